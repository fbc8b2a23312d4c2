"""How the views present what `store.results` reads: one-line headlines, dose-ordered confusion
matrices, histogram axes, the analysis run a tab shows.

The reading itself (run scope, task and mode, test scores, training curves, grids, per-rank vectors)
lives in the headless `store.results`; functions here that take a `Store` run on the store thread.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from gfattn_tui.format import dose_order, label_sort_key
from store import results as R


def ordered_confusion(labels: list[str], matrix: np.ndarray) -> tuple[list[str], np.ndarray]:
    order = dose_order(labels)
    m = np.asarray(matrix)
    return [str(labels[i]) for i in order], m[np.ix_(order, order)]


def run_choices(runs: Iterable[dict], wanted: int | None) -> tuple[list[dict], int | None]:
    """The runs a tab's picker offers ({"id", "name"}) and the one shown: `wanted` if offered, else the first."""
    choices = [{"id": r["id"], "name": r.get("name")} for r in runs]
    ids = [c["id"] for c in choices]
    return choices, wanted if wanted in ids else (ids[0] if ids else None)


def headline(st, run: dict) -> str:
    """The runs list's one-line summary: best test accuracy per task (pipeline) or acc/F1 (finetune)."""
    return headline_and_value(st, run)[0]


def headline_and_value(st, run: dict) -> tuple[str, tuple[str, float] | None]:
    """The headline text and what the list sorts by: (task, macro-F1) so that sorting keeps each task's
    runs together. A pipeline names, per task, its best mode by test macro-F1 ("lowhigh unfrozen F1
    0.84"; a model that did not learn is never the best; "lowhigh: did not learn" when none did); a
    finetune its task, mode and scores; an analysis its mean cosine."""
    kind = run.get("kind")
    if kind == R.KIND_FINETUNE:
        scores = R.test_scores(st, run["id"], R.read_confusion(st, run["id"]))
        acc, f1 = scores[R.METRIC_ACCURACY], scores[R.METRIC_MACRO_F1]
        if acc is None and f1 is None:
            return "", None
        task, mode = R.task_and_mode(R.full_run(st, run))
        mark = " ✘" if R.did_not_learn(R.model_gate(st, run["id"])) else ""
        text = f"{mode}{mark} F1 {f1:.2f}" if f1 is not None else f"{mode}{mark} acc {acc:.2f}"
        return text, (task, f1 if f1 is not None else acc)
    if kind == R.KIND_PIPELINE:
        best: dict[str, tuple[float, str, str]] = {}  # task -> (value, mode, metric)
        not_learned: set[str] = set()
        for child in st.children(run["id"]):
            if child.get("kind") != R.KIND_FINETUNE:
                continue
            task, mode = R.task_and_mode(child)
            if R.did_not_learn(R.model_gate(st, child["id"])):
                not_learned.add(task)
                continue
            rows = st.metrics(child["id"], split=R.SPLIT_TEST)
            f1 = R.last_metric(rows, R.F1_NAMES, (R.SPLIT_TEST,))
            value, metric = (
                (f1, "F1") if f1 is not None else (R.last_metric(rows, R.ACCURACY_NAMES, (R.SPLIT_TEST,)), "acc")
            )
            if value is None:
                continue
            if task not in best or value > best[task][0]:
                best[task] = (value, mode, metric)
        tasks = sorted(set(best) | not_learned, key=label_sort_key)
        parts = [
            f"{t} {best[t][1]} {best[t][2]} {best[t][0]:.2f}" if t in best else f"{t}: did not learn" for t in tasks
        ]
        first = next((t for t in tasks if t in best), None)
        return " · ".join(parts), ((first, best[first][0]) if first else None)
    if kind == R.KIND_ANALYSIS:
        grids = R.read_grids(st, run["id"], [R.GRID_COSINE])
        if R.GRID_COSINE in grids:
            values = np.asarray(grids[R.GRID_COSINE].values, dtype=float)
            if values.size and np.isfinite(values).any():
                mean = float(np.nanmean(values))
                return f"cos {mean:.3f}", ("~cosine", mean)
    return "", None


def pipeline_progress_text(st, run: dict, now: float | None = None) -> str:
    """A running pipeline's progress for the runs list: "3 of 13 · ETA 2m05s" (stages of the whole run,
    the whole run's ETA)."""
    import time

    full = R.full_run(st, run)
    text, _ = run_progress_text(full, st.stages(run["id"]), st.progress(run["id"]), now or time.time())
    if not text:
        return ""
    head, _, rest = text.partition(" · ")
    head = head.split(":", 1)[0].removeprefix("stage ")
    eta = rest.replace(" for the run", "").replace(" for this stage", " (stage)")
    return head + (f" · {eta}" if eta else "")


