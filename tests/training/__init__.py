"""Tests of `pipeline.training`: fine-tuning modes, data-parallel fine-tuning, the baseline."""
