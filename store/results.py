"""The read model of a run's results: every stored name in one place, and typed readers.

The pipeline writes its results into the store under fixed names (grids, per-rank vectors, gene tables,
JSON documents, metrics, run kinds; docs/architecture.md, "How the pipeline uses runs"). The writers
(`pipeline.analysis.pair.pair_records`, the experiment's stages, fine-tuning) and every reader
(`gfattn plot`, the end-of-run summary, the TUI) name them through the constants here, and the readers
get them back as dataclasses instead of querying the store themselves.

A `gfattn pipeline` run owns child runs: one "data" run, one "finetune" run per task x mode
("dose/frozen"), one "de" run and one "analysis" run per compared pair ("lowhigh: frozen vs unfrozen").
`collect_scope` gathers a run and its descendants, so the same readers serve a pipeline run and a
single child.

Headless: imports the standard library, numpy and (lazily) pandas only; never textual, torch or
`pipeline`. Readers take a `store.Store` and do all their reading before they return, so they can run on
the TUI's store thread.

One module on purpose: it owns every stored name, for writers and readers alike, so that no name is spelled
twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

# ------------------------------------------------------------------------------------------ run kinds
KIND_PIPELINE = "pipeline"
KIND_DATA = "data"
KIND_FINETUNE = "finetune"
KIND_DE = "de"
KIND_ANALYSIS = "analysis"
KIND_PRETRAIN = "pretrain"
KIND_MODEL = "model"  # one model's analysis in a pipeline run ("lowhigh: frozen"), read by every pair using it
RUN_KINDS = (KIND_PIPELINE, KIND_DATA, KIND_FINETUNE, KIND_DE, KIND_ANALYSIS, KIND_PRETRAIN, KIND_MODEL)
STAGE_FINETUNE = "finetune"  # the stage a finetune run's own events and progress row name

# ---------------------------------------------------------------------------- tasks and training modes
TASK_DOSE = "dose"
TASK_LOWHIGH = "lowhigh"
TASK_ORDER = {TASK_DOSE: 0, TASK_LOWHIGH: 1}
MODE_FROZEN = "frozen"
MODE_UNFROZEN = "unfrozen"
MODE_ORDER = {MODE_FROZEN: 0, MODE_UNFROZEN: 1}
GROUP_LOW = "low"
GROUP_HIGH = "high"

# -------------------------------------------------------------------------------- metrics and splits
METRIC_LOSS = "loss"
METRIC_ACCURACY = "accuracy"
METRIC_MACRO_F1 = "macro_f1"
METRIC_LR = "lr"
METRIC_CELLS_PER_S = "cells_per_s"
METRIC_MASKED_ACCURACY = "masked_accuracy"
# on each finetune run, split "test": the gene-set logistic regression beside the model (pipeline.training.baseline),
# the test cells' share of the training split's most frequent class, and the model's balanced accuracy
METRIC_BASELINE_ACCURACY = "baseline_accuracy"
METRIC_BASELINE_MACRO_F1 = "baseline_macro_f1"
METRIC_MAJORITY_RATE = "majority_rate"
METRIC_BALANCED_ACCURACY = "balanced_accuracy"
SPLIT_TRAIN = "train"
SPLIT_VALIDATION = "validation"
SPLIT_TEST = "test"
SPLITS = (SPLIT_TRAIN, SPLIT_VALIDATION, SPLIT_TEST)
# what readers accept besides the names the pipeline writes (older runs, other trainers)
LOSS_NAMES = (METRIC_LOSS, "train_loss", "train/loss")
ACCURACY_NAMES = (METRIC_ACCURACY, "acc", "val_accuracy", "eval_accuracy")
F1_NAMES = (METRIC_MACRO_F1, "f1_macro", "f1")
VAL_SPLITS = ("val", SPLIT_VALIDATION, "eval", "valid")


def per_label_metric(metric: str, label: str) -> str:
    """ "precision/high", "recall/high", "f1/high": the per-class test metrics of a fine-tuning run."""
    return f"{metric}/{label}"


# ---------------------------------------------------------------------------- the compared models
# An analysis run compares model a with model b; names of per-model results end in "_a" / "_b".
MODEL_SUFFIXES = ("a", "b")


def _suffixed(stem: str, suffix: str) -> str:
    return f"{stem}_{suffix}"


# ------------------------------------------------------------------------ grids (layer x head)
GRID_COSINE = "cosine"  # lower / upper: the bootstrap CI
GRID_COSINE_STD = "cosine_std"
GRID_P_VALUE = "p_value"
GRID_P_VALUE_ADJ = "p_value_adj"
GRID_P_VALUE_NORM = "p_value_norm"
GRID_NORM_PREFIX = "norm_"  # norm_<s> and norm_summed_<s>


def grid_norm(suffix: str) -> str:
    """`norm_a`: norm-based attention per layer and head (Kobayashi et al. 2020), with its CI."""
    return _suffixed("norm", suffix)


def grid_norm_summed(suffix: str) -> str:
    """`norm_summed_a`: norm-based attention per layer, heads summed (layer x 1), with its CI."""
    return _suffixed("norm_summed", suffix)


def grid_centre(suffix: str) -> str:
    return _suffixed("centre", suffix)


# ----------------------------------------------------------------------------- per-rank vectors
VEC_RANK_PCT_DIFF = "rank_pct_diff"
VEC_RANK_PCT_DIFF_LOWER = "rank_pct_diff_lower"
VEC_RANK_PCT_DIFF_UPPER = "rank_pct_diff_upper"
VEC_RANK_LOG_RATIO = "rank_log_ratio"
VEC_RANK_COUNT = "rank_count"
VEC_RANK_SPECIAL_COUNT = "rank_special_count"
VEC_LENGTH_HIST = "length_hist"  # on analysis runs and on the data run


def vec_rank_received(suffix: str) -> str:
    return _suffixed("rank_received", suffix)


def vec_rank_received_lower(suffix: str) -> str:
    return f"{vec_rank_received(suffix)}_lower"


def vec_rank_received_upper(suffix: str) -> str:
    return f"{vec_rank_received(suffix)}_upper"


def vec_rank_received_lh(suffix: str) -> str:
    """(layer, head, rank) attention received per rank position."""
    return _suffixed("rank_received_lh", suffix)


def vec_rank_norm_received(suffix: str) -> str:
    return _suffixed("rank_norm_received", suffix)


# vector meta keys
META_MEDIAN_LENGTH = "median_length"  # per-rank vectors
META_MEDIAN = "median"  # length_hist
META_EDGES = "edges"  # length_hist
META_LOWER = "lower"  # name of the vector holding the lower CI bound
META_UPPER = "upper"
META_MODELS = "models"

# ------------------------------------------------------------------------------------- gene tables
TABLE_GENES = "genes"  # an analysis run's key-gene table (thesis table 8)
TABLE_DE = "de"  # a DE run's Wilcoxon table (pipeline runs: training and validation cells, test cells held out)
TABLE_DE_ALL_CELLS = "de_all_cells"  # a pipeline DE run's Wilcoxon table on every selected cell (test included)

COL_ENSEMBL_ID = "ensembl_id"
COL_SYMBOL = "symbol"
COL_TOKEN_ID = "token_id"
COL_N_CELLS = "n_cells"
COL_RANK_MEAN = "rank_mean"
COL_RANK_STD = "rank_std"
COL_IN_REFERENCE_SET = "in_reference_set"
COL_DE_SCORE = "de_score"
COL_ATTN_DIFF = "attn_diff"
COL_ATTN_LOG2_RATIO = "attn_log2_ratio"
COL_ATTN_SCALED_DIFF = "attn_scaled_diff"
COL_POS_RATIO_DIFF = "pos_ratio_diff"
COL_SCORE = "score"  # the DE table's Wilcoxon score
TEXT_COLUMNS = (COL_SYMBOL, COL_ENSEMBL_ID)


def col_attn(suffix: str) -> str:
    """Attention received, summed over layers, heads, query rows and cells."""
    return _suffixed("attn", suffix)


def col_attn_scaled(suffix: str) -> str:
    return _suffixed("attn_scaled", suffix)


def col_attn_per_cell(suffix: str) -> str:
    return _suffixed("attn_per_cell", suffix)


def col_attn_norm(suffix: str) -> str:
    return _suffixed("attn_norm", suffix)


def col_attn_expected(suffix: str) -> str:
    return _suffixed("attn_expected", suffix)


def col_attn_pos_ratio(suffix: str) -> str:
    return _suffixed("attn_pos_ratio", suffix)


def col_key_score(suffix: str) -> str:
    """The controlled key-gene score (`pipeline.analysis.keygenes`), the default ranking of key genes."""
    return _suffixed("key_score", suffix)


def col_rank_mean_group(group: str) -> str:
    return _suffixed(COL_RANK_MEAN, group)


# ------------------------------------------------------------------------------------ JSON documents
JSON_DE_OVERLAP = "de_overlap"
JSON_STATS = "stats"
JSON_SUMMARY = "summary"
JSON_KEY_GENES = "key_genes"  # the key-gene score's definition, fit and frequency correlations
JSON_QC_REPORT = "qc_report"  # on the data run
JSON_PRETRAIN = "pretrain"  # on a pretraining run
JSON_WARNINGS = "warnings"  # on a pipeline run: [{"kind", "message", ...}], what the researcher must see
# on a finetune run: {"learned", "reasons", "predicted_share", "predicted_class", "balanced_accuracy",
# "balanced_accuracy_ci", "chance"}; a model that did not learn has no findings (`model_gate`)
JSON_GATE = "gate"
# on a pipeline run given a masked-LM checkpoint: {"cells", "top1", "top10", "baseline_top1", "baseline_top10",
# "ok", "message"}, its masked-gene accuracy on the user's cells against the gene-frequency baseline
JSON_CHECKPOINT_CHECK = "checkpoint_check"
# q-values: the family a document's Benjamini-Hochberg q-values were computed over ({"method", "family",
# "n_tests"}), in `de_overlap` (overlap tests) and in every `deletion_<model>` (deletion tests)
FIELD_MULTIPLICITY = "multiplicity"
JSON_DE_NAMES = (JSON_DE_OVERLAP, "de", "de_vs_attention")  # where a DE comparison may sit, first first

# ------------------------------------------------------------------------- the data run's cells table
# Besides these, one column per task (named after the task) holds each cell's class name; the data run's
# labels (`Store.labels`) give each task's classes in order (`DataRecord.task_columns`).
CELL_ID = "cell_id"
CELL_DOSE = "dose"  # stores written before tasks were general: numeric dose, and the low/high group
CELL_DOSE_CLASS = "dose_class"
CELL_CLASS = "class"
CELL_GROUP = "group"
CELL_LENGTH = "length"
CELL_SPLIT = "split"
CELL_UMAP1 = "umap1"
CELL_UMAP2 = "umap2"


# ======================================================================================= run config
def run_config(run: dict) -> dict:
    cfg = run.get("config")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError:
            cfg = {}
    return cfg if isinstance(cfg, dict) else {}


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


def run_preset(run: dict) -> str:
    cfg = run_config(run)
    return str(config_value(cfg, "run.preset") or cfg.get("preset") or "")


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
    return (TASK_ORDER.get(task, 2), task, mode_sort_key(mode), run.get("id", 0))


def compared_models(run: dict) -> tuple[str, str]:
    """The two training modes an analysis run compares: from its config, else its name ("x: a vs b")."""
    cfg = run_config(run)
    a = cfg.get("a") or cfg.get("model_a") or cfg.get("mode_a")
    b = cfg.get("b") or cfg.get("model_b") or cfg.get("mode_b")
    if not (a and b):
        match = re.search(r"(\S+)\s+vs\.?\s+(\S+)\s*$", str(run.get("name") or ""))
        if match:
            a, b = a or match.group(1), b or match.group(2)
    return str(a or "model a"), str(b or "model b")


# ============================================================================================ scope
@dataclass
class Scope:
    """A run and every run below it (children, grandchildren), in creation order."""

    run: dict
    runs: list[dict] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.runs if r.get("kind") == kind]

    @property
    def finetunes(self) -> list[dict]:
        return sorted(self.of_kind(KIND_FINETUNE), key=finetune_sort_key)

    @property
    def analyses(self) -> list[dict]:
        return self.of_kind(KIND_ANALYSIS)

    @property
    def data_runs(self) -> list[dict]:
        return self.of_kind(KIND_DATA)

    @property
    def de_runs(self) -> list[dict]:
        return self.of_kind(KIND_DE)


def full_run(st, run: dict | int) -> dict:
    """The run with its config: rows of `children` and `list_runs` carry none, `get_run` does."""
    if isinstance(run, dict) and "config" in run:
        return run
    return st.get_run(run["id"] if isinstance(run, dict) else run)


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


# ========================================================================================= finetune
@dataclass
class Confusion:
    labels: list[str]
    matrix: np.ndarray
    split: str | None = SPLIT_TEST


@dataclass
class Curve:
    label: str
    x: list[float]
    y: list[float]


@dataclass
class FinetuneResult:
    """One fine-tuning run (task x mode): test scores, the confusion matrix, optionally the curves."""

    run_id: int
    name: str
    task: str
    mode: str
    status: str | None
    accuracy: float | None
    macro_f1: float | None
    confusion: Confusion | None
    curves: dict[str, list[Curve]] | None = None

    @property
    def key(self) -> str:
        return f"{self.task}/{self.mode}"


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


def test_scores(st, run_id: int, confusion: dict | Confusion | None = None) -> dict[str, float | None]:
    """Test accuracy and macro-F1 as logged, else computed from the test confusion matrix."""
    rows = st.metrics(run_id, split=SPLIT_TEST)
    acc = last_metric(rows, ACCURACY_NAMES, (SPLIT_TEST,))
    f1 = last_metric(rows, F1_NAMES, (SPLIT_TEST,))
    if (acc is None or f1 is None) and confusion is not None:
        matrix = confusion.matrix if isinstance(confusion, Confusion) else confusion["matrix"]
        c_acc, c_f1 = scores_from_confusion(np.asarray(matrix))
        acc = c_acc if acc is None else acc
        f1 = c_f1 if f1 is None else f1
    return {METRIC_ACCURACY: acc, METRIC_MACRO_F1: f1}


def test_accuracy(st, run_id: int) -> float | None:
    """The logged test accuracy only (no confusion fallback): one query."""
    return last_metric(st.metrics(run_id, split=SPLIT_TEST), ACCURACY_NAMES, (SPLIT_TEST,))


def pick_confusion(confusions: list[dict], split: str = SPLIT_TEST) -> dict | None:
    for c in confusions:
        if c.get("split") == split:
            return c
    return confusions[0] if confusions else None


def read_confusion(st, run_id: int, split: str = SPLIT_TEST) -> Confusion | None:
    """The run's confusion matrix of `split` (else its first one)."""
    c = pick_confusion(st.confusions(run_id), split)
    if c is None:
        return None
    return Confusion([str(x) for x in c["labels"]], np.asarray(c["matrix"]), c.get("split"))


