"""gfattn's tests, one package per package of the code (analysis, data, models, parallel, run, store,
tokenize, training, tui); the tests of `pipeline`'s top-level modules and of the layering sit here, beside the
shared fixtures (conftest.py) and helpers (`_helpers_*.py`). Test modules import helpers and each other
absolutely (`from tests._helpers_cli import cli`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The repository root: the working directory of commands run as a user would, and the PYTHONPATH of
the subprocesses that import gfattn from this checkout."""
