"""Key genes on the synthetic data against its planted truth, read from the session's quick pipeline run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.synth_genes import P53_TARGETS_UP
from store import Store

P53_TARGETS = set(P53_TARGETS_UP)


def _children(db):
    st = Store(db)
    (run,) = st.list_runs(kind="pipeline")
    return st, {c["name"]: c for c in st.children(run["id"])}


def _test_cells(db, checkpoint: Path):
    from datasets import load_from_disk

    from pipeline.training.finetune import load_split

    (tokenized,) = [p for p in (Path(db).parent / ".gfattn-cache" / "tokenized").iterdir() if p.is_dir()]
    ds = load_from_disk(str(tokenized))
    split = load_split(checkpoint)
    rows = [i for i, c in enumerate(ds["cell_id"]) if split.get(str(c)) == "test"]
    return ds.select(rows)


@pytest.mark.slow
def test_controlled_overlap_of_a_random_weight_model_is_not_significant(quick_run):
    """A model with random weights attends to no biology: the matched null must call its key genes' overlap
    with DE non-significant, though its summed attention follows detection frequency."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.analysis.pair import run_pair_analysis
    from pipeline.models.load import model_dictionaries

    db, _ = quick_run
    st, children = _children(db)
    checkpoint = Path(st.get_json(children["lowhigh/unfrozen"]["id"], "checkpoint")["path"])
    de = st.gene_table_df(children["de: high vs low"]["id"], "de")
    torch.manual_seed(0)
    config = json.loads((checkpoint / "config.json").read_text())
    model = BertForSequenceClassification(BertConfig(**config)).eval()
    out = run_pair_analysis(
        model,
        None,
        _test_cells(db, checkpoint),
        dicts=model_dictionaries(checkpoint),
        de=de,
        top_k=(10, 20, 50),
    )
    ov = out["de_overlap"]
    assert ov["attention_column"] == "key_score_a"
    assert all(item["p_matched"] > 0.05 for item in ov["overlap"]), ov["overlap"]
    assert out["key_genes"]["frequency_spearman"]["attn_a"] > 0.8
    assert any("attn_a" in w for w in out["key_genes"]["warnings"])
    raw = ov["by_column"]["attn_a"]["overlap"]
    assert min(item["p_value"] for item in raw) < min(item["p_matched"] for item in raw)


@pytest.mark.slow
def test_planted_targets_lead_the_controlled_key_genes_of_the_unfrozen_model(quick_run):
    db, _ = quick_run
    st, children = _children(db)
    child = children["lowhigh: frozen vs unfrozen"]["id"]
    genes = st.gene_table_df(child, "genes")
    top = genes.dropna(subset=["key_score_b"]).nlargest(20, "key_score_b")
    assert len(set(top["symbol"]) & P53_TARGETS) >= 2, top["symbol"].tolist()
    doc = st.get_json(child, "key_genes")
    rho = doc["frequency_spearman"]
    assert abs(rho["key_score_b"]) < 0.5 < rho["attn_b"]
    assert doc["default_score"] == "key_score_b"
    assert np.all(genes.loc[genes["key_score_b"].notna(), "n_cells"] >= doc["min_cells"])


@pytest.mark.slow
def test_deleting_planted_targets_hurts_high_dose_predictions_more_than_matched_random_sets(quick_run):
    """The unfrozen lowhigh model uses the planted p53 targets: deleting them from the high-dose test cells
    lowers the high-dose probability more than deleting random genes matched on frequency and rank."""
    from pipeline.analysis.deletion import DeletionEngine, matched_random_sets
    from pipeline.analysis.keygenes import frequency_rank_bins
    from pipeline.models.load import load_for_attention, model_dictionaries

    db, _ = quick_run
    st, children = _children(db)
    checkpoint = Path(st.get_json(children["lowhigh/unfrozen"]["id"], "checkpoint")["path"])
    test = _test_cells(db, checkpoint)
    data = children["data"]["id"]
    cells = st.cells(data).set_index("cell_id")
    classes = st.labels(data)["lowhigh"]
    label = np.array([classes.index(cells.loc[str(c), "lowhigh"]) for c in test["cell_id"]])
    high = test.select(np.flatnonzero(label == classes.index("high")).tolist())
    genes = st.gene_table_df(children["lowhigh: frozen vs unfrozen"]["id"], "genes")
    candidates = genes["token_id"].to_numpy()
    bins = frequency_rank_bins(genes["n_cells"].to_numpy(), genes["rank_mean"].to_numpy(), 5, 5)
    planted = np.flatnonzero(genes["symbol"].isin(P53_TARGETS).to_numpy())
    assert len(planted) >= 5
    randoms = matched_random_sets(planted, bins, 39, np.random.default_rng(0))
    dicts = model_dictionaries(checkpoint)
    engine = DeletionEngine(
        load_for_attention(checkpoint),
        high,
        np.full(len(high), classes.index("high")),
        pad_id=dicts.pad_id,
        special_ids=dicts.special_ids,
    )
    effects = engine.effects([candidates[planted]] + [candidates[r] for r in randoms])
    drop = [float(np.mean(e.delta_prob)) for e in effects]
    p = (1 + sum(d <= drop[0] for d in drop[1:])) / len(drop)
    assert drop[0] < 0 and p < 0.05, (drop[0], sorted(drop[1:])[:5], p)