def training_curves(st, run: dict) -> dict[str, list[Curve]]:
    """Loss by step (train) and validation accuracy/loss by epoch of one finetune run."""
    rows = st.metrics(run["id"])
    out: dict[str, list[Curve]] = {METRIC_LOSS: [], METRIC_ACCURACY: []}

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

    x, y = series(LOSS_NAMES, (None, SPLIT_TRAIN), "step")
    if not x:
        x, y = series(LOSS_NAMES, (None, SPLIT_TRAIN), "epoch")
    if x:
        out[METRIC_LOSS].append(Curve("train", x, y))
    x, y = series(LOSS_NAMES, VAL_SPLITS, "epoch")
    if x:
        out[METRIC_LOSS].append(Curve("val", x, y))
    x, y = series(ACCURACY_NAMES, VAL_SPLITS, "epoch")
    if not x:
        x, y = series(ACCURACY_NAMES, VAL_SPLITS, "step")
    if x:
        out[METRIC_ACCURACY].append(Curve("val acc", x, y))
    x, y = series(F1_NAMES, VAL_SPLITS, "epoch")
    if x:
        out[METRIC_ACCURACY].append(Curve("val F1", x, y))
    return out


def read_finetune(st, run: dict, *, curves: bool = False) -> FinetuneResult:
    """A finetune run's results: scores as logged (else from its confusion matrix), the matrix, curves."""
    confusion = read_confusion(st, run["id"])
    scores = test_scores(st, run["id"], confusion)
    task, mode = task_and_mode(run)
    return FinetuneResult(
        run_id=int(run["id"]),
        name=str(run.get("name") or ""),
        task=task,
        mode=mode,
        status=run.get("status"),
        accuracy=scores[METRIC_ACCURACY],
        macro_f1=scores[METRIC_MACRO_F1],
        confusion=confusion,
        curves=training_curves(st, run) if curves else None,
    )


