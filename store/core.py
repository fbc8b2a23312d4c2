"""The experiment store: one SQLite file that every gfattn run writes to and every view reads from.

Implements docs/architecture.md, "The store": WAL mode with a busy timeout, a versioned schema (`store.schema`),
one transaction per write call, reads in short snapshot transactions that are closed before the call
returns, `PRAGMA data_version` as the change detector for live views, and run liveness: a `running`
run reads as `lost` once its process is provably gone (this host) or its heartbeat is very old (others).
Stores can also be opened read-only (a shared, finished result store in a folder one cannot write).

Only the pipeline's rank-0 process writes results; the TUI and the `gfattn runs/show/export/tag/note/rm`
commands read and make small edits. SQL is parameterised everywhere; the few identifiers that are
spliced into SQL (result column names of gene and cell tables) are validated first and double-quoted.

One module on purpose: it is the only code that writes SQL; its transactions, schema checks and read-only
handling must stay in one place.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from store import schema, system
from store.errors import (
    RunNotFoundError,
    SchemaTooNewError,
    StoreDamagedError,
    StoreError,
    StoreFullError,
    is_store_full,
)
from store.jsonsafe import dumps

RUN_STATUSES = ("running", "completed", "failed", "interrupted", "lost")
FINISH_STATUSES = ("completed", "failed", "interrupted")
STAGE_STATUSES = ("pending", "running", "completed", "failed", "skipped")
EVENT_LEVELS = ("debug", "info", "warning", "error")

STALE_AFTER_ENV = "GFATTN_STALE_AFTER_S"
DEFAULT_STALE_AFTER_S = 30.0
# A run on another host cannot have its pid checked; only a much older heartbeat makes it `lost` there.
# (A run on this host is `lost` as soon as its pid is gone or belongs to another process.)
REMOTE_STALE_FACTOR = 20.0
REMOTE_STALE_MIN_S = 600.0

MAX_COLUMN_NAME = 1000  # characters of a result column's name (a user's task or class name may be in it)
_GENE_RESERVED = {"run_id", "gtable", "rowid", "oid", "_rowid_"}
_CELL_RESERVED = {"run_id", "rowid", "oid", "_rowid_"}
_WHERE_OPS = {
    "=": "=",
    "==": "=",
    "!=": "!=",
    "<>": "!=",
    "<": "<",
    "<=": "<=",
    ">": ">",
    ">=": ">=",
    "like": "LIKE",
    "in": "IN",
    "is": "IS",
    "is not": "IS NOT",
}

_versions_cache: dict[str, str | None] | None = None
_commit_cache: list[str | None] = []


def _package_versions() -> dict[str, str | None]:
    global _versions_cache
    if _versions_cache is None:
        _versions_cache = system.package_versions()
    return dict(_versions_cache)


def _git_commit() -> str | None:
    if not _commit_cache:
        _commit_cache.append(system.git_commit())
    return _commit_cache[0]


def to_json(obj: Any) -> str:
    """Strict JSON (NaN and infinities as null) of a config, meta or result; see `store.jsonsafe`."""
    return dumps(obj, ensure_ascii=False)


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def _scalar(v: Any) -> Any:
    """A value SQLite can bind: numpy scalars unwrapped, NaN/NA as NULL, bools as 0/1."""
    t = type(v)
    if t is str or t is int or v is None:
        return v
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (int, str, bytes)):
        return v
    try:  # pandas.NA / NaT
        import pandas as pd

        if v is pd.NA or v is pd.NaT:
            return None
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def check_identifier(name: str, what: str) -> str:
    """A result column's name: any text (a user's task or class names: non-ASCII, spaces, punctuation), kept
    exactly as given; `_quote` makes it a safe SQL identifier. Only NUL, surrounding spaces, emptiness and
    absurd lengths are refused."""
    if (
        not isinstance(name, str)
        or not name.strip()
        or name != name.strip()
        or "\x00" in name
        or len(name) > MAX_COLUMN_NAME
    ):
        raise StoreError(
            f"{what} name {name!r} is not a valid column name; use non-empty text without surrounding spaces "
            f"(at most {MAX_COLUMN_NAME} characters)"
        )
    return name


def _quote(identifier: str) -> str:
    """An SQL identifier of any text: double-quoted, inner quotes doubled (SQLite's quoting rule)."""
    return '"' + identifier.replace('"', '""') + '"'


def _no_room(path: Path) -> bool:
    """Whether a failed write to the store at `path` met a full disk or the file-size limit (SQLite reports
    a write past RLIMIT_FSIZE, EFBIG, as a plain I/O error)."""
    import shutil

    try:
        if shutil.disk_usage(path.parent).free < (1 << 20):
            return True
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit == resource.RLIM_INFINITY:
            return False
        sizes = [p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()]
        return any(size + (1 << 16) >= limit for size in sizes)
    except (ImportError, OSError, ValueError):
        return False


def _fold(name: str) -> str:
    """A column name as SQLite compares identifiers: case-insensitive for ASCII letters only."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _check_text(value: Any, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise StoreError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _records(rows: Any) -> list[dict]:
    """Rows given as a pandas DataFrame or an iterable of mappings, as a list of dicts."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return rows.to_dict(orient="records")
    return [dict(r) for r in rows]


def _columns_of(rows: Any) -> tuple[dict[str, Any], int]:
    """Column name -> values (a pandas Series or a list) and the row count, from a DataFrame or an
    iterable of mappings (a key missing from some rows reads as None there)."""
    if hasattr(rows, "columns") and hasattr(rows, "to_dict"):
        if rows.columns.has_duplicates:
            raise StoreError(
                f"table has duplicate column names: {sorted(set(rows.columns[rows.columns.duplicated()]))}"
            )
        for name in rows.columns:
            if not isinstance(name, str):
                raise StoreError(f"column name {name!r} is not a string")
        return {name: rows[name] for name in rows.columns}, len(rows)
    records = [dict(r) for r in rows]
    names = dict.fromkeys(k for r in records for k in r)
    return {n: [r.get(n) for r in records] for n in names}, len(records)


def _typed_values(values: Any) -> tuple[str, list]:
    """('integer' | 'real' | 'text', values as Python numbers/strings with None for missing)."""
    dtype = getattr(values, "dtype", None)
    kind_code = getattr(dtype, "kind", None)
    if kind_code in ("b", "i", "u"):
        return "integer", [int(x) for x in values.tolist()]
    if kind_code == "f":
        return "real", [x if math.isfinite(x) else None for x in values.tolist()]
    raw = values.tolist() if hasattr(values, "tolist") else list(values)
    out = [_scalar(v) for v in raw]
    kind, seen = "integer", False
    for v in out:
        if v is None:
            continue
        seen = True
        if isinstance(v, int):
            continue
        if isinstance(v, float):
            kind = "real"
            continue
        kind = "text"
        break
    if not seen:
        return "real", out
    if kind == "text":
        return kind, [v if v is None or isinstance(v, str) else str(v) for v in out]
    if kind == "real":
        return kind, [None if v is None else float(v) for v in out]
    return kind, out


class Store:
    """An open gfattn experiment store (see the module docstring and docs/architecture.md, "The store").

    `Store(path)` opens or creates the SQLite file at `path`, applies pending migrations and returns a
    handle that is safe to share between threads (calls are serialised on one connection). Keyword
    options:

    - `create=False` refuses a path where no store exists yet. The folder must exist either way unless
      `create_parents=True` (so a mistyped `--store` is an error, not a new empty store).
    - `readonly=True` opens with SQLite's `mode=ro`, falling back to `immutable=1` where the `-wal` and
      `-shm` files cannot be created (folder not writable, read-only mount; refused when a non-empty
      `-wal` holds changes that would then be invisible). Such a handle never migrates, never records
      `lost` runs and never writes: every write method raises `StoreError`. A store of an older schema
      is read as it is (no stages before schema 2, no `uid` before 3). `readonly="auto"` opens
      writable when the file and folder can be written and read-only otherwise. `readonly` and
      `readonly_reason` (why it could not be written, or None) tell which one was opened;
      `immutable` whether SQLite was told the file cannot change while open.
    - `stale_after_s`: a `running` run on another host reads as `lost` once its heartbeat is older than
      max(20 x this, 600 s) (default $GFATTN_STALE_AFTER_S or 30 s); on this host it reads `lost` as
      soon as its process is gone, whatever the heartbeat.
    - `busy_timeout_s`: how long a write waits for another writer.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        create: bool = True,
        create_parents: bool = False,
        readonly: bool | str = False,
        stale_after_s: float | None = None,
        busy_timeout_s: float = 30.0,
        check_filesystem: bool = True,
    ):
        self.path = Path(path).expanduser()
        if readonly not in (True, False, "auto"):
            raise ValueError(f"readonly must be True, False or 'auto', got {readonly!r}")
        if stale_after_s is None:
            env = os.environ.get(STALE_AFTER_ENV)
            try:
                stale_after_s = float(env) if env else DEFAULT_STALE_AFTER_S
            except ValueError:
                raise StoreError(f"{STALE_AFTER_ENV}={env!r} is not a number of seconds") from None
        self.stale_after_s = float(stale_after_s)
        self._lock = threading.RLock()
        self._txn: str | None = None  # the kind of transaction this handle has open
        self._own_commits = 0
        self._last_reap = 0.0
        self._reap_disabled = False
        self._host = system.hostname()
        self._closed = True
        self._db = None
        self.readonly = False
        self.readonly_reason: str | None = None
        self.immutable = False
        # features an older schema lacks, read around by a read-only handle (which never migrates)
        self._gaps: frozenset[str] = frozenset()
        self._busy_timeout_s = float(busy_timeout_s)

        if self.path.is_dir():
            raise StoreError(
                f"store path {self.path} is a directory; pass a file path such as {self.path / 'gfattn.db'}"
            )
        exists = self.path.exists()
        if not exists:
            self._check_folder(make=create_parents and create and readonly is not True)
            if not create or readonly is True:
                raise StoreError(
                    f"no gfattn store at {self.path}; pass --store PATH (or set GFATTN_STORE) to an existing store, "
                    f"or create one by running `gfattn pipeline`"
                )
        if check_filesystem:
            system.check_local_filesystem(self.path)
        blocker = system.write_blocker(self.path)
        if readonly is True or (readonly == "auto" and blocker and exists):
            self.readonly, self.readonly_reason = True, blocker
        elif blocker and not exists:
            raise StoreError(
                f"cannot create store {self.path}: {blocker}; pass --store a path in a folder you can write"
            )
        elif blocker:
            raise StoreError(
                f"store {self.path} cannot be written: {blocker}; it can still be read (gfattn runs/show/export, "
                f"gfattn-tui), or copy it to a folder you can write to change it"
            )
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        self._conn = conn
        self._closed = False
        try:
            if self.readonly:
                self._probe_readonly()
            conn = self._conn
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._open_schema()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(f"{self.path} is not a usable gfattn store ({exc})") from None
        except BaseException:
            self.close()
            raise

    def _check_folder(self, *, make: bool) -> None:
        folder = self.path.parent
        if folder.is_dir():
            return
        if folder.exists():
            raise StoreError(f"{folder}, the folder of store {self.path}, is not a folder; fix --store")
        if not make:
            raise StoreError(f"folder {folder} of store {self.path} does not exist; create it or fix --store")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of store {self.path}: {exc.strerror or exc}") from None

    def _connect(self, *, immutable: bool = False) -> sqlite3.Connection:
        options = dict(timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        if not self.readonly:
            return sqlite3.connect(str(self.path), **options)
        uri = (
            "file:"
            + urllib.parse.quote(os.path.abspath(self.path))
            + "?mode=ro"
            + ("&immutable=1" if immutable else "")
        )
        return sqlite3.connect(uri, uri=True, **options)

    def _probe_readonly(self) -> None:
        """Read the schema once; where `mode=ro` cannot set up WAL's shared memory, reopen immutable."""
        try:
            self._conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return
        except sqlite3.OperationalError:
            reason = self.readonly_reason or system.write_blocker(self.path)
            if reason is None:
                raise
        wal = Path(f"{self.path}-wal")
        try:
            pending = wal.stat().st_size > 0
        except OSError:
            pending = False
        if pending:
            raise StoreError(
                f"store {self.path} has changes in {wal.name} not yet merged into the file, which cannot be read "
                f"because {reason}; open it once with write access (any gfattn command merges them) or copy the "
                f"folder with both files somewhere writable"
            )
        self._conn.close()
        self._conn = self._connect(immutable=True)
        self.immutable, self.readonly_reason = True, reason
        self._conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()

    # ------------------------------------------------------------------ connection and transactions
    def _open_schema(self) -> None:
        conn = self._conn
        version = schema.user_version(conn)  # also fails fast on a file that is not SQLite
        if version > schema.SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"store {self.path} has schema version {version} but this gfattn knows versions up to "
                f"{schema.SCHEMA_VERSION}; it was written by a newer gfattn: upgrade gfattn to read it "
                f"(or use another --store)"
            )
        if version == 0:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            foreign = tables - schema.KNOWN_TABLES
            if foreign:
                raise StoreError(
                    f"{self.path} is an SQLite database but not a gfattn store (it has tables "
                    f"{', '.join(sorted(foreign)[:5])}); pass --store a new or existing gfattn store path"
                )
            if self.readonly:
                raise StoreError(
                    f"{self.path} holds no gfattn store yet (an empty SQLite file) and is opened read-only; "
                    f"pass --store an existing store"
                )
        if self.readonly:
            conn.execute("PRAGMA query_only = ON")
            if version < schema.SCHEMA_VERSION:
                self._gaps = self._schema_gaps(conn)
            return
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"store {self.path}: cannot switch to WAL journal mode (got {mode})")
        # NORMAL is crash-safe in WAL mode: a killed process never corrupts the file or splits a commit
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        if version < schema.SCHEMA_VERSION:
            schema.migrate(self.db)

    @staticmethod
    def _schema_gaps(conn: sqlite3.Connection) -> frozenset[str]:
        """What an older schema lacks that the reads use: `stages` (2), `pid_start` (2), `store_meta` (3)."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        run_columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        gaps = {t for t in ("stages", "store_meta") if t not in tables}
        if "pid_start" not in run_columns:
            gaps.add("pid_start")
        return frozenset(gaps)

    def _refuse_write(self) -> None:
        why = f" ({self.readonly_reason})" if self.readonly_reason else ""
        raise StoreError(
            f"store {self.path} is open read-only{why}; runs, tags, notes and deletions need a writable store "
            f"(copy it to a folder you can write to)"
        )

    @property
    def db(self):
        """The connection as a `sqlite_utils.Database` (for schema work and ad-hoc inspection).

        Created on first use: importing sqlite-utils also imports pandas, which the commands that only
        list or tag runs do not need.
        """
        self._check_open()
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self._conn, recursive_triggers=False, execute_plugins=False)
        return self._db

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction for the whole call (nested calls join the outer one)."""
        with self._lock:
            self._check_open()
            if self.readonly:
                self._refuse_write()
            conn = self._conn
            if self._txn == "write":
                yield conn
                return
            if self._txn == "read":
                raise RuntimeError("a store write cannot run inside a read")
            self._txn = "write"
            try:
                if conn.in_transaction:  # left open by an interrupted call: never build on it
                    conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
                self._own_commits += 1
            except sqlite3.IntegrityError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "FOREIGN KEY" in str(exc):
                    raise RunNotFoundError(f"no such run in store {self.path} (it may have been deleted)") from None
                raise
            except sqlite3.DatabaseError as exc:
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                if is_store_full(exc):
                    raise StoreFullError(self.path) from None
                if "disk i/o error" in str(exc).lower() and _no_room(self.path):
                    raise StoreFullError(self.path, f"{exc}; no room left there") from None
                if type(exc) is not sqlite3.DatabaseError:  # busy, a bug in a statement, ...: as it is
                    raise
                raise StoreDamagedError(self.path, str(exc)) from None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._txn = None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A snapshot for the duration of one call, closed before the call returns."""
        with self._lock:
            self._check_open()
            conn = self._conn
            if self._txn is not None:
                yield conn
                return
            self._txn = "read"
            try:
                if conn.in_transaction:  # left open by an interrupted call: never read a stale snapshot
                    conn.execute("ROLLBACK")
                conn.execute("BEGIN")
                yield conn
            finally:
                self._txn = None
                if conn.in_transaction:
                    conn.execute("COMMIT")

    @staticmethod
    def _rows(conn: sqlite3.Connection, sql: str, params: Sequence | Mapping = ()) -> list[dict]:
        cur = conn.execute(sql, params)
        keys = [d[0] for d in cur.description]
        return [dict(zip(keys, row)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    @property
    def uid(self) -> str:
        """This store's random identity (created with the store; a copied file keeps it)."""
        if "store_meta" in self._gaps:
            raise StoreError(
                f"store {self.path} has schema version {self.schema_version}, older than store identities; "
                f"open it once with write access to upgrade it"
            )
        with self._read() as conn:
            row = conn.execute("SELECT value FROM store_meta WHERE key = 'uid'").fetchone()
        return str(row[0])

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return schema.user_version(conn)

    def migrations(self) -> list[dict]:
        """The migrations applied to this store: id, name, applied (time)."""
        with self._read() as conn:
            return self._rows(conn, "SELECT id, name, applied FROM migrations ORDER BY id")

    def data_version(self) -> int:
        """A number that changes whenever the store's content changed (any connection, this one included).

        Cheap enough to poll a few times a second: one `PRAGMA data_version` (which moves when another
        connection commits) plus this handle's own commit count. Every few seconds a writable handle also
        records runs that have become `lost`, so a live view polling only this number notices a crashed
        run (a read-only one cannot; its reads still resolve `lost`).
        """
        with self._lock:
            self._check_open()
            now = time.monotonic()
            if (
                not self.readonly
                and not self._reap_disabled
                and now - self._last_reap >= min(2.0, max(self.stale_after_s / 2, 0.05))
            ):
                self._last_reap = now
                try:
                    self.reap_lost()
                except sqlite3.OperationalError:
                    self._reap_disabled = True  # a read-only store: reads still resolve `lost`
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0]) + self._own_commits

    # ------------------------------------------------------------------ run liveness
    def _is_lost(self, row: Mapping[str, Any], now: float | None = None) -> bool:
        """A `running` run is lost when, on this host, its pid is gone, a zombie or another process
        (different start time), at once; on another host, when its heartbeat is older than
        max(REMOTE_STALE_FACTOR x stale_after_s, REMOTE_STALE_MIN_S)."""
        if row.get("status") != "running":
            return False
        if row.get("host") == self._host:
            return not system.process_alive(row.get("pid"), row.get("pid_start"))
        now = time.time() if now is None else now
        beat = row.get("heartbeat") or row.get("created") or 0.0
        return now - beat > max(REMOTE_STALE_FACTOR * self.stale_after_s, REMOTE_STALE_MIN_S)

    def _resolve_status(self, row: dict, now: float | None = None) -> dict:
        if self._is_lost(row, now):
            row["status"] = "lost"
        return row

    def reap_lost(self) -> list[int]:
        """Record `lost` in the store for running runs that read as lost (see `_is_lost`).

        Reads already report such runs as `lost`; writing it down makes the change visible to
        `data_version()` pollers and to tools that read the table directly. Returns the run ids marked.
        A read-only handle refuses (StoreError).
        """
        if self.readonly:
            self._refuse_write()
        with self._read() as conn:
            running = self._rows(
                conn, "SELECT id, status, created, heartbeat, host, pid, pid_start FROM runs WHERE status = 'running'"
            )
        now = time.time()
        lost = [r for r in running if self._is_lost(r, now)]
        if not lost:
            return []
        with self._write() as conn:
            for r in lost:
                # guarded by the heartbeat we judged, so a run that just beat again is left alone
                conn.execute(
                    "UPDATE runs SET status = 'lost' WHERE id = ? AND status = 'running' AND heartbeat IS ?",
                    (r["id"], r["heartbeat"]),
                )
        return [r["id"] for r in lost]

    # ------------------------------------------------------------------ lifecycle
    def create_run(
        self,
        name: str,
        kind: str,
        config: dict | None = None,
        parent_id: int | None = None,
        *,
        data_path: str | os.PathLike | None = None,
        data_hash: str | None = None,
        model_path: str | os.PathLike | None = None,
        model_hash: str | None = None,
        device: str | None = None,
        tags: Iterable[str] = (),
    ) -> int:
        """Create a run in status `running`, recording versions, git commit, host, pid and a heartbeat."""
        _check_text(name, "run name")
        _check_text(kind, "run kind")
        tags = [_check_text(t, "tag") for t in tags]
        now = time.time()
        pid = os.getpid()
        values = (
            name,
            kind,
            "running",
            now,
            None if parent_id is None else int(parent_id),
            to_json(config if config is not None else {}),
            None if data_path is None else os.fspath(data_path),
            data_hash,
            None if model_path is None else os.fspath(model_path),
            model_hash,
            to_json(_package_versions()),
            _git_commit(),
            self._host,
            pid,
            system.process_start_ticks(pid),
            now,
            device,
        )
        with self._write() as conn:
            if parent_id is not None:
                self._require_run(conn, int(parent_id))
            cur = conn.execute(
                """INSERT INTO runs (name, kind, status, created, parent_id, config, data_path, data_hash,
                   model_path, model_hash, versions, git_commit, host, pid, pid_start, heartbeat, device)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                values,
            )
            run_id = int(cur.lastrowid)
            conn.executemany("INSERT OR IGNORE INTO tags (run_id, tag) VALUES (?, ?)", [(run_id, t) for t in tags])
        return run_id

    def _require_run(self, conn: sqlite3.Connection, run_id: int) -> None:
        if not isinstance(run_id, (int, np.integer)) or isinstance(run_id, bool):
            raise StoreError(f"run id must be an integer, got {run_id!r}")
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (int(run_id),)).fetchone() is None:
            raise RunNotFoundError(f"no run with id {run_id} in store {self.path}; see `gfattn runs`")

    def heartbeat(self, run_id: int) -> None:
        with self._write() as conn:
            cur = conn.execute(
                """UPDATE runs SET heartbeat = ?, status = CASE WHEN status = 'lost' THEN 'running' ELSE status END
                   WHERE id = ?""",
                (time.time(), int(run_id)),
            )
            if cur.rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in store {self.path}")

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """End a run: `completed`, `failed` or `interrupted` (with an optional error message)."""
        if status not in FINISH_STATUSES:
            raise StoreError(f"finish status must be one of {', '.join(FINISH_STATUSES)}, got {status!r}")
        now = time.time()
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "UPDATE runs SET status = ?, finished = ?, heartbeat = ?, error = ? WHERE id = ?",
                (status, now, now, error, int(run_id)),
            )
            # a stage still marked running cannot outlive its run
            conn.execute(
                "UPDATE stages SET status = ?, finished = ? WHERE run_id = ? AND status = 'running'",
                ("completed" if status == "completed" else "failed", now, int(run_id)),
            )

    def reopen_run(self, run_id: int) -> None:
        """Mark a finished, failed, interrupted or lost run `running` again, owned by this process.

        For resuming: the host, pid and heartbeat become this process's; the end time and error are
        cleared. Refused while the run is still running in another live process.
        """
        run = self.get_run(run_id)
        if run["status"] == "running" and not (run["host"] == self._host and run["pid"] == os.getpid()):
            raise StoreError(
                f"run {run_id} is still running (pid {run['pid']} on {run['host']}); stop it first or wait "
                f"until it reads as lost"
            )
        now, pid = time.time(), os.getpid()
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                """UPDATE runs SET status = 'running', finished = NULL, error = NULL, host = ?, pid = ?,
                   pid_start = ?, heartbeat = ? WHERE id = ?""",
                (self._host, pid, system.process_start_ticks(pid), now, int(run_id)),
            )

    def track(self, run_id: int, heartbeat_s: float = 2.0):
        """Context manager that keeps the run's heartbeat and records how the block ended.

        A background thread beats every `heartbeat_s` seconds. On leaving the block the run becomes
        `completed`; an exception makes it `failed` with the message (re-raised); Ctrl-C or SIGTERM
        makes it `interrupted` (re-raised; SIGTERM arrives as `store.RunInterrupted`, a
        KeyboardInterrupt). The SIGTERM handler is installed only when called from the main thread and
        the previous handler is restored afterwards.
        """
        from store.tracking import track

        return track(self, run_id, heartbeat_s=heartbeat_s)

    def set_progress(
        self,
        run_id: int,
        stage: str,
        done: float,
        total: float | None = None,
        *,
        unit: str = "",
        throughput: float | None = None,
        eta_s: float | None = None,
    ) -> None:
        """Current progress of a run (also counts as a heartbeat)."""
        now = time.time()
        with self._write() as conn:
            conn.execute(
                """INSERT INTO progress (run_id, stage, done, total, unit, throughput, eta_s, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (run_id) DO UPDATE SET stage = excluded.stage, done = excluded.done,
                   total = excluded.total, unit = excluded.unit, throughput = excluded.throughput,
                   eta_s = excluded.eta_s, updated = excluded.updated""",
                (
                    int(run_id),
                    stage,
                    _finite_or_none(done),
                    _finite_or_none(total),
                    unit or "",
                    _finite_or_none(throughput),
                    _finite_or_none(eta_s),
                    now,
                ),
            )
            conn.execute("UPDATE runs SET heartbeat = ? WHERE id = ? AND status = 'running'", (now, int(run_id)))

    def log_event(self, run_id: int, message: str, *, stage: str | None = None, level: str = "info") -> int:
        if level not in EVENT_LEVELS:
            raise StoreError(f"event level must be one of {', '.join(EVENT_LEVELS)}, got {level!r}")
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO events (run_id, time, stage, level, message) VALUES (?, ?, ?, ?, ?)",
                (int(run_id), time.time(), stage, level, str(message)),
            )
            return int(cur.lastrowid)

    def set_stage(self, run_id: int, stage: str, status: str) -> None:
        """Add or update one entry of the run's stage list (kept in the order stages first appear)."""
        _check_text(stage, "stage")
        if status not in STAGE_STATUSES:
            raise StoreError(f"stage status must be one of {', '.join(STAGE_STATUSES)}, got {status!r}")
        now = time.time()
        started = now if status == "running" else None
        finished = now if status in ("completed", "failed", "skipped") else None
        with self._write() as conn:
            self._require_run(conn, run_id)
            pos = conn.execute(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM stages WHERE run_id = ?", (int(run_id),)
            ).fetchone()[0]
            conn.execute(
                """INSERT INTO stages (run_id, stage, status, position, started, finished) VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (run_id, stage) DO UPDATE SET status = excluded.status,
                   started = COALESCE(stages.started, excluded.started),
                   finished = CASE WHEN excluded.status IN ('pending', 'running') THEN NULL
                                   ELSE excluded.finished END""",
                (int(run_id), stage, status, pos, started, finished),
            )

    def stages(self, run_id: int) -> list[dict]:
        if "stages" in self._gaps:
            return []
        with self._read() as conn:
            return self._rows(
                conn,
                "SELECT stage, status, started, finished FROM stages WHERE run_id = ? ORDER BY position",
                (int(run_id),),
            )

    # ------------------------------------------------------------------ results
    def log_metrics(self, run_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append metric rows dict(name, value, step=None, epoch=None, split=None) in one transaction.

        Non-finite values are stored as NULL. Returns the number of rows written.
        """
        now = time.time()
        batch = []
        for r in _records(rows):
            name = _check_text(r.get("name"), "metric name")
            step, epoch, split = r.get("step"), r.get("epoch"), r.get("split")
            try:
                value = _finite_or_none(_scalar(r.get("value")))
                step = None if step is None else int(step)
                epoch = None if epoch is None else float(epoch)
            except (TypeError, ValueError):
                raise StoreError(
                    f"metric {name!r}: value {r.get('value')!r}, step {step!r} and epoch {epoch!r} must be numbers"
                ) from None
            batch.append((int(run_id), name, value, step, epoch, None if split is None else str(split), now))
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.executemany(
                "INSERT INTO metrics (run_id, name, value, step, epoch, split, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
        return len(batch)

    def log_metric(
        self,
        run_id: int,
        name: str,
        value: float,
        *,
        step: int | None = None,
        epoch: float | None = None,
        split: str | None = None,
    ) -> None:
        self.log_metrics(run_id, [dict(name=name, value=value, step=step, epoch=epoch, split=split)])

    def put_confusion(self, run_id: int, labels: Sequence[str], matrix: Any, *, split: str = "test") -> None:
        """A confusion matrix (rows = true label, columns = predicted) with its label names; replaces."""
        labels = [str(x) for x in labels]
        m = np.asarray(matrix, dtype=float)
        if m.shape != (len(labels), len(labels)):
            raise StoreError(f"confusion matrix shape {m.shape} does not match {len(labels)} labels")
        rows = [(int(run_id), split, i, j, float(m[i, j])) for i in range(m.shape[0]) for j in range(m.shape[1])]
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute("DELETE FROM confusion_cells WHERE run_id = ? AND split = ?", (int(run_id), split))
            conn.execute(
                "INSERT OR REPLACE INTO confusions (run_id, split, labels) VALUES (?, ?, ?)",
                (int(run_id), split, to_json(labels)),
            )
            conn.executemany(
                "INSERT INTO confusion_cells (run_id, split, true_index, pred_index, count) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def put_grid(self, run_id: int, name: str, values: Any, *, lower: Any = None, upper: Any = None) -> None:
        """A layer x head grid (and optional confidence bounds) as rows (layer, head, value, lower, upper)."""
        _check_text(name, "grid name")
        v = np.asarray(values, dtype=float)
        if v.ndim != 2:
            raise StoreError(f"grid {name!r} must be 2-D (layers x heads), got shape {v.shape}")
        lo = None if lower is None else np.asarray(lower, dtype=float)
        hi = None if upper is None else np.asarray(upper, dtype=float)
        for arr, what in ((lo, "lower"), (hi, "upper")):
            if arr is not None and arr.shape != v.shape:
                raise StoreError(f"grid {name!r}: {what} bound shape {arr.shape} differs from values {v.shape}")
        rows = [
            (
                int(run_id),
                name,
                i,
                j,
                _finite_or_none(v[i, j]),
                None if lo is None else _finite_or_none(lo[i, j]),
                None if hi is None else _finite_or_none(hi[i, j]),
            )
            for i in range(v.shape[0])
            for j in range(v.shape[1])
        ]
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute("DELETE FROM grids WHERE run_id = ? AND name = ?", (int(run_id), name))
            conn.executemany(
                "INSERT INTO grids (run_id, name, layer, head, value, lower, upper) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )

    def put_vector(self, run_id: int, name: str, array: Any, *, meta: dict | None = None) -> None:
        """An array stored as a little-endian float32 BLOB with its dtype and shape (replaces)."""
        _check_text(name, "vector name")
        a = np.ascontiguousarray(np.asarray(array, dtype="<f4"))
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT OR REPLACE INTO vectors (run_id, name, dtype, shape, data, meta) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    int(run_id),
                    name,
                    "<f4",
                    to_json(list(a.shape)),
                    sqlite3.Binary(a.tobytes()),
                    to_json(meta if meta is not None else {}),
                ),
            )

    # -------- dynamic per-gene / per-cell tables
    def _ensure_columns(
        self, conn: sqlite3.Connection, table: str, names: Iterable[str], index_prefix: tuple[str, ...]
    ) -> None:
        existing = {_fold(row[1]) for row in conn.execute(f"PRAGMA table_info({_quote(table)})")}
        for name in names:
            if _fold(name) in existing:
                continue
            # no declared type: each value keeps its storage class, so sorting stays numeric
            conn.execute(f"ALTER TABLE {_quote(table)} ADD COLUMN {_quote(name)}")
            cols = ", ".join([*index_prefix, _quote(name)])
            conn.execute(f"CREATE INDEX IF NOT EXISTS {_quote(table + '__' + _fold(name))} ON {_quote(table)} ({cols})")
            existing.add(_fold(name))

    @staticmethod
    def _result_columns(
        cols: dict[str, Any], fixed: Sequence[str], reserved: set[str], what: str
    ) -> list[tuple[str, str, list]]:
        """Validated (name, kind, values) of the columns other than `fixed`."""
        out: list[tuple[str, str, list]] = []
        seen: dict[str, str] = {_fold(f): f for f in fixed}
        for name, values in cols.items():
            if name in fixed:
                continue
            check_identifier(name, f"{what} column")
            low = _fold(name)
            if low in reserved:
                raise StoreError(f"{what} column {name!r} is reserved; rename it")
            if low in seen:
                raise StoreError(f"{what} columns {seen[low]!r} and {name!r} differ only in case; rename one")
            seen[low] = name
            kind, converted = _typed_values(values)
            out.append((name, kind, converted))
        return out

    def _insert_dynamic(self, conn: sqlite3.Connection, table: str, head: dict[str, list], columns: list) -> None:
        names = list(head) + [n for n, _, _ in columns]
        sql = (
            f"INSERT INTO {_quote(table)} ({', '.join(_quote(n) for n in names)}) "
            f"VALUES ({', '.join('?' * len(names))})"
        )
        # plain executemany: one prepared statement for the whole table is what makes 20,000 rows cheap
        conn.executemany(sql, zip(*head.values(), *(v for _, _, v in columns)))

    def put_gene_table(self, run_id: int, table: str, rows: Any) -> int:
        """Replace the per-gene table `table` of a run. Returns the number of rows.

        `rows` is a pandas DataFrame or a list of dicts with an `ensembl_id` column (unique), an
        optional `symbol` column, and any other columns, which become SQL columns named exactly so
        (letters, digits, underscores) holding numbers or text.
        """
        _check_text(table, "gene table name")
        if (
            hasattr(rows, "columns")
            and "ensembl_id" not in rows.columns
            and getattr(rows.index, "name", None) == "ensembl_id"
        ):
            rows = rows.reset_index()
        cols, n = _columns_of(rows)
        if n and "ensembl_id" not in cols:
            raise StoreError(f"gene table {table!r} needs an 'ensembl_id' column")
        ids = [None if v is None else str(v) for v in _typed_values(cols.get("ensembl_id", []))[1]]
        if None in ids:
            raise StoreError(f"gene table {table!r} has a missing ensembl_id")
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in collections.Counter(ids).items() if c > 1)
            raise StoreError(f"gene table {table!r} has ensembl_id {dup!r} twice; each gene once per table")
        symbols = [None if v is None else str(v) for v in _typed_values(cols.get("symbol", [None] * n))[1]]
        columns = self._result_columns(cols, ("ensembl_id", "symbol"), _GENE_RESERVED, f"gene table {table!r}")
        head = {"run_id": [int(run_id)] * n, "gtable": [table] * n, "ensembl_id": ids, "symbol": symbols}
        with self._write() as conn:
            self._require_run(conn, run_id)
            self._ensure_columns(conn, "gene_rows", [c for c, _, _ in columns], ("run_id", "gtable"))
            conn.execute("DELETE FROM gene_rows WHERE run_id = ? AND gtable = ?", (int(run_id), table))
            conn.execute("DELETE FROM gene_columns WHERE run_id = ? AND gtable = ?", (int(run_id), table))
            conn.executemany(
                "INSERT INTO gene_columns (run_id, gtable, position, name, type) VALUES (?, ?, ?, ?, ?)",
                [(int(run_id), table, i, c, k) for i, (c, k, _) in enumerate(columns)],
            )
            if n:
                self._insert_dynamic(conn, "gene_rows", head, columns)
        return n

    def put_labels(self, run_id: int, task: str, labels: Sequence[str]) -> None:
        _check_text(task, "label task")
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute("DELETE FROM labels WHERE run_id = ? AND task = ?", (int(run_id), task))
            conn.executemany(
                "INSERT INTO labels (run_id, task, position, label) VALUES (?, ?, ?, ?)",
                [(int(run_id), task, i, str(x)) for i, x in enumerate(labels)],
            )

    def put_split(self, run_id: int, cell_ids: Sequence[str], splits: Sequence[str] | str) -> None:
        """Record split membership: `splits` parallel to `cell_ids`, or one split name for all of them.

        Calls add to (and overwrite for repeated cells) the run's membership, so a split can be written
        whole or one split at a time.
        """
        cell_ids = [str(_scalar(c)) for c in cell_ids]
        if isinstance(splits, str):
            splits = [splits] * len(cell_ids)
        else:
            splits = [str(_scalar(s)) for s in splits]
        if len(splits) != len(cell_ids):
            raise StoreError(f"put_split: {len(cell_ids)} cell ids but {len(splits)} split names")
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.executemany(
                "INSERT OR REPLACE INTO splits (run_id, cell_id, split) VALUES (?, ?, ?)",
                [(int(run_id), c, s) for c, s in zip(cell_ids, splits)],
            )

    def put_cells(self, run_id: int, df: Any) -> int:
        """Replace the run's per-cell table: `cell_id` (a column, or the DataFrame index) + any columns."""
        if hasattr(df, "columns") and "cell_id" not in df.columns:
            df = df.copy()
            df.insert(0, "cell_id", [str(x) for x in df.index])
        cols, n = _columns_of(df)
        if n and "cell_id" not in cols:
            raise StoreError("the cell table needs a 'cell_id' column")
        ids = [None if v is None else str(v) for v in _typed_values(cols.get("cell_id", []))[1]]
        if None in ids:
            raise StoreError("the cell table has a missing cell_id")
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in collections.Counter(ids).items() if c > 1)
            raise StoreError(f"the cell table has cell_id {dup!r} twice")
        columns = self._result_columns(cols, ("cell_id",), _CELL_RESERVED, "cell table")
        head = {"run_id": [int(run_id)] * n, "cell_id": ids}
        with self._write() as conn:
            self._require_run(conn, run_id)
            self._ensure_columns(conn, "cells", [c for c, _, _ in columns], ("run_id",))
            conn.execute("DELETE FROM cells WHERE run_id = ?", (int(run_id),))
            conn.execute("DELETE FROM cell_columns WHERE run_id = ?", (int(run_id),))
            conn.executemany(
                "INSERT INTO cell_columns (run_id, position, name, type) VALUES (?, ?, ?, ?)",
                [(int(run_id), i, c, k) for i, (c, k, _) in enumerate(columns)],
            )
            if n:
                self._insert_dynamic(conn, "cells", head, columns)
        return n

    def put_json(self, run_id: int, name: str, obj: Any) -> None:
        """A small JSON result (report, statistics, summary); numpy values are converted; replaces."""
        _check_text(name, "JSON result name")
        text = to_json(obj)
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT OR REPLACE INTO json_results (run_id, name, value) VALUES (?, ?, ?)", (int(run_id), name, text)
            )

    # ------------------------------------------------------------------ reads: runs
    _RUN_LIST_SQL = """
        SELECT r.id, r.name, r.kind, r.status, r.created, r.finished, r.parent_id, r.heartbeat, r.host, r.pid,
               {pid_start} AS pid_start, r.device, r.error, r.note,
               (SELECT COUNT(*) FROM runs c WHERE c.parent_id = r.id) AS n_children,
               p.stage AS progress_stage, p.done AS progress_done, p.total AS progress_total
        FROM runs r LEFT JOIN progress p ON p.run_id = r.id
    """

    def _run_summary(self, row: dict, now: float, tags: Mapping[int, list[str]]) -> dict:
        row["tags"] = tags.get(row["id"], [])
        self._resolve_status(row, now)
        row.pop("pid_start", None)
        return row

    def list_runs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        name_glob: str | None = None,
        tag: str | None = None,
        kind: str | None = None,
        parent_id: Any = ...,
        limit: int | None = None,
    ) -> list[dict]:
        """Runs, newest first: id, name, kind, status (`lost` resolved), created, finished, parent_id,
        tags, heartbeat, host, pid, device, error, note, n_children, progress_stage/done/total.

        `parent_id=...` (default) lists every run, `None` only top-level runs, an id that run's children.
        `name_glob` is a shell-style pattern (case-sensitive, `*` and `?`). `status` may be a list.
        """
        clauses, params = [], []
        if name_glob:
            clauses.append("r.name GLOB ?")
            params.append(name_glob)
        if tag:
            clauses.append("EXISTS (SELECT 1 FROM tags t WHERE t.run_id = r.id AND t.tag = ?)")
            params.append(tag)
        if kind:
            clauses.append("r.kind = ?")
            params.append(kind)
        if parent_id is None:
            clauses.append("r.parent_id IS NULL")
        elif parent_id is not ...:
            clauses.append("r.parent_id = ?")
            params.append(int(parent_id))
        statuses = None
        if status is not None:
            statuses = {status} if isinstance(status, str) else set(status)
            bad = statuses - set(RUN_STATUSES)
            if bad:
                raise StoreError(f"unknown run status {sorted(bad)[0]!r}; use one of {', '.join(RUN_STATUSES)}")
            # `lost` is resolved after reading, so filter stored statuses loosely and exactly afterwards
            wanted = set(statuses) | ({"running"} if "lost" in statuses else set())
            clauses.append(f"r.status IN ({', '.join('?' * len(wanted))})")
            params.extend(sorted(wanted))
        sql = self._RUN_LIST_SQL.format(pid_start="NULL" if "pid_start" in self._gaps else "r.pid_start")
        sql += (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY r.id DESC"
        if limit is not None and statuses is None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read() as conn:
            rows = self._rows(conn, sql, params)
            tags: dict[int, list[str]] = {}
            for run_id, tag in conn.execute("SELECT run_id, tag FROM tags ORDER BY run_id, tag"):
                tags.setdefault(run_id, []).append(tag)
        now = time.time()
        out = [self._run_summary(r, now, tags) for r in rows]
        if statuses is not None:
            out = [r for r in out if r["status"] in statuses]
            if limit is not None:
                out = out[: int(limit)]
        return out

    def get_run(self, run_id: int) -> dict:
        """Everything about one run: every column (config and versions parsed), progress, tags,
        stages, children ids, `stored_status` (what the table says) next to `status` (resolved)."""
        with self._read() as conn:
            rows = self._rows(conn, "SELECT * FROM runs WHERE id = ?", (int(run_id),))
            if not rows:
                raise RunNotFoundError(f"no run with id {run_id} in store {self.path}; see `gfattn runs`")
            run = rows[0]
            run["tags"] = [
                r[0] for r in conn.execute("SELECT tag FROM tags WHERE run_id = ? ORDER BY tag", (int(run_id),))
            ]
            prog = self._rows(
                conn,
                "SELECT stage, done, total, unit, throughput, eta_s, updated FROM progress WHERE run_id = ?",
                (int(run_id),),
            )
            run["children"] = [
                r[0] for r in conn.execute("SELECT id FROM runs WHERE parent_id = ? ORDER BY id", (int(run_id),))
            ]
        run["config"] = _from_json(run.get("config")) or {}
        run["versions"] = _from_json(run.get("versions")) or {}
        run["progress"] = prog[0] if prog else None
        run["stored_status"] = run["status"]
        self._resolve_status(run)
        run.pop("pid_start", None)
        return run

    def children(self, run_id: int) -> list[dict]:
        return list(reversed(self.list_runs(parent_id=run_id)))

    def descendants(self, run_id: int) -> list[int]:
        """Ids of the run's children, grandchildren, ... (not the run itself), oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                """WITH RECURSIVE d(id) AS (SELECT id FROM runs WHERE parent_id = ?
                   UNION SELECT r.id FROM runs r JOIN d ON r.parent_id = d.id) SELECT id FROM d ORDER BY id""",
                (int(run_id),),
            ).fetchall()
        return [r[0] for r in rows]

    def events(self, run_id: int, since_id: int = 0) -> list[dict]:
        with self._read() as conn:
            return self._rows(
                conn,
                "SELECT id, time, stage, level, message FROM events WHERE run_id = ? AND id > ? ORDER BY id",
                (int(run_id), int(since_id)),
            )

    def progress(self, run_id: int) -> dict | None:
        with self._read() as conn:
            rows = self._rows(
                conn,
                "SELECT stage, done, total, unit, throughput, eta_s, updated FROM progress WHERE run_id = ?",
                (int(run_id),),
            )
        return rows[0] if rows else None

    # ------------------------------------------------------------------ reads: results
    def metrics(self, run_id: int, name: str | None = None, split: str | None = None) -> list[dict]:
        """Metric rows (id, name, value, step, epoch, split, time) in the order they were logged."""
        sql = "SELECT id, name, value, step, epoch, split, time FROM metrics WHERE run_id = ?"
        params: list[Any] = [int(run_id)]
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        if split is not None:
            sql += " AND split = ?"
            params.append(split)
        with self._read() as conn:
            return self._rows(conn, sql + " ORDER BY id", params)

    def metric_names(self, run_id: int) -> list[dict]:
        """Distinct (name, split) pairs with their row counts."""
        with self._read() as conn:
            return self._rows(
                conn,
                "SELECT name, split, COUNT(*) AS count FROM metrics WHERE run_id = ? GROUP BY name, split ORDER BY name, split",
                (int(run_id),),
            )

    def confusions(self, run_id: int) -> list[dict]:
        with self._read() as conn:
            heads = self._rows(
                conn, "SELECT split, labels FROM confusions WHERE run_id = ? ORDER BY split", (int(run_id),)
            )
            cells = conn.execute(
                "SELECT split, true_index, pred_index, count FROM confusion_cells WHERE run_id = ?", (int(run_id),)
            ).fetchall()
        out = []
        for h in heads:
            labels = json.loads(h["labels"])
            m = np.zeros((len(labels), len(labels)))
            for split, i, j, c in cells:
                if split == h["split"]:
                    m[i, j] = c
            out.append({"split": h["split"], "labels": labels, "matrix": m})
        return out

    def grid_names(self, run_id: int) -> list[str]:
        with self._read() as conn:
            return [
                r[0]
                for r in conn.execute("SELECT DISTINCT name FROM grids WHERE run_id = ? ORDER BY name", (int(run_id),))
            ]

    def grid(self, run_id: int, name: str) -> dict:
        """dict(values, lower, upper) as (layers x heads) float arrays; lower/upper None when absent."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT layer, head, value, lower, upper FROM grids WHERE run_id = ? AND name = ?", (int(run_id), name)
            ).fetchall()
        if not rows:
            raise StoreError(f"run {run_id} has no grid {name!r}")
        n_l = max(r[0] for r in rows) + 1
        n_h = max(r[1] for r in rows) + 1
        out = {k: np.full((n_l, n_h), np.nan) for k in ("values", "lower", "upper")}
        has = {"lower": False, "upper": False}
        for layer, head, v, lo, hi in rows:
            out["values"][layer, head] = np.nan if v is None else v
            if lo is not None:
                out["lower"][layer, head] = lo
                has["lower"] = True
            if hi is not None:
                out["upper"][layer, head] = hi
                has["upper"] = True
        return {
            "values": out["values"],
            "lower": out["lower"] if has["lower"] else None,
            "upper": out["upper"] if has["upper"] else None,
        }

    def vector_names(self, run_id: int) -> list[str]:
        with self._read() as conn:
            return [
                r[0] for r in conn.execute("SELECT name FROM vectors WHERE run_id = ? ORDER BY name", (int(run_id),))
            ]

    def _vector_row(self, run_id: int, name: str) -> tuple:
        with self._read() as conn:
            row = conn.execute(
                "SELECT dtype, shape, data, meta FROM vectors WHERE run_id = ? AND name = ?", (int(run_id), name)
            ).fetchone()
        if row is None:
            raise StoreError(f"run {run_id} has no vector {name!r}")
        return row

    def vector(self, run_id: int, name: str) -> np.ndarray:
        dtype, shape, data, _ = self._vector_row(run_id, name)
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape)).copy()

    def vector_meta(self, run_id: int, name: str) -> dict:
        """The vector's meta dict plus `dtype` and `shape` (a list)."""
        dtype, shape, _, meta = self._vector_row(run_id, name)
        out = dict(_from_json(meta) or {})
        out.setdefault("dtype", dtype)
        out.setdefault("shape", json.loads(shape))
        return out

    def gene_tables(self, run_id: int) -> list[str]:
        with self._read() as conn:
            return [
                r[0]
                for r in conn.execute(
                    """SELECT gtable FROM (SELECT DISTINCT gtable FROM gene_columns WHERE run_id = ?
                   UNION SELECT DISTINCT gtable FROM gene_rows WHERE run_id = ?) ORDER BY gtable""",
                    (int(run_id), int(run_id)),
                )
            ]

    def _gene_columns(self, conn: sqlite3.Connection, run_id: int, table: str) -> list[tuple[str, str]]:
        cols = conn.execute(
            "SELECT name, type FROM gene_columns WHERE run_id = ? AND gtable = ? ORDER BY position",
            (int(run_id), table),
        ).fetchall()
        if (
            not cols
            and conn.execute(
                "SELECT 1 FROM gene_rows WHERE run_id = ? AND gtable = ? LIMIT 1", (int(run_id), table)
            ).fetchone()
            is None
        ):
            raise StoreError(f"run {run_id} has no gene table {table!r}")
        return [(n, t) for n, t in cols]

    def gene_table_columns(self, run_id: int, table: str) -> list[str]:
        """Column names of a gene table: `ensembl_id`, `symbol`, then the result columns in order."""
        with self._read() as conn:
            return ["ensembl_id", "symbol"] + [n for n, _ in self._gene_columns(conn, run_id, table)]

    def gene_table_types(self, run_id: int, table: str) -> dict[str, str]:
        """Column name -> 'integer' | 'real' | 'text' for a gene table's result columns."""
        with self._read() as conn:
            return dict(self._gene_columns(conn, run_id, table))

    def _gene_filter(
        self, run_id: int, table: str, cols: list[str], search: str | None, where: Mapping[str, Any] | None
    ) -> tuple[str, list[Any]]:
        sql = "run_id = ? AND gtable = ?"
        params: list[Any] = [int(run_id), table]
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += " AND (symbol LIKE ? ESCAPE '\\' OR ensembl_id LIKE ? ESCAPE '\\')"
            params += [pattern, pattern]
        for col, cond in (where or {}).items():
            name = self._match_column(col, cols, table)
            if (
                isinstance(cond, tuple)
                and len(cond) == 2
                and isinstance(cond[0], str)
                and cond[0].lower() in _WHERE_OPS
            ):
                op, value = _WHERE_OPS[cond[0].lower()], cond[1]
            else:
                op, value = ("IS" if cond is None else "="), cond
            if op == "IN":
                values = [_scalar(v) for v in value]
                if not values:
                    sql += " AND 0"
                    continue
                sql += f" AND {_quote(name)} IN ({', '.join('?' * len(values))})"
                params += values
            else:
                sql += f" AND {_quote(name)} {op} ?"
                params.append(_scalar(value))
        return sql, params

    @staticmethod
    def _match_column(col: str, cols: list[str], table: str) -> str:
        for c in cols:
            if _fold(c) == _fold(str(col)):
                return c
        raise StoreError(f"gene table {table!r} has no column {col!r}; columns: {', '.join(cols)}")

    def gene_table(
        self,
        run_id: int,
        table: str,
        *,
        order_by: str | None = None,
        descending: bool = True,
        limit: int | None = 100,
        offset: int = 0,
        search: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> list[dict]:
        """One page of a gene table as dicts (keys = `gene_table_columns`).

        `order_by` is a column name (NULLs always last; ties broken by ensembl_id); None keeps the order
        the rows were written in. `search` matches symbol or ensembl_id (case-insensitive substring).
        `where` maps column -> value (equality; None means IS NULL) or column -> (op, value) with op one
        of =, !=, <, <=, >, >=, like, in, is, is not; values are always bound as parameters.
        """
        with self._read() as conn:
            cols = ["ensembl_id", "symbol"] + [n for n, _ in self._gene_columns(conn, run_id, table)]
            cond, params = self._gene_filter(run_id, table, cols, search, where)
            if order_by is None:
                order = "rowid"
            else:
                name = self._match_column(order_by, cols, table)
                direction = "DESC" if descending else "ASC"
                order = f"{_quote(name)} {direction} NULLS LAST, ensembl_id {direction}"
            sql = f"SELECT {', '.join(_quote(c) for c in cols)} FROM gene_rows WHERE {cond} ORDER BY {order}"
            if limit is not None:
                sql += " LIMIT ? OFFSET ?"
                params += [int(limit), int(offset)]
            elif offset:
                sql += " LIMIT -1 OFFSET ?"
                params.append(int(offset))
            return self._rows(conn, sql, params)

    def gene_table_count(
        self, run_id: int, table: str, *, search: str | None = None, where: Mapping[str, Any] | None = None
    ) -> int:
        with self._read() as conn:
            cols = ["ensembl_id", "symbol"] + [n for n, _ in self._gene_columns(conn, run_id, table)]
            cond, params = self._gene_filter(run_id, table, cols, search, where)
            return int(conn.execute(f"SELECT COUNT(*) FROM gene_rows WHERE {cond}", params).fetchone()[0])

    def gene_table_df(self, run_id: int, table: str):
        """The whole gene table as a pandas DataFrame (columns = `gene_table_columns`, write order)."""
        import pandas as pd

        with self._read() as conn:
            cols = ["ensembl_id", "symbol"] + [n for n, _ in self._gene_columns(conn, run_id, table)]
            rows = conn.execute(
                f"SELECT {', '.join(_quote(c) for c in cols)} FROM gene_rows WHERE run_id = ? AND gtable = ? ORDER BY rowid",
                (int(run_id), table),
            ).fetchall()
        return pd.DataFrame.from_records(rows, columns=cols)

    def labels(self, run_id: int) -> dict[str, list[str]]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT task, label FROM labels WHERE run_id = ? ORDER BY task, position", (int(run_id),)
            ).fetchall()
        out: dict[str, list[str]] = {}
        for task, label in rows:
            out.setdefault(task, []).append(label)
        return out

    def split(self, run_id: int) -> dict[str, str]:
        with self._read() as conn:
            return dict(
                conn.execute(
                    "SELECT cell_id, split FROM splits WHERE run_id = ? ORDER BY rowid", (int(run_id),)
                ).fetchall()
            )

    def cells(self, run_id: int):
        """The run's per-cell table as a pandas DataFrame (`cell_id` first; empty when none was written)."""
        import pandas as pd

        with self._read() as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM cell_columns WHERE run_id = ? ORDER BY position", (int(run_id),)
                )
            ]
            cols = ["cell_id"] + names
            rows = conn.execute(
                f"SELECT {', '.join(_quote(c) for c in cols)} FROM cells WHERE run_id = ? ORDER BY rowid",
                (int(run_id),),
            ).fetchall()
        return pd.DataFrame.from_records(rows, columns=cols)

    def json_names(self, run_id: int) -> list[str]:
        with self._read() as conn:
            return [
                r[0]
                for r in conn.execute("SELECT name FROM json_results WHERE run_id = ? ORDER BY name", (int(run_id),))
            ]

    def get_json(self, run_id: int, name: str) -> Any:
        with self._read() as conn:
            row = conn.execute(
                "SELECT value FROM json_results WHERE run_id = ? AND name = ?", (int(run_id), name)
            ).fetchone()
        if row is None:
            raise StoreError(f"run {run_id} has no JSON result {name!r}")
        return json.loads(row[0])

    # ------------------------------------------------------------------ edits
    def add_tag(self, run_id: int, tag: str) -> None:
        _check_text(tag, "tag")
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute("INSERT OR IGNORE INTO tags (run_id, tag) VALUES (?, ?)", (int(run_id), tag))

    def remove_tag(self, run_id: int, tag: str) -> None:
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute("DELETE FROM tags WHERE run_id = ? AND tag = ?", (int(run_id), tag))

    def set_inputs(
        self,
        run_id: int,
        *,
        data_path: str | os.PathLike | None = None,
        data_hash: str | None = None,
        model_path: str | os.PathLike | None = None,
        model_hash: str | None = None,
    ) -> None:
        """Record the data and model a run resolved once it started (a generated data set, a cached
        model, content hashes); arguments left None keep what is recorded."""
        fields = {
            "data_path": None if data_path is None else os.fspath(data_path),
            "data_hash": data_hash,
            "model_path": None if model_path is None else os.fspath(model_path),
            "model_hash": model_hash,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            return
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*fields.values(), int(run_id))
            )

    def set_note(self, run_id: int, text: str | None) -> None:
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute("UPDATE runs SET note = ? WHERE id = ?", (text, int(run_id)))

    def delete_run(self, run_id: int) -> list[int]:
        """Delete a run, its child runs (recursively) and everything they own. Returns the deleted ids."""
        with self._write() as conn:
            self._require_run(conn, run_id)
            ids = [int(run_id)] + [
                r[0]
                for r in conn.execute(
                    """WITH RECURSIVE d(id) AS (SELECT id FROM runs WHERE parent_id = ?
                   UNION SELECT r.id FROM runs r JOIN d ON r.parent_id = d.id) SELECT id FROM d""",
                    (int(run_id),),
                )
            ]
            # children first, so nothing depends on what is being deleted; ON DELETE CASCADE removes rows
            for rid in reversed(ids):
                conn.execute("DELETE FROM runs WHERE id = ?", (rid,))
        return ids

    def resolve_run(self, ref: str | int) -> int:
        """A run id from an id (`12`, `#12`) or an exact run name (the newest run of that name)."""
        text = str(ref).strip()
        with self._read() as conn:
            digits = text[1:] if text.startswith("#") else text
            if digits.isdigit():
                if conn.execute("SELECT 1 FROM runs WHERE id = ?", (int(digits),)).fetchone():
                    return int(digits)
            row = conn.execute("SELECT id FROM runs WHERE name = ? ORDER BY id DESC LIMIT 1", (text,)).fetchone()
        if row is not None:
            return int(row[0])
        raise RunNotFoundError(f"no run with id or name {text!r} in store {self.path}; see `gfattn runs`")

    # ------------------------------------------------------------------ documents
    def show(self, run_id: int) -> dict:
        """Everything about a run as one JSON-ready dict (the `gfattn show --json` shape).

        ```
        {
          "format": "gfattn.show/1",
          "run": {...},              # get_run(): id, name, kind, status, created, finished, parent_id,
                                     # config, versions, git_commit, host, pid, heartbeat, device,
                                     # data_path/hash, model_path/hash, error, note, tags, progress,
                                     # children (ids), stored_status
          "stages": [{stage, status, started, finished}],
          "events": {"count": N, "last": [{id, time, stage, level, message}, ... up to 20]},
          "metrics": [{name, split, count, last, last_step, last_epoch, min, max}],  # per (name, split)
          "confusions": [{split, labels, matrix (list of rows)}],
          "grids": [{name, shape [L, H], mean, min, max, has_bounds}],
          "vectors": [{name, dtype, shape, meta}],
          "gene_tables": [{name, rows, columns}],
          "labels": {task: [label, ...]},
          "split_counts": {split: n_cells},
          "cells": {"rows": N, "columns": [...]},
          "json": {name: value},
          "children": [show(child), ...]       # the same shape, recursively
        }
        ```
        Times are seconds since the Unix epoch (UTC); non-finite numbers are null.
        """
        from store.export import show_document

        return show_document(self, int(run_id))

    def export(self, run_id: int, out_dir: str | os.PathLike, fmt: str = "csv") -> list[Path]:
        """Write every table of the run and its descendants to `out_dir` as csv, parquet or json files
        (plus `manifest.json` naming each file's table, run and row count). Returns the paths written."""
        from store.export import export_run

        return export_run(self, int(run_id), out_dir, fmt)
