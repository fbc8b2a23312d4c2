"""Tests of `pipeline.models`: loading checkpoints, pretraining gfattn's small BERT, the embedded model."""
