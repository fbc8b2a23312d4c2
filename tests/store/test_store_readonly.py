"""Read-only stores: `Store(readonly=True)`, the reading commands on a store in a folder nobody may write,
the `immutable` fallback, older schemas read without migrating, and the TUI over a read-only store.

A read-only folder is made with permission bits when the tests run as a normal user. Root ignores
permission bits (and so would SQLite), so as root the commands run in a private mount namespace where
the folder is a read-only bind mount, i.e. a read-only filesystem; without `unshare` those tests skip.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sqlite_utils

from store import SCHEMA_VERSION, Store, StoreError, schema

from tests import REPO

_MOUNT_RO = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GFATTN_STORE", None)
    return env


@functools.lru_cache(maxsize=1)
def _can_mount_readonly() -> bool:
    if not shutil.which("unshare"):
        return False
    folder = tempfile.mkdtemp(prefix="gfattn-ro-probe-")
    try:
        out = subprocess.run(
            ["unshare", "-m", "sh", "-c", _MOUNT_RO, "sh", folder, "sh", "-c", f"! touch {folder}/x"],
            capture_output=True,
            timeout=30,
        )
        return out.returncode == 0 and not os.path.exists(os.path.join(folder, "x"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ReadOnlyFolder:
    """Runs commands that see `folder` as read-only (permission bits, or a read-only mount as root)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.as_root = os.geteuid() == 0
        self._modes: dict[Path, int] = {}

    def __enter__(self) -> ReadOnlyFolder:
        if self.as_root:
            if not _can_mount_readonly():
                pytest.skip("running as root without `unshare -m` + bind mounts: cannot make a folder read-only")
            return self
        for p in [self.folder, *self.folder.iterdir()]:
            self._modes[p] = stat.S_IMODE(p.stat().st_mode)
            p.chmod(0o555 if p.is_dir() else 0o444)
        return self

    def __exit__(self, *exc) -> None:
        for p, mode in self._modes.items():
            p.chmod(mode)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        if self.as_root:
            argv = ["unshare", "-m", "sh", "-c", _MOUNT_RO, "sh", str(self.folder), *argv]
        return subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, **kwargs)

    def gfattn(self, *args) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "pipeline", *map(str, args)])

    def python(self, code: str, *args) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code, *map(str, args)])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _small_store(path: Path) -> dict:
    ids = {}
    with Store(path) as st:
        ids["done"] = st.create_run("done", "pipeline", {"seed": 1}, tags=["keep"])
        st.set_stage(ids["done"], "data", "completed")
        st.log_metric(ids["done"], "accuracy", 0.75, split="test")
        st.put_json(ids["done"], "report", {"cells": 12})
        st.finish_run(ids["done"], "completed")
        ids["crashed"] = st.create_run("crashed", "pipeline")
        st._conn.execute("UPDATE runs SET pid = ?, pid_start = NULL WHERE id = ?", (_dead_pid(), ids["crashed"]))
    return ids


def _raw(path: Path, sql: str) -> list:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _one_line_error(out: subprocess.CompletedProcess, command: str, text: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout[-500:], out.stderr[-2000:])
    assert out.stderr.startswith(f"gfattn {command}: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert text in out.stderr and "Traceback" not in out.stderr, out.stderr


# ----------------------------------------------------------------------------------- the API
def test_readonly_handle_reads_but_never_writes(tmp_path):
    path = tmp_path / "s.db"
    ids = _small_store(path)
    with Store(path, readonly=True) as st:
        assert st.readonly and "readonly=True" in repr(st)
        runs = {r["name"]: r for r in st.list_runs()}
        assert runs["done"]["status"] == "completed" and runs["done"]["tags"] == ["keep"]
        assert runs["crashed"]["status"] == "lost"  # resolved on read ...
        st.data_version()
        st.data_version()
        doc = st.show(ids["done"])
        assert doc["stages"][0]["stage"] == "data" and doc["json"] == {"report": {"cells": 12}}
        writes = [
            lambda: st.create_run("new", "x"),
            lambda: st.add_tag(ids["done"], "t"),
            lambda: st.set_note(ids["done"], "n"),
            lambda: st.delete_run(ids["done"]),
            lambda: st.heartbeat(ids["crashed"]),
            lambda: st.reap_lost(),
            lambda: st.log_metric(ids["done"], "x", 1.0),
            lambda: st.finish_run(ids["crashed"], "failed"),
        ]
        for write in writes:
            with pytest.raises(StoreError, match=r"store .*s\.db is open read-only") as info:
                write()
            assert "\n" not in str(info.value)
    # ... but never recorded: the file says what the writer left
    assert _raw(path, "SELECT name, status FROM runs ORDER BY id") == [("done", "completed"), ("crashed", "running")]
    assert _raw(path, "SELECT COUNT(*) FROM tags") == [(1,)]


def test_readonly_open_never_creates_anything(tmp_path):
    with pytest.raises(StoreError, match="no gfattn store at"):
        Store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="holds no gfattn store yet"):
        Store(empty, readonly=True)
    assert empty.read_bytes() == b""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable gfattn store"):
        Store(junk, readonly=True)


