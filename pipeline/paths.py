"""Where gfattn finds things: the store, the cache, and the shared Geneformer dictionaries."""

from __future__ import annotations

import os
from pathlib import Path

STORE_ENV = "GFATTN_STORE"
SHARED_ENV = "GFATTN_SHARED"
DEFAULT_STORE_NAME = "gfattn.db"


def default_store_path() -> Path:
    """`$GFATTN_STORE` if set, else `gfattn.db` in the current directory."""
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else Path.cwd() / DEFAULT_STORE_NAME


def resolve_store_path(arg: str | os.PathLike | None) -> Path:
    return Path(arg).expanduser() if arg else default_store_path()


def cache_dir_for_store(store_path: str | os.PathLike) -> Path:
    """Caches (tokenized data, the embedded default's model) live next to the store they serve."""
    store_path = Path(store_path).resolve()
    return store_path.parent / ".gfattn-cache"


def shared_dir() -> Path | None:
    """The shared reference folder (`$GFATTN_SHARED`), or None when not configured or missing."""
    env = os.environ.get(SHARED_ENV)
    if not env:
        return None
    p = Path(env).expanduser()
    return p if p.is_dir() else None
