"""The `gfattn pipeline` driver: preflight, the run's context, its stages and caches, resume."""
