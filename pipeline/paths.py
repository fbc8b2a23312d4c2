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


_UNSAFE_IN_FILE_NAMES = set('/\\%:*?"<>|')


def file_name(text: str, limit: int = 120) -> str:
    """A name from the user's data (a task, a class) as one file or folder name: the text itself where a
    file system takes it (non-ASCII and spaces included), `%XX` for each UTF-8 byte of a character it
    refuses or reads specially (`/`, `\\`, `%`, `:`, wildcards, control characters, a leading dot or
    space), so the mapping is reversible (`urllib.parse.unquote`). A name longer than `limit` bytes is cut
    and ends with `~` and a digest of the whole text, so distinct names stay distinct."""
    import hashlib

    text = str(text)
    out = "".join(
        "".join(f"%{b:02X}" for b in c.encode("utf-8"))
        if c in _UNSAFE_IN_FILE_NAMES or ord(c) < 0x20 or c == "\x7f" or (i == 0 and c in ". ")
        else c
        for i, c in enumerate(text)
    )
    if not out:
        return "%00"
    if len(out.encode("utf-8")) > limit:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        head = out.encode("utf-8")[: limit - 17].decode("utf-8", "ignore")
        out = f"{head}~{digest}"
    return out


CHECKPOINT_JSON = "checkpoint"  # a finetune run's JSON result {"path", "weights_sha256"} (pipeline.run.driver)


def run_folders(store, run_id: int) -> list[Path]:
    """The folders under the store's cache that belong to `run_id` and its descendants, for deleting them
    with the run (`gfattn rm`, the TUI): a pipeline run's `.gfattn-cache/runs/<store uid>/<run>/`, and a
    fine-tuning run's recorded checkpoint folder, only where it lies inside that tree (nothing outside
    the cache is ever removed)."""
    root = (cache_dir_for_store(store.path) / "runs" / store.uid).resolve()
    out: list[Path] = []
    for rid in [run_id, *store.descendants(run_id)]:
        candidates = [root / str(rid)]
        if CHECKPOINT_JSON in store.json_names(rid):
            path = (store.get_json(rid, CHECKPOINT_JSON) or {}).get("path")
            candidates += [Path(path).resolve()] if path else []
        for c in candidates:
            if c.is_dir() and c != root and root in c.parents and not any(c == o or o in c.parents for o in out):
                out.append(c)
    return out
