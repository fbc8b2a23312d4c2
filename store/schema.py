"""The store's schema as an ordered list of named migrations (docs/architecture.md, "The store", "Tables").

`PRAGMA user_version` holds the number of migrations applied and the `migrations` table records their
names and times. Opening an older store applies the missing migrations, each in its own transaction;
opening a store whose version is higher than `SCHEMA_VERSION` is refused (`SchemaTooNewError`), because
an older gfattn cannot know what the newer tables mean.

Column conventions: times are REAL seconds since the Unix epoch (UTC); JSON documents are TEXT;
per-rank vectors are little-endian float32 BLOBs with their dtype and shape beside them; per-gene and
per-cell tables gain one SQL column per result column (declared without a type, so SQLite keeps each
value's own storage class and numeric columns sort numerically whatever another run stored there).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import sqlite_utils


def _m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            created REAL NOT NULL,
            finished REAL,
            parent_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
            config TEXT,
            data_path TEXT, data_hash TEXT, model_path TEXT, model_hash TEXT,
            versions TEXT, git_commit TEXT, host TEXT, pid INTEGER, heartbeat REAL,
            device TEXT, error TEXT, note TEXT
        )"""
    )
    ref = "INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE"
    statements = [
        f"CREATE TABLE tags (run_id {ref}, tag TEXT NOT NULL, PRIMARY KEY (run_id, tag))",
        f"""CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id {ref}, time REAL NOT NULL,
            stage TEXT, level TEXT NOT NULL, message TEXT NOT NULL)""",
        f"""CREATE TABLE progress (run_id {ref} PRIMARY KEY, stage TEXT, done REAL, total REAL, unit TEXT,
            throughput REAL, eta_s REAL, updated REAL)""",
        f"""CREATE TABLE metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id {ref}, name TEXT NOT NULL,
            value REAL, step INTEGER, epoch REAL, split TEXT, time REAL NOT NULL)""",
        f"""CREATE TABLE confusions (run_id {ref}, split TEXT NOT NULL, labels TEXT NOT NULL,
            PRIMARY KEY (run_id, split))""",
        f"""CREATE TABLE confusion_cells (run_id {ref}, split TEXT NOT NULL, true_index INTEGER NOT NULL,
            pred_index INTEGER NOT NULL, count REAL NOT NULL,
            PRIMARY KEY (run_id, split, true_index, pred_index))""",
        f"""CREATE TABLE grids (run_id {ref}, name TEXT NOT NULL, layer INTEGER NOT NULL,
            head INTEGER NOT NULL, value REAL, lower REAL, upper REAL,
            PRIMARY KEY (run_id, name, layer, head))""",
        f"""CREATE TABLE vectors (run_id {ref}, name TEXT NOT NULL, dtype TEXT NOT NULL,
            shape TEXT NOT NULL, data BLOB NOT NULL, meta TEXT, PRIMARY KEY (run_id, name))""",
        f"""CREATE TABLE gene_rows (run_id {ref}, gtable TEXT NOT NULL, ensembl_id TEXT NOT NULL,
            symbol TEXT, PRIMARY KEY (run_id, gtable, ensembl_id))""",
        f"""CREATE TABLE gene_columns (run_id {ref}, gtable TEXT NOT NULL, position INTEGER NOT NULL,
            name TEXT NOT NULL, type TEXT NOT NULL, PRIMARY KEY (run_id, gtable, name))""",
        f"""CREATE TABLE labels (run_id {ref}, task TEXT NOT NULL, position INTEGER NOT NULL,
            label TEXT NOT NULL, PRIMARY KEY (run_id, task, position))""",
        f"""CREATE TABLE splits (run_id {ref}, cell_id TEXT NOT NULL, split TEXT NOT NULL,
            PRIMARY KEY (run_id, cell_id))""",
        f"""CREATE TABLE cells (run_id {ref}, cell_id TEXT NOT NULL, PRIMARY KEY (run_id, cell_id))""",
        f"""CREATE TABLE cell_columns (run_id {ref}, position INTEGER NOT NULL, name TEXT NOT NULL,
            type TEXT NOT NULL, PRIMARY KEY (run_id, name))""",
        f"""CREATE TABLE json_results (run_id {ref}, name TEXT NOT NULL, value TEXT NOT NULL,
            PRIMARY KEY (run_id, name))""",
    ]
    for sql in statements:
        db.execute(sql)


def _m002_stages_and_indexes(db: sqlite_utils.Database) -> None:
    """Per-run stage lists, the process start time that tells a reused pid apart, and read indexes."""
    db.execute(
        """CREATE TABLE stages (run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            stage TEXT NOT NULL, status TEXT NOT NULL, position INTEGER NOT NULL,
            started REAL, finished REAL, PRIMARY KEY (run_id, stage))"""
    )
    db["runs"].add_column("pid_start", int)
    # the run list filters by status/parent/name; live views read metrics and events of one run
    db["runs"].create_index(["status"], index_name="runs_by_status", if_not_exists=True)
    db["runs"].create_index(["parent_id"], index_name="runs_by_parent", if_not_exists=True)
    db["runs"].create_index(["name"], index_name="runs_by_name", if_not_exists=True)
    db["metrics"].create_index(
        ["run_id", "name", "split", "step"], index_name="metrics_by_run_name", if_not_exists=True
    )
    db["events"].create_index(["run_id", "id"], index_name="events_by_run", if_not_exists=True)
    db["tags"].create_index(["tag"], index_name="tags_by_tag", if_not_exists=True)


def _m003_store_identity(db: sqlite_utils.Database) -> None:
    """A random identity per store, so files that belong to one store (its fine-tuned models) live under a
    folder no other store shares, even when two stores sit side by side and both number runs from 1."""
    import uuid

    db.execute("CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO store_meta (key, value) VALUES ('uid', ?)", (uuid.uuid4().hex,))


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_initial", _m001_initial),
    ("0002_stages_and_indexes", _m002_stages_and_indexes),
    ("0003_store_identity", _m003_store_identity),
]
SCHEMA_VERSION = len(MIGRATIONS)

# Tables a gfattn store may hold (used to refuse an unrelated SQLite file at user_version 0).
KNOWN_TABLES = frozenset(
    {
        "runs",
        "tags",
        "events",
        "progress",
        "metrics",
        "confusions",
        "confusion_cells",
        "grids",
        "vectors",
        "gene_rows",
        "gene_columns",
        "labels",
        "splits",
        "cells",
        "cell_columns",
        "json_results",
        "stages",
        "migrations",
        "store_meta",
        "sqlite_sequence",
        "sqlite_stat1",
        "sqlite_stat4",
    }
)


def ensure_migrations_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
    )


def user_version(conn) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database, target: int | None = None) -> list[str]:
    """Apply the migrations between the store's version and `target` (default: all); return their names.

    Each migration runs in one IMMEDIATE transaction that re-reads `user_version`, so two processes
    opening a fresh store at once apply each migration exactly once.
    """
    target = SCHEMA_VERSION if target is None else target
    applied: list[str] = []
    conn = db.conn
    for number, (name, step) in enumerate(MIGRATIONS[:target], start=1):
        if user_version(conn) >= number:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if user_version(conn) >= number:  # another process got here first
                conn.execute("COMMIT")
                continue
            ensure_migrations_table(db)
            step(db)
            conn.execute("INSERT INTO migrations (id, name, applied) VALUES (?, ?, ?)", (number, name, time.time()))
            conn.execute(f"PRAGMA user_version = {int(number)}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
