"""Tests of `pipeline.parallel`: torchrun launch and the job channel between a run and its worker processes."""
