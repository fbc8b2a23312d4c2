"""Errors raised by the experiment store.

Every message is one line that names the store path, run or column at fault and what to do about it, so
the `gfattn` commands can print it unchanged (they turn any `StoreError` into exit status 2).
"""

from __future__ import annotations


class StoreError(Exception):
    """A store problem the user can act on (bad run reference, bad name, unusable store file)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class SchemaTooNewError(StoreError):
    """The store was written by a newer gfattn (its schema version is higher than this one knows)."""


class NetworkFilesystemError(StoreError):
    """The store path is on a network filesystem, where SQLite's WAL mode is unsafe."""


class RunNotFoundError(StoreError, LookupError):
    """No run with that id or name."""


class StoreFullError(StoreError):
    """The disk (or quota, or file-size limit) ran out while writing the store; the transaction was rolled
    back, so the store holds everything up to the last complete write."""

    def __init__(self, path, reason: str = "database or disk is full"):
        self.path = path
        super().__init__(
            f"out of disk space writing {path} ({reason}); free space there "
            "(or move the store and its .gfattn-cache) and resume the run"
        )


class StoreDamagedError(StoreError):
    """SQLite found the store file damaged (malformed pages, not a database)."""

    def __init__(self, path, reason: str):
        self.path = path
        super().__init__(
            f"store {path} is damaged ({reason}); `gfattn runs` may still list what is intact; "
            f"restore it from a copy, or recover it with `sqlite3 {path} .recover`"
        )


def is_store_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL (or an I/O error on a full disk) as raised by the sqlite3 module."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc).lower()
    return code == 13 or "database or disk is full" in text or "no space left" in text


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main thread by `Store.track` when the process receives SIGTERM.

    It is a `KeyboardInterrupt` so that code which already treats Ctrl-C as "stop now" treats a
    polite kill the same way; `signum` says which signal it was.
    """

    def __init__(self, signum: int):
        super().__init__(f"received signal {signum}")
        self.signum = signum
