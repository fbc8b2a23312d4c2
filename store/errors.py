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


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main thread by `Store.track` when the process receives SIGTERM.

    It is a `KeyboardInterrupt` so that code which already treats Ctrl-C as "stop now" treats a
    polite kill the same way; `signum` says which signal it was.
    """

    def __init__(self, signum: int):
        super().__init__(f"received signal {signum}")
        self.signum = signum