def read_finetunes(st, scope: Scope, *, curves: bool = False) -> list[FinetuneResult]:
    """Every fine-tuning run of the scope, task by task, frozen before unfrozen."""
    return [read_finetune(st, run, curves=curves) for run in scope.finetunes]


# ========================================================================================= analysis
@dataclass
class Grid:
    """A layer x head grid with its stored interval (if any)."""

    name: str
    values: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


@dataclass
class Histogram:
    counts: np.ndarray
    meta: dict

    @property
    def median(self) -> float | None:
        return self.meta.get(META_MEDIAN)


@dataclass
class RankCurves:
    """Attention received per rank position (layers and heads summed) of the compared models."""

    received: dict[str, np.ndarray] = field(default_factory=dict)  # by model suffix
    lower: dict[str, np.ndarray] = field(default_factory=dict)
    upper: dict[str, np.ndarray] = field(default_factory=dict)
    pct_diff: np.ndarray | None = None
    log_ratio: np.ndarray | None = None
    median_length: float | None = None  # from the first model's vector meta
    length_hist: Histogram | None = None

    @property
    def a(self) -> np.ndarray | None:
        return self.received.get(MODEL_SUFFIXES[0])

    @property
    def b(self) -> np.ndarray | None:
        return self.received.get(MODEL_SUFFIXES[1])


