"""Reading a run's results out of the store the way the views present them.

A `gfattn pipeline` run owns child runs (contract, "How the pipeline uses runs"): one "data" run, one
"finetune" run per task x mode ("dose/frozen") and one "analysis" run per compared pair ("lowhigh:
frozen vs unfrozen"). Opening any run shows it together with its descendants, so the same views serve
a pipeline run and a single child. Functions here take a `Store` and run on the store thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from gfattn_tui.format import dose_order, label_sort_key

MODE_ORDER = {"frozen": 0, "unfrozen": 1}
LOSS_NAMES = ("loss", "train_loss", "train/loss")
ACCURACY_NAMES = ("accuracy", "acc", "val_accuracy", "eval_accuracy")
F1_NAMES = ("macro_f1", "f1_macro", "f1")
VAL_SPLITS = ("val", "validation", "eval", "valid")


@dataclass
class Scope:
    """A run and every run below it (children, grandchildren), in creation order."""

    run: dict
    runs: list[dict] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.runs if r.get("kind") == kind]

    @property
    def finetunes(self) -> list[dict]:
        return sorted(self.of_kind("finetune"), key=finetune_sort_key)

    @property
    def analyses(self) -> list[dict]:
        return self.of_kind("analysis")

    @property
    def data_runs(self) -> list[dict]:
        return self.of_kind("data")


def collect_scope(st, run_id: int, *, depth: int = 3) -> Scope:
    run = st.get_run(run_id)
    runs = [run]
    frontier = [run_id]
    for _ in range(depth):
        nxt = []
        for rid in frontier:
            for child in st.children(rid):
                runs.append(child)
                nxt.append(child["id"])
        if not nxt:
            break
        frontier = nxt
    return Scope(run=run, runs=runs)


def run_config(run: dict) -> dict:
    cfg = run.get("config")
    if isinstance(cfg, str):
        import json

        try:
            cfg = json.loads(cfg)
        except ValueError:
            cfg = {}
    return cfg if isinstance(cfg, dict) else {}


def task_and_mode(run: dict) -> tuple[str, str]:
    """A finetune run's task and training mode, from its config or its name ("dose/frozen")."""
    cfg = run_config(run)
    task, mode = cfg.get("task"), cfg.get("mode")
    name = str(run.get("name") or "")
    if (not task or not mode) and "/" in name:
        t, m = name.rsplit("/", 1)
        task, mode = task or t.strip(), mode or m.strip()
    return str(task or name or "?"), str(mode or "?")


def mode_sort_key(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.get(mode, 2), mode)


def finetune_sort_key(run: dict) -> tuple:
    task, mode = task_and_mode(run)
    task_rank = {"dose": 0, "lowhigh": 1}.get(task, 2)
    return (task_rank, task, mode_sort_key(mode), run.get("id", 0))


def run_preset(run: dict) -> str:
    cfg = run_config(run)
    return str(config_value(cfg, "run.preset") or cfg.get("preset") or "")


def config_value(cfg: dict, dotted: str, default: Any = None) -> Any:
    """`config_value(cfg, "data.path")` without failing on missing or non-table sections."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 5}} -> {"train.epochs": 5}; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten_config(value, path))
            else:
                out[path] = value
    elif prefix:
        out[prefix] = cfg
    return out


def config_differences(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    fa, fb = flatten_config(a), flatten_config(b)
    missing = object()
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            rows.append((key, None if va is missing else va, None if vb is missing else vb))
    return rows


def last_metric(rows: Iterable[dict], names: Iterable[str], splits: Iterable[str | None]) -> float | None:
    names, splits = tuple(names), tuple(splits)
    best = None
    for row in rows:
        if row.get("name") in names and row.get("split") in splits:
            best = row
    if best is None:
        return None
    try:
        return float(best["value"])
    except (TypeError, ValueError):
        return None


def test_scores(st, run_id: int, confusion: dict | None = None) -> dict[str, float | None]:
    """Test accuracy and macro-F1 as logged, else computed from the test confusion matrix."""
    rows = st.metrics(run_id, split="test")
    acc = last_metric(rows, ACCURACY_NAMES, ("test",))
    f1 = last_metric(rows, F1_NAMES, ("test",))
    if (acc is None or f1 is None) and confusion is not None:
        c_acc, c_f1 = scores_from_confusion(np.asarray(confusion["matrix"]))
        acc = c_acc if acc is None else acc
        f1 = c_f1 if f1 is None else f1
    return {"accuracy": acc, "macro_f1": f1}


def scores_from_confusion(matrix: np.ndarray) -> tuple[float | None, float | None]:
    m = np.asarray(matrix, dtype=float)
    total = m.sum()
    if total <= 0:
        return None, None
    acc = float(np.trace(m) / total)
    f1s = []
    for i in range(m.shape[0]):
        tp = m[i, i]
        precision = tp / m[:, i].sum() if m[:, i].sum() else 0.0
        recall = tp / m[i, :].sum() if m[i, :].sum() else 0.0
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return acc, float(np.mean(f1s))


def pick_confusion(confusions: list[dict], split: str = "test") -> dict | None:
    for c in confusions:
        if c.get("split") == split:
            return c
    return confusions[0] if confusions else None


def ordered_confusion(labels: list[str], matrix: np.ndarray) -> tuple[list[str], np.ndarray]:
    order = dose_order(labels)
    m = np.asarray(matrix)
    return [str(labels[i]) for i in order], m[np.ix_(order, order)]


def headline(st, run: dict) -> str:
    """The runs list's one-line summary: best test accuracy per task (pipeline) or acc/F1 (finetune)."""
    kind = run.get("kind")
    if kind == "finetune":
        scores = test_scores(st, run["id"], pick_confusion(st.confusions(run["id"])))
        if scores["accuracy"] is None:
            return ""
        f1 = scores["macro_f1"]
        return f"acc {scores['accuracy']:.3f}" + (f" F1 {f1:.3f}" if f1 is not None else "")
    if kind == "pipeline":
        best: dict[str, float] = {}
        for child in st.children(run["id"]):
            if child.get("kind") != "finetune":
                continue
            acc = last_metric(st.metrics(child["id"], split="test"), ACCURACY_NAMES, ("test",))
            if acc is None:
                continue
            task, _ = task_and_mode(child)
            best[task] = max(best.get(task, -1.0), acc)
        short = {"lowhigh": "l/h"}
        ordered = sorted(best.items(), key=lambda kv: label_sort_key(kv[0]))
        return " ".join(f"{short.get(t, t)} {v:.2f}" for t, v in ordered)
    if kind == "analysis":
        if "cosine" in st.grid_names(run["id"]):
            values = np.asarray(st.grid(run["id"], "cosine")["values"], dtype=float)
            if values.size and np.isfinite(values).any():
                return f"cos {np.nanmean(values):.3f}"
    return ""


