"""gfattn's experiment store: a SQLite file (WAL, versioned schema) holding every run and result.

docs/architecture.md, "The store". `from store import Store, StoreError, SchemaTooNewError`; see `store.core.Store`
for the API. This package never imports torch, transformers or textual.
"""

from store.core import FINISH_STATUSES, RUN_STATUSES, STAGE_STATUSES, Store
from store.errors import (
    NetworkFilesystemError,
    RunInterrupted,
    RunNotFoundError,
    SchemaTooNewError,
    StoreDamagedError,
    StoreError,
    StoreFullError,
)
from store.schema import SCHEMA_VERSION

__all__ = [
    "Store",
    "StoreError",
    "SchemaTooNewError",
    "NetworkFilesystemError",
    "RunNotFoundError",
    "StoreFullError",
    "StoreDamagedError",
    "RunInterrupted",
    "RUN_STATUSES",
    "FINISH_STATUSES",
    "STAGE_STATUSES",
    "SCHEMA_VERSION",
]
