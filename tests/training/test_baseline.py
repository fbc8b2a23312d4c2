"""The baseline beside every model (`pipeline.training.baseline`): a logistic regression on each cell's gene set,
the majority-class rate, and the project's one macro-F1; checked against scikit-learn directly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.baseline import (
    C_GRID,
    gene_bags,
    gene_set_baseline,
    macro_f1,
)
from pipeline.training.finetune import classification_metrics
from store import results as R

from tests._helpers_model import class_coded_cells


def _parts(n=240, *, seed=0, n_classes=2):
    cells = class_coded_cells(n, n_classes=n_classes, seed=seed)
    split = np.array(["train"] * int(n * 0.6) + ["validation"] * int(n * 0.2) + ["test"] * (n - int(n * 0.8)))
    return {
        s: {k: [v for v, keep in zip(cells[k], split == s) if keep] for k in ("input_ids", "label")}
        for s in ("train", "validation", "test")
    }


def test_gene_bags_are_the_tokens_as_a_binary_set():
    bags = gene_bags([[5, 3, 3, 0], [2], []], 8, special_ids={0, 1})
    assert bags.shape == (3, 8)
    dense = bags.toarray()
    assert dense[0].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]  # special <pad> dropped, duplicate counted once
    assert dense[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0] and dense[2].sum() == 0


def test_baseline_equals_scikit_learn_fitted_by_hand():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    parts = _parts()
    out = gene_set_baseline(parts, 2, 202, special_ids={0, 1}, seed=3)
    X = {s: gene_bags(parts[s]["input_ids"], 202, {0, 1}) for s in parts}
    y = {s: np.asarray(parts[s]["label"]) for s in parts}
    scores = []
    for C in C_GRID:
        m = LogisticRegression(C=C, max_iter=2000, class_weight="balanced", random_state=3).fit(X["train"], y["train"])
        scores.append(f1_score(y["validation"], m.predict(X["validation"]), average="macro"))
    best = C_GRID[int(np.argmax(scores))]  # the first of equal scores: the strongest regularisation
    assert out.C == best
    m = LogisticRegression(C=best, max_iter=2000, class_weight="balanced", random_state=3).fit(X["train"], y["train"])
    pred = m.predict(X["test"])
    assert out.predictions.tolist() == pred.tolist()
    assert out.accuracy == pytest.approx((pred == y["test"]).mean())
    assert out.macro_f1 == pytest.approx(f1_score(y["test"], pred, average="macro"))
    assert out.accuracy > 0.9  # the class-coded cells are separable by their gene sets
    majority = np.bincount(y["train"]).argmax()
    assert out.majority_rate == pytest.approx((y["test"] == majority).mean())


def test_baseline_is_deterministic_and_handles_one_training_class():
    parts = _parts(seed=1)
    a = gene_set_baseline(parts, 2, 202, seed=0)
    b = gene_set_baseline(parts, 2, 202, seed=0)
    assert (a.accuracy, a.macro_f1, a.C) == (b.accuracy, b.macro_f1, b.C)
    one = {s: {"input_ids": p["input_ids"], "label": [0] * len(p["label"])} for s, p in parts.items()}
    out = gene_set_baseline(one, 2, 202)
    assert out.predictions.tolist() == [0] * len(parts["test"]["label"]) and out.majority_rate == 1.0


def test_one_macro_f1_for_the_project():
    """Training's metrics, the baseline and the store's fallback (from a confusion matrix) agree with
    scikit-learn's f1_score over every class, an absent class counting 0."""
    from sklearn.metrics import f1_score

    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0, 0, 0, 1, 0, 0])  # class 2 of three is neither true nor predicted
    expected = f1_score(y, p, average="macro", labels=[0, 1, 2], zero_division=0)
    metrics, confusion = classification_metrics(y, p, ["a", "b", "c"])
    assert metrics["macro_f1"] == pytest.approx(expected)
    assert macro_f1(y, p, 3) == pytest.approx(expected)
    _, from_confusion = R.scores_from_confusion(confusion)
    assert from_confusion == pytest.approx(expected)
    assert expected < f1_score(y, p, average="macro")  # scikit-learn's default leaves the absent class out
