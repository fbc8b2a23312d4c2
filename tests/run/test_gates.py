"""Gates before interpretation (`pipeline.training.baseline.learning_gate`, `analysis.gate`): a model that predicts
one class for >= 90% of test cells, or whose balanced accuracy is not above chance with its bootstrap
interval, did not learn; its deletion and randomisation cascade are skipped (or computed and marked), and
the summary says so first. Also the steps that follow the training set and early stopping."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest

from pipeline.training.baseline import _balanced_accuracy_rows, balanced_accuracy_interval, learning_gate
from pipeline.training.finetune import TrainConfig, planned_epochs

# the shipped embedded model as a user's checkpoint, on synthetic cells labelled by a coin: nothing to learn
NO_LEARNING = textwrap.dedent("""
    [data]
    umap = false
    [[tasks]]
    name = "coin"
    column = "coin"
    [train]
    modes = ["frozen", "unfrozen"]
    epochs = 2
    [analysis]
    tasks = ["coin"]
    pairs = [["frozen", "unfrozen"]]
    attribution = []
    max_cells = 60
    n_boot = 20
    top_k = [10]
    deletion_k = [5]
    deletion_random_sets = 2
    deletion_top_genes = 3
    sanity_attribution = false
    [compute]
    threads = 1
""")


def coin_h5ad(path, seed: int = 0):
    """Synthetic sci-Plex-like counts with an obs column `coin` of random heads and tails."""
    from pipeline.data.synth import make_sciplex_like

    adata = make_sciplex_like(scale=0.1, preset="thesis", seed=seed)
    adata.uns.pop("gfattn_truth", None)
    adata.obs["coin"] = np.random.default_rng([seed, 7]).choice(["heads", "tails"], adata.n_obs)
    adata.write_h5ad(path)
    return path


def test_balanced_accuracy_rows_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=(50, 40))
    p = np.where(rng.random((50, 40)) < 0.6, y, rng.integers(0, 3, size=(50, 40)))
    y[7] = 0  # a resample holding one class only
    got = _balanced_accuracy_rows(y, p, 3)
    for i in range(len(y)):
        with pytest.warns(UserWarning) if i == 7 and (p[7] != 0).any() else _nothing():
            expected = balanced_accuracy_score(y[i], p[i])
        assert got[i] == pytest.approx(expected)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_interval_agrees_with_a_naive_bootstrap_loop():
    """The percentile interval from scipy equals a plain resampling loop's quantiles, to Monte Carlo error."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    p = np.where(rng.random(120) < 0.75, y, 1 - y)
    lo, hi = balanced_accuracy_interval(y, p, 2, seed=4, n_boot=2000)
    loop = np.random.default_rng(9)
    values = []
    for _ in range(2000):
        i = loop.integers(0, len(y), len(y))
        values.append(balanced_accuracy_score(y[i], p[i]))
    assert lo == pytest.approx(np.quantile(values, 0.025), abs=0.02)
    assert hi == pytest.approx(np.quantile(values, 0.975), abs=0.02)
    assert balanced_accuracy_interval(y, p, 2, seed=4) == balanced_accuracy_interval(y, p, 2, seed=4)


def test_gate_marks_a_majority_class_model_and_passes_a_learner():
    names = ["CD14 Mono", "T cell"]
    y = np.array([0] * 20 + [1] * 10)
    majority = learning_gate(y, np.r_[np.zeros(29, int), [1]], names, seed=0)
    assert majority["learned"] is False
    assert majority["predicted_class"] == "CD14 Mono" and majority["predicted_share"] == pytest.approx(29 / 30)
    assert "predicts CD14 Mono for 97% of test cells" in majority["reasons"][0]
    assert majority["chance"] == 0.5 and len(majority["balanced_accuracy_ci"]) == 2

    coin = np.random.default_rng(2).integers(0, 2, 30)  # no better than chance, not one class
    chance = learning_gate(y, coin, names, seed=0)
    assert chance["learned"] is False and "not above chance" in chance["reasons"][-1]

    good = y.copy()
    good[:2] = 1
    learner = learning_gate(y, good, names, seed=0)
    assert learner["learned"] is True and learner["reasons"] == []
    assert learner["balanced_accuracy_ci"][0] > 0.5


