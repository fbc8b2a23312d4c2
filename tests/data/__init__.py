"""Tests of `pipeline.data`: counts, the design's inputs, gene dictionaries, the synthetic generator, fixed length, `gfattn inspect`."""
