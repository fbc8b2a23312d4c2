"""Tests of `pipeline.analysis`: the attention engine, statistics, attribution, deletion, key genes, the cascade."""