@dataclass
class PairAnalysis:
    """An analysis run: two models' attention compared (thesis 4.2-4.5)."""

    run_id: int
    name: str
    status: str | None
    models: tuple[str, str]
    grids: dict[str, Grid] = field(default_factory=dict)
    ranks: RankCurves = field(default_factory=RankCurves)
    gene_table_names: list[str] = field(default_factory=list)
    genes: pd.DataFrame | None = None
    de_overlap: dict | None = None
    stats: dict | None = None
    summary: dict | None = None
    json: dict[str, Any] = field(default_factory=dict)

    @property
    def model_names(self) -> dict[str, str]:
        """{"a": "frozen", "b": "unfrozen"}"""
        return dict(zip(MODEL_SUFFIXES, self.models))

    @property
    def grid_names(self) -> list[str]:
        return list(self.grids)

    def norm_grids(self) -> list[Grid]:
        return [g for g in self.grids.values() if g.name.startswith(GRID_NORM_PREFIX)]


def reduce_rank_vector(values: np.ndarray) -> np.ndarray:
    """Per-rank vectors may carry (layer, head, rank) axes: sum the heads and layers away."""
    v = np.asarray(values, dtype=float)
    while v.ndim > 1:
        v = v.sum(axis=0)
    return v


def default_grid(names: Sequence[str], wanted: str | None = None) -> str | None:
    """`wanted` if stored, else the cosine similarity, else the first grid."""
    if wanted in names:
        return wanted
    return GRID_COSINE if GRID_COSINE in names else (names[0] if names else None)


def read_grid(st, run_id: int, name: str) -> Grid:
    g = st.grid(run_id, name)
    arr = lambda v: None if v is None else np.asarray(v)  # noqa: E731
    return Grid(name, np.asarray(g["values"]), arr(g.get("lower")), arr(g.get("upper")))


def read_grids(st, run_id: int, names: Iterable[str] | None = None) -> dict[str, Grid]:
    stored = st.grid_names(run_id)
    wanted = stored if names is None else [n for n in names if n in stored]
    return {n: read_grid(st, run_id, n) for n in wanted}


def read_histogram(st, run_id: int, name: str = VEC_LENGTH_HIST) -> Histogram | None:
    if name not in set(st.vector_names(run_id)):
        return None
    return Histogram(np.asarray(st.vector(run_id, name), dtype=float).ravel(), st.vector_meta(run_id, name) or {})


def read_rank_curves(st, run_id: int, *, hist_sources: Iterable[int] = ()) -> RankCurves:
    """The per-rank vectors of an analysis run; the length histogram from the run, else `hist_sources`."""
    names = set(st.vector_names(run_id))
    out = RankCurves()
    for s in MODEL_SUFFIXES:
        if vec_rank_received(s) in names:
            out.received[s] = reduce_rank_vector(st.vector(run_id, vec_rank_received(s)))
            if s == MODEL_SUFFIXES[0]:
                out.median_length = st.vector_meta(run_id, vec_rank_received(s)).get(META_MEDIAN_LENGTH)
        for bound, target in ((vec_rank_received_lower(s), out.lower), (vec_rank_received_upper(s), out.upper)):
            if bound in names:
                target[s] = reduce_rank_vector(st.vector(run_id, bound))
    if VEC_RANK_PCT_DIFF in names:
        out.pct_diff = reduce_rank_vector(st.vector(run_id, VEC_RANK_PCT_DIFF))
    if VEC_RANK_LOG_RATIO in names:
        out.log_ratio = reduce_rank_vector(st.vector(run_id, VEC_RANK_LOG_RATIO))
    for source in (run_id, *hist_sources):
        out.length_hist = read_histogram(st, source)
        if out.length_hist is not None:
            break
    return out


def read_json(st, run_id: int, names: Iterable[str] | None = None) -> dict[str, Any]:
    stored = st.json_names(run_id)
    wanted = stored if names is None else [n for n in names if n in stored]
    return {n: st.get_json(run_id, n) for n in wanted}


def read_pair_analysis(st, run: dict | int, *, genes: bool = False, hist_sources: Iterable[int] = ()) -> PairAnalysis:
    """Everything an analysis run holds; the gene table (up to ~20,000 rows) only with `genes`.
    `run`: an id or a run row (one from `children` is completed with `get_run`)."""
    run = full_run(st, run)
    rid = int(run["id"])
    docs = read_json(st, rid)
    tables = st.gene_tables(rid)
    return PairAnalysis(
        run_id=rid,
        name=str(run.get("name") or ""),
        status=run.get("status"),
        models=compared_models(run),
        grids=read_grids(st, rid),
        ranks=read_rank_curves(st, rid, hist_sources=hist_sources),
        gene_table_names=list(tables),
        genes=st.gene_table_df(rid, TABLE_GENES) if genes and TABLE_GENES in tables else None,
        de_overlap=docs.get(JSON_DE_OVERLAP),
        stats=docs.get(JSON_STATS),
        summary=docs.get(JSON_SUMMARY),
        json=docs,
    )


def gene_label(row: dict) -> str:
    """A gene's symbol, or its Ensembl ID where it has none."""
    symbol = row.get(COL_SYMBOL)
    return symbol if isinstance(symbol, str) and symbol else str(row[COL_ENSEMBL_ID])


def top_genes(st, run_id: int, column: str, n: int = 10, *, table: str = TABLE_GENES) -> list[str]:
    """The labels of the `n` genes with the highest `column` (one SQL page); [] when the column is absent."""
    if table not in st.gene_tables(run_id) or column not in st.gene_table_columns(run_id, table):
        return []
    rows = st.gene_table(run_id, table, order_by=column, descending=True, limit=n)
    return [gene_label(r) for r in rows]


# ================================================================================ view summaries
# What the views show first: a pipeline's task x mode table, each analysis's headline, a pipeline's
# progress over its stages, and the ranks of genes in a key-gene table.

COL_LOGFC = "logfoldchange"  # the DE table's log fold change
COL_PVAL = "pval"
COL_PVAL_ADJ = "pval_adj"
JSON_HEADLINE_PREFIXES = ("deletion", "attribution")  # further analyses' documents shown on the Overview
STAGE_DONE = ("completed", "skipped")
SIGNIFICANCE = 0.05


