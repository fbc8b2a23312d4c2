"""`gfattn runs/show/export/tag/note/rm` against a fixture store, and the export/show round trip."""

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from store import SCHEMA_VERSION, Store
from store.export import metric_summaries

from tests import REPO
from tests._helpers_cli import cli


def gfattn(*args, store=None):
    """The command in this process (`pipeline.cli.main`), without $GFATTN_STORE."""
    return cli(*args, *(["--store", store] if store is not None else []), cwd=REPO, env={"GFATTN_STORE": None})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def build_fixture_store(path: Path) -> dict:
    """A small finished pipeline run with every kind of result, plus a crashed and a failed run."""
    rng = np.random.default_rng(0)
    ids = {}
    with Store(path) as st:
        p = ids["pipeline"] = st.create_run("demo", "pipeline", {"preset": "thesis", "seed": 0}, tags=["demo"])
        for s in ("data", "finetune", "analysis"):
            st.set_stage(p, s, "completed")
        d = ids["data"] = st.create_run("data", "data", {"drug": "nutlin"}, parent_id=p)
        st.put_json(d, "qc_report", {"cells": 120, "dropped": {"low_counts": 3}})
        cells = pd.DataFrame(
            {
                "cell_id": [f"cell{i}" for i in range(12)],
                "dose": rng.choice([0.1, 1.0, 10.0], 12),
                "group": ["low", "high"] * 6,
                "length": rng.integers(50, 2048, 12),
                "umap1": rng.normal(size=12),
                "umap2": rng.normal(size=12),
            }
        )
        st.put_cells(d, cells)
        st.put_labels(d, "dose", ["0.1", "1.0", "10.0"])
        st.put_split(d, cells["cell_id"], ["train"] * 8 + ["validation"] * 2 + ["test"] * 2)
        st.put_vector(d, "length_hist", rng.integers(0, 30, 40), meta={"bin_edges": [0, 2048]})
        st.log_event(d, "selected 120 cells", stage="data")
        st.finish_run(d, "completed")
        for mode in ("frozen", "unfrozen"):
            f = ids[mode] = st.create_run(f"dose/{mode}", "finetune", {"task": "dose", "mode": mode}, parent_id=p)
            st.log_metrics(
                f, [dict(name="train/loss", value=2.0 / (i + 1), step=i * 10, epoch=i / 5) for i in range(15)]
            )
            for e in range(3):
                st.log_metrics(
                    f,
                    [
                        dict(name="accuracy", value=0.5 + 0.1 * e, epoch=e, split="validation"),
                        dict(name="loss", value=1.0 - 0.2 * e, epoch=e, split="validation"),
                    ],
                )
            st.log_metrics(
                f,
                [
                    dict(name="accuracy", value=0.71, split="test"),
                    dict(name="macro_f1", value=0.69, split="test"),
                    dict(name="precision/high", value=0.8, split="test"),
                ],
            )
            st.put_confusion(f, ["0.1", "1.0", "10.0"], rng.integers(0, 20, (3, 3)))
            st.put_labels(f, "dose", ["0.1", "1.0", "10.0"])
            st.finish_run(f, "completed")
        a = ids["analysis"] = st.create_run(
            "dose: frozen vs unfrozen", "analysis", {"pair": ["frozen", "unfrozen"]}, parent_id=p
        )
        v = rng.random((6, 4))
        st.put_grid(a, "cosine", v, lower=v - 0.05, upper=v + 0.05)
        st.put_grid(a, "norm_a", rng.random((6, 4)))
        st.put_vector(a, "rank_pct_diff", rng.normal(size=256))
        genes = pd.DataFrame(
            {
                "ensembl_id": [f"ENSG{i:011d}" for i in range(40)],
                "symbol": [f"G{i}" for i in range(40)],
                "total": rng.random(40),
                "n_cells": rng.integers(0, 12, 40),
                "p53_target": [i % 5 == 0 for i in range(40)],
            }
        )
        st.put_gene_table(a, "genes", genes)
        st.put_gene_table(a, "de", genes[["ensembl_id", "symbol"]].assign(logfc=rng.normal(size=40)))
        st.put_json(a, "stats", {"wilcoxon_p": 0.012, "overlap_at_50": 7})
        st.finish_run(a, "completed")
        st.finish_run(p, "completed")
        bad = ids["failed"] = st.create_run("lowhigh/frozen", "finetune", {"task": "lowhigh"})
        st.finish_run(bad, "failed", "ValueError: only one class in the training split")
        crashed = ids["crashed"] = st.create_run("crashed", "finetune")
        st._conn.execute(
            "UPDATE runs SET pid = ?, pid_start = NULL, heartbeat = 1.0e9 WHERE id = ?", (_dead_pid(), crashed)
        )
    return ids


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "gfattn.db"
    return path, build_fixture_store(path)


