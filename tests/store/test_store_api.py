"""The experiment store's API: round trips, validation, liveness, lifecycle, migrations, refusals."""

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import sqlite_utils

from store import (
    SCHEMA_VERSION,
    NetworkFilesystemError,
    RunInterrupted,
    RunNotFoundError,
    SchemaTooNewError,
    Store,
    StoreError,
    schema,
    system,
)


@pytest.fixture
def st(tmp_path):
    with Store(tmp_path / "gfattn.db") as s:
        yield s


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_open_sets_wal_and_records_named_migrations(st):
    conn = st._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    assert [m["name"] for m in st.migrations()] == [name for name, _ in schema.MIGRATIONS]
    assert not conn.in_transaction


def test_run_lifecycle_and_provenance(st):
    p = st.create_run(
        "demo",
        "pipeline",
        {"preset": "thesis", "seed": np.int64(3)},
        tags=["a", "b"],
        device="cpu",
        data_path="/data/x.h5ad",
        data_hash="abc",
    )
    c = st.create_run("dose/frozen", "finetune", {"task": "dose", "mode": "frozen"}, parent_id=p)
    run = st.get_run(c)
    assert run["status"] == "running" and run["parent_id"] == p and run["config"]["mode"] == "frozen"
    assert run["pid"] == os.getpid() and run["host"] == socket.gethostname() and run["heartbeat"] >= run["created"]
    assert run["versions"]["numpy"] == np.__version__ and "torch" in run["versions"]
    top = st.get_run(p)
    assert top["tags"] == ["a", "b"] and top["config"]["seed"] == 3 and top["children"] == [c]
    assert top["device"] == "cpu" and top["data_hash"] == "abc"
    st.finish_run(c, "completed")
    assert st.get_run(c)["status"] == "completed" and st.get_run(c)["finished"] is not None
    with pytest.raises(StoreError):
        st.finish_run(c, "done")
    with pytest.raises(RunNotFoundError):
        st.create_run("x", "finetune", parent_id=999)
    assert [r["id"] for r in st.children(p)] == [c]
    assert [r["id"] for r in st.list_runs(parent_id=None)] == [p]
    assert {r["id"] for r in st.list_runs(status="completed")} == {c}
    assert {r["id"] for r in st.list_runs(name_glob="dose/*")} == {c}
    assert {r["id"] for r in st.list_runs(tag="a")} == {p}
    assert {r["id"] for r in st.list_runs(kind="finetune")} == {c}
    assert [r["id"] for r in st.list_runs(limit=1)] == [c]
    row = st.list_runs()[0]
    assert {"id", "name", "kind", "status", "created", "finished", "parent_id", "tags"} <= set(row)
    # inputs resolved after the start (a generated data set, a cached model) are recorded; None keeps
    st.set_inputs(p, model_path="/cache/models/m", model_hash="def")
    top = st.get_run(p)
    assert (top["data_path"], top["data_hash"]) == ("/data/x.h5ad", "abc")
    assert (top["model_path"], top["model_hash"]) == ("/cache/models/m", "def")
    with pytest.raises(RunNotFoundError):
        st.set_inputs(999, data_hash="x")