def best_epoch(st, run_id: int) -> int | None:
    """The epoch with the highest validation accuracy (the one a fine-tuning keeps), else None."""
    best, epoch = None, None
    for row in st.metrics(run_id):
        if row.get("name") in ACCURACY_NAMES and row.get("split") in VAL_SPLITS and row.get("epoch") is not None:
            try:
                value = float(row["value"])
            except (TypeError, ValueError):
                continue
            if best is None or value > best:
                best, epoch = value, int(row["epoch"])
    return epoch


@dataclass
class StageProgress:
    """A pipeline's progress over its stages: how many are done, which runs, and that stage's progress."""

    done: int
    total: int
    current: str | None
    progress: dict | None  # the run's progress row, only when it belongs to the running stage

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def stage_progress(stages: list[dict], progress: dict | None) -> StageProgress:
    """Stages done of total; a progress row of a stage that is no longer running is left out (stale)."""
    running = [s["stage"] for s in stages if s.get("status") == "running"]
    current = running[-1] if running else None
    live = progress if progress and current is not None and progress.get("stage") == current else None
    done = sum(1 for s in stages if s.get("status") in STAGE_DONE)
    return StageProgress(done, len(stages), current, live)


@dataclass
class AnalysisHeadline:
    """An analysis run's headline numbers (thesis 4.2-4.5): mean cosine per layer, key genes, DE overlap."""

    run_id: int
    name: str
    status: str | None
    models: tuple[str, str]
    cosine_mean: float | None = None
    cosine_per_layer: list[float] = field(default_factory=list)
    heads_differing: int | None = None
    n_heads_total: int | None = None
    top_genes: dict[str, list[str]] = field(default_factory=dict)  # by model suffix: summed attention
    key_genes: dict[str, list[str]] = field(default_factory=dict)  # by model suffix: top by the key score
    key_warnings: list[str] = field(default_factory=list)  # rankings that track detection frequency
    de_overlap: list[dict] = field(default_factory=list)  # k, overlap, expected, p_value (, p_matched)
    de_attention_column: str | None = None  # the gene-table column the DE overlap ranks genes by
    # the overlap per DE direction: [{"direction": "up"|"down"|"either", "label": "up in high", "overlap": [...]}]
    de_directions: list[dict] = field(default_factory=list)
    de_cells: str | None = None  # which cells the DE was computed on (pipeline runs: test cells held out)
    spearman: dict | None = None


def _floats(values: Any) -> list[float]:
    out = []
    for v in values or ():
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


def read_analysis_headline(st, run: dict | int) -> AnalysisHeadline:
    """From the run's `summary`, `key_genes` and `de_overlap` documents, else from its cosine grid and
    gene table. Key genes are the top genes by the key score (`col_key_score`) where the run has it."""
    run = full_run(st, run)
    rid = int(run["id"])
    head = AnalysisHeadline(rid, str(run.get("name") or ""), run.get("status"), compared_models(run))
    docs = read_json(st, rid, (JSON_SUMMARY, JSON_DE_OVERLAP, JSON_KEY_GENES))
    summary = docs.get(JSON_SUMMARY) or {}
    if isinstance(summary, dict):
        head.cosine_mean = summary.get("cosine_mean")
        head.cosine_per_layer = _floats(summary.get("cosine_per_layer"))
        head.heads_differing = summary.get("heads_differing")
        for s in MODEL_SUFFIXES:
            if summary.get(f"top_genes_{s}"):
                head.top_genes[s] = [str(g) for g in summary[f"top_genes_{s}"]]
            if summary.get(f"top_key_genes_{s}"):
                head.key_genes[s] = [str(g) for g in summary[f"top_key_genes_{s}"]]
    if not head.key_genes:
        for s in MODEL_SUFFIXES:
            genes = top_genes(st, rid, col_key_score(s), 10)
            if genes:
                head.key_genes[s] = genes
    key_doc = docs.get(JSON_KEY_GENES)
    if isinstance(key_doc, dict):
        head.key_warnings = [str(w) for w in key_doc.get("warnings") or ()]
    if GRID_COSINE in st.grid_names(rid):
        values = np.asarray(read_grid(st, rid, GRID_COSINE).values, dtype=float)
        head.n_heads_total = int(values.size)
        if (head.cosine_mean is None or not head.cosine_per_layer) and values.size and np.isfinite(values).any():
            head.cosine_mean = float(np.nanmean(values))
            head.cosine_per_layer = [float(np.nanmean(r)) if np.isfinite(r).any() else float("nan") for r in values]
    if not head.top_genes:
        for s in MODEL_SUFFIXES:
            genes = top_genes(st, rid, col_attn(s), 10)
            if genes:
                head.top_genes[s] = genes
    overlap = docs.get(JSON_DE_OVERLAP)
    if isinstance(overlap, dict):
        records = overlap.get("overlap")
        if isinstance(records, list):
            head.de_overlap = [r for r in records if isinstance(r, dict) and "k" in r]
        if isinstance(overlap.get("spearman"), dict):
            head.spearman = overlap["spearman"]
        if overlap.get("attention_column"):
            head.de_attention_column = str(overlap["attention_column"])
        head.de_directions = [d for d in overlap.get("directions") or () if isinstance(d, dict) and d.get("overlap")]
        head.de_cells = overlap.get("de_cells")
    return head


@dataclass
class FinetuneRow:
    """One row of the task x mode table."""

    run_id: int
    task: str
    mode: str
    status: str | None
    accuracy: float | None
    macro_f1: float | None
    best_epoch: int | None

    @property
    def key(self) -> str:
        return task_key(self.task, self.mode)


def task_key(task: str, mode: str) -> str:
    return f"{task}/{mode}"


@dataclass
class ResultsSummary:
    """What a run's Overview leads with: the task x mode table, analysis headlines, other headlines."""

    finetunes: list[FinetuneRow] = field(default_factory=list)
    analyses: list[AnalysisHeadline] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # deletion / attribution documents by name

    @property
    def empty(self) -> bool:
        return not (self.finetunes or self.analyses or self.extra)


