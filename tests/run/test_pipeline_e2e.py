"""`gfattn pipeline --quick` end to end on CPU, asserting on what lands in the store."""

import json

import numpy as np
import pytest

from store import Store

from tests._helpers_cli import cli

P53_UP = {
    "CDKN1A",
    "MDM2",
    "TP53I3",
    "SPATA18",
    "PHLDA3",
    "FDXR",
    "GDF15",
    "RRM2B",
    "DDB2",
    "SESN1",
    "ZMAT3",
    "TNFRSF10B",
    "AEN",
    "TIGAR",
    "FAS",
    "BTG2",
    "PLK3",
    "BAX",
    "XPC",
    "BBC3",
    "PMAIP1",
}


@pytest.mark.slow
def test_quick_run_completes_every_stage(quick_run):
    db, out = quick_run
    st = Store(db)
    (run,) = st.list_runs(kind="pipeline")
    assert run["status"] == "completed"
    assert f"run {run['id']}" in out.stdout
    stages = {s["stage"]: s["status"] for s in st.stages(run["id"])}
    assert stages and all(v in ("completed", "skipped") for v in stages.values()), stages
    assert {"data", "model", "tokenize", "record", "de"} <= set(stages)
    children = st.children(run["id"])
    kinds = {c["kind"] for c in children}
    assert {"data", "finetune", "de", "analysis"} <= kinds
    assert all(c["status"] == "completed" for c in children)
    assert {c["name"] for c in children if c["kind"] == "finetune"} == {
        "lowhigh/frozen",
        "lowhigh/unfrozen",
        "lowhigh/last-1",
    }


@pytest.mark.slow
def test_quick_run_fills_every_table(quick_run):
    db, _ = quick_run
    st = Store(db)
    (run,) = st.list_runs(kind="pipeline")
    children = {c["name"]: c for c in st.children(run["id"])}
    data = children["data"]["id"]
    cells = st.cells(data)
    # a class column per task, in the user's words: the sci-Plex presets' dose classes carry their unit
    assert {"umap1", "umap2", "dose", "lowhigh", "length", "split"} <= set(cells.columns)
    assert np.isfinite(cells[["umap1", "umap2"]].to_numpy()).all()
    assert st.labels(data)["lowhigh"] == ["low", "high"]
    assert st.labels(data)["dose"] == ["0 uM", "1.25 uM", "2.5 uM", "12.5 uM", "25 uM"]
    assert set(cells["dose"]) == set(st.labels(data)["dose"])
    assert "qc_report" in st.json_names(data)
    for c in children.values():
        if c["kind"] == "finetune":
            assert st.confusions(c["id"]), c["name"]
            assert st.metrics(c["id"], split="train"), c["name"]
            assert st.metrics(c["id"], split="validation"), c["name"]
    analyses = [c for c in children.values() if c["kind"] == "analysis"]
    assert [c["name"] for c in analyses] == ["lowhigh: frozen vs unfrozen"]
    for c in analyses:
        assert {"cosine"} <= set(st.grid_names(c["id"]))
        assert {"rank_received_a", "rank_received_b", "rank_pct_diff"} <= set(st.vector_names(c["id"]))
        assert st.gene_table_count(c["id"], "genes") > 100
        assert "de_overlap" in st.json_names(c["id"])


@pytest.mark.slow
def test_quick_run_learns_and_finds_planted_genes(quick_run):
    db, _ = quick_run
    st = Store(db)
    (run,) = st.list_runs(kind="pipeline")
    children = {c["name"]: c for c in st.children(run["id"])}
    unfrozen = children["lowhigh/unfrozen"]["id"]
    acc = {m["name"]: m["value"] for m in st.metrics(unfrozen, split="test")}["accuracy"]
    (conf,) = st.confusions(unfrozen)
    majority = conf["matrix"].sum(axis=1).max() / conf["matrix"].sum()  # always predicting the larger class
    assert acc >= majority + 0.08, (acc, majority)
    de = st.gene_table(children["de: high vs low"]["id"], "de", order_by="score", descending=True, limit=10)
    planted = [r["symbol"] for r in de if r["symbol"] in P53_UP]
    assert len(planted) >= 8, [r["symbol"] for r in de]


@pytest.mark.slow
def test_show_json_and_plot_of_the_run(quick_run, tmp_path):
    db, _ = quick_run
    out = cli("show", "1", "--json", "--store", str(db))
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["run"]["status"] == "completed" if "run" in shown else shown["status"] == "completed"
    out = cli("plot", "1", "--out", str(tmp_path / "fig"), "--store", str(db))
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    for stem in ("fig1_umap", "fig3_confusion_lowhigh"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names
    assert any(n.startswith("fig4_similarity_") for n in names)
    assert any(n.startswith("fig5_ranks_") for n in names)
    assert any(n.startswith("table8_key_genes_") for n in names)
    assert any(n.startswith("fig7_attention_vs_de_") and n.endswith(".png") for n in names)
    assert any(n.startswith("fig9_norms_") for n in names)
    assert any(n.startswith("fig10_attribution_") and n.endswith(".png") for n in names)
    assert any(n.startswith("fig11_deletion_") and n.endswith(".png") for n in names)
    assert any(n.startswith("fig12_randomisation_") and n.endswith(".png") for n in names)
    text = cli("show", "1", "--store", str(db))
    assert "top genes of unfrozen by score (single-gene deletion" in text.stdout
    assert "deletion from unfrozen: change of the true-class probability" in text.stdout


@pytest.mark.slow
def test_compare_two_runs(quick_run, tmp_path):
    """`gfattn compare`: a run against itself differs by nothing, and the figure is written."""
    db, _ = quick_run
    out = cli("compare", "1", "1", "--store", str(db), "--out", str(tmp_path / "cmp"))
    assert out.returncode == 0, out.stderr
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("  lowhigh/")]
    assert len(rows) == 3 and all("+0.000" in ln for ln in rows)
    assert "key genes vs top DE genes" in out.stdout and "matched p=" in out.stdout
    assert {p.suffix for p in (tmp_path / "cmp").iterdir()} == {".png", ".svg"}