# ----------------------------------------------------------------------------- export <-> show
def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (np.generic,)):
        return _clean(v.item())
    return v


def load_export(out_dir: Path) -> tuple[dict, dict]:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    tables = {}
    for name, info in manifest["files"].items():
        path = out_dir / name
        if path.suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""], float_precision="round_trip")
        elif path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.DataFrame.from_records(json.loads(path.read_text()))
        tables[name] = (info, [{k: _clean(v) for k, v in r.items()} for r in df.to_dict(orient="records")])
    return manifest, tables


def _table(tables, stem):
    for name, (_info, rows) in tables.items():
        if Path(name).stem == stem:
            return rows
    return []


def assert_export_matches_show(doc: dict, tables: dict) -> int:
    """Every number in the show document recomputed from the exported rows; returns runs checked."""
    run = doc["run"]
    rid = run["id"]
    (row,) = [r for r in _table(tables, "runs") if r["id"] == rid]
    for key in (
        "name",
        "kind",
        "status",
        "created",
        "finished",
        "parent_id",
        "error",
        "note",
        "host",
        "pid",
        "heartbeat",
        "git_commit",
        "device",
    ):
        assert row[key] == run[key], key
    assert json.loads(row["config"]) == run["config"] and json.loads(row["tags"]) == run["tags"]
    assert json.loads(row["versions"]) == run["versions"]

    metrics = sorted((r for r in _table(tables, "metrics") if r["run_id"] == rid), key=lambda r: r["id"])
    assert metric_summaries(metrics) == doc["metrics"]

    stages = [
        {k: r[k] for k in ("stage", "status", "started", "finished")}
        for r in _table(tables, "stages")
        if r["run_id"] == rid
    ]
    assert stages == doc["stages"]
    assert sum(r["run_id"] == rid for r in _table(tables, "events")) == doc["events"]["count"]

    for c in doc["confusions"]:
        labels = c["labels"]
        m = [[None] * len(labels) for _ in labels]
        for r in _table(tables, "confusions"):
            if r["run_id"] == rid and r["split"] == c["split"]:
                m[labels.index(str(r["true_label"]))][labels.index(str(r["predicted_label"]))] = r["count"]
        assert m == c["matrix"]
    for g in doc["grids"]:
        rows = [r for r in _table(tables, "grids") if r["run_id"] == rid and r["name"] == g["name"]]
        assert [max(r["layer"] for r in rows) + 1, max(r["head"] for r in rows) + 1] == g["shape"]
        assert np.mean([r["value"] for r in rows]) == pytest.approx(g["mean"], rel=1e-12)
        assert any(r["lower"] is not None for r in rows) == g["has_bounds"]
    for v in doc["vectors"]:
        (meta,) = [r for r in _table(tables, "vector_meta") if r["run_id"] == rid and r["name"] == v["name"]]
        assert (
            json.loads(meta["shape"]) == v["shape"]
            and meta["dtype"] == v["dtype"]
            and json.loads(meta["meta"]) == v["meta"]
        )
        assert sum(r["run_id"] == rid and r["name"] == v["name"] for r in _table(tables, "vectors")) == int(
            np.prod(v["shape"])
        )
    for t in doc["gene_tables"]:
        (found,) = [
            (info, rows)
            for info, rows in tables.values()
            if info["table"] == "gene_table" and info["run_id"] == rid and info["name"] == t["name"]
        ]
        assert found[0]["rows"] == len(found[1]) == t["rows"]
        assert list(found[1][0]) == t["columns"]
    labels: dict = {}
    for r in sorted(
        (r for r in _table(tables, "labels") if r["run_id"] == rid), key=lambda r: (r["task"], r["position"])
    ):
        labels.setdefault(r["task"], []).append(str(r["label"]))
    assert labels == doc["labels"]
    counts: dict = {}
    for r in _table(tables, "splits"):
        if r["run_id"] == rid:
            counts[r["split"]] = counts.get(r["split"], 0) + 1
    assert counts == doc["split_counts"]
    cells = _table(tables, f"cells__run{rid}")
    assert len(cells) == doc["cells"]["rows"]
    if cells:
        assert list(cells[0]) == doc["cells"]["columns"]
    assert {r["name"]: json.loads(r["value"]) for r in _table(tables, "json_results") if r["run_id"] == rid} == doc[
        "json"
    ]
    return 1 + sum(assert_export_matches_show(child, tables) for child in doc["children"])


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_export_round_trip_matches_show(fixture_store, tmp_path, fmt):
    path, ids = fixture_store
    with Store(path) as st:
        doc = json.loads(json.dumps(st.show(ids["pipeline"])))
        written = st.export(ids["pipeline"], tmp_path / "out", fmt)
        gene_df = st.gene_table_df(ids["analysis"], "genes")
    assert all(p.exists() for p in written)
    manifest, tables = load_export(tmp_path / "out")
    assert manifest["run_id"] == ids["pipeline"] and manifest["file_format"] == fmt
    assert assert_export_matches_show(doc, tables) == 5
    # the gene table's values too, not only its shape
    (genes,) = [rows for info, rows in tables.values() if info.get("name") == "genes"]
    assert [g["total"] for g in genes] == gene_df["total"].tolist()
    assert [g["ensembl_id"] for g in genes] == gene_df["ensembl_id"].tolist()


