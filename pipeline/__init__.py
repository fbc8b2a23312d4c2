"""gfattn's headless core: data, tokenization, models, training, attention analysis and the `gfattn` CLI.

Nothing here imports textual; heavy libraries (torch, transformers, scanpy) are imported inside the
functions that need them so that `gfattn --help` starts instantly.
"""

__version__ = "0.1.0"
