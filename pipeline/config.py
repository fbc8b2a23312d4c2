"""The experiment configuration: every choice of a `gfattn pipeline` run, with documented defaults.

A run's configuration is resolved in layers: the built-in defaults below, then a preset
(`pipeline/presets/<name>.toml`), then the user's `--config FILE.toml`, then command-line flags. Unknown
keys are errors that name the nearest valid key. The resolved configuration is stored with the run.

One typed schema: each section is a standard-library dataclass whose fields are its keys (type from
the annotation, default, documentation and allowed range from `key(...)`). The defaults (`defaults`),
the checks of every value (`merge`: type, range and choices, one line naming the key, the value and
what is allowed), `--print-config` (`to_toml`) and the TOML writer (`dumps_toml`) all read it, so a new
key is one line in its section's class. Dataclasses rather than pydantic: this module stays
standard-library only (the CLI's `--help` and the TUI import it without loading anything heavy), the
rules are few (bounds, choices, element types), and the resolved configuration stays the plain nested
dict (`cfg["train"]["lr"]`) that is stored with the run and read by every stage. Most of the module's
length is the schema itself: one documented field per key.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).with_name("presets")

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds: 0 .. 2**32 - 1


def key(default: Any, doc: str, **rules: Any) -> Any:
    """One configuration key: its default, its documentation and the rules its value must pass.

    Rules: `ge`, `gt`, `le`, `lt` (bounds of a number, or of each number of a list) and `choices`
    (allowed values of a text, or of each text of a list), `min_items` and `max_items` (of a list), `each` (a function
    that raises `InputError` for a bad item of a list) and `allowed` (the words of `--print-config` and
    of errors, where the type's own would not say enough). The type is the field's annotation.
    """
    meta = {"doc": doc, **rules}
    if isinstance(default, list | dict):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Run:
    name: str = key("", "run name shown in `gfattn runs` and the TUI (default: preset and time)")
    seed: int = key(0, "seed for selection, splits, training and bootstrap", ge=0, le=SEED_MAX)


@dataclass
class Data:
    path: str = key("", ".h5ad with raw counts; empty = the synthetic sci-Plex-like data set (`gfattn synth`)")
    tokenized: str = key(
        "", "a dataset tokenized by Geneformer (or `gfattn tokenize`) instead of counts: no UMAP, no DE"
    )
    synth_scale: float = key(0.33, "synthetic data: cells relative to sci-Plex 2's Nutlin-3a arm", gt=0)
    synth_preset: str = key(
        "thesis", "synthetic data: `thesis` (~680 genes/cell) or `raw` (~2,300)", choices=("thesis", "raw")
    )
    synth_length_effect: float = key(
        1.0, "synthetic data: strength of the dose -> detected genes confound (0 = off)", ge=0
    )
    filter: dict[str, list[str | int | float] | str | int | float] = key(
        {"perturbation": ["Nutlin*", "control", "vehicle", "Vehicle", "DMSO"]},
        "cells kept: obs column -> accepted values (`*` wildcards; several columns combine with AND; {} = all)",
        allowed="a table of obs column = list of values (text or numbers)",
    )
    gene_id_column: str = key("", "var column with Ensembl IDs or symbols (empty: var index, auto-detected)")
    n_counts_column: str = key(
        "", "obs column with total counts (empty: n_counts/ncounts/n.umi/total_counts, else computed)"
    )
    layer: str = key("", "layer with raw counts (empty: X)")
    max_cells: int = key(0, "subsample to at most this many cells, stratified by the tasks' classes (0 = all)", ge=0)
    fixed_length: int = key(
        0, "every cell keeps exactly this many genes, cells with fewer are dropped (0 = off; thesis 5.1)", ge=0
    )
    fixed_length_mode: str = key(
        "top",
        "fixed length: `top` (its N top-ranked genes) or `subsample` (N drawn, rank order kept)",
        choices=("top", "subsample"),
    )
    umap: bool = key(True, "compute a UMAP of the selected cells (scanpy) for the Data view")


@dataclass
class Split:
    validation: float = key(0.15, "fraction of cells for validation (model selection)", gt=0, lt=1)
    test: float = key(0.15, "fraction of cells for the independent test split (metrics and attention)", gt=0, lt=1)


@dataclass
class Model:
    path: str = key(
        "",
        "Geneformer checkpoint directory; empty or `embedded`: gfattn's small model, the one it ships (the default "
        "preset's recipe) or one pretrained on the synthetic corpus (no --data) or on your data's training cells, "
        "and cached",
    )
    geneformer_dir: str = key("", "Geneformer dictionaries (checkout dir) when the model dir does not carry them")
    version: str = key("auto", "`V1`, `V2` or `auto` (from the model's vocabulary)", choices=("auto", "V1", "V2"))
    max_len: int = key(0, "truncate encodings to the top N ranks (0 = the model's input size)", ge=0)


@dataclass
class Pretrain:
    corpus_cells: int = key(3000, "embedded model: cells of the synthetic corpus", ge=1)
    layers: int = key(2, "embedded model: encoder layers", ge=1)
    hidden: int = key(128, "embedded model: hidden size", ge=1)
    heads: int = key(4, "embedded model: attention heads", ge=1)
    intermediate: int = key(256, "embedded model: feed-forward size", ge=1)
    max_len: int = key(256, "embedded model: input size (top ranks kept)", ge=2)
    epochs: int = key(3, "embedded model: pretraining epochs", ge=1)
    batch_size: int = key(32, "embedded model: pretraining batch size", ge=1)
    lr: float = key(1e-3, "embedded model: peak learning rate", gt=0)
    time_budget_s: float = key(75.0, "embedded model: stop pretraining after this many seconds (0 = no limit)", ge=0)
    corpus: str = key(
        "healthy",
        "embedded model: the synthetic corpus, `healthy` or `atlas` (adds a graded p53 response that "
        "arrests the cycle and wider library sizes)",
        choices=("healthy", "atlas"),
    )
    cell_loss_weight: float = key(
        0.0,
        "embedded model: weight of the cell-level objective (the first position predicts its cell's genes; "
        "0 = masked genes only)",
        ge=0,
    )
    cell_objective: str = key(
        "genes",
        "gfattn's small model: the cell-level objective, `genes` (the first position predicts its cell's genes) "
        "or `components` (it regresses the cell's scores on the corpus's top principal components)",
        choices=("genes", "components"),
    )
    cell_components: int = key(
        32, "gfattn's small model: principal components of the `components` cell objective", ge=1
    )
    lineage_cells: int = key(
        0,
        "embedded model: cells of a dosed sci-Plex-like cell line (its own draw, doses dropped) added to the "
        "synthetic corpus, as an atlas holds stressed cell lines",
        ge=0,
    )
    seed: int = key(
        -1,
        "embedded model: seed of its corpus and pretraining (-1: the run's seed); a fixed seed keeps one model "
        "across runs of different seeds, as a checkpoint would",
        ge=-1,
        le=SEED_MAX,
    )
    cls_token: bool = key(
        False,
        "gfattn's small model: wrap every cell in <cls> ... <eos> as Geneformer V2 does, so that the first "
        "position, which the frozen mode reads, is a cell token",
    )


@dataclass
class Train:
    tasks: list[str] = key([], "tasks to fine-tune ([] = every task in [[tasks]])")
    modes: list[str] = key(
        ["frozen", "unfrozen", "last-1"],
        "training modes: frozen, unfrozen, last-K, freeze-N",
        allowed="a list of modes: frozen, unfrozen, last-K or freeze-N",
        min_items=1,
        each=lambda mode: parse_mode(mode),
    )
    epochs: int = key(5, "fine-tuning epochs (the thesis used 5); the least, when min_steps asks for more", ge=1)
    min_steps: int = key(
        300,
        "optimisation steps a small training set still gets: epochs = clamp(ceil(min_steps x batch_size / "
        "training cells), epochs, max_epochs) (0 = exactly `epochs`; epochs set in your config file or by "
        "--epochs are kept exactly unless you set min_steps too)",
        ge=0,
    )
    max_epochs: int = key(40, "the most epochs min_steps may ask for", ge=1)
    patience: int = key(
        5,
        "early stopping: stop once validation macro-F1 has not improved for this many epochs; the best "
        "epoch's weights are kept (0 = never stop early)",
        ge=0,
    )
    batch_size: int = key(12, "cells per optimisation step (Geneformer: 12)", ge=1)
    grad_accum: int = key(1, "gradient accumulation steps", ge=1)
    lr: float = key(5e-5, "peak learning rate (Geneformer's 6-layer default)", gt=0)
    head_lr: float = key(0.0, "learning rate of the frozen mode's head (0 = same as lr)", ge=0)
    weight_decay: float = key(0.001, "AdamW weight decay", ge=0)
    warmup_ratio: float = key(0.1, "fraction of steps of linear warm-up", ge=0, lt=1)
    class_weights: bool = key(True, "weight the loss by inverse class frequency, n / (classes x n_class): balanced")
    amp: str = key("auto", "autocast on CUDA: auto, bf16, fp16 or off", choices=("auto", "bf16", "fp16", "off"))


@dataclass
class Analysis:
    gate: str = key(
        "skip",
        "a model that did not learn (one class for >= 90% of test cells, or balanced accuracy not above chance): "
        "`skip` its deletion and randomisation cascade, or `mark` (compute them, marked as no findings)",
        choices=("skip", "mark"),
    )
    pairs: list[list[str]] = key(
        [["frozen", "unfrozen"], ["frozen", "last-1"]], "model pairs whose attention is compared"
    )
    tasks: list[str] = key(["lowhigh"], "tasks whose fine-tuned models are analysed ([] = every fine-tuned task)")
    batch_size: int = key(8, "cells per attention batch", ge=1)
    max_cells: int = key(0, "analyse at most this many test cells (0 = all)", ge=0)
    n_boot: int = key(200, "bootstrap resamples for confidence intervals", ge=1)
    reference_set: str = key("", "reference gene set file (TSV with ensembl_id, or one ID/symbol per line)")
    top_k: list[int] = key([10, 20, 50, 100], "k for the DE vs attention overlap", ge=1)
    de: bool = key(True, "scanpy's Wilcoxon DE for each analysed task (see [de]), compared with attention")
    attribution: list[str] = key(
        ["hao", "ig", "rollout"],
        "attribution scores per analysed model: `hao` (self-attention attribution), `ig` (integrated gradients),"
        " `rollout` (attention rollout); [] = none",
        choices=("hao", "ig", "rollout"),
    )
    hao_steps: int = key(20, "Riemann steps of Hao et al.'s self-attention attribution", ge=1)
    ig_steps: int = key(50, "steps of integrated gradients (Gauss-Legendre, Captum)", ge=1)
    ig_max_steps: int = key(
        200,
        "integrated gradients' steps double from ig_steps up to this while the 95th percentile of the"
        " per-cell completeness gap is above ig_gap_p95 (a warning if it stays above)",
        ge=1,
    )
    ig_gap_p95: float = key(
        0.05,
        "largest acceptable 95th percentile over cells of |sum of attributions - (F(x) - F(baseline))|"
        " / |F(x) - F(baseline)|",
        gt=0,
    )
    null_bins: list[int] = key(
        [5, 5],
        "matched null of the DE and reference-set overlaps: quantile bins of detection frequency x mean rank",
        ge=1,
        min_items=2,
        max_items=2,
        allowed="two integers >= 1",
    )
    null_permutations: int = key(0, "within-bin permutations of the matched null (0 = its exact distribution)", ge=0)
    deletion: bool = key(
        True, "in-silico deletion of each score's top genes (and matched random sets) from the test cells"
    )
    deletion_k: list[int] = key([1, 5, 10, 20, 50], "sizes of the deleted top-k sets", ge=1)
    deletion_random_sets: int = key(20, "random gene sets per top-k set, matched on detection frequency and rank", ge=0)
    deletion_max_random_sets: int = key(
        999,
        "cap of the random sets per top-k set: while no random set hurts as much (p at its floor"
        " 1/(R+1)), R doubles up to this (999: p can reach 0.001; = deletion_random_sets: fixed R)",
        ge=0,
    )
    deletion_match_pool: int = key(
        10,
        "each random gene is drawn from the N genes nearest to a top gene in cells expressing, mean rank"
        " and how often it sits at the position the classifier reads",
        ge=1,
    )
    deletion_top_genes: int = key(50, "single-gene deletion of each score's top N genes (0 = none)", ge=0)
    sanity: bool = key(True, "cascading randomisation of each analysed model (Adebayo et al. 2018)")
    sanity_attribution: bool = key(
        True, "the cascade recomputes the attribution scores too (false: attention scores only)"
    )
    label_permutation: bool = key(
        False,
        "also fine-tune each analysed mode on permuted labels and compare its key-gene scores (with `sanity`)",
    )


@dataclass
class De:
    groupby: str = key("", "task whose classes DE compares (empty: each analysed task)")
    groups: list[str | int | float] = key(
        [], "classes tested ([] = binary tasks: the second class; more classes: each one)"
    )
    reference: str = key("", "`rest` or a class (empty: binary tasks: the first class; more classes: rest)")


@dataclass
class Compute:
    device: str = key("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    nproc: int = key(1, "processes for data-parallel fine-tuning and the sharded analysis (torchrun)", ge=1)
    analysis_nproc: int = key(0, "processes that analyse each model (torchrun; 0 = compute.nproc)", ge=0)
    threads: int = key(0, "torch CPU threads (0 = torch's default)", ge=0)


# section name -> its dataclass: the whole schema. A new key is one line in its section's class.
SECTIONS: dict[str, type] = {
    "run": Run,
    "data": Data,
    "split": Split,
    "model": Model,
    "pretrain": Pretrain,
    "train": Train,
    "analysis": Analysis,
    "de": De,
    "compute": Compute,
}


@dataclass(frozen=True)
class Key:
    """A key of the schema as the checks use it: its section, name, type, default, documentation, rules."""

    section: str
    name: str
    type: Any
    default: Any
    doc: str
    rules: dict


def _keys(cls: type, section: str) -> dict[str, Key]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        rules = {k: v for k, v in f.metadata.items() if k != "doc"}
        out[f.name] = Key(section, f.name, hints[f.name], default, f.metadata["doc"], rules)
    return out


KEYS: dict[str, dict[str, Key]] = {section: _keys(cls, section) for section, cls in SECTIONS.items()}

# section -> key -> (default, documentation): the schema as a plain table (read-only view of KEYS)
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    section: {name: (k.default, k.doc) for name, k in keys.items()} for section, keys in KEYS.items()
}


# The thesis design (sections 2.2-2.3), the tasks of every sci-Plex preset: [[tasks]] in a config file,
# or --label-column, replace them (and then data.filter defaults to {} unless set too).
SCIPLEX_TASKS: list[dict[str, Any]] = [
    {"name": "dose", "column": "dose_value", "unit": "uM", "classes": [0.0, 1.25, 2.5, 12.5, 25.0]},
    {
        "name": "lowhigh",
        "column": "dose_value",
        "unit": "uM",
        "groups": {"low": [0.0, 1.25, 2.5], "high": [12.5, 25.0]},
    },
]
TASK_KEYS: dict[str, str] = {
    "name": "the task's name (in run names, tables and figures)",
    "column": "obs column holding the labels",
    "classes": "values kept as classes, in this order (default: every value)",
    "groups": 'new class -> list of values, e.g. {KO = ["ZAP70_1", "LCK_1"], ctrl = ["control"]}',
    "unit": 'unit of a numeric column, shown in class names ("12.5 uM")',
    "scale": "multiply a numeric column first (scPerturb copies of sci-Plex 2: 2.5)",
}

# the data run's cells table has one column per task named after it, beside these (and the store's own)
MAX_TASK_NAME = 200  # characters; a task's name is a column of the store and part of folder names
CELL_COLUMNS = ("cell_id", "length", "split", "umap1", "umap2", "run_id", "rowid", "oid", "_rowid_")

PRESETS: dict[str, str] = {
    "default": "embedded demo: synthetic data (~1,500 cells), a small pretrained model, top 96 ranks, both tasks",
    "quick": "a tiny end-to-end run (~700 cells or at most 1,000 of yours, 96 ranks, one task) for smoke tests",
    "thesis-synthetic": "the thesis's scale on synthetic data (~4,600 cells, ~680 genes per cell)",
    "sciplex2-nutlin": "the thesis design on real sci-Plex 2 data and a real Geneformer checkpoint",
}


def defaults() -> dict[str, Any]:
    out: dict[str, Any] = {
        section: {name: copy.deepcopy(k.default) for name, k in keys.items()} for section, keys in KEYS.items()
    }
    out["tasks"] = copy.deepcopy(SCIPLEX_TASKS)
    return out


def check_tasks(tasks: Any, source: str) -> list[dict]:
    """A `[[tasks]]` array: tables with a name and an obs column, known keys only, unique names."""
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise InputError(f"{source}: tasks must be an array of tables ([[tasks]] with name and column)")
    seen = set()
    out = []
    for i, t in enumerate(tasks):
        for key_ in t:
            if key_ not in TASK_KEYS:
                raise InputError(f"{source}: unknown key tasks[{i}].{key_}{_nearest(key_, TASK_KEYS)}")
        for key_ in ("name", "column"):
            if not isinstance(t.get(key_), str) or not t[key_].strip():
                raise InputError(f"{source}: tasks[{i}] needs a `{key_}` (text)")
        if t["name"] in seen:
            raise InputError(f"{source}: two tasks are named {t['name']!r}")
        if len(t["name"]) > MAX_TASK_NAME:
            raise InputError(
                f"{source}: task name {_show(t['name'])} has {len(t['name'])} characters; allowed: at most "
                f"{MAX_TASK_NAME} (name the task in a [[tasks]] table when its column's name is longer)"
            )
        if t["name"].strip().lower() in CELL_COLUMNS:
            raise InputError(
                f"{source}: task name {t['name']!r} is a column of gfattn's own cells table "
                f"({', '.join(CELL_COLUMNS)}); give the task another name ([[tasks]] name = ...)"
            )
        seen.add(t["name"])
        if "classes" in t and "groups" in t:
            raise InputError(f"{source}: task {t['name']!r} has both classes and groups; give one")
        if "classes" in t and (
            not isinstance(t["classes"], list) or len(t["classes"]) < 2 or not all(_is_label(c) for c in t["classes"])
        ):
            raise InputError(
                f"{source}: task {t['name']!r}: classes = {_show(t['classes'])}; allowed: a list of at least two "
                "values (text or numbers)"
            )
        if "groups" in t:
            g = t["groups"]
            if (
                not isinstance(g, dict)
                or len(g) < 2
                or not all(isinstance(v, list) and v and all(_is_label(x) for x in v) for v in g.values())
            ):
                raise InputError(
                    f"{source}: task {t['name']!r}: groups must map at least two classes to lists of values"
                )
        if "unit" in t and not isinstance(t["unit"], str):
            raise InputError(f"{source}: task {t['name']!r}: unit = {_show(t['unit'])}; allowed: text")
        if "scale" in t and not (_is_number(t["scale"]) and math.isfinite(t["scale"]) and t["scale"] > 0):
            raise InputError(f"{source}: task {t['name']!r}: scale = {_show(t['scale'])}; allowed: a number > 0")
        out.append(dict(t))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_label(v: Any) -> bool:
    return isinstance(v, str) or (_is_number(v) and math.isfinite(v))


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else f"; valid: {', '.join(sorted(options))}"


def _show(value: Any) -> str:
    """A value as the user wrote it (TOML), shortened to fit one line."""
    try:
        text = toml_value(value)
    except Exception:  # pragma: no cover - values parsed from TOML or flags always render
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _bounds(rules: dict) -> str:
    lo = [f">= {rules['ge']}"] if "ge" in rules else [f"> {rules['gt']}"] if "gt" in rules else []
    hi = [f"<= {rules['le']}"] if "le" in rules else [f"< {rules['lt']}"] if "lt" in rules else []
    if "ge" in rules and "le" in rules:
        return f"from {rules['ge']} to {rules['le']}"
    return " and ".join(lo + hi)


def _allowed(tp: Any, rules: dict) -> str:
    """What a key of type `tp` with `rules` accepts, in words (`allowed`: a key's own words)."""
    if "allowed" in rules:
        return rules["allowed"]
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_plural(_allowed(typing.get_args(tp)[0], rules))}"
    if origin is dict:
        return f"a table of {_plural(_allowed(typing.get_args(tp)[1], rules))}"
    if origin in (typing.Union, types.UnionType):
        if set(typing.get_args(tp)) == {str, int, float}:
            return "text or a number"
        return " or ".join(_allowed(a, {}) for a in typing.get_args(tp))
    if "choices" in rules:
        return "one of " + ", ".join(map(str, rules["choices"]))
    bounds = _bounds(rules)
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp))) + (f" {bounds}" if bounds else "")


