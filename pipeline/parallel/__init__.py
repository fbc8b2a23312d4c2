"""Several processes: torchrun launch and the process-group primitives."""