def _build_v1_store(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    schema.migrate(sqlite_utils.Database(conn), target=1)
    conn.execute("""INSERT INTO runs (name, kind, status, created, finished, config, versions, host, pid, heartbeat)
                    VALUES ('old run', 'finetune', 'completed', 1.0e9, 1.0e9 + 60, '{"task": "dose"}', '{}', 'h', 1,
                    1.0e9)""")
    conn.execute("INSERT INTO metrics (run_id, name, value, step, time) VALUES (1, 'loss', 0.5, 3, 1.0e9)")
    conn.execute(
        """INSERT INTO runs (name, kind, status, created, config, versions, host, pid, heartbeat)
                    VALUES ('old crash', 'finetune', 'running', 1.0e9, '{}', '{}', ?, ?, 1.0e9)""",
        (socket.gethostname(), _dead_pid()),
    )
    conn.close()


def test_readonly_reads_an_older_schema_without_migrating(tmp_path):
    path = tmp_path / "old.db"
    _build_v1_store(path)
    with Store(path, readonly=True) as st:
        assert st.schema_version == 1 < SCHEMA_VERSION
        assert [(r["name"], r["status"]) for r in st.list_runs()] == [("old crash", "lost"), ("old run", "completed")]
        assert st.get_run(1)["config"] == {"task": "dose"} and st.metrics(1)[0]["value"] == 0.5
        assert st.stages(1) == []  # schema 1 has no stages
        doc = st.show(1)
        assert doc["stages"] == [] and doc["metrics"][0]["last"] == 0.5
        with pytest.raises(StoreError, match="older than store identities; open it once with write access"):
            _ = st.uid
    assert _raw(path, "PRAGMA user_version") == [(1,)]
    assert "stages" not in {r[0] for r in _raw(path, "SELECT name FROM sqlite_master")}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "show", "1", "--json", "--store", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["run"]["name"] == "old run"
    assert _raw(path, "PRAGMA user_version") == [(1,)]  # `gfattn show` did not migrate it either


# ------------------------------------------------------------------ a folder nobody may write
def test_reading_commands_browse_a_store_in_a_readonly_folder(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = shared / "gfattn.db"
    ids = _small_store(path)
    before = sorted(p.name for p in shared.iterdir())
    with ReadOnlyFolder(shared) as ro:
        out = ro.gfattn("runs", "--json", "--store", path)
        assert out.returncode == 0, out.stderr
        assert {r["name"]: r["status"] for r in json.loads(out.stdout)} == {"done": "completed", "crashed": "lost"}
        out = ro.gfattn("runs", "--store", path)
        assert out.returncode == 0 and "crashed" in out.stdout, out.stderr
        out = ro.gfattn("show", "done", "--json", "--store", path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["json"] == {"report": {"cells": 12}}
        out = ro.gfattn("export", "done", "--out", tmp_path / "exp", "--format", "json", "--store", path)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "exp" / "manifest.json").exists()
        for args in (("tag", "done", "x"), ("note", "done", "x"), ("rm", "done", "--yes")):
            _one_line_error(ro.gfattn(*args, "--store", path), args[0], "cannot be written")
        assert sorted(p.name for p in shared.iterdir()) == before  # no -wal/-shm, nothing else
    assert _raw(path, "SELECT COUNT(*) FROM runs") == [(2,)] and _raw(path, "SELECT COUNT(*) FROM tags") == [(1,)]
    assert ids


PROBE = """
import json, sys
from store import Store, StoreError
path = sys.argv[1]
out = {}
with Store(path, readonly="auto") as st:
    out["auto"] = [st.readonly, st.readonly_reason, st.immutable, [r["name"] for r in st.list_runs()]]
    try:
        st.add_tag(1, "x")
    except StoreError as exc:
        out["write"] = str(exc)
with Store(path, readonly=True) as st:
    out["explicit"] = [st.readonly, st.immutable, st.get_run(1)["name"]]
try:
    Store(path)
except StoreError as exc:
    out["writable"] = str(exc)
try:
    Store(path.replace("gfattn.db", "new.db"))
except StoreError as exc:
    out["create"] = str(exc)
print(json.dumps(out))
"""


def test_auto_and_immutable_opens_in_a_readonly_folder(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = shared / "gfattn.db"
    _small_store(path)
    with ReadOnlyFolder(shared) as ro:
        out = ro.python(PROBE, path)
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
    readonly, reason, immutable, names = seen["auto"]
    assert readonly and immutable and names == ["crashed", "done"]
    assert "read-only filesystem" in reason if ro.as_root else "is not writable" in reason
    assert seen["write"].startswith(f"store {path} is open read-only ({reason})")
    assert seen["explicit"] == [True, True, "done"]
    assert seen["writable"].startswith(f"store {path} cannot be written: {reason}")
    assert seen["create"].startswith(f"cannot create store {shared / 'new.db'}: ")
    assert not (shared / "new.db").exists()


def test_unmerged_wal_in_a_readonly_folder_is_refused_not_misread(tmp_path):
    src, shared = tmp_path / "live", tmp_path / "shared"
    src.mkdir()
    shared.mkdir()
    with Store(src / "gfattn.db") as st:
        st._conn.execute("PRAGMA wal_autocheckpoint = 0")
        st.create_run("only in the wal", "x")
        # copied while the writer is open: the run is in gfattn.db-wal only
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{src / 'gfattn.db'}{suffix}", f"{shared / 'gfattn.db'}{suffix}")
    assert (shared / "gfattn.db-wal").stat().st_size > 0
    with ReadOnlyFolder(shared) as ro:
        out = ro.gfattn("runs", "--json", "--store", shared / "gfattn.db")
    _one_line_error(out, "runs", "gfattn.db-wal not yet merged into the file")
    with Store(shared / "gfattn.db", readonly=True) as st:  # where -shm can be made, the WAL is read
        assert [r["name"] for r in st.list_runs()] == ["only in the wal"]


# ------------------------------------------------------------------------------------ the TUI
@pytest.mark.asyncio
async def test_tui_over_a_readonly_store_says_so_and_refuses_writes(tmp_path):
    from gfattn_tui.app import GfattnApp
    from gfattn_tui.config import TuiConfig
    from gfattn_tui.screens.runs import RunsScreen

    from tests._helpers_tui import settle

    path = tmp_path / "gfattn.db"
    with Store(path) as st:
        st.create_run("live", "pipeline")  # this process: running
    app = GfattnApp(path, config=TuiConfig(utc=True), poll=False, readonly=True)
    notes: list[str] = []
    app.notify = lambda message, **kw: notes.append(str(message))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert app.read_only and "read-only" in app.title and "read-only" in app.sub_title
        for key, what in (("N", "launching runs"), ("k", "stopping runs"), ("t", "tagging"), ("d", "deleting runs")):
            notes.clear()
            await pilot.press(key)
            await settle(pilot)
            assert isinstance(app.screen, RunsScreen), key  # no form, prompt or confirmation opened
            assert any(n.startswith(f"{what} needs a writable store") for n in notes), (key, notes)
        with pytest.raises(PermissionError, match="read-only"):
            app.launch_run(None)
    with Store(path) as st:
        assert st.list_runs()[0]["tags"] == []


@pytest.mark.asyncio
async def test_tui_over_a_writable_store_is_not_read_only(tmp_path):
    from gfattn_tui.app import GfattnApp
    from gfattn_tui.config import TuiConfig

    from tests._helpers_tui import settle

    path = tmp_path / "gfattn.db"
    Store(path).close()
    app = GfattnApp(path, config=TuiConfig(utc=True), poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert not app.read_only and "read-only" not in app.title and app.sub_title == str(path)