def read_results_summary(st, run_id: int, scope: Scope | None = None) -> ResultsSummary:
    scope = scope or collect_scope(st, run_id)
    out = ResultsSummary()
    for ft in read_finetunes(st, scope):
        out.finetunes.append(
            FinetuneRow(ft.run_id, ft.task, ft.mode, ft.status, ft.accuracy, ft.macro_f1, best_epoch(st, ft.run_id))
        )
    for an in scope.analyses:
        out.analyses.append(read_analysis_headline(st, an))
    for run in scope.runs:
        for name in st.json_names(run["id"]):
            if name.startswith(JSON_HEADLINE_PREFIXES):
                label = name if run["id"] == scope.run["id"] else f"{run.get('name')} · {name}"
                out.extra[label] = st.get_json(run["id"], name)
    return out


def gene_ranks(
    st, run_id: int, column: str, ensembl_ids: Iterable[str], *, table: str = TABLE_GENES, descending: bool = True
) -> dict:
    """{ensembl_id: rank} of the given genes in the whole table sorted by `column` (1 = first); one
    counting query per gene, so meant for a page of rows."""
    if table not in st.gene_tables(run_id) or column not in st.gene_table_columns(run_id, table):
        return {}
    out = {}
    for gid in ensembl_ids:
        rows = st.gene_table(run_id, table, limit=1, where={COL_ENSEMBL_ID: ("=", gid)})
        value = rows[0].get(column) if rows else None
        if value is None:
            continue
        out[gid] = st.gene_table_count(run_id, table, where={column: (">" if descending else "<", value)}) + 1
    return out


def rank_order(values: Sequence[Any]) -> list[int | None]:
    """Rank of each value, descending (1 = largest); missing or NaN values get None."""
    idx = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(f):
            idx.append((f, i))
    idx.sort(key=lambda t: -t[0])
    ranks: list[int | None] = [None] * len(values)
    for r, (_, i) in enumerate(idx, start=1):
        ranks[i] = r
    return ranks


def read_de_table(st, de_run_id: int, analyses: Iterable[dict] = ()) -> dict:
    """A DE run's Wilcoxon table with, per analysis and model, each gene's attention rank (1 = the most
    attended gene): {"columns": [...], "rows": [dict], "rank_columns": {column: label}}."""
    analyses = list(analyses)
    rows = st.gene_table(de_run_id, TABLE_DE, limit=None) if TABLE_DE in st.gene_tables(de_run_id) else []
    columns = list(st.gene_table_columns(de_run_id, TABLE_DE)) if rows else []
    rank_columns: dict[str, str] = {}
    for an in analyses:
        rid = int(an["id"])
        if TABLE_GENES not in st.gene_tables(rid):
            continue
        models = compared_models(full_run(st, an))
        cols = st.gene_table_columns(rid, TABLE_GENES)
        genes = None
        for s, model in zip(MODEL_SUFFIXES, models):
            if col_attn(s) not in cols:
                continue
            if genes is None:
                genes = st.gene_table(rid, TABLE_GENES, limit=None)
            ranks = rank_order([g.get(col_attn(s)) for g in genes])
            by_id = {g[COL_ENSEMBL_ID]: r for g, r in zip(genes, ranks)}
            column = f"rank_{rid}_{s}"
            rank_columns[column] = f"rank {model}" + (f" (#{rid})" if len(analyses) > 1 else "")
            for row in rows:
                row[column] = by_id.get(row.get(COL_ENSEMBL_ID))
    return {"columns": columns + list(rank_columns), "rows": rows, "rank_columns": rank_columns}


# =============================================================================================== DE
@dataclass
class DEResult:
    """A DE run: scanpy's Wilcoxon between two label groups (thesis fig. 7)."""

    run_id: int
    name: str
    status: str | None
    groupby: str | None
    group: str | None
    reference: str | None
    table: pd.DataFrame | None


def read_de(st, run: dict) -> DEResult:
    run = full_run(st, run)
    cfg = run_config(run)
    rid = int(run["id"])
    table = st.gene_table_df(rid, TABLE_DE) if TABLE_DE in st.gene_tables(rid) else None
    return DEResult(
        rid,
        str(run.get("name") or ""),
        run.get("status"),
        cfg.get("groupby"),
        cfg.get("group"),
        cfg.get("reference"),
        table,
    )


def completed_de(st, de_runs: Iterable[dict]) -> DEResult | None:
    """The first completed DE run that holds its table."""
    for run in de_runs:
        if run.get("status") == "completed" and TABLE_DE in st.gene_tables(run["id"]):
            return read_de(st, run)
    return None


# ============================================================================================= data
@dataclass
class DataRecord:
    """The data run: the selected cells (a class column per task, length, split, UMAP), labels, QC, lengths."""

    run_id: int
    name: str
    cells: pd.DataFrame
    labels: dict[str, list[str]]
    qc: dict | None
    length_hist: Histogram | None

    def has_umap(self) -> bool:
        return {CELL_UMAP1, CELL_UMAP2} <= set(self.cells.columns)

    def task_columns(self) -> list[str]:
        """The cells-table columns holding a task's class names, in task order (older stores: dose, group)."""
        cols = [t for t in self.labels if t in self.cells.columns]
        return cols or [c for c in (CELL_DOSE_CLASS, CELL_GROUP) if c in self.cells.columns]

    def class_order(self, column: str) -> list[str]:
        """A task column's classes in the task's order (else the values present, sorted)."""
        if column in self.labels:
            return list(self.labels[column])
        return sorted(map(str, self.cells[column].unique()))


def read_data_record(st, run: dict) -> DataRecord:
    rid = int(run["id"])
    qc = st.get_json(rid, JSON_QC_REPORT) if JSON_QC_REPORT in st.json_names(rid) else None
    return DataRecord(rid, str(run.get("name") or ""), st.cells(rid), st.labels(rid), qc, read_histogram(st, rid))