def test_results_round_trip(st):
    r = st.create_run("analysis", "analysis")
    st.log_metrics(r, [dict(name="loss", value=1.0 / (i + 1), step=i, epoch=i / 10) for i in range(5)])
    st.log_metric(r, "accuracy", np.float32(0.75), split="test")
    st.log_metric(r, "nan_metric", float("nan"), split="test")
    assert [m["step"] for m in st.metrics(r, "loss")] == list(range(5))
    assert st.metrics(r, split="test")[0]["value"] == pytest.approx(0.75)
    assert st.metrics(r, "nan_metric")[0]["value"] is None

    m = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    st.put_confusion(r, ["low", "mid", "high"], m)
    (conf,) = st.confusions(r)
    assert conf["split"] == "test" and conf["labels"] == ["low", "mid", "high"]
    np.testing.assert_array_equal(conf["matrix"], m)
    with pytest.raises(StoreError):
        st.put_confusion(r, ["a"], m)

    vals = np.random.default_rng(0).random((6, 4))
    st.put_grid(r, "cosine", vals, lower=vals - 0.1, upper=vals + 0.1)
    st.put_grid(r, "norm_a", vals * 2)
    assert st.grid_names(r) == ["cosine", "norm_a"]
    g = st.grid(r, "cosine")
    np.testing.assert_allclose(g["values"], vals)
    np.testing.assert_allclose(g["upper"], vals + 0.1)
    assert st.grid(r, "norm_a")["lower"] is None

    vec = np.linspace(-1, 1, 2048)
    st.put_vector(r, "rank_pct_diff", vec, meta={"model_a": "frozen"})
    st.put_vector(r, "matrix", np.arange(6).reshape(2, 3))
    out = st.vector(r, "rank_pct_diff")
    assert out.dtype == np.float32 and out.shape == (2048,)
    np.testing.assert_array_equal(out, vec.astype("<f4"))
    assert st.vector(r, "matrix").shape == (2, 3)
    assert st.vector_meta(r, "rank_pct_diff") == {"model_a": "frozen", "dtype": "<f4", "shape": [2048]}
    blob = st._conn.execute("SELECT data FROM vectors WHERE name = 'rank_pct_diff'").fetchone()[0]
    assert blob == vec.astype("<f4").tobytes()  # little-endian float32, byte for byte

    st.put_labels(r, "dose", ["low", "mid", "high"])
    st.put_labels(r, "lowhigh", ["low", "high"])
    assert st.labels(r) == {"dose": ["low", "mid", "high"], "lowhigh": ["low", "high"]}
    st.put_split(r, ["c1", "c2", "c3"], ["train", "validation", "test"])
    st.put_split(r, ["c4"], "test")
    assert st.split(r) == {"c1": "train", "c2": "validation", "c3": "test", "c4": "test"}

    cells = pd.DataFrame(
        {"dose": [0.1, 1.0], "group": ["low", "high"], "length": [100, 2048], "umap1": [0.5, np.nan]},
        index=pd.Index(["c1", "c2"], name="cell"),
    )
    st.put_cells(r, cells)
    back = st.cells(r)
    assert list(back.columns) == ["cell_id", "dose", "group", "length", "umap1"]
    assert back["cell_id"].tolist() == ["c1", "c2"] and back["length"].tolist() == [100, 2048]
    assert math.isnan(back["umap1"][1])

    st.put_json(r, "stats", {"p": np.float64(0.01), "counts": np.arange(3), "nested": {"x": [1, 2]}})
    assert st.json_names(r) == ["stats"]
    assert st.get_json(r, "stats") == {"p": 0.01, "counts": [0, 1, 2], "nested": {"x": [1, 2]}}


def _genes(n, batch=0):
    return pd.DataFrame(
        {
            "ensembl_id": [f"ENSG{i:011d}" for i in range(n)],
            "symbol": [f"GENE{i}" for i in range(n)],
            "total": np.arange(n, dtype=float)[::-1] / n,
            "n_cells": np.arange(n) % 7,
            "label_group": ["high" if i % 2 else "low" for i in range(n)],
            "batch": batch,
        }
    )


