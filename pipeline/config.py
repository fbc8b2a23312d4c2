"""The experiment configuration: every choice of a `gfattn pipeline` run, with documented defaults.

A run's configuration is resolved in layers: the built-in defaults below, then a preset
(`pipeline/presets/<name>.toml`), then the user's `--config FILE.toml`, then command-line flags. Unknown
keys are errors that name the nearest valid key. The resolved configuration is stored with the run.
"""

from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).with_name("presets")

# section -> key -> (default, documentation)
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "run": {
        "name": ("", "run name shown in `gfattn runs` and the TUI (default: preset and time)"),
        "seed": (0, "seed for selection, splits, training and bootstrap"),
    },
    "data": {
        "path": ("", ".h5ad with raw counts; empty = the synthetic sci-Plex-like data set (`gfattn synth`)"),
        "tokenized": ("", "a dataset tokenized by Geneformer (or `gfattn tokenize`) instead of counts: no UMAP, no DE"),
        "synth_scale": (0.33, "synthetic data: cells relative to sci-Plex 2's Nutlin-3a arm"),
        "synth_preset": ("thesis", "synthetic data: `thesis` (~680 genes/cell) or `raw` (~2,300)"),
        "synth_length_effect": (1.0, "synthetic data: strength of the dose -> detected genes confound (0 = off)"),
        "filter": (
            {"perturbation": ["Nutlin*", "control", "vehicle", "Vehicle", "DMSO"]},
            "cells kept: obs column -> accepted values (`*` wildcards; several columns combine with AND; {} = all)",
        ),
        "gene_id_column": ("", "var column with Ensembl IDs or symbols (empty: var index, auto-detected)"),
        "n_counts_column": (
            "",
            "obs column with total counts (empty: n_counts/ncounts/n.umi/total_counts, else computed)",
        ),
        "layer": ("", "layer with raw counts (empty: X)"),
        "max_cells": (0, "subsample to at most this many cells, stratified by the tasks' classes (0 = all)"),
        "fixed_length": (
            0,
            "every cell keeps exactly this many genes, cells with fewer are dropped (0 = off; thesis 5.1)",
        ),
        "fixed_length_mode": (
            "top",
            "fixed length: `top` (its N top-ranked genes) or `subsample` (N drawn, rank order kept)",
        ),
        "umap": (True, "compute a UMAP of the selected cells (scanpy) for the Data view"),
    },
    "split": {
        "validation": (0.15, "fraction of cells for validation (model selection)"),
        "test": (0.15, "fraction of cells for the independent test split (metrics and attention)"),
    },
    "model": {
        "path": (
            "",
            "Geneformer checkpoint directory; empty or `embedded`: gfattn's small model, the one it ships (the default "
            "preset's recipe) or one pretrained on the synthetic corpus (no --data) or on your data's training cells, "
            "and cached",
        ),
        "geneformer_dir": ("", "Geneformer dictionaries (checkout dir) when the model dir does not carry them"),
        "version": ("auto", "`V1`, `V2` or `auto` (from the model's vocabulary)"),
        "max_len": (0, "truncate encodings to the top N ranks (0 = the model's input size)"),
    },
    "pretrain": {
        "corpus_cells": (3000, "embedded model: cells of the synthetic corpus"),
        "layers": (2, "embedded model: encoder layers"),
        "hidden": (128, "embedded model: hidden size"),
        "heads": (4, "embedded model: attention heads"),
        "intermediate": (256, "embedded model: feed-forward size"),
        "max_len": (256, "embedded model: input size (top ranks kept)"),
        "epochs": (3, "embedded model: pretraining epochs"),
        "batch_size": (32, "embedded model: pretraining batch size"),
        "lr": (1e-3, "embedded model: peak learning rate"),
        "time_budget_s": (75.0, "embedded model: stop pretraining after this many seconds (0 = no limit)"),
        "corpus": (
            "healthy",
            "embedded model: the synthetic corpus, `healthy` or `atlas` (adds a graded p53 response that "
            "arrests the cycle and wider library sizes)",
        ),
        "cell_loss_weight": (
            0.0,
            "embedded model: weight of the cell-level objective (the first position predicts its cell's genes; "
            "0 = masked genes only)",
        ),
        "cell_objective": (
            "genes",
            "gfattn's small model: the cell-level objective, `genes` (the first position predicts its cell's genes) "
            "or `components` (it regresses the cell's scores on the corpus's top principal components)",
        ),
        "cell_components": (32, "gfattn's small model: principal components of the `components` cell objective"),
        "lineage_cells": (
            0,
            "embedded model: cells of a dosed sci-Plex-like cell line (its own draw, doses dropped) added to the "
            "synthetic corpus, as an atlas holds stressed cell lines",
        ),
        "seed": (
            -1,
            "embedded model: seed of its corpus and pretraining (-1: the run's seed); a fixed seed keeps one model "
            "across runs of different seeds, as a checkpoint would",
        ),
        "cls_token": (
            False,
            "gfattn's small model: wrap every cell in <cls> ... <eos> as Geneformer V2 does, so that the first "
            "position, which the frozen mode reads, is a cell token",
        ),
    },
    "train": {
        "tasks": ([], "tasks to fine-tune ([] = every task in [[tasks]])"),
        "modes": (["frozen", "unfrozen", "last-1"], "training modes: frozen, unfrozen, last-K, freeze-N"),
        "epochs": (5, "fine-tuning epochs (the thesis used 5)"),
        "batch_size": (16, "cells per optimisation step"),
        "grad_accum": (1, "gradient accumulation steps"),
        "lr": (5e-5, "peak learning rate (Geneformer's 6-layer default)"),
        "head_lr": (0.0, "learning rate of the frozen mode's head (0 = same as lr)"),
        "weight_decay": (0.001, "AdamW weight decay"),
        "warmup_ratio": (0.1, "fraction of steps of linear warm-up"),
        "class_weights": (False, "weight the loss by inverse class frequency"),
        "amp": ("auto", "autocast on CUDA: auto, bf16, fp16 or off"),
    },
    "analysis": {
        "pairs": ([["frozen", "unfrozen"], ["frozen", "last-1"]], "model pairs whose attention is compared"),
        "tasks": (["lowhigh"], "tasks whose fine-tuned models are analysed ([] = every fine-tuned task)"),
        "batch_size": (8, "cells per attention batch"),
        "max_cells": (0, "analyse at most this many test cells (0 = all)"),
        "n_boot": (200, "bootstrap resamples for confidence intervals"),
        "reference_set": ("", "reference gene set file (TSV with ensembl_id, or one ID/symbol per line)"),
        "top_k": ([10, 20, 50, 100], "k for the DE vs attention overlap"),
        "de": (True, "scanpy's Wilcoxon DE for each analysed task (see [de]), compared with attention"),
        "attribution": (
            ["hao", "ig", "rollout"],
            "attribution scores per analysed model: `hao` (self-attention attribution), `ig` (integrated gradients),"
            " `rollout` (attention rollout); [] = none",
        ),
        "hao_steps": (20, "Riemann steps of Hao et al.'s self-attention attribution"),
        "ig_steps": (50, "steps of integrated gradients (Gauss-Legendre, Captum)"),
        "ig_max_steps": (
            200,
            "integrated gradients' steps double from ig_steps up to this while the 95th percentile of the"
            " per-cell completeness gap is above ig_gap_p95 (a warning if it stays above)",
        ),
        "ig_gap_p95": (
            0.05,
            "largest acceptable 95th percentile over cells of |sum of attributions - (F(x) - F(baseline))|"
            " / |F(x) - F(baseline)|",
        ),
        "null_bins": (
            [5, 5],
            "matched null of the DE and reference-set overlaps: quantile bins of detection frequency x mean rank",
        ),
        "null_permutations": (0, "within-bin permutations of the matched null (0 = its exact distribution)"),
        "deletion": (
            True,
            "in-silico deletion of each score's top genes (and matched random sets) from the test cells",
        ),
        "deletion_k": ([1, 5, 10, 20, 50], "sizes of the deleted top-k sets"),
        "deletion_random_sets": (20, "random gene sets per top-k set, matched on detection frequency and rank"),
        "deletion_top_genes": (50, "single-gene deletion of each score's top N genes (0 = none)"),
        "deletion_max_random_sets": (
            999,
            "cap of the random sets per top-k set: while no random set hurts as much (p at its floor"
            " 1/(R+1)), R doubles up to this (999: p can reach 0.001; = deletion_random_sets: fixed R)",
        ),
        "deletion_match_pool": (
            10,
            "each random gene is drawn from the N genes nearest to a top gene in cells expressing, mean rank"
            " and how often it sits at the position the classifier reads",
        ),
        "sanity": (True, "cascading randomisation of each analysed model (Adebayo et al. 2018)"),
        "sanity_attribution": (
            True,
            "the cascade recomputes the attribution scores too (false: attention scores only)",
        ),
        "label_permutation": (
            False,
            "also fine-tune each analysed mode on permuted labels and compare its key-gene scores (with `sanity`)",
        ),
    },
    "de": {
        "groupby": ("", "task whose classes DE compares (empty: each analysed task)"),
        "groups": ([], "classes tested ([] = binary tasks: the second class; more classes: each one)"),
        "reference": ("", "`rest` or a class (empty: binary tasks: the first class; more classes: rest)"),
    },
    "compute": {
        "device": ("auto", "auto, cpu or cuda"),
        "nproc": (1, "processes for data-parallel fine-tuning (torchrun)"),
        "threads": (0, "torch CPU threads (0 = torch's default)"),
    },
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

