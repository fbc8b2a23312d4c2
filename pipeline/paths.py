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


def open_store(arg: str | os.PathLike | None = None, **options):
    """The store named by `--store` (or the default, `default_store_path`), as a `store.Store`: the one way
    gfattn opens its store (`options`: `Store`'s `create`, `readonly`). A `StoreError` says what is wrong
    in one line (`pipeline.cli` prints it; the reading commands turn it into an `InputError`)."""
    from store import Store

    return Store(resolve_store_path(arg), **options)


STORE_HELP = "experiment store (default: $GFATTN_STORE or ./gfattn.db)"


def add_store_argument(parser) -> None:
    """`--store PATH`, declared once for every command that reads or writes the store."""
    parser.add_argument("--store", metavar="PATH", default=None, help=STORE_HELP)


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