def test_epochs_follow_the_training_set_size():
    config = TrainConfig(epochs=5, min_steps=300, max_epochs=40, batch_size=16)
    assert planned_epochs(config, 380, 16) == 13  # 24 steps an epoch: 13 epochs reach 300 steps
    assert planned_epochs(config, 1050, 16) == 5  # 66 steps an epoch: the 5 epochs already do
    assert planned_epochs(config, 20, 16) == 40  # capped at max_epochs
    assert planned_epochs(TrainConfig(epochs=5, min_steps=0), 20, 16) == 5


def test_an_explicit_epochs_count_is_kept():
    from pipeline import config

    assert config.resolve("default")["train"]["min_steps"] == 300
    assert config.resolve("default", None, {"train.epochs": 2})["train"]["min_steps"] == 0
    assert config.resolve("default", None, {"train.epochs": 2, "train.min_steps": 50})["train"]["min_steps"] == 50


def _run(root, gate: str, db) -> str:
    import io

    from pipeline import config
    from pipeline.models.embedded import SHIPPED_DIR
    from pipeline.run.driver import run_pipeline

    path = root / "nolearn.toml"
    path.write_text(NO_LEARNING)
    data = root / "coin.h5ad"
    if not data.exists():
        coin_h5ad(data)
    flags = {"analysis.gate": gate, "data.path": str(data), "model.path": str(SHIPPED_DIR)}
    out = io.StringIO()
    assert run_pipeline(config.resolve("default", path, flags), db, stdout=out) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    """One run with the default analysis.gate (skip) on cells labelled by a coin: (store, summary)."""
    root = tmp_path_factory.mktemp("gates")
    db = root / "gfattn.db"
    return db, _run(root, "skip", db)


def test_a_model_that_did_not_learn_is_marked_and_its_deletion_skipped(gated_run):
    from store import Store
    from store import results as R

    db, summary = gated_run
    st = Store(db)
    children = {c["name"]: c["id"] for c in st.children(1)}
    for mode in ("frozen", "unfrozen"):
        run = children[f"coin/{mode}"]
        gate = R.model_gate(st, run)
        assert gate["learned"] is False and gate["reasons"], gate
        assert gate["balanced_accuracy_ci"][0] <= gate["chance"] == 0.5 or gate["predicted_share"] >= 0.9
        scores = R.baseline_scores(st, run)  # the baseline and the balanced accuracy beside each model
        assert all(v is not None and 0.0 <= v <= 1.0 for v in scores.values()), scores
    analysis = children["coin: frozen vs unfrozen"]
    names = st.json_names(analysis)
    for mode in ("frozen", "unfrozen"):
        assert R.json_deletion(mode) not in names and R.json_sanity(mode) not in names
    warnings = R.run_warnings(st, 1)
    gates = [w for w in warnings if w["kind"] == "gate"]
    assert len(gates) == 2 and "coin/frozen did not learn" in gates[0]["message"]
    events = " ".join(e["message"] for e in st.events(1))
    assert "deletion of frozen skipped: the model did not learn" in events
    assert "randomisation cascade of unfrozen skipped" in events
    # the summary says it in its first lines, in the table and beside the models' key genes
    head = summary.splitlines()[:4]
    assert any("coin/frozen did not learn" in line and "not findings" in line for line in head), head
    assert (
        "DID NOT LEARN" in summary and "key genes (controlled score), frozen (did not learn: not findings)" in summary
    )
    assert "baseline" in summary and "majority" in summary
    # the shipped model, given as a checkpoint, knows these cells' genes (many times chance; a small model on one
    # cell line does not beat their frequency): not flagged
    check = R.checkpoint_check(st, 1)
    assert check is not None and check["ok"] is True and check["top10"] >= 3 * check["chance_top10"], check
    assert not [w for w in warnings if w["kind"] == "checkpoint"]


@pytest.mark.slow
def test_gate_mark_computes_and_marks(gated_run):
    from store import Store
    from store import results as R

    db, _ = gated_run
    marked = _run(db.parent, "mark", db)
    st = Store(db)
    run_id = int(marked.split()[1])  # "run 9 'default ...' completed"
    analysis = {c["name"]: c["id"] for c in st.children(run_id)}["coin: frozen vs unfrozen"]
    assert R.json_deletion("frozen") in st.json_names(analysis)
    assert "deletion from frozen (did not learn: not findings)" in marked
    assert "randomisation cascade, frozen (did not learn: not findings)" in marked