@dataclass
class Curve:
    label: str
    x: list[float]
    y: list[float]


def training_curves(st, run: dict) -> dict[str, list[Curve]]:
    """Loss by step (train) and validation accuracy/loss by epoch of one finetune run."""
    rows = st.metrics(run["id"])
    out: dict[str, list[Curve]] = {"loss": [], "accuracy": []}

    def series(names, splits, axis) -> tuple[list[float], list[float]]:
        pts = []
        for r in rows:
            if r.get("name") in names and r.get("split") in splits and r.get(axis) is not None:
                try:
                    pts.append((float(r[axis]), float(r["value"])))
                except (TypeError, ValueError):
                    continue
        pts.sort()
        return [p[0] for p in pts], [p[1] for p in pts]

    x, y = series(LOSS_NAMES, (None, "train"), "step")
    if not x:
        x, y = series(LOSS_NAMES, (None, "train"), "epoch")
    if x:
        out["loss"].append(Curve("train", x, y))
    x, y = series(LOSS_NAMES, VAL_SPLITS, "epoch")
    if x:
        out["loss"].append(Curve("val", x, y))
    x, y = series(ACCURACY_NAMES, VAL_SPLITS, "epoch")
    if not x:
        x, y = series(ACCURACY_NAMES, VAL_SPLITS, "step")
    if x:
        out["accuracy"].append(Curve("val acc", x, y))
    x, y = series(F1_NAMES, VAL_SPLITS, "epoch")
    if x:
        out["accuracy"].append(Curve("val F1", x, y))
    return out


def compared_models(run: dict) -> tuple[str, str]:
    """The two training modes an analysis run compares: from its config, else its name ("x: a vs b")."""
    import re

    cfg = run_config(run)
    a = cfg.get("a") or cfg.get("model_a") or cfg.get("mode_a")
    b = cfg.get("b") or cfg.get("model_b") or cfg.get("mode_b")
    if not (a and b):
        match = re.search(r"(\S+)\s+vs\.?\s+(\S+)\s*$", str(run.get("name") or ""))
        if match:
            a, b = a or match.group(1), b or match.group(2)
    return str(a or "model a"), str(b or "model b")


def reduce_rank_vector(values: np.ndarray) -> np.ndarray:
    """Per-rank vectors may carry (layer, head, rank) axes: sum the heads and layers away."""
    v = np.asarray(values, dtype=float)
    while v.ndim > 1:
        v = v.sum(axis=0)
    return v


def histogram_axis(meta: dict | None, n: int) -> list[float]:
    """Bin centres of a stored histogram from its meta (edges, or start and width), else bin index."""
    centres = _histogram_centres(meta or {}, n)
    if centres and min(abs(c) for c in centres) >= 10:
        return [float(round(c)) for c in centres]  # whole genes read better on an axis than 294.65
    return centres


def _histogram_centres(meta: dict, n: int) -> list[float]:
    edges = meta.get("edges") or meta.get("bin_edges") or meta.get("bins")
    if isinstance(edges, (list, tuple)) and len(edges) == n + 1:
        return [(float(a) + float(b)) / 2 for a, b in zip(edges[:-1], edges[1:])]
    if isinstance(edges, (list, tuple)) and len(edges) == n:
        return [float(e) for e in edges]
    start = meta.get("start", meta.get("min"))
    width = meta.get("width", meta.get("bin_width"))
    if start is not None and width is not None:
        return [float(start) + (i + 0.5) * float(width) for i in range(n)]
    if start is not None and meta.get("max") is not None and n:
        w = (float(meta["max"]) - float(start)) / n
        return [float(start) + (i + 0.5) * w for i in range(n)]
    return [float(i) for i in range(n)]


def finite_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