# ----------------------------------------------------------------------------- the commands
def test_runs_json_lists_every_run_with_resolved_status(fixture_store):
    path, ids = fixture_store
    out = gfattn("runs", "--json", store=path)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)
    assert {r["id"] for r in runs} == set(ids.values())
    for r in runs:
        assert {"id", "name", "status", "created"} <= set(r)
    status = {r["id"]: r["status"] for r in runs}
    assert (
        status[ids["crashed"]] == "lost" and status[ids["failed"]] == "failed" and status[ids["frozen"]] == "completed"
    )

    out = gfattn("runs", "--json", "--status", "completed", "--name", "dose/*", store=path)
    assert sorted(r["name"] for r in json.loads(out.stdout)) == ["dose/frozen", "dose/unfrozen"]
    out = gfattn("runs", "--json", "--tag", "demo", store=path)
    assert [r["id"] for r in json.loads(out.stdout)] == [ids["pipeline"]]

    out = gfattn("runs", store=path)
    assert out.returncode == 0 and out.stdout.splitlines()[0].split()[:4] == ["ID", "NAME", "KIND", "STATUS"]
    assert "└ dose/frozen" in out.stdout and "lost" in out.stdout


def test_show_json_and_export_from_the_command_line(fixture_store, tmp_path):
    path, ids = fixture_store
    out = gfattn("show", "demo", "--json", store=path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    with Store(path) as st:
        assert doc == json.loads(json.dumps(st.show(ids["pipeline"])))
    assert doc["format"] == "gfattn.show/1" and len(doc["children"]) == 4
    exp = gfattn("export", "demo", "--out", tmp_path / "exp", "--format", "parquet", store=path)
    assert exp.returncode == 0, exp.stderr
    _, tables = load_export(tmp_path / "exp")
    assert assert_export_matches_show(doc, tables) == 5

    human = gfattn("show", str(ids["frozen"]), store=path)
    assert human.returncode == 0 and "accuracy [test]" in human.stdout and "confusion [test]" in human.stdout


def test_bad_run_and_bad_store_exit_2_with_one_line(fixture_store, tmp_path):
    path, _ = fixture_store
    cases = [
        (("show", "no-such-run"), path, "no run with id or name 'no-such-run'"),
        (("runs",), tmp_path / "missing.db", "no gfattn store at"),
    ]
    for args, store, message in cases:
        out = gfattn(*args, store=store)
        assert out.returncode == 2, (args, out.stderr)
        assert (
            out.stderr.count("\n") == 1 and message in out.stderr and out.stderr.startswith(f"gfattn {args[0]}: error:")
        )
    assert not (tmp_path / "missing.db").exists()


def test_store_from_a_newer_gfattn_exits_2(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    raw.commit()
    raw.close()
    out = gfattn("runs", "--json", store=path)
    assert out.returncode == 2 and "newer gfattn" in out.stderr and out.stderr.count("\n") == 1


def test_rm_needs_yes_without_a_terminal(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as st:
        st.finish_run(st.create_run("demo", "pipeline"), "completed")  # a running run is refused anyway
    refused = gfattn("rm", "demo", store=path)  # stdin is not a terminal: needs --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    with Store(path) as st:
        assert len(st.list_runs()) == 1


def test_tag_note_rm_and_errors_in_process(fixture_store, tmp_path, capsys, monkeypatch):
    """The remaining commands through `pipeline.cli.main` (the same code path as `gfattn`)."""
    from pipeline.cli import main

    fixture, _ = fixture_store
    path = tmp_path / "s.db"
    with Store(path) as st:
        p = st.create_run("demo", "pipeline")
        c = st.create_run("child", "finetune", parent_id=p)
        st.finish_run(c, "completed")
        st.finish_run(p, "completed")  # `rm` refuses a run still running
    s = ["--store", str(path)]
    evil = 'it\'s "fine"; DROP TABLE runs; --'
    assert main(["tag", "demo", "best", *s]) == 0
    assert main(["tag", "demo", "other", *s]) == 0
    assert main(["tag", "demo", "other", "--remove", *s]) == 0
    assert main(["note", str(p), evil, *s]) == 0
    with Store(path) as st:
        run = st.get_run(p)
        assert run["tags"] == ["best"] and run["note"] == evil
    assert main(["note", "demo", "", *s]) == 0
    with Store(path) as st:
        assert st.get_run(p)["note"] is None
    capsys.readouterr()
    assert main(["export", "999", "--out", str(tmp_path / "x"), "--store", str(fixture)]) == 2
    assert main(["tag", "demo", "x", "--store", str(tmp_path)]) == 2
    assert main(["note", "nope", "x", *s]) == 2
    assert main(["runs", "--limit", "0", *s]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("gfattn ") and ": error: " in line for line in err)
    assert "no run with id or name '999'" in err[0] and "is a directory" in err[1]
    assert main(["rm", "demo", "--yes", *s]) == 0
    with Store(path) as st:
        assert st.list_runs() == []
    assert c


def test_commands_in_process(tmp_path, capsys, monkeypatch):
    """The same commands through `pipeline.cli.main`, with the store taken from $GFATTN_STORE."""
    from pipeline.cli import main

    path = tmp_path / "env.db"
    with Store(path) as st:
        r = st.create_run("solo", "finetune")
        st.finish_run(r, "completed")
    monkeypatch.setenv("GFATTN_STORE", str(path))
    assert main(["runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "solo"
    assert main(["runs", "--status", "lost"]) == 0
    assert capsys.readouterr().out.strip().endswith("no runs")
    assert main(["runs", "--limit", "0"]) == 2
    assert main(["export", "solo", "--out", str(tmp_path / "e"), "--format", "json"]) == 0
    assert (tmp_path / "e" / "runs.json").exists()