def test_gene_table_pages_sorting_search_and_where(st):
    r = st.create_run("a", "analysis")
    df = _genes(50)
    df.loc[3, "total"] = np.nan
    df.loc[10, "symbol"] = "TP53"
    df.loc[11, "symbol"] = "MDM2_100%"
    assert st.put_gene_table(r, "genes", df) == 50
    assert st.gene_tables(r) == ["genes"]
    assert st.gene_table_columns(r, "genes") == ["ensembl_id", "symbol", "total", "n_cells", "label_group", "batch"]
    assert st.gene_table_types(r, "genes")["n_cells"] == "integer"
    page = st.gene_table(r, "genes", order_by="total", limit=5)
    assert [row["ensembl_id"] for row in page] == [f"ENSG{i:011d}" for i in (0, 1, 2, 4, 5)]
    asc = st.gene_table(r, "genes", order_by="total", descending=False, limit=100)
    assert asc[-1]["total"] is None  # NULLs last in both directions
    assert [x["total"] for x in asc[:-1]] == sorted(x["total"] for x in asc[:-1])
    assert st.gene_table(r, "genes", limit=3, offset=2)[0]["ensembl_id"] == "ENSG00000000002"
    assert [x["symbol"] for x in st.gene_table(r, "genes", search="tp5")] == ["TP53"]
    assert [x["symbol"] for x in st.gene_table(r, "genes", search="100%")] == ["MDM2_100%"]
    assert st.gene_table_count(r, "genes", search="%") == 1  # % is literal, not a wildcard
    assert st.gene_table_count(r, "genes", search="ensg0000000004") == 10
    assert st.gene_table_count(r, "genes", where={"label_group": "high"}) == 25
    assert st.gene_table_count(r, "genes", where={"n_cells": (">=", 5), "label_group": "low"}) == sum(
        1 for i in range(50) if i % 7 >= 5 and i % 2 == 0
    )
    assert st.gene_table_count(r, "genes", where={"n_cells": ("in", [0, 1])}) == sum(1 for i in range(50) if i % 7 < 2)
    assert st.gene_table_count(r, "genes", where={"total": None}) == 1
    full = st.gene_table_df(r, "genes")
    assert len(full) == 50 and full["symbol"][10] == "TP53"
    # replacing is whole: new columns appear, old rows go
    st.put_gene_table(r, "genes", [{"ensembl_id": "ENSG1", "score": 2.5}, {"ensembl_id": "ENSG2", "score": "n/a"}])
    assert st.gene_table_columns(r, "genes") == ["ensembl_id", "symbol", "score"]
    assert st.gene_table_count(r, "genes") == 2 and st.gene_table_df(r, "genes")["score"].tolist() == ["2.5", "n/a"]
    with pytest.raises(StoreError, match="no column"):
        st.gene_table(r, "genes", order_by="total")
    with pytest.raises(StoreError, match="no gene table"):
        st.gene_table(r, "nope")


def test_gene_table_columns_validated_and_values_are_data(st):
    r = st.create_run("a", "analysis")
    for bad in ["run_id", "gtable", "RowID", "", " padded", "a\x00b", "x" * 1001]:
        with pytest.raises(StoreError):
            st.put_gene_table(r, "genes", [{"ensembl_id": "E1", bad: 1.0}])
    # any other text is a column name, quoted, never SQL: a user's class names reach columns unchanged
    odd = ['x"; DROP TABLE runs; --', "1st", "with space", "a-b", "x" * 80, "Zustand µ ü"]
    st.put_gene_table(r, "odd", [{"ensembl_id": "E1", **{name: float(i) for i, name in enumerate(odd)}}])
    assert st.gene_table_columns(r, "odd")[-len(odd) :] == odd
    assert st.gene_table(r, "odd")[0]['x"; DROP TABLE runs; --'] == 0.0 and st.get_run(r)["name"] == "a"
    with pytest.raises(StoreError, match="twice"):
        st.put_gene_table(r, "genes", [{"ensembl_id": "E1"}, {"ensembl_id": "E1"}])
    with pytest.raises(StoreError, match="ensembl_id"):
        st.put_gene_table(r, "genes", [{"symbol": "X"}])
    with pytest.raises(StoreError, match="case"):
        st.put_gene_table(r, "genes", [{"ensembl_id": "E1", "Score": 1, "score": 2}])
    evil = "'); DELETE FROM runs; --"
    st.put_gene_table(r, evil, [{"ensembl_id": evil, "symbol": evil, "note": evil}])
    assert st.gene_table(r, evil, search=evil)[0]["note"] == evil
    st.set_note(r, evil)
    st.add_tag(r, evil)
    assert st.get_run(r)["note"] == evil and st.list_runs(tag=evil)[0]["id"] == r
    assert st.resolve_run(str(r)) == r