PRESETS: dict[str, str] = {
    "default": "embedded demo: synthetic data (~1,500 cells), a small pretrained model, top 96 ranks, both tasks",
    "quick": "a tiny end-to-end run (~700 cells or at most 1,000 of yours, 96 ranks, one task) for smoke tests",
    "thesis-synthetic": "the thesis's scale on synthetic data (~4,600 cells, ~680 genes per cell)",
    "sciplex2-nutlin": "the thesis design on real sci-Plex 2 data and a real Geneformer checkpoint",
}


def defaults() -> dict[str, Any]:
    out: dict[str, Any] = {
        section: {k: copy.deepcopy(v[0]) for k, v in keys.items()} for section, keys in SCHEMA.items()
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
        for key in t:
            if key not in TASK_KEYS:
                raise InputError(f"{source}: unknown key tasks[{i}].{key}{_nearest(key, TASK_KEYS)}")
        for key in ("name", "column"):
            if not isinstance(t.get(key), str) or not t[key]:
                raise InputError(f"{source}: tasks[{i}] needs a `{key}` (text)")
        if t["name"] in seen:
            raise InputError(f"{source}: two tasks are named {t['name']!r}")
        seen.add(t["name"])
        if "classes" in t and "groups" in t:
            raise InputError(f"{source}: task {t['name']!r} has both classes and groups; give one")
        if "classes" in t and (not isinstance(t["classes"], list) or len(t["classes"]) < 2):
            raise InputError(f"{source}: task {t['name']!r}: classes must list at least two values")
        if "groups" in t:
            g = t["groups"]
            if not isinstance(g, dict) or len(g) < 2 or not all(isinstance(v, list) and v for v in g.values()):
                raise InputError(
                    f"{source}: task {t['name']!r}: groups must map at least two classes to lists of values"
                )
        out.append(dict(t))
    return out


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else f"; valid: {', '.join(sorted(options))}"


def _check_type(where: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, list) and isinstance(value, list):
        return value
    if isinstance(default, dict) and isinstance(value, dict):
        return value
    raise InputError(f"{where} must be {type(default).__name__}, got {value!r}")


def merge(base: dict, overrides: dict, source: str) -> dict:
    """Merge `overrides` (a parsed TOML document) into `base`, refusing unknown keys and wrong types."""
    out = copy.deepcopy(base)
    for section, values in overrides.items():
        if section == "tasks":
            out["tasks"] = check_tasks(values, source)
            continue
        if section not in SCHEMA:
            raise InputError(f"{source}: unknown section [{section}]{_nearest(section, SCHEMA)}")
        if not isinstance(values, dict):
            raise InputError(f"{source}: [{section}] must be a table of keys")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                everything = [f"{s}.{k}" for s in SCHEMA for k in SCHEMA[s]]
                hint = _nearest(f"{section}.{key}", everything)
                raise InputError(f"{source}: unknown key {section}.{key}{hint}")
            out[section][key] = _check_type(f"{source}: {section}.{key}", SCHEMA[section][key][0], value)
    return out


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist; pass an existing TOML file to --config")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
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
    cfg["run"]["preset"] = preset
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Checks that do not need the data: values in range and consistent with each other."""
    split = cfg["split"]
    if not (0 < split["validation"] < 1 and 0 < split["test"] < 1 and split["validation"] + split["test"] < 0.9):
        raise InputError("split.validation and split.test must be in (0, 1) and leave at least 10% for training")
    for mode in cfg["train"]["modes"]:
        parse_mode(mode)
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
    for method in cfg["analysis"]["attribution"]:
        if method not in ("hao", "ig", "rollout"):
            raise InputError(f"analysis.attribution: unknown method {method!r}; use hao, ig and/or rollout")
    a = cfg["analysis"]
    if not (len(a["null_bins"]) == 2 and all(isinstance(b, int) and b >= 1 for b in a["null_bins"])):
        raise InputError(f"analysis.null_bins must be two positive integers, got {a['null_bins']!r}")
    if not all(isinstance(k, int) and k >= 1 for k in a["deletion_k"]):
        raise InputError(f"analysis.deletion_k must list positive integers, got {a['deletion_k']!r}")
    for key in ("null_permutations", "deletion_random_sets", "deletion_top_genes"):
        if a[key] < 0:
            raise InputError(f"analysis.{key} must be 0 or more, got {a[key]!r}")
    pre = cfg["pretrain"]
    if pre["lineage_cells"] < 0:
        raise InputError(f"pretrain.lineage_cells must be 0 or more, got {pre['lineage_cells']!r}")
    if pre["corpus"] not in ("healthy", "atlas"):
        raise InputError(f"pretrain.corpus must be healthy or atlas, got {pre['corpus']!r}")
    if pre["cell_objective"] not in ("genes", "components"):
        raise InputError(f"pretrain.cell_objective must be genes or components, got {pre['cell_objective']!r}")
    if pre["cell_components"] < 1:
        raise InputError(f"pretrain.cell_components must be at least 1, got {pre['cell_components']!r}")
    if cfg["data"]["fixed_length_mode"] not in ("top", "subsample"):
        raise InputError(f"data.fixed_length_mode must be top or subsample, got {cfg['data']['fixed_length_mode']!r}")
    if cfg["data"]["fixed_length"] < 0:
        raise InputError("data.fixed_length must be 0 (off) or a number of genes")
    if cfg["de"]["groupby"] and cfg["de"]["groupby"] not in names:
        raise InputError(f"de.groupby: {cfg['de']['groupby']!r} is not a task; tasks: {', '.join(names)}")
    modes = set(cfg["train"]["modes"])
    for pair in cfg["analysis"]["pairs"]:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise InputError(f"analysis.pairs: each pair is two modes, got {pair!r}")
        for mode in pair:
            if mode not in modes:
                raise InputError(f"analysis.pairs: mode {mode!r} is not among train.modes {sorted(modes)}")
    if cfg["compute"]["device"] not in ("auto", "cpu", "cuda"):
        raise InputError(f"compute.device must be auto, cpu or cuda, got {cfg['compute']['device']!r}")
    if cfg["compute"]["nproc"] < 1:
        raise InputError("compute.nproc must be at least 1")
    if cfg["train"]["epochs"] < 1:
        raise InputError("train.epochs must be at least 1")


def trained_tasks(cfg: dict) -> list[str]:
    """Names of the tasks fine-tuned (`train.tasks`, default every task)."""
    return list(cfg["train"]["tasks"]) or [t["name"] for t in cfg["tasks"]]


def analysed_tasks(cfg: dict) -> list[str]:
    """Names of the tasks whose models are analysed (`analysis.tasks`, default every fine-tuned task)."""
    return list(cfg["analysis"]["tasks"]) or trained_tasks(cfg)


def parse_mode(mode: str) -> tuple[str, int]:
    """`frozen`, `unfrozen`, `last-K` or `freeze-N` -> (kind, k)."""
    if mode in ("frozen", "unfrozen"):
        return mode, 0
    for prefix in ("last-", "freeze-"):
        if mode.startswith(prefix) and mode[len(prefix) :].isdigit() and int(mode[len(prefix) :]) >= 1:
            return prefix[:-1], int(mode[len(prefix) :])
    raise InputError(f"unknown training mode {mode!r}; use frozen, unfrozen, last-K (e.g. last-1) or freeze-N")


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


def dumps_toml(doc: dict) -> str:
    """A config document (sections of keys, and `tasks`) as TOML that `load_toml` reads back unchanged."""
    lines = []
    for section, keys in doc.items():
        if section == "tasks":
            continue
        lines.append(f"[{toml_key(section)}]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    for t in doc.get("tasks", []):
        lines.append("[[tasks]]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in t.items())
        lines.append("")
    return "\n".join(lines)


def to_toml(cfg: dict) -> str:
    """A commented TOML rendering of a configuration (`gfattn pipeline --print-config`)."""
    fmt = toml_value
    lines = []
    for section, keys in SCHEMA.items():
        lines.append(f"[{section}]")
        for key, (_, doc) in keys.items():
            lines.append(f"# {doc}")
            lines.append(f"{key} = {fmt(cfg[section][key])}")
        lines.append("")
    lines.append(
        "# one [[tasks]] table per classification task; keys: " + "; ".join(f"{k}: {v}" for k, v in TASK_KEYS.items())
    )
    for t in cfg["tasks"]:
        lines.append("[[tasks]]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in t.items())
        lines.append("")
    return "\n".join(lines)