def _plural(words: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a list", "lists"), ("a table", "tables")):
        words = words.replace(one, many)
    return words.replace("one of", "values from")


def _fits(tp: Any, rules: dict, value: Any) -> tuple[bool, Any]:
    """(whether `value` is of type `tp` and within `rules`, the value converted: ints to floats for floats)."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, v = _fits(typing.get_args(tp)[0], rules, v)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        out_d = {}
        for k, v in value.items():
            ok, v = _fits(typing.get_args(tp)[1], rules, v)
            if not (ok and isinstance(k, str)):
                return False, value
            out_d[k] = v
        return True, out_d
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            ok, v = _fits(a, {}, value)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return False, value
    elif tp is float:
        if not _is_number(value) or not math.isfinite(value):
            return False, value
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            return False, value
        return ("choices" not in rules or value in rules["choices"]), value
    else:  # pragma: no cover - the schema uses only the types above
        return isinstance(value, tp), value
    ok = (
        ("ge" not in rules or value >= rules["ge"])
        and ("gt" not in rules or value > rules["gt"])
        and ("le" not in rules or value <= rules["le"])
        and ("lt" not in rules or value < rules["lt"])
    )
    return ok, value


def check_value(section: str, name: str, value: Any, source: str = "config") -> Any:
    """`value` for `section.name` checked against the schema (type, range, choices), converted (an integer
    for a number becomes a float); an `InputError` naming the key, the value and what is allowed if not."""
    k = KEYS[section][name]
    ok, converted = _fits(k.type, k.rules, value)
    if ok and isinstance(converted, list):
        ok = k.rules.get("min_items", 0) <= len(converted) <= k.rules.get("max_items", len(converted))
    if not ok:
        raise InputError(f"{source}: {section}.{name} = {_show(value)}; allowed: {_allowed(k.type, k.rules)}")
    for item in converted if "each" in k.rules else ():
        try:
            k.rules["each"](item)
        except InputError as exc:
            raise InputError(f"{source}: {section}.{name}: {exc}") from None
    return converted


def merge(base: dict, overrides: dict, source: str) -> dict:
    """Merge `overrides` (a parsed TOML document) into `base`, refusing unknown keys and wrong values."""
    out = copy.deepcopy(base)
    for section, values in overrides.items():
        if section == "tasks":
            out["tasks"] = check_tasks(values, source)
            continue
        if section not in KEYS:
            raise InputError(f"{source}: unknown section [{section}]{_nearest(section, KEYS)}")
        if not isinstance(values, dict):
            raise InputError(f"{source}: [{section}] must be a table of keys")
        for name, value in values.items():
            if name not in KEYS[section]:
                everything = [f"{s}.{k}" for s in KEYS for k in KEYS[s]]
                hint = _nearest(f"{section}.{name}", everything)
                raise InputError(f"{source}: unknown key {section}.{name}{hint}")
            out[section][name] = check_value(section, name, value, source)
    return out


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist; pass an existing TOML file to --config")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise InputError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config file {path} is not valid TOML: {exc}") from None


def preset_overrides(name: str) -> dict:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}{_nearest(name, PRESETS)}")
    return load_toml(PRESET_DIR / f"{name}.toml")


def resolve(preset: str = "default", config_file: str | Path | None = None, flags: dict | None = None) -> dict:
    """Defaults -> preset -> config file -> flags (a dict of "section.key" -> value; None values skipped)."""
    cfg = merge(defaults(), preset_overrides(preset), f"preset {preset}")
    user_sets: set[str] = set()  # what the user's file and flags set: own tasks drop the sci-Plex filter
    if config_file:
        doc = load_toml(config_file)
        cfg = merge(cfg, doc, str(config_file))
        user_sets |= {"tasks"} if "tasks" in doc else set()
        user_sets |= {"data.filter"} if "filter" in doc.get("data", {}) else set()
        user_sets |= {f"train.{k}" for k in ("epochs", "min_steps") if k in doc.get("train", {})}
    nested: dict[str, Any] = {}
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        if dotted == "tasks":
            nested["tasks"] = value
            user_sets.add("tasks")
            continue
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
        user_sets.add(dotted)
    cfg = merge(cfg, nested, "command line")
    if cfg["model"]["path"] == "embedded":  # the explicit name of the default: gfattn's own small model
        cfg["model"]["path"] = ""
    if "tasks" in user_sets:
        if "data.filter" not in user_sets:
            cfg["data"]["filter"] = {}
        names = [t["name"] for t in cfg["tasks"]]
        for section in ("train", "analysis"):
            if f"{section}.tasks" not in user_sets and not set(cfg[section]["tasks"]) <= set(names):
                cfg[section]["tasks"] = []
    if "train.epochs" in user_sets and "train.min_steps" not in user_sets:
        cfg["train"]["min_steps"] = 0  # the epochs the user asked for, exactly
    cfg["run"]["preset"] = preset
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Every value against the schema (type, range, choices), then the checks that relate keys to each
    other; none needs the data."""
    for section, keys in KEYS.items():
        for name in keys:
            cfg[section][name] = check_value(section, name, cfg[section][name])
    split = cfg["split"]
    if split["validation"] + split["test"] >= 0.9:
        raise InputError(
            f"split.validation = {split['validation']} and split.test = {split['test']} leave "
            f"{1 - split['validation'] - split['test']:.0%} for training; allowed: at least 10%"
        )
    names = [t["name"] for t in check_tasks(cfg["tasks"], "config")]
    if not names:
        raise InputError("no task: add a [[tasks]] table (name, column) or pass --label-column")
    for task in cfg["train"]["tasks"]:
        if task not in names:
            raise InputError(f"train.tasks: {task!r} is not a task; tasks: {', '.join(names)}")
    trained = trained_tasks(cfg)
    for task in cfg["analysis"]["tasks"]:
        if task not in trained:
            raise InputError(f"analysis.tasks: {task!r} is not fine-tuned; fine-tuned tasks: {', '.join(trained)}")
    pre = cfg["pretrain"]
    if pre["hidden"] % pre["heads"]:
        raise InputError(
            f"pretrain.hidden = {pre['hidden']} with pretrain.heads = {pre['heads']}; allowed: a hidden size that "
            "the number of heads divides"
        )
    if cfg["de"]["groupby"] and cfg["de"]["groupby"] not in names:
        raise InputError(f"de.groupby: {cfg['de']['groupby']!r} is not a task; tasks: {', '.join(names)}")
    modes = set(cfg["train"]["modes"])
    for pair in cfg["analysis"]["pairs"]:
        if len(pair) != 2:
            raise InputError(f"analysis.pairs: each pair is two modes, got {_show(pair)}")
        for mode in pair:
            if mode not in modes:
                raise InputError(f"analysis.pairs: mode {mode!r} is not among train.modes {sorted(modes)}")


def trained_tasks(cfg: dict) -> list[str]:
    """Names of the tasks fine-tuned (`train.tasks`, default every task)."""
    return list(cfg["train"]["tasks"]) or [t["name"] for t in cfg["tasks"]]


def analysed_tasks(cfg: dict) -> list[str]:
    """Names of the tasks whose models are analysed (`analysis.tasks`, default every fine-tuned task)."""
    return list(cfg["analysis"]["tasks"]) or trained_tasks(cfg)


def finetune_stages(cfg: dict) -> list[tuple[str, str, bool]]:
    """(task, mode, permuted labels) of every model the run fine-tunes, in order: each mode of each trained
    task, then (`analysis.label_permutation`) each mode the pairs compare, on permuted labels."""
    stages = [(task, mode, False) for task in trained_tasks(cfg) for mode in cfg["train"]["modes"]]
    if cfg["analysis"]["label_permutation"]:
        pair_modes = dict.fromkeys(m for pair in cfg["analysis"]["pairs"] for m in pair)
        stages += [(task, mode, True) for task in analysed_tasks(cfg) for mode in pair_modes]
    return stages


MODES_HELP = "frozen, unfrozen, last-K (e.g. last-1) or freeze-N (e.g. freeze-2)"


def parse_mode(mode: str, num_layers: int | None = None) -> tuple[str, int]:
    """`frozen`, `unfrozen`, `last-K` or `freeze-N` -> (kind, K); K checked against `num_layers` when given.

    The one parser of training modes: the configuration checks `train.modes` with it before a model is
    loaded, and `pipeline.models.load.apply_training_mode` checks a mode against the model's layers."""
    if not isinstance(mode, str):
        raise InputError(f"training mode {_show(mode)}; use {MODES_HELP}")
    kind, k = None, 0
    if mode in ("frozen", "unfrozen"):
        kind = mode
    else:
        for prefix in ("last-", "freeze-"):
            rest = mode[len(prefix) :] if mode.startswith(prefix) else ""
            if rest.isdigit() and int(rest) >= 1:
                kind, k = prefix[:-1], int(rest)
    if kind is None:
        raise InputError(f"unknown training mode {mode!r}; use {MODES_HELP}")
    if num_layers is not None and k > int(num_layers):
        raise InputError(f"training mode {mode!r} names {k} layers but the model has {num_layers} encoder layers")
    return kind, k


def toml_value(value: Any) -> str:
    """One TOML value: booleans, numbers, strings, lists and inline tables of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _toml_char(c: str) -> str:
    if c in '\\"':
        return "\\" + c
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f" else c


def toml_key(k: str) -> str:
    return k if k and k.replace("_", "").replace("-", "").isalnum() and k.isascii() else toml_value(k)


def _ordered(doc: dict) -> list[tuple[str, dict]]:
    """The sections of a config document with their keys in the schema's order (unknown ones last)."""
    out = []
    for section in [*(s for s in KEYS if s in doc), *(s for s in doc if s not in KEYS and s != "tasks")]:
        keys = doc[section]
        order = [k for k in KEYS.get(section, {}) if k in keys] + [k for k in keys if k not in KEYS.get(section, {})]
        out.append((section, {k: keys[k] for k in order}))
    return out


def dumps_toml(doc: dict) -> str:
    """A config document (sections of keys, and `tasks`) as TOML that `load_toml` reads back unchanged,
    sections and keys in the schema's order."""
    lines = []
    for section, keys in _ordered(doc):
        lines.append(f"[{toml_key(section)}]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    for t in doc.get("tasks", []):
        lines.append("[[tasks]]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in t.items())
        lines.append("")
    return "\n".join(lines)


def to_toml(cfg: dict) -> str:
    """A commented TOML rendering of a configuration (`gfattn pipeline --print-config`): every key of the
    schema with its documentation and what it accepts."""
    lines = []
    for section, keys in KEYS.items():
        lines.append(f"[{section}]")
        for name, k in keys.items():
            lines.append(f"# {k.doc} [{_allowed(k.type, k.rules)}]")
            lines.append(f"{name} = {toml_value(cfg[section][name])}")
        lines.append("")
    lines.append(
        "# one [[tasks]] table per classification task; keys: " + "; ".join(f"{k}: {v}" for k, v in TASK_KEYS.items())
    )
    for t in cfg["tasks"]:
        lines.append("[[tasks]]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in t.items())
        lines.append("")
    return "\n".join(lines)


def analysed_models(cfg: dict) -> dict[str, list[str]]:
    """Each model of the analysis pairs (in pair order) with the pairs that compare it: "{a} vs {b}"."""
    out: dict[str, list[str]] = {}
    for mode_a, mode_b in cfg["analysis"]["pairs"]:
        for mode in dict.fromkeys((mode_a, mode_b)):
            out.setdefault(mode, []).append(f"{mode_a} vs {mode_b}")
    return out


def analysis_processes(cfg: dict) -> int:
    """How many processes analyse each model (`compute.analysis_nproc`, or `compute.nproc` when it is 0)."""
    return int(cfg["compute"]["analysis_nproc"] or cfg["compute"]["nproc"])


def model_analysis_on(cfg: dict) -> bool:
    """Whether the run analyses each model on its own: attribution, deletion or the randomisation cascade."""
    a_cfg = cfg["analysis"]
    return bool(a_cfg["attribution"] or a_cfg["deletion"] or a_cfg["sanity"])