def test_numeric_sorting_survives_another_run_storing_text_in_the_same_column(st):
    a, b = st.create_run("a", "analysis"), st.create_run("b", "analysis")
    st.put_gene_table(a, "genes", [{"ensembl_id": "E1", "score": "high"}])
    st.put_gene_table(b, "genes", [{"ensembl_id": f"E{i}", "score": float(i)} for i in (2, 10, 1)])
    assert [x["score"] for x in st.gene_table(b, "genes", order_by="score")] == [10.0, 2.0, 1.0]


def test_stages_progress_and_events(st):
    r = st.create_run("p", "pipeline")
    for s in ("data", "finetune", "analysis"):
        st.set_stage(r, s, "pending")
    st.set_stage(r, "data", "running")
    st.set_stage(r, "data", "completed")
    st.set_stage(r, "finetune", "running")
    stages = st.stages(r)
    assert [(s["stage"], s["status"]) for s in stages] == [
        ("data", "completed"),
        ("finetune", "running"),
        ("analysis", "pending"),
    ]
    assert stages[0]["started"] is not None and stages[0]["finished"] >= stages[0]["started"]
    with pytest.raises(StoreError):
        st.set_stage(r, "data", "done")
    st.set_progress(r, "finetune", 30, 100, unit="steps", throughput=12.5, eta_s=5.6)
    assert st.progress(r) == {
        **st.progress(r),
        "stage": "finetune",
        "done": 30,
        "total": 100,
        "unit": "steps",
        "throughput": 12.5,
        "eta_s": 5.6,
    }
    assert st.get_run(r)["progress"]["done"] == 30
    first = st.log_event(r, "started", stage="data")
    st.log_event(r, "careful", stage="finetune", level="warning")
    assert [e["message"] for e in st.events(r)] == ["started", "careful"]
    assert [e["level"] for e in st.events(r, since_id=first)] == ["warning"]
    with pytest.raises(StoreError):
        st.log_event(r, "x", level="loud")
    st.finish_run(r, "failed", "boom")
    assert st.stages(r)[1]["status"] == "failed"  # no stage stays running after its run ends


def test_tags_note_resolve_and_delete_cascade(st):
    p = st.create_run("demo", "pipeline")
    c = st.create_run("dose/frozen", "finetune", parent_id=p)
    g = st.create_run("nested", "analysis", parent_id=c)
    st.log_metric(g, "x", 1.0)
    st.put_gene_table(g, "genes", _genes(3))
    st.add_tag(p, "keep")
    st.add_tag(p, "keep")
    st.add_tag(p, "other")
    st.remove_tag(p, "other")
    assert st.get_run(p)["tags"] == ["keep"]
    st.set_note(p, "first try")
    assert st.get_run(p)["note"] == "first try"
    again = st.create_run("demo", "pipeline")
    assert st.resolve_run("demo") == again and st.resolve_run(str(p)) == p and st.resolve_run(f"#{c}") == c
    for bad in ("nope", "999", ""):
        with pytest.raises(RunNotFoundError, match="gfattn runs"):
            st.resolve_run(bad)
    assert st.descendants(p) == [c, g]
    assert sorted(st.delete_run(p)) == [p, c, g]
    assert [r["id"] for r in st.list_runs()] == [again]
    for table in ("metrics", "gene_rows", "tags", "runs"):
        n = st._conn.execute(
            f"SELECT COUNT(*) FROM {table} WHERE {'id' if table == 'runs' else 'run_id'} IN (?, ?, ?)", (p, c, g)
        ).fetchone()[0]
        assert n == 0, table
    with pytest.raises(RunNotFoundError):
        st.get_run(p)
    with pytest.raises(RunNotFoundError):
        st.log_metric(p, "x", 1.0)
    assert st.create_run("new", "x") > g  # ids are never reused