def histogram_axis(meta: dict | None, n: int) -> list[float]:
    """Bin centres of a stored histogram from its meta (edges, or start and width), else bin index."""
    centres = _histogram_centres(meta or {}, n)
    if centres and min(abs(c) for c in centres) >= 10:
        return [float(round(c)) for c in centres]  # whole genes read better on an axis than 294.65
    return centres


def _histogram_centres(meta: dict, n: int) -> list[float]:
    edges = meta.get(R.META_EDGES) or meta.get("bin_edges") or meta.get("bins")
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


# ----------------------------------------------------------------------------------- stage counts
FIXED_STAGES = ("data", "model", "tokenize", "record")


def planned_stage_count(cfg: dict | None) -> int | None:
    """How many stages a `gfattn pipeline` run with this (resolved) config goes through, as
    `pipeline.run.driver._stages` runs them; None when the config does not say (an older run)."""
    try:
        from pipeline.config import analysed_tasks, trained_tasks

        train, analysis = cfg["train"], cfg["analysis"]
        tasks = {str(t["name"]): t for t in cfg.get("tasks") or ()}
        n = len(FIXED_STAGES) + len(trained_tasks(cfg)) * len(train["modes"])
        analysed = analysed_tasks(cfg)
        if analysis.get("label_permutation"):
            n += len(analysed) * len(dict.fromkeys(m for pair in analysis["pairs"] for m in pair))
        de = cfg.get("de") or {}
        comparisons = 0
        if analysis.get("de") and not (cfg.get("data") or {}).get("tokenized"):
            for task in [de["groupby"]] if de.get("groupby") else analysed:
                t = tasks.get(str(task)) or {}
                n_classes = len(t.get("classes") or t.get("groups") or ()) or 2
                groups = [str(g) for g in de.get("groups") or ()]
                if groups:
                    comparisons += len([g for g in groups if g != str(de.get("reference") or "")])
                else:
                    comparisons += 1 if n_classes == 2 else n_classes
        n += max(comparisons, 1)  # no comparison: the skipped "de" stage
        n += len(analysed) * len(analysis["pairs"])
        if analysis.get("attribution") or analysis.get("deletion") or analysis.get("sanity"):
            models = dict.fromkeys(m for pair in analysis["pairs"] for m in pair)  # each analysed once
            n += len(analysed) * len(models)
        if (cfg.get("model") or {}).get("path"):
            n += 1  # the checkpoint check of a user's model
        return n
    except (KeyError, TypeError, AttributeError, ValueError, ImportError):
        return None


def run_progress_text(run: dict, stages: list[dict], progress: dict | None, now: float) -> tuple[str, float | None]:
    """ "stage k of N: <stage>" with N the run's whole stage count and a whole-run ETA with its unit
    (the running stage's own ETA plus the stages still to come at the mean pace of the finished ones);
    and the fraction of stages done."""
    from gfattn_tui.format import as_epoch, fmt_duration

    overall = R.stage_progress(stages, progress)
    total = max(overall.total, planned_stage_count(R.run_config(run)) or 0)
    if not total:
        return "", None
    k = min(overall.done + (1 if overall.current else 0), total) or 1
    text = f"stage {k} of {total}" + (f": {overall.current}" if overall.current else "")
    took = []
    for s in stages:
        start, end = as_epoch(s.get("started")), as_epoch(s.get("finished"))
        if s.get("status") == "completed" and start is not None and end is not None:
            took.append(end - start)
    current_eta = (overall.progress or {}).get("eta_s")
    remaining = total - overall.done - (1 if overall.current else 0)
    if took and (current_eta is not None or not overall.current):
        eta = (float(current_eta) if current_eta is not None else 0.0) + remaining * (sum(took) / len(took))
        text += f" · ETA {fmt_duration(eta)} for the run"
    elif current_eta is not None:
        text += f" · ETA {fmt_duration(float(current_eta))} for this stage"
    return text, overall.done / total


def model_gates(st, analysis: dict) -> dict[str, dict]:
    """{model: gate} of the fine-tunings an analysis run compares (its siblings of the same task), for
    the did-not-learn marks beside each model; empty where no gate is stored."""
    run = R.full_run(st, analysis)
    if run.get("parent_id") is None:
        return {}
    task = R.run_config(run).get("task") or str(run.get("name") or "").split(":", 1)[0]
    models = set(R.compared_models(run))
    out = {}
    for child in st.children(run["parent_id"]):
        if child.get("kind") != R.KIND_FINETUNE:
            continue
        t, mode = R.task_and_mode(child)
        if t == task and mode in models:
            gate = R.model_gate(st, child["id"])
            if gate is not None:
                out[mode] = gate
    return out