# ====================================================================== attribution (pipeline.analysis.attribution)
# Per analysed model: Hao et al.'s self-attention attribution, integrated gradients and attention rollout,
# written by `pipeline.analysis.attribution.attribution_records` for the run its recorder writes. `<model>` is
# `attr_model_key(model name)`; `<method>` one of ATTR_METHODS.
ATTR_METHODS = ("hao", "ig", "rollout")
ATTR_TABLE_PREFIX = "attribution_"
ATTR_JSON_PREFIX = "attribution_"


def json_deletion(model: str) -> str:
    """JSON `deletion_<model>`: set deletion of each score's top k genes beside matched random sets."""
    return f"deletion_{attr_model_key(model)}"


def table_deletion(model: str) -> str:
    """Gene table `deletion_<model>`: single-gene deletion effects on the true-class logit."""
    return f"deletion_{attr_model_key(model)}"


def col_deletion_logit(suffix: str) -> str:
    """Analysis gene table: mean change of the true-class logit when the gene alone is deleted."""
    return _suffixed("deletion_logit", suffix)


def col_deletion_prob(suffix: str) -> str:
    return _suffixed("deletion_prob", suffix)


JSON_MODEL_ANALYSIS = "model_analysis"  # on a "model" run: {"task", "model", "pairs"}, the pairs that read it


def model_analysis_name(task: str, model: str) -> str:
    """The name of a pipeline's "model" run: one model's attention, attribution, deletion and cascade."""
    return f"{task}: {model}"


def json_sanity(model: str) -> str:
    """JSON `sanity_<model>`: the randomisation cascade of one model (`pipeline.analysis.sanity`)."""
    return f"sanity_{attr_model_key(model)}"


def attr_model_key(model: str) -> str:
    """A model name as it appears in attribution result names: letters, digits, underscores ("last-1" -> "last_1")."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(model)).strip("_") or "model"


def table_attribution(model: str) -> str:
    """Gene table `attribution_<model>`: per method `<m>_total`, `<m>_mean`, `<m>_expected`, `<m>_pos_ratio`,
    `<m>_pos_excess`; shared `n_cells`, `n_occurrences`, `rank_mean`."""
    return f"{ATTR_TABLE_PREFIX}{attr_model_key(model)}"


def vec_attr_rank(method: str, model: str) -> str:
    """`attr_rank_<method>_<model>`: mean score received per rank position (layers and heads summed)."""
    return f"attr_rank_{method}_{attr_model_key(model)}"


def vec_attr_rank_lh_hao(model: str) -> str:
    """`attr_rank_lh_hao_<model>`: Hao attribution received per (layer, head, rank position)."""
    return f"attr_rank_lh_hao_{attr_model_key(model)}"


def grid_attr_head_importance(model: str) -> str:
    """`attr_head_importance_<model>`: Hao et al.'s head importance E[max Attr_h(A)], layer x head."""
    return f"attr_head_importance_{attr_model_key(model)}"


def json_attribution(model: str) -> str:
    """JSON `attribution_<model>`: parameters, completeness, rollout read position, memory, agreement."""
    return f"{ATTR_JSON_PREFIX}{attr_model_key(model)}"


def col_attr(method: str, what: str = "mean") -> str:
    """A column of the attribution gene table: `hao_mean`, `ig_total`, `rollout_pos_excess`, ..."""
    return f"{method}_{what}"


@dataclass
class Attribution:
    """One model's attribution scores in a run."""

    run_id: int
    model: str  # the key (attr_model_key)
    info: dict  # the JSON document
    rank: dict[str, np.ndarray] = field(default_factory=dict)  # by method
    rank_lh_hao: np.ndarray | None = None  # (layer, head, rank)
    head_importance: Grid | None = None
    genes: pd.DataFrame | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.info.get("methods", []))


def attribution_models(st, run_id: int) -> list[str]:
    """The model keys of the attributions a run holds."""
    names = set(st.gene_tables(run_id))
    return sorted(
        n[len(ATTR_JSON_PREFIX) :]
        for n in st.json_names(run_id)
        if n.startswith(ATTR_JSON_PREFIX) and table_attribution(n[len(ATTR_JSON_PREFIX) :]) in names
    )


def read_attribution(st, run_id: int, model: str, *, genes: bool = False) -> Attribution | None:
    """One model's attribution in a run (None when it has none); the gene table only with `genes`."""
    key = attr_model_key(model)
    if json_attribution(key) not in st.json_names(run_id):
        return None
    info = st.get_json(run_id, json_attribution(key)) or {}
    vectors = set(st.vector_names(run_id))
    out = Attribution(run_id=int(run_id), model=key, info=info)
    for m in ATTR_METHODS:
        if vec_attr_rank(m, key) in vectors:
            out.rank[m] = np.asarray(st.vector(run_id, vec_attr_rank(m, key)), dtype=float)
    if vec_attr_rank_lh_hao(key) in vectors:
        out.rank_lh_hao = np.asarray(st.vector(run_id, vec_attr_rank_lh_hao(key)), dtype=float)
    if grid_attr_head_importance(key) in st.grid_names(run_id):
        out.head_importance = read_grid(st, run_id, grid_attr_head_importance(key))
    if genes and table_attribution(key) in st.gene_tables(run_id):
        out.genes = st.gene_table_df(run_id, table_attribution(key))
    return out


# ===================================================== key genes, deletion and the randomisation cascade
# Per analysed model: set and single-gene deletion (`pipeline.analysis.deletion`) and the randomisation cascade
# (`pipeline.analysis.sanity`), keyed by `attr_model_key(model name)`; per analysis run: the key-gene score's
# definition, fit and frequency correlations (JSON_KEY_GENES).
DEL_SCORE = "score"
DEL_K = "k"
DEL_DELTA_PROB = "delta_prob_mean"
DEL_DELTA_PROB_LOW = "delta_prob_ci_low"
DEL_DELTA_PROB_HIGH = "delta_prob_ci_high"
DEL_RANDOM_MEAN = "random_delta_prob_mean"
DEL_RANDOM_LOW = "random_delta_prob_low"
DEL_RANDOM_HIGH = "random_delta_prob_high"
DEL_P = "p_empirical"
DEL_ACCURACY_AFTER = "accuracy_after"
DEL_N_CELLS_EXPRESSING = "n_cells_expressing"
DEL_LOGIT = "delta_logit_mean"
DEL_LOGIT_LOW = "delta_logit_ci_low"
DEL_LOGIT_HIGH = "delta_logit_ci_high"
DEL_TOP_OF = "top_of"
SANITY_FLAG_RHO = 0.8  # a score whose Spearman with the trained one stays at or above this is flagged


