"""What the data allow without a transformer, and whether a fine-tuned model learned anything.

`gene_set_baseline`: scikit-learn's logistic regression on each cell's gene set, i.e. the tokens the
model sees as a binary bag of genes (special tokens left out), trained on the same training cells and
scored on the same test cells as the model; its L2 strength C is chosen on the validation cells
(macro-F1, ties to the stronger regularisation) from a fixed grid and the model refitted on the training
cells, so the choice is deterministic and suits any data size. The majority-class rate beside it is the
share of the test cells in the training split's most frequent class.

`learning_gate`: a model that predicts one class for at least `MAX_PREDICTED_SHARE` of the test cells, or
whose balanced accuracy's bootstrap interval (scipy.stats.bootstrap, percentile, seeded) does not lie
above chance (1 / number of classes), did not learn; its key genes are not findings.

Macro-F1 is scikit-learn's over all the task's classes (`macro_f1`), the one definition of the project.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried on the validation cells
MAX_PREDICTED_SHARE = 0.9  # a model predicting one class for this share of test cells did not learn
GATE_BOOT = 1000  # bootstrap resamples of the balanced accuracy
GATE_CONFIDENCE = 0.95


def macro_f1(y_true, y_pred, n_classes: int) -> float:
    """scikit-learn's macro-F1 over every class of the task (absent classes count 0)."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0:
        return 0.0
    return float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_classes)), zero_division=0))


def balanced_accuracy(y_true, y_pred) -> float:
    """scikit-learn's balanced accuracy (mean recall over the classes present in the truth)."""
    from sklearn.metrics import balanced_accuracy_score

    if len(y_true) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": those are left out, as meant
        return float(balanced_accuracy_score(y_true, y_pred))


def gene_bags(input_ids: Iterable[Sequence[int]], n_tokens: int, special_ids: Iterable[int] = ()):
    """Cells x tokens binary CSR matrix: 1 where the cell's encoding holds the gene (special tokens dropped)."""
    from scipy import sparse

    special = np.asarray(sorted(set(int(s) for s in special_ids)), dtype=np.int64)
    indptr, indices = [0], []
    for ids in input_ids:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(special):
            ids = ids[~np.isin(ids, special)]
        indices.append(ids)
        indptr.append(indptr[-1] + len(ids))
    idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    data = np.ones(len(idx), dtype=np.float32)
    return sparse.csr_matrix((data, idx, np.asarray(indptr)), shape=(len(indptr) - 1, int(n_tokens)))


@dataclass
class BaselineResult:
    accuracy: float
    macro_f1: float
    balanced_accuracy: float
    majority_rate: float
    C: float
    predictions: np.ndarray


def _fit(X, y, C: float, seed: int, balanced: bool):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=2000, class_weight="balanced" if balanced else None, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


def gene_set_baseline(
    parts: dict,
    n_classes: int,
    n_tokens: int,
    *,
    special_ids: Iterable[int] = (),
    seed: int = 0,
    balanced: bool = True,
) -> BaselineResult:
    """Logistic regression on the gene sets of `parts["train"]`, C chosen on `parts["validation"]`, scored on
    `parts["test"]` (datasets or dicts with `input_ids` and an integer `label`)."""
    bags = {s: gene_bags(parts[s]["input_ids"], n_tokens, special_ids) for s in ("train", "validation", "test")}
    labels = {s: np.asarray(parts[s]["label"], dtype=np.int64) for s in ("train", "validation", "test")}
    y_train, y_test = labels["train"], labels["test"]
    majority = int(np.bincount(y_train, minlength=n_classes).argmax())
    majority_rate = float((y_test == majority).mean()) if len(y_test) else 0.0
    if len(np.unique(y_train)) < 2:  # one class to learn from: the baseline is the majority class
        pred = np.full(len(y_test), majority, dtype=np.int64)
        return BaselineResult(
            float((pred == y_test).mean()) if len(y_test) else 0.0,
            macro_f1(y_test, pred, n_classes),
            balanced_accuracy(y_test, pred),
            majority_rate,
            0.0,
            pred,
        )
    best_c, best = C_GRID[len(C_GRID) // 2], None
    if len(labels["validation"]):
        for C in C_GRID:  # ascending: a tie keeps the stronger regularisation
            pred = _fit(bags["train"], y_train, C, seed, balanced).predict(bags["validation"])
            score = macro_f1(labels["validation"], pred, n_classes)
            if best is None or score > best:
                best_c, best = C, score
    pred = _fit(bags["train"], y_train, best_c, seed, balanced).predict(bags["test"]).astype(np.int64)
    return BaselineResult(
        accuracy=float((pred == y_test).mean()) if len(y_test) else 0.0,
        macro_f1=macro_f1(y_test, pred, n_classes),
        balanced_accuracy=balanced_accuracy(y_test, pred),
        majority_rate=majority_rate,
        C=float(best_c),
        predictions=pred,
    )


def _balanced_accuracy_rows(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced accuracy of each row of resampled (truth, prediction) index arrays, vectorised."""
    hits = y_true == y_pred
    recalls = []
    for c in range(n_classes):
        is_c = y_true == c
        n = is_c.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(n > 0, (hits & is_c).sum(axis=-1) / np.maximum(n, 1), np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(recalls, axis=-1), axis=-1)


def balanced_accuracy_interval(y_true, y_pred, n_classes: int, *, seed: int, n_boot: int = GATE_BOOT) -> list[float]:
    """Percentile bootstrap interval of the balanced accuracy over test cells (scipy.stats.bootstrap, paired)."""
    from scipy import stats

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(y_true) < 2:
        value = balanced_accuracy(y_true, y_pred)
        return [value, value]

    def statistic(t, p, axis=-1):
        return _balanced_accuracy_rows(np.moveaxis(t, axis, -1), np.moveaxis(p, axis, -1), n_classes)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (one value) are a valid answer here
        res = stats.bootstrap(
            (y_true, y_pred),
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=int(n_boot),
            confidence_level=GATE_CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng([int(seed), 23]),
        )
    lo, hi = res.confidence_interval
    return [float(lo), float(hi)]


def learning_gate(y_true, y_pred, label_names: Sequence[str], *, seed: int) -> dict:
    """The gate before interpretation (`results.JSON_GATE`): learned or not, and why, in the user's words."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n_classes = len(label_names)
    chance = 1.0 / n_classes
    counts = np.bincount(y_pred, minlength=n_classes)
    top = int(counts.argmax())
    share = float(counts[top] / max(1, len(y_pred)))
    bacc = balanced_accuracy(y_true, y_pred)
    ci = balanced_accuracy_interval(y_true, y_pred, n_classes, seed=seed)
    reasons = []
    if share >= MAX_PREDICTED_SHARE:
        reasons.append(f"predicts {label_names[top]} for {share:.0%} of test cells")
    if not ci[0] > chance:
        reasons.append(
            f"balanced accuracy {bacc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) is not above chance ({chance:.3f})"
        )
    return {
        "learned": not reasons,
        "reasons": reasons,
        "predicted_share": share,
        "predicted_class": str(label_names[top]),
        "balanced_accuracy": bacc,
        "balanced_accuracy_ci": ci,
        "chance": chance,
    }