def test_a_random_weight_checkpoint_is_flagged(tmp_path, geneformer_dir):
    """Geneformer's V1 config (shrunk to two layers) with random weights, on cells over the real V1 vocabulary:
    no better than gene frequency, nor than chance. The same cells through the shipped model's own
    vocabulary are not flagged."""
    from pipeline.data.dictionaries import GeneDictionaries
    from pipeline.models.checkpoint_check import masked_gene_check

    from tests._helpers_model import corpus_cells, save_geneformer_checkpoint

    model_dir = tmp_path / "random-v1"
    save_geneformer_checkpoint(
        geneformer_dir / "configs" / "V1-6L-10M" / "config.json",
        model_dir,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
    )
    dicts = GeneDictionaries.from_geneformer_dir(geneformer_dir, "V1")
    cells = corpus_cells(120, n_genes=400, seed=1)["input_ids"]  # tokens 2..401: real V1 genes
    check = masked_gene_check(model_dir, cells, dicts, seed=0)
    assert check["ok"] is False and check["cells"] == 96
    assert check["top10"] <= check["baseline_top10"] and check["top10"] < 3 * check["chance_top10"]
    assert "random weights, or dictionaries that are not its own" in check["message"]
    assert masked_gene_check(model_dir, cells, dicts, seed=0) == check  # seeded: the same sample and masks


def test_show_and_compare_put_the_baseline_and_gate_beside_each_model(gated_run, capsys):
    import argparse

    from pipeline.commands import show
    from pipeline.commands.compare import compare_text
    from store import Store

    db, _ = gated_run
    assert show.run(argparse.Namespace(store=str(db), run="1", json=False)) == 0
    out = capsys.readouterr().out
    assert "warning: coin/frozen did not learn" in out and "checkpoint check: masked-gene top-1" in out
    assert "baseline  logistic regression on the gene sets" in out and "DID NOT LEARN" in out
    text = compare_text(Store(db), 1, 1)
    assert "A warning: coin/unfrozen did not learn" in text and "A base" in text
    assert (
        re.search(r"coin/frozen +\d\.\d{3}\*", text) and "* did not learn (one class for >= 90% of test cells" in text
    )


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    """Labels the genes cannot tell (a coin): validation macro-F1 stops improving, training stops `patience`
    epochs after the best one, whose weights are kept; the planned epochs follow min_steps."""
    from pipeline.models.load import load_classifier
    from pipeline.run.stages.finetune import FinetuneStoreRecorder
    from pipeline.training.finetune import finetune

    from tests._helpers_model import FakeStore, class_coded_cells, save_tiny_model, toy_dictionaries

    cells = class_coded_cells(96, seed=3)
    cells["label"] = np.random.default_rng(0).integers(0, 2, 96).tolist()
    held_out = class_coded_cells(48, seed=4)
    held_out["label"] = np.random.default_rng(1).integers(0, 2, 48).tolist()
    dicts = toy_dictionaries(200)
    model = load_classifier(save_tiny_model(tmp_path / "m"), 2, dicts=dicts, max_len=64, seed=0)
    store = FakeStore()
    config = TrainConfig(lr=1e-3, epochs=2, min_steps=120, max_epochs=30, patience=2, batch_size=16)
    result = finetune(
        model,
        cells,
        held_out,
        held_out,
        label_names=["a", "b"],
        mode="unfrozen",
        config=config,
        recorder=FinetuneStoreRecorder(store, 1),
    )
    planned = planned_epochs(config, 96, 16)  # 6 steps an epoch: 20 epochs reach 120 steps
    assert planned == 20
    assert len(result.history) < planned  # stopped early
    scores = [h["val_macro_f1"] for h in result.history]
    assert scores[result.best_epoch - 1] == max(scores)  # the best epoch's weights (ties: the lower loss)
    assert len(result.history) == result.best_epoch + 2  # stopped `patience` epochs after it
    assert result.val_metrics["macro_f1"] == max(scores)
    assert any("early stop after epoch" in e for e in store.events)