def test_data_version_changes_only_on_commits(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as a, Store(path) as b:
        r = a.create_run("r", "x")
        v0 = b.data_version()
        assert b.data_version() == v0
        a.log_metric(r, "loss", 1.0)
        v1 = b.data_version()
        assert v1 != v0
        assert b.data_version() == v1
        b.add_tag(r, "t")  # its own commits count too
        assert b.data_version() != v1
        b.list_runs()
        assert not b._conn.in_transaction and not a._conn.in_transaction


def test_lost_needs_stale_heartbeat_and_dead_pid(tmp_path):
    path = tmp_path / "s.db"
    with Store(path, stale_after_s=5) as st:
        r = st.create_run("crashed", "finetune")
        alive = st.create_run("slow", "finetune")
        remote = st.create_run("remote", "finetune")
        remote_old = st.create_run("remote-old", "finetune")
        old = time.time() - 60
        st._conn.execute("UPDATE runs SET pid = ?, pid_start = NULL, heartbeat = ? WHERE id = ?", (_dead_pid(), old, r))
        st._conn.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", (old, alive))  # our own pid: alive
        st._conn.execute("UPDATE runs SET host = 'elsewhere', heartbeat = ? WHERE id IN (?, ?)", (old, remote, remote))
        st._conn.execute(
            "UPDATE runs SET host = 'elsewhere', heartbeat = ? WHERE id = ?", (time.time() - 7200, remote_old)
        )
        status = {x["id"]: x["status"] for x in st.list_runs()}
        assert status == {r: "lost", alive: "running", remote: "running", remote_old: "lost"}
        assert st.get_run(r)["status"] == "lost" and st.get_run(r)["stored_status"] == "running"
        assert [x["id"] for x in st.list_runs(status="lost")] == [remote_old, r]
        assert [x["id"] for x in st.list_runs(status="running")] == [remote, alive]
        assert sorted(st.reap_lost()) == sorted([r, remote_old])
        assert st.get_run(r)["stored_status"] == "lost"
        # a fresh heartbeat (the run was only suspended) brings it back
        st.heartbeat(remote_old)
        assert st.get_run(remote_old)["status"] == "running"
    with Store(path, stale_after_s=3600) as st:  # within the threshold nothing is lost
        assert st.get_run(alive)["status"] == "running"


def test_on_this_host_a_gone_or_reused_pid_is_lost_whatever_the_heartbeat(tmp_path):
    with Store(tmp_path / "s.db", stale_after_s=3600) as st:
        dead, reused, mine = st.create_run("dead", "x"), st.create_run("reused", "x"), st.create_run("mine", "x")
        st._conn.execute("UPDATE runs SET pid = ? WHERE id = ?", (_dead_pid(), dead))
        st._conn.execute("UPDATE runs SET pid_start = 1 WHERE id = ?", (reused,))  # our pid, another start time
        assert {r["id"]: r["status"] for r in st.list_runs()} == {dead: "lost", reused: "lost", mine: "running"}


def test_process_liveness_checks():
    assert system.process_alive(os.getpid(), system.process_start_ticks(os.getpid()))
    assert not system.process_alive(_dead_pid())
    assert not system.process_alive(os.getpid(), start_ticks=1)  # a reused pid has another start time
    assert not system.process_alive(None) and not system.process_alive(0)


def test_track_completed_failed_interrupted(st):
    ok = st.create_run("ok", "x")
    with st.track(ok, heartbeat_s=0.02):
        before = st.get_run(ok)["heartbeat"]
        time.sleep(0.15)
        assert st.get_run(ok)["heartbeat"] > before  # the thread beats
    assert st.get_run(ok)["status"] == "completed"

    bad = st.create_run("bad", "x")
    with pytest.raises(ValueError):
        with st.track(bad):
            raise ValueError("matrix is singular\nsecond line")
    run = st.get_run(bad)
    assert run["status"] == "failed" and run["error"] == "ValueError: matrix is singular"
    assert "Traceback" in st.events(bad)[-1]["message"] and st.events(bad)[-1]["level"] == "error"

    ctrl_c = st.create_run("ctrl-c", "x")
    with pytest.raises(KeyboardInterrupt):
        with st.track(ctrl_c):
            raise KeyboardInterrupt
    assert st.get_run(ctrl_c)["status"] == "interrupted"
    assert threading.active_count() < 5  # heartbeat threads are joined


def test_track_sigterm_marks_interrupted_and_restores_handler(st):
    def previous(signum, frame):  # pragma: no cover - only installed, never called
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        r = st.create_run("term", "x")
        with pytest.raises(RunInterrupted) as info:
            with st.track(r):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by the handler long before this ends
        assert info.value.signum == signal.SIGTERM
        assert isinstance(info.value, KeyboardInterrupt)
        run = st.get_run(r)
        assert run["status"] == "interrupted" and "SIGTERM" in run["error"]
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_track_off_main_thread_installs_no_handler(st):
    r = st.create_run("thread", "x")
    seen = {}

    def work():
        with st.track(r, heartbeat_s=0.02):
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["handler"] is before and st.get_run(r)["status"] == "completed"


def test_threads_share_one_store(st):
    r = st.create_run("r", "x")
    errors = []

    def writer(k):
        try:
            for i in range(30):
                st.log_metrics(r, [dict(name=f"t{k}", value=i, step=i)] * 3)
                st.list_runs()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(st.metrics(r)) == 4 * 30 * 3


def test_write_is_one_transaction(st):
    r = st.create_run("r", "x")
    rows = [dict(name="ok", value=1.0)] * 10 + [dict(name=None, value=2.0)]
    with pytest.raises(StoreError):
        st.log_metrics(r, rows)
    assert st.metrics(r) == []
    st.put_gene_table(r, "genes", _genes(5))
    with pytest.raises(StoreError):
        st.put_gene_table(r, "genes", [{"ensembl_id": "E1", "new_col": 1}, {"ensembl_id": "E1"}])
    assert st.gene_table_count(r, "genes") == 5  # the old table is untouched


# ------------------------------------------------------------------ migrations and refusals
def _build_v1_store(path):
    """A store exactly as the first schema version left it, with one finished run in it."""
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute("PRAGMA journal_mode = WAL")
    assert schema.migrate(db, target=1) == ["0001_initial"]
    conn.execute(
        """INSERT INTO runs (name, kind, status, created, finished, config, versions, host, pid, heartbeat)
           VALUES ('old run', 'finetune', 'completed', 1.0e9, 1.0e9 + 60, '{"task": "dose"}', '{}', 'h', 1, 1.0e9)"""
    )
    conn.execute("INSERT INTO metrics (run_id, name, value, step, time) VALUES (1, 'loss', 0.5, 3, 1.0e9)")
    conn.execute(
        """INSERT INTO runs (name, kind, status, created, config, versions, host, pid, heartbeat)
                    VALUES ('old crash', 'finetune', 'running', 1.0e9, '{}', '{}', ?, ?, 1.0e9)""",
        (socket.gethostname(), _dead_pid()),
    )
    conn.close()


def test_migrates_a_store_of_the_previous_schema_version(tmp_path):
    path = tmp_path / "old.db"
    _build_v1_store(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "stages" not in {r[0] for r in raw.execute("SELECT name FROM sqlite_master")}
    raw.close()
    with Store(path) as st:
        assert st.schema_version == SCHEMA_VERSION
        assert [m["name"] for m in st.migrations()] == [
            "0001_initial",
            "0002_stages_and_indexes",
            "0003_store_identity",
        ]
        assert len(st.uid) == 32
        run = st.get_run(1)
        assert run["name"] == "old run" and run["config"] == {"task": "dose"} and run["status"] == "completed"
        assert st.metrics(1)[0]["value"] == 0.5
        assert st.get_run(2)["status"] == "lost"  # no pid_start recorded: still judged by pid
        st.set_stage(1, "train", "completed")
        assert st.stages(1)[0]["stage"] == "train"
        new = st.create_run("new", "finetune")
        assert st.get_run(new)["status"] == "running"
        names = {r[0] for r in st._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"runs_by_status", "metrics_by_run_name"} <= names
    with Store(path) as st:  # opening again applies nothing
        assert len(st.migrations()) == SCHEMA_VERSION


def test_refuses_a_store_from_a_newer_gfattn(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(SchemaTooNewError, match="newer gfattn") as info:
        Store(path)
    assert str(SCHEMA_VERSION + 1) in str(info.value) and "\n" not in str(info.value)


def test_refuses_files_that_are_not_gfattn_stores(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a usable gfattn store"):
        Store(junk)
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE customers (id INTEGER)")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match="not a gfattn store"):
        Store(other)
    with pytest.raises(StoreError, match="directory"):
        Store(tmp_path)
    with pytest.raises(StoreError, match="no gfattn store"):
        Store(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/nfs nfs4 rw,relatime,vers=4.2 0 0
//nas/share /mnt/smb cifs rw 0 0
user@host:/home /mnt/ssh fuse.sshfs rw,nosuid 0 0
/dev/sdb1 /mnt/nfs/local\\040disk ext4 rw 0 0
"""


def test_network_filesystem_detection():
    assert system.filesystem_type("/home/x/gfattn.db", MOUNTS) == "ext4"
    assert system.filesystem_type("/mnt/nfs/proj/gfattn.db", MOUNTS) == "nfs4"
    assert system.filesystem_type("/mnt/nfs/local disk/gfattn.db", MOUNTS) == "ext4"
    assert system.filesystem_type("/mnt/nfsother/gfattn.db", MOUNTS) == "ext4"
    for path in ("/mnt/nfs/a.db", "/mnt/smb/a.db", "/mnt/ssh/a.db"):
        with pytest.raises(NetworkFilesystemError, match="WAL"):
            system.check_local_filesystem(path, MOUNTS)
    system.check_local_filesystem("/mnt/nfs/local disk/a.db", MOUNTS)
    assert not system.is_network_filesystem("ext4") and system.is_network_filesystem("9p")


def test_store_refuses_a_network_path(tmp_path, monkeypatch):
    monkeypatch.setattr(system, "filesystem_type", lambda path, mounts_text=None: "nfs4")
    with pytest.raises(NetworkFilesystemError, match="network filesystem .*WAL"):
        Store(tmp_path / "s.db")
    assert not (tmp_path / "s.db").exists()
    monkeypatch.setenv(system.ALLOW_NETWORK_FS_ENV, "1")
    Store(tmp_path / "s.db").close()


def test_git_commit_read_without_git(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert system.git_commit(tmp_path) is None
    (git / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/main\n")
    assert system.git_commit(tmp_path / "sub") == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert system.git_commit(tmp_path) == "b" * 40


def test_show_document_is_strict_json(st):
    r = st.create_run("r", "x", {"lr": float("nan")})
    st.log_metric(r, "loss", float("inf"))
    st.put_grid(r, "g", np.full((2, 2), np.nan))
    doc = st.show(r)
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["format"] == "gfattn.show/1"
    assert doc["grids"][0]["mean"] is None and doc["run"]["config"]["lr"] is None


def test_a_transaction_left_open_never_serves_stale_reads(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as reader, Store(path) as writer:
        r = writer.create_run("r", "x")
        reader._conn.execute("BEGIN")  # as if a call had been interrupted between BEGIN and COMMIT
        reader._conn.execute("SELECT COUNT(*) FROM runs").fetchone()
        writer.log_metric(r, "loss", 1.0)
        assert len(reader.metrics(r)) == 1
        assert not reader._conn.in_transaction
        reader._conn.execute("BEGIN")
        reader.add_tag(r, "t")
        assert writer.get_run(r)["tags"] == ["t"]


def test_reopen_run_for_resuming(tmp_path):
    with Store(tmp_path / "s.db", stale_after_s=5) as st:
        r = st.create_run("p", "pipeline")
        st.finish_run(r, "failed", "boom")
        st.reopen_run(r)
        run = st.get_run(r)
        assert run["status"] == "running" and run["error"] is None and run["finished"] is None
        other = st.create_run("other", "pipeline")
        st._conn.execute(
            "UPDATE runs SET pid = 1, pid_start = ?, host = ? WHERE id = ?",
            (system.process_start_ticks(1), socket.gethostname(), other),
        )
        with pytest.raises(StoreError, match="still running"):
            st.reopen_run(other)  # pid 1 is alive (with the recorded start time)
        st._conn.execute("UPDATE runs SET pid = ?, heartbeat = 1.0e9 WHERE id = ?", (_dead_pid(), other))
        st.reopen_run(other)  # lost: may be taken over
        assert st.get_run(other)["pid"] == os.getpid()