@pytest.mark.slow
def test_planted_targets_overlap_genes_up_in_high_with_q_values_and_held_out_de(quick_run):
    """The unfrozen model's key genes overlap the genes up in high dose (named so), not those up in low, at a
    BH q below 0.05 over the run's overlap tests; the DE compared with was computed without the test cells
    (its full-data twin is kept); every deletion test has a q, a resolved p and its matching quality."""
    db, _ = quick_run
    st, children = _children(db)
    child = children["lowhigh: frozen vs unfrozen"]["id"]
    ov = st.get_json(child, "de_overlap")
    assert ov["attention_column"] == "key_score_b" and "held out" in ov["de_cells"]
    assert ov["population"] < ov["background"]  # the key score ranks only genes in enough cells
    by = {d["label"]: d["overlap"] for d in ov["directions"]}
    assert set(by) == {"up in high", "up in low", "either direction"}
    assert min(item["q_matched"] for item in by["up in high"]) < 0.05, by["up in high"]
    assert all(item["q_matched"] >= item["p_matched"] for block in by.values() for item in block)
    assert ov["multiplicity"]["n_tests"]["p_matched"] >= 3 * len(ov["overlap"])
    de_run = children["de: high vs low"]["id"]
    assert {"de", "de_all_cells"} <= set(st.gene_tables(de_run))
    held_out, every = st.gene_table_df(de_run, "de"), st.gene_table_df(de_run, "de_all_cells")
    every = every.set_index("ensembl_id")["score"].reindex(held_out["ensembl_id"]).to_numpy()
    assert not np.allclose(held_out["score"].to_numpy(), every)  # other cells, other statistics
    # a model that did not learn has no deletion (analysis.gate = "skip"); the family is every test of the run
    docs = [
        st.get_json(child, f"deletion_{m}") for m in ("frozen", "unfrozen") if f"deletion_{m}" in st.json_names(child)
    ]
    assert docs and all(d["multiplicity"]["n_tests"] == sum(len(e["sets"]) for e in docs) for d in docs)
    for doc in docs:
        for row in doc["sets"]:
            assert row["q_value"] >= row["p_empirical"] >= 1 / (row["n_random"] + 1)
            assert row["n_random"] <= doc["max_random"] and row["read_removed"] == 0.0
            if row["p_at_floor"] and row["n_random"] < doc["max_random"]:
                raise AssertionError(f"a test at its floor was not extended: {row}")


@pytest.mark.slow
def test_held_out_de_is_scanpy_on_the_training_and_validation_cells(quick_run):
    """The stored `de` table against scanpy run here on the run's own split: the training and validation
    cells of each class, test cells left out (the `de_all_cells` table keeps every cell)."""
    import anndata as ad
    import scanpy as sc

    db, _ = quick_run
    st, children = _children(db)
    data = children["data"]["id"]
    cells = st.cells(data)
    held_out = cells[(cells["split"] != "test") & cells["lowhigh"].isin(["high", "low"])]
    got = st.gene_table_df(children["de: high vs low"]["id"], "de").set_index("ensembl_id")["score"]
    adata = ad.read_h5ad(st.get_run(data)["data_path"])
    # the genes the model's vocabulary maps (the DE stage tests those and normalises over them)
    adata = adata[held_out["cell_id"].astype(str).to_numpy(), adata.var["ensembl_id"].isin(got.index).to_numpy()]
    adata = adata[:, ~adata.var["ensembl_id"].duplicated().to_numpy()].copy()
    adata.obs["group"] = held_out["lowhigh"].to_numpy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.tl.rank_genes_groups(adata, "group", groups=["high"], reference="low", method="wilcoxon")
    want = sc.get.rank_genes_groups_df(adata, group="high").set_index("names")["scores"]
    want.index = adata.var.loc[want.index, "ensembl_id"].astype(str).to_numpy()
    shared = got.index.intersection(want.index)
    assert len(shared) > 0.9 * len(got)
    np.testing.assert_allclose(got[shared].to_numpy(), want[shared].to_numpy(), rtol=1e-4, atol=1e-4)
