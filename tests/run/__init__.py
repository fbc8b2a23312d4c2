"""Tests of `pipeline.run` and the CLI: `gfattn pipeline` end to end, its errors, preflight, gates, the plan, resume and reproducibility."""