@dataclass
class Deletion:
    """One model's deletion results in a run: the JSON document (`info`), its set rows (one per score and
    k) and the single-gene table (None where the run has none)."""

    run_id: int
    model: str  # the key (attr_model_key)
    info: dict
    sets: pd.DataFrame
    single: pd.DataFrame | None = None

    @property
    def scores(self) -> list[str]:
        """The scores in the document's order (else in the order of the set rows)."""
        listed = [str(s) for s in self.info.get("scores") or ()]
        present = [str(s) for s in dict.fromkeys(self.sets[DEL_SCORE])] if DEL_SCORE in self.sets else []
        return [s for s in listed if s in present] + [s for s in present if s not in listed]

    def curve(self, score: str) -> pd.DataFrame:
        """One score's set rows, by k."""
        return self.sets[self.sets[DEL_SCORE] == score].sort_values(DEL_K)


def read_deletion(st, run_id: int, model: str) -> Deletion | None:
    """A model's set deletion and single-gene deletion (None when the run has no deletion document)."""
    import pandas as pd

    key = attr_model_key(model)
    if json_deletion(key) not in st.json_names(run_id):
        return None
    info = st.get_json(run_id, json_deletion(key)) or {}
    rows = [r for r in info.get("sets") or () if isinstance(r, dict)]
    sets = pd.DataFrame(rows)
    single = st.gene_table_df(run_id, table_deletion(key)) if table_deletion(key) in st.gene_tables(run_id) else None
    return Deletion(run_id=int(run_id), model=key, info=info, sets=sets, single=single)


def read_sanity(st, run_id: int, model: str) -> dict | None:
    """A model's randomisation cascade: {steps, scores: {column: {spearman, jaccard}}, flagged, ...}."""
    name = json_sanity(model)
    if name not in st.json_names(run_id):
        return None
    doc = st.get_json(run_id, name)
    return doc if isinstance(doc, dict) else None


def read_key_genes(st, run_id: int) -> dict | None:
    """The key-gene score's definition, fit, frequency Spearmans and warnings (None when not stored)."""
    if JSON_KEY_GENES not in st.json_names(run_id):
        return None
    doc = st.get_json(run_id, JSON_KEY_GENES)
    return doc if isinstance(doc, dict) else None


# ------------------------------------------------------------------------------------------ warnings
def run_warnings(st, run_id: int) -> list[dict]:
    """The warnings a pipeline run recorded (`JSON_WARNINGS`): dicts with "kind" and "message", in order."""
    if JSON_WARNINGS not in st.json_names(run_id):
        return []
    return [w for w in (st.get_json(run_id, JSON_WARNINGS) or []) if isinstance(w, dict) and w.get("message")]


def model_gate(st, finetune_run_id: int) -> dict | None:
    """The gate before interpretation of a finetune run (`JSON_GATE`), or None when it has none (older runs)."""
    if JSON_GATE not in st.json_names(finetune_run_id):
        return None
    doc = st.get_json(finetune_run_id, JSON_GATE)
    return doc if isinstance(doc, dict) else None


BASELINE_METRICS = (METRIC_BASELINE_ACCURACY, METRIC_BASELINE_MACRO_F1, METRIC_MAJORITY_RATE, METRIC_BALANCED_ACCURACY)


def did_not_learn(gate: dict | None) -> bool:
    """Whether a gate says the model did not learn (False when there is no gate)."""
    return isinstance(gate, dict) and gate.get("learned") is False


def baseline_scores(st, finetune_run_id: int) -> dict[str, float | None]:
    """The test metrics stored beside a model: baseline accuracy and macro-F1, majority rate, balanced accuracy."""
    rows = st.metrics(finetune_run_id, split=SPLIT_TEST)
    return {name: last_metric(rows, (name,), (SPLIT_TEST,)) for name in BASELINE_METRICS}


def checkpoint_check(st, run_id: int) -> dict | None:
    """A pipeline run's masked-gene check of the user's checkpoint (`JSON_CHECKPOINT_CHECK`), or None."""
    if JSON_CHECKPOINT_CHECK not in st.json_names(run_id):
        return None
    doc = st.get_json(run_id, JSON_CHECKPOINT_CHECK)
    return doc if isinstance(doc, dict) else None


# ------------------------------------------------------------------------------------- cost plan, memory
JSON_PLAN = "plan"  # on a pipeline run: `pipeline.run.plan` (work and estimated seconds per stage), made at its start
JSON_GPU_MEMORY = "gpu_memory"  # on a pipeline run: stage -> peak CUDA memory allocated (bytes), `pipeline.progress`


def run_plan(st, run_id: int) -> dict | None:
    """The cost plan a pipeline run stored when it started (None for runs without one)."""
    if JSON_PLAN not in st.json_names(run_id):
        return None
    doc = st.get_json(run_id, JSON_PLAN)
    return doc if isinstance(doc, dict) else None


def run_gpu_memory(st, run_id: int) -> dict[str, int]:
    """Peak CUDA memory per stage of a pipeline run (empty when it ran on CPU)."""
    if JSON_GPU_MEMORY not in st.json_names(run_id):
        return {}
    doc = st.get_json(run_id, JSON_GPU_MEMORY)
    return {str(k): int(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


# --------------------------------------------------------------------------------------- process count
def run_process_count(st, run_id: int) -> int:
    """The processes a run fine-tuned in (`compute.nproc` of a pipeline run, `nproc` of a stand-alone finetune
    run; a finetune child reports its pipeline's); 1 when the run recorded none."""
    run = st.get_run(run_id)
    while True:
        cfg = run.get("config") or {}
        value = (cfg.get("compute") or {}).get("nproc") if isinstance(cfg.get("compute"), dict) else None
        value = cfg.get("nproc", value)
        if value is not None or not run.get("parent_id"):
            return int(value or 1)
        run = st.get_run(run["parent_id"])
