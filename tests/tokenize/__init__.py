"""Tests of `pipeline.tokenize`: the rank-value encoding, tokenized datasets, `gfattn tokenize`."""
