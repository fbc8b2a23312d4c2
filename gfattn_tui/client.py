"""The TUI's one door to the experiment store.

Every store call runs on a single dedicated thread that owns the `store.Store` (SQLite connections belong
to the thread that opened them, and `PRAGMA data_version` is only meaningful on one connection). Thread
workers block on `call()`; the app's change poll awaits `acall()` without blocking the event loop.
Readers never see "database is locked": the store reads in WAL mode, and a busy or locked answer while a
pipeline checkpoints is retried with backoff here before it can reach the screen.

The store is opened with `readonly="auto"` by default: writable where the file and its folder can be
written, read-only otherwise (a shared result store), so browsing never needs write access.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


class StoreClient:
    """Runs functions of a `Store` on the store thread, opening the store on first use."""

    def __init__(self, path: str | Path, *, opener: Callable[[Path], Any] | None = None, readonly: bool | str = "auto"):
        self.path = Path(path)
        self._opener = opener
        self._readonly = readonly
        self._store: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gfattn-store")
        self._closed = False
        self._lock = threading.Lock()

    def _open(self) -> Any:
        if self._store is None:
            if self._opener is not None:
                self._store = self._opener(self.path)
            else:
                from store import Store

                self._store = Store(self.path, readonly=self._readonly)
        return self._store

    @property
    def opened(self) -> bool:
        return self._store is not None

    @property
    def readonly(self) -> bool:
        """Whether the open store is read-only (False before the first call opened it)."""
        return bool(getattr(self._store, "readonly", False))

    @property
    def readonly_reason(self) -> str | None:
        return getattr(self._store, "readonly_reason", None)

    def _run(self, fn: Callable[[Any], T]) -> T:
        for delay in (*RETRY_DELAYS_S, None):
            try:
                return fn(self._open())
            except sqlite3.OperationalError as exc:
                if delay is None or not _is_busy(exc):
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(self, fn: Callable[[Any], T]) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("the store connection is closed")
            return self._executor.submit(self._run, fn)

    def call(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(store)` on the store thread and wait (for thread workers)."""
        return self.submit(fn).result()

    async def acall(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(store)` on the store thread without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True

        def _close() -> None:
            if self._store is not None:
                try:
                    self._store.close()
                finally:
                    self._store = None

        self._executor.submit(_close)
        self._executor.shutdown(wait=True)
