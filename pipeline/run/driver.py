"""The thesis experiment end to end (docs/architecture.md, "Data flow of one pipeline run").

data -> model -> tokenize -> record -> fine-tune (task x mode) -> DE -> attention (task x model pair) ->
summary. Every stage reports to the store; a pipeline run owns one child run per data set, fine-tuning,
DE and analysis.

Same seed, same numbers: every stage draws from the run's seed alone (`pipeline.compute`), so a clean
run, a run with warm caches and a run killed and resumed at any stage store identical results. A
child interrupted mid-way is restarted cleanly on `--resume` (its partial records are removed).

Nothing is recorded before the input is known to be usable: `preflight` opens the store and checks
paths, the model's config and vocabulary, obs (labels, duplicated cell IDs, the split) and every count
of the selected cells (raw integer counts, at least one cell with counts) and the gene mapping; a
problem found later in a fresh run removes that run again.

Products are cached next to the store (`.gfattn-cache/`): the synthetic data and the embedded model by
their configuration, tokenizations by data content hash + dictionaries + options (each with a sha256
manifest verified on reuse), and fine-tuned models under `runs/<store uid>/<run id>/`, so two stores in
one folder never share a checkpoint; each checkpoint's weights hash is recorded on its finetune run and
verified before it is reused (`--resume`) or analysed.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.compute import fault_point, pin_threads
from pipeline.config import analysed_models, analysed_tasks, model_analysis_on, trained_tasks
from pipeline.errors import InputError
from pipeline.io import digest as _digest
from pipeline.paths import CHECKPOINT_JSON, cache_dir_for_store  # CHECKPOINT_JSON: {"path", "weights_sha256"}
from pipeline.progress import Reporter

DETERMINISM_JSON = "determinism"  # json result on a pipeline run: `pipeline.compute.determinism_report`
REAL_DATA_PRESET = "sciplex2-nutlin"  # a preset that needs the user's data (--data or --tokenized)


# ------------------------------------------------------------------------------------------- preflight
@dataclass
class Preflight:
    """What the checks before recording learned: the device, the resolved model and the cell selection."""

    device: str
    selection: Any = None  # pipeline.data.design.Selection (None for the synthetic data, made in the data stage)
    split: np.ndarray | None = None
    obs_rows: int = 0
    read_path: str = ""  # the .h5ad the stages read: --data itself, or its .loom converted once into the cache


def preflight(cfg: dict, cache: Path | None = None) -> Preflight:
    """Checks done before a run is recorded; each problem is one `InputError` line."""
    from pipeline.compute import resolve_device

    data_path = cfg["data"]["path"]
    read_path = data_path
    tokenized = cfg["data"]["tokenized"]
    if tokenized and data_path:
        raise InputError("--data and --tokenized both given; pass one: counts (.h5ad) or a tokenized dataset")
    if cfg["run"].get("preset") == REAL_DATA_PRESET and not (data_path or tokenized):
        raise InputError(
            f"preset {REAL_DATA_PRESET} runs on real data: pass --data FILE.h5ad (sci-Plex 2, Nutlin-3a arm) "
            "or --tokenized DIR"
        )
    if data_path:
        p = Path(data_path)
        if p.is_dir():
            raise InputError(f"--data {p} is a directory; pass the .h5ad (or .loom) file itself")
        if not p.is_file():
            raise InputError(f"data file {p} does not exist; pass an .h5ad (or .loom) with raw counts to --data")
        if p.suffix not in (".h5ad", ".loom"):
            raise InputError(f"data file {p} is neither .h5ad nor .loom; convert it with anndata (`adata.write_h5ad`)")
        if p.suffix == ".loom":
            from pipeline.data.counts import loom_as_h5ad

            read_path = str(loom_as_h5ad(p, (cache or p.parent / ".gfattn-cache") / "data"))
    model_path = cfg["model"]["path"]
    dicts = None
    if model_path:
        m = Path(model_path)
        if not m.is_dir():
            raise InputError(f"model directory {m} does not exist; pass a local Hugging Face checkpoint dir to --model")
        from pipeline.models.load import check_checkpoint, read_model_config

        # config.json present, valid, BERT, weights beside it, opened and matching it (and its manifest)
        check_checkpoint(m, read_model_config(m))
    gdir = cfg["model"]["geneformer_dir"]
    if gdir and not Path(gdir).is_dir():
        raise InputError(f"Geneformer dictionary directory {gdir} does not exist (--geneformer-dir)")
    ref = cfg["analysis"]["reference_set"]
    if ref and not Path(ref).is_file():
        raise InputError(f"reference gene set {ref} does not exist (analysis.reference_set)")
    device = resolve_device(cfg["compute"]["device"]).type
    if model_path:
        dicts = _dictionaries_for(Path(model_path), cfg)
        model_input_size(Path(model_path), dicts, cfg["model"]["max_len"])
    out = Preflight(device=device)
    out.read_path = read_path
    if tokenized:
        if not model_path:
            raise InputError(
                f"--tokenized {tokenized} needs --model DIR: the checkpoint whose dictionaries tokenized it"
            )
        obs = tokenized_obs(tokenized)
        out.selection, out.split = select_and_split(obs, cfg)
        out.obs_rows = len(obs)
    if data_path:
        from pipeline.data.counts import validate_counts

        obs = read_obs(read_path)
        out.selection, out.split = select_and_split(obs, cfg)
        out.obs_rows = len(obs)
        _, totals = validate_counts(
            read_path,
            out.selection.index,
            dicts,
            layer=cfg["data"]["layer"] or None,
            gene_id_column=cfg["data"]["gene_id_column"] or None,
            gene_totals=True,
        )
        if not model_path:
            _check_embedded_genes(read_path, cfg, totals)
    return out


def tokenized_obs(path: str):
    """A tokenized dataset's cell columns (everything but the tokens) as an obs table indexed by cell id."""
    import pandas as pd

    from pipeline.tokenize.encode import load_tokenized

    ds = load_tokenized(path)
    columns = [c for c in ds.column_names if c not in ("input_ids", "length", "cell_id")]
    obs = pd.DataFrame({c: ds[c] for c in columns}, index=pd.Index([str(c) for c in ds["cell_id"]]))
    if obs.index.duplicated().any():
        raise InputError(f"{path}: duplicated cell_id values; give every cell a unique id")
    return obs


def read_obs(data_path: str):
    """The obs table of an .h5ad without loading X; duplicated cell IDs are refused."""
    import warnings

    import anndata as ad

    # duplicated cell IDs are refused below in one line; anndata's own warning about them would only repeat it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique", category=UserWarning)
        try:
            backed = ad.read_h5ad(data_path, backed="r")
        except Exception as exc:  # unreadable HDF5 or not an AnnData
            raise InputError(
                f"cannot read {data_path} as .h5ad ({type(exc).__name__}: {exc}); is the file complete?"
            ) from None
        try:
            obs = backed.obs.copy()
        finally:
            backed.file.close()
    dup = obs.index.duplicated()
    if dup.any():
        first = str(obs.index[dup][0])
        raise InputError(
            f"{data_path}: obs index has {int(dup.sum())} duplicated cell IDs (e.g. {first!r}); make them unique "
            "(`adata.obs_names_make_unique()`) and write the file again"
        )
    return obs


def select_and_split(obs, cfg: dict):
    from pipeline.data.design import check_class_sizes, select_cells, stratified_split

    sel = select_cells(obs, cfg)
    check_class_sizes(sel, cfg["split"]["validation"], cfg["split"]["test"])
    split = stratified_split(sel.strata, cfg["split"]["validation"], cfg["split"]["test"], int(cfg["run"]["seed"]))
    de_comparisons(cfg, sel)  # refuses DE groups that name no class, before anything is recorded
    return sel, split


# -------------------------------------------------------------------------------------------- context
@dataclass
class Products:
    """What the stages hand on to later stages (typed; filled in stage order)."""

    data_path: str = ""
    data_hash: str | None = None
    selection: Any = None  # pipeline.data.design.Selection
    split: np.ndarray | None = None
    model_dir: Path | None = None
    dicts: Any = None  # pipeline.data.dictionaries.GeneDictionaries
    max_len: int = 0
    dataset: Any = None  # datasets.Dataset of the selected cells, in selection order
    tokenize_report: dict = field(default_factory=dict)
    models: dict[tuple[str, str], Path] = field(default_factory=dict)
    checkpoint_hashes: dict[tuple[str, str], str] = field(default_factory=dict)
    de: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (task, group, reference) -> DE table
    pretrain_metrics: dict = field(default_factory=dict)
    gates: dict[tuple[str, str], dict] = field(default_factory=dict)  # (task, mode) -> results.JSON_GATE document


@dataclass
class Context:
    cfg: dict
    store: object
    run_id: int
    rep: Reporter
    cache: Path
    device: str
    out: Products = field(default_factory=Products)
    preflight: Preflight | None = None
    threads: int = 1  # torch CPU threads of every stage (`compute.pin_threads`)
    _adata: Any = None

    @property
    def seed(self) -> int:
        return int(self.cfg["run"]["seed"])

    @property
    def has_counts(self) -> bool:
        """False for a tokenized dataset: no UMAP, no DE (both need the counts)."""
        return not self.cfg["data"]["tokenized"]

    def selected_adata(self):
        """The selected cells' AnnData (X in memory), read from the data file once per process."""
        if self._adata is None:
            from pipeline.data.counts import read_selected

            self._adata = read_selected(self.out.data_path, self.out.selection.index)
        return self._adata

    def completed_child(self, name: str, kind: str) -> int | None:
        """The id of a completed child run of this name (when resuming), else None; stale ones are removed."""
        found = None
        for c in self.store.children(self.run_id):
            if c["name"] == name and c["kind"] == kind:
                if c["status"] == "completed" and found is None:
                    found = c["id"]
                else:
                    self.store.delete_run(c["id"])
        return found

    def new_child(self, name: str, kind: str, config: dict | None = None, **kw) -> int:
        return self.store.create_run(name, kind, config or {}, parent_id=self.run_id, device=self.device, **kw)

    def warn(self, kind: str, message: str, **detail) -> None:
        """A warning the researcher must see where the result is shown: printed now, logged as an event, and
        kept on the pipeline run (`results.JSON_WARNINGS`, read by `results.run_warnings`) for the summary,
        `gfattn show` and the TUI. `kind` groups them ("checkpoint", "gate", "integrated_gradients", ...)."""
        from store import results as R

        self.rep.line(f"warning: {message}", level="warning")
        found = R.run_warnings(self.store, self.run_id)
        entry = {"kind": kind, "message": message, **detail}
        if entry not in found:  # a resumed stage says the same thing once
            self.store.put_json(self.run_id, R.JSON_WARNINGS, [*found, entry])


# --------------------------------------------------------------------------------------------- data
def stage_data(ctx: Context) -> None:
    """Load (or synthesise) the data, select the cells of the design, label, split."""
    cfg = ctx.cfg
    pre = ctx.preflight
    if cfg["data"]["tokenized"]:
        ctx.out.data_path = cfg["data"]["tokenized"]
        sel, split, n_obs = pre.selection, pre.split, pre.obs_rows
    elif cfg["data"]["path"]:
        ctx.out.data_path = pre.read_path
        sel, split, n_obs = pre.selection, pre.split, pre.obs_rows
    else:
        ctx.out.data_path = str(synthetic_data_path(ctx))
        obs = read_obs(ctx.out.data_path)
        sel, split = select_and_split(obs, cfg)
        n_obs = len(obs)
    ctx.out.selection, ctx.out.split = sel, split
    ctx.rep.line(f"data: {ctx.out.data_path}")
    ctx.rep.line(
        f"{len(sel.index)} cells selected of {n_obs}: "
        + ", ".join(f"{k} {v}" for k, v in sel.counts_after.items())
        + f"; split train {int((split == 'train').sum())} / validation {int((split == 'validation').sum())}"
        f" / test {int((split == 'test').sum())}"
        + (f"; {sel.no_label} cells without a label (NaN) dropped" if sel.no_label else "")
    )


def synthetic_data_path(ctx: Context) -> Path:
    """The embedded default's data set, generated once per configuration and cached in a folder with its
    manifest (sha256), verified on reuse: a replaced or damaged file is an error, never a quiet reuse."""
    from pipeline.data.synth import make_sciplex_like
    from pipeline.io import cached_h5ad

    d = ctx.cfg["data"]
    params = {
        "scale": d["synth_scale"],
        "preset": d["synth_preset"],
        "length_effect": d["synth_length_effect"],
        "seed": ctx.seed,
        "v": 1,
    }

    def make():
        ctx.rep.line(f"generating synthetic sci-Plex-like data (scale {d['synth_scale']}, preset {d['synth_preset']})")
        adata = make_sciplex_like(
            scale=d["synth_scale"], preset=d["synth_preset"], length_effect=d["synth_length_effect"], seed=ctx.seed
        )
        fault_point("write", "synthetic-data")
        return adata

    return cached_h5ad(ctx.cache / "data" / f"sciplex-like-{_digest(params)}", make, what="cached synthetic data")


def stage_record_data(ctx: Context) -> None:
    """The data child run: what the experiment saw (cells per class of each task, lengths per class, UMAP)."""
    import pandas as pd

    sel, split, ds = ctx.out.selection, ctx.out.split, ctx.out.dataset
    if ctx.completed_child("data", "data") is not None:
        ctx.rep.line("data record already complete (resumed)")
        return
    child = ctx.new_child(
        "data",
        "data",
        {"data": ctx.cfg["data"], "tasks": ctx.cfg["tasks"]},
        data_path=ctx.out.data_path,
        data_hash=ctx.out.data_hash,
    )
    with ctx.store.track(child):
        lengths = np.asarray(ds["length"], dtype=np.int64)
        # one column per task holding each cell's class name, in the user's words
        cells = pd.DataFrame({"cell_id": sel.cell_ids, **{t.name: sel.class_names(t.name) for t in sel.tasks}})
        cells["length"], cells["split"] = lengths, split
        if ctx.cfg["data"]["umap"] and ctx.has_counts:
            from pipeline.data.counts import umap_coordinates

            ctx.rep.line("UMAP of the selected cells (scanpy)")
            coords = umap_coordinates(ctx.selected_adata(), ctx.seed)
            cells["umap1"], cells["umap2"] = coords[:, 0], coords[:, 1]
        ctx.store.put_cells(child, cells)
        for t in sel.tasks:
            ctx.store.put_labels(child, t.name, sel.labels(t.name)[1])
        ctx.store.put_split(child, list(sel.cell_ids), list(split))
        per_class = {
            t.name: {c: _length_summary(lengths[cells[t.name].to_numpy() == c]) for c in sel.names[t.name]}
            for t in sel.tasks
        }
        from pipeline.analysis.pair import length_histogram
        from store import results as R

        hist, edges = length_histogram(lengths, bins=50)  # the analysis runs' histogram, over every cell
        ctx.store.put_vector(
            child,
            R.VEC_LENGTH_HIST,
            hist,
            meta={R.META_EDGES: edges.tolist(), R.META_MEDIAN: float(np.median(lengths))},
        )
        ctx.store.put_json(
            child,
            "qc_report",
            {
                "first_task": sel.tasks[0].name,
                "cells_per_class_before": sel.counts_before,  # of the first task, after data.filter only
                "cells_per_class_after": sel.counts_after,
                "cells_per_task": {
                    t.name: dict(
                        zip(
                            sel.names[t.name], np.bincount(sel.codes[t.name], minlength=len(sel.names[t.name])).tolist()
                        )
                    )
                    for t in sel.tasks
                },
                "split": {s: int((split == s).sum()) for s in ("train", "validation", "test")},
                "length_per_class": per_class,
                "tokenize": ctx.out.tokenize_report,
            },
        )


def _length_summary(lengths: np.ndarray) -> dict:
    return {
        "n": int(len(lengths)),
        "median": float(np.median(lengths)),
        "mean": float(np.mean(lengths)),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "q25": float(np.percentile(lengths, 25)),
        "q75": float(np.percentile(lengths, 75)),
    }


# -------------------------------------------------------------------------------------------- model
def stage_model(ctx: Context) -> None:
    """The checkpoint and its dictionaries: the user's, or the embedded model (pretrained once, cached)."""
    from pipeline.data.dictionaries import GeneDictionaries
    from pipeline.io import sha256_file
    from pipeline.models.load import weight_file

    cfg = ctx.cfg
    if cfg["model"]["path"]:
        model_dir = Path(cfg["model"]["path"])
        dicts = _dictionaries_for(model_dir, cfg)
    elif cfg["data"]["path"]:
        model_dir = self_pretrained_model_dir(ctx)
        dicts = GeneDictionaries.from_model_dir(model_dir)
    else:
        model_dir = embedded_model_dir(ctx)
        dicts = GeneDictionaries.from_model_dir(model_dir)
    ctx.out.max_len = model_input_size(model_dir, dicts, cfg["model"]["max_len"])
    ctx.out.model_dir = model_dir
    ctx.out.dicts = dicts
    weights = weight_file(model_dir)
    ctx.store.set_inputs(ctx.run_id, model_path=model_dir, model_hash=sha256_file(weights) if weights else None)
    ctx.rep.line(f"model {model_dir} ({dicts.version}, {len(dicts.token_dict)} tokens, input size {ctx.out.max_len})")


def model_input_size(model_dir: Path, dicts, requested: int = 0) -> int:
    """The encoding length for a model: its input size, or fewer ranks if asked; refuses a vocabulary mismatch."""
    from pipeline.models.load import read_model_config

    config = read_model_config(model_dir)
    vocab, n_tokens = int(config.vocab_size), len(dicts.token_dict)
    if vocab != n_tokens:
        raise InputError(
            f"model {model_dir} has vocab_size {vocab} but the token dictionary has {n_tokens} tokens;"
            f" use the dictionaries the model was trained with (--geneformer-dir, V1 = gc30M, V2 = gc104M)"
        )
    size = int(config.max_position_embeddings)
    if requested and requested > size:
        raise InputError(f"model.max_len {requested} exceeds the input size {size} of model {model_dir}")
    return int(requested or size)


def _dictionaries_for(model_dir: Path, cfg: dict):
    from pipeline.data.dictionaries import GeneDictionaries, resolve_version

    version = cfg["model"]["version"]
    if any(model_dir.glob("token_dictionary*.pkl")):
        return GeneDictionaries.from_model_dir(model_dir)
    gdir = cfg["model"]["geneformer_dir"]
    if not gdir:
        raise InputError(
            f"model directory {model_dir} carries no gene dictionaries; pass --geneformer-dir with a Geneformer"
            " checkout's dictionaries (token_dictionary_gc104M.pkl, gene_dictionaries_30m/)"
        )
    return GeneDictionaries.from_geneformer_dir(gdir, resolve_version(version, model_dir))


def embedded_model_dir(ctx: Context) -> Path:
    """The embedded default's model (`pipeline.models.embedded`): the one shipped with gfattn when the run's recipe
    is the shipped one's, else pretrained on the synthetic corpus once per recipe and cached.

    Concurrent pipelines may both pretrain it; the first complete copy is kept (`staging_dir(replace=False)`)
    and both are identical for the same recipe unless the time budget cut one short. A shipped or cached
    copy is verified against its manifest before use."""
    from pipeline.io import verify_manifest
    from pipeline.models import embedded

    pcfg = dict(ctx.cfg["pretrain"])
    preset = ctx.cfg["data"]["synth_preset"]
    seed = embedded.model_seed(pcfg, ctx.seed)
    key = embedded.recipe_key(embedded.recipe(pcfg, preset, seed))
    shipped = embedded.shipped_model(key)
    if shipped is not None:
        ctx.rep.line(f"embedded model shipped with gfattn ({shipped}; rebuilt by `gfattn pretrain --embedded`)")
        return shipped
    out = ctx.cache / "models" / f"embedded-{key}"
    if (out / "config.json").is_file():
        verify_manifest(out, what="cached embedded model")
        ctx.rep.line(f"embedded model cached at {out}")
        return out
    import anndata  # noqa: F401  (fail early with a clear import error)

    ctx.rep.line(f"pretraining the embedded model on a synthetic corpus of {pcfg['corpus_cells']} cells")
    dicts, corpus_ds = embedded.corpus_for(pcfg, preset, seed)
    metrics = _pretrain_small_model(ctx, corpus_ds, dicts, out, seed=seed)
    ctx.out.pretrain_metrics = dict(metrics)
    ctx.rep.line(
        "embedded model: "
        + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    )
    if metrics.get("stopped_by_time_budget"):
        ctx.rep.line(
            "the pretraining time budget cut the embedded model short: another machine (or a loaded one) "
            "may pretrain a different model from the same seed; raise pretrain.time_budget_s for "
            "reproducible models",
            level="warning",
        )
    return out


def _pretrain_small_model(ctx: Context, corpus_ds, dicts, out: Path, *, seed: int) -> dict:
    """`pipeline.models.embedded.pretrain_small_model` with the run's config, device and progress line."""
    from pipeline.models.embedded import pretrain_small_model

    return pretrain_small_model(
        ctx.cfg["pretrain"],
        corpus_ds,
        dicts,
        out,
        seed=seed,
        device=ctx.device,
        progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="steps", **kw),
    )


def _check_embedded_genes(data_path: str, cfg: dict, totals: np.ndarray | None = None) -> None:
    """Without a checkpoint, the model's vocabulary is the data's own genes as Ensembl IDs: symbols need
    Geneformer's name dictionary (--geneformer-dir) to become IDs. Only the genes detected in the selected
    cells (`totals` > 0: their counts summed over those cells) count: an unfiltered matrix lists many
    genes no cell expresses, and the vocabulary is built from the detected ones."""
    from pipeline.data.counts import MIN_MAPPED_FRACTION, looks_like_ensembl, open_counts, var_identifiers

    with open_counts(data_path, cfg["data"]["layer"] or None) as cm:
        ids = np.asarray(var_identifiers(cm.var, cfg["data"]["gene_id_column"] or None), dtype=object)
    detected = totals > 0 if totals is not None and (totals > 0).any() else np.ones(len(ids), dtype=bool)
    mapped = looks_like_ensembl(ids)
    if cfg["model"]["geneformer_dir"]:
        from pipeline.data.dictionaries import GeneDictionaries

        version = cfg["model"]["version"] if cfg["model"]["version"] != "auto" else "V2"
        names = GeneDictionaries.from_geneformer_dir(cfg["model"]["geneformer_dir"], version).name_to_id or {}
        mapped |= np.array([str(i) in names for i in ids], dtype=bool)
        share = mapped[detected].mean()
        if share < MIN_MAPPED_FRACTION:
            raise InputError(
                f"{data_path}: only {int(mapped[detected].sum()):,} of the {int(detected.sum()):,} genes detected in "
                f"the selected cells ({share:.1%}) are Ensembl IDs or symbols Geneformer's name dictionary knows "
                f"(e.g. unknown: {', '.join(map(repr, ids[detected & ~mapped][:3]))}); wrong species, or name a var "
                "column of Ensembl IDs (data.gene_id_column)"
            )
        return
    if mapped[detected].mean() < 0.5:
        raise InputError(
            f"{data_path}: genes are named by symbol (e.g. {', '.join(map(repr, ids[:3]))}); without --model, gfattn "
            "pretrains its small model on your cells over Ensembl IDs: pass --geneformer-dir (its gene name "
            "dictionary maps symbols to IDs), a var column of Ensembl IDs (data.gene_id_column), or --model DIR"
        )


def self_pretrained_model_dir(ctx: Context) -> Path:
    """No checkpoint given: gfattn's small model pretrained by masked genes on the user's own training cells
    (test cells stay unseen), over the genes they express; cached by data, cells and pretraining config."""
    from pipeline.io import verify_manifest
    from pipeline.models.pretrain import pretraining_objective
    from pipeline.tokenize.encode import build_vocabulary, hash_file, tokenize_anndata

    cfg, pcfg = ctx.cfg, dict(ctx.cfg["pretrain"])
    ctx.out.data_hash = ctx.out.data_hash or hash_file(ctx.out.data_path)
    train = ctx.out.split == "train"
    train_ids = ctx.out.selection.cell_ids[train]
    columns = {k: cfg["data"][k] for k in ("gene_id_column", "n_counts_column", "layer")}
    key = _digest(
        {
            "pretrain": pcfg,
            "data": ctx.out.data_hash,
            "cells": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
            "columns": columns,
            "geneformer_dir": bool(cfg["model"]["geneformer_dir"]),
            "seed": ctx.seed,
            "v": 1,
        }
    )
    out = ctx.cache / "models" / f"self-{key}"
    if (out / "config.json").is_file():
        verify_manifest(out, what="cached self-pretrained model")
        ctx.rep.line(f"model pretrained on this data's training cells, cached at {out}")
        return out

    name_to_id = None
    if cfg["model"]["geneformer_dir"]:
        from pipeline.data.dictionaries import GeneDictionaries, resolve_version

        version = resolve_version(cfg["model"]["version"])
        name_to_id = GeneDictionaries.from_geneformer_dir(cfg["model"]["geneformer_dir"], version).name_to_id
    cells = ctx.selected_adata()[np.flatnonzero(train)].copy()
    ctx.rep.line(
        f"no --model: pretraining gfattn's small model ({pcfg['layers']} layers x {pcfg['hidden']}) by "
        f"{pretraining_objective(pcfg)} on the {len(train_ids):,} training cells of this data; it is small and "
        "self-pretrained, not Geneformer"
    )
    opts = {
        "gene_id_column": columns["gene_id_column"] or None,
        "n_counts_column": columns["n_counts_column"] or None,
        "layer": columns["layer"] or None,
    }
    # preflight checked that most genes detected in the selected cells map (`_check_embedded_genes`)
    dicts = build_vocabulary(
        cells,
        name_to_id=name_to_id,
        special_tokens=bool(pcfg.get("cls_token", False)),
        min_mapped_fraction=0.0,
        **opts,
    )
    corpus, _ = tokenize_anndata(cells, dicts, max_len=int(pcfg["max_len"]), min_mapped_fraction=0.0, **opts)
    metrics = _pretrain_small_model(ctx, corpus, dicts, out, seed=ctx.seed)
    ctx.out.pretrain_metrics = dict(metrics)
    if metrics.get("stopped_by_time_budget"):
        ctx.rep.line(
            "the pretraining time budget cut the model short: raise pretrain.time_budget_s for a model "
            "that does not depend on the machine's speed",
            level="warning",
        )
    return out


# ----------------------------------------------------------------------------------------- tokenize
def stage_tokenize(ctx: Context) -> None:
    """Rank-value encode the selected cells (cached by data content hash, dictionaries and options)."""
    from pipeline.tokenize.encode import (
        hash_file,
        load_cached_tokenization,
        save_tokenized,
        tokenization_cache_key,
        tokenize_anndata,
    )

    cfg, sel, dicts = ctx.cfg, ctx.out.selection, ctx.out.dicts
    if cfg["data"]["tokenized"]:
        _use_tokenized(ctx)
        return
    data_hash = ctx.out.data_hash or hash_file(ctx.out.data_path)
    ctx.out.data_hash = data_hash
    ctx.store.set_inputs(ctx.run_id, data_path=cfg["data"]["path"] or ctx.out.data_path, data_hash=data_hash)
    key = tokenization_cache_key(
        data_hash,
        dicts,
        {
            "cells": hashlib.sha256("\n".join(sel.cell_ids).encode()).hexdigest(),
            "max_len": ctx.out.max_len,
            "columns": {k: cfg["data"][k] for k in ("gene_id_column", "n_counts_column", "layer")},
        },
    )[:16]
    path = ctx.cache / "tokenized" / key
    cached = load_cached_tokenization(path)
    if cached is not None:
        ds, report = cached[0], cached[1].to_dict()
        ctx.rep.line(f"tokenization cached at {path}")
    else:
        ds, rep = tokenize_anndata(
            ctx.selected_adata(),
            dicts,
            max_len=ctx.out.max_len,
            n_counts_column=cfg["data"]["n_counts_column"] or None,
            gene_id_column=cfg["data"]["gene_id_column"] or None,
            layer=cfg["data"]["layer"] or None,
            min_mapped_fraction=0.0,  # preflight checked the genes detected in the selected cells
        )
        if len(ds) == 0:
            raise InputError(
                f"{ctx.out.data_path}: no selected cell has counts in a vocabulary gene; check the "
                "count matrix (data.layer) and the gene IDs (data.gene_id_column)"
            )
        save_tokenized(ds, path, rep, cache=True)
        ds, report = load_cached_tokenization(path)
        report = report.to_dict()
    ds, report = _fixed_length(ctx, ds, report)
    ids = list(ds["cell_id"])
    if len(ids) != len(sel.cell_ids):
        # cells dropped by the tokenizer (zero counts, filter_pass): keep the selection in step
        keep = np.isin(sel.cell_ids, ids)
        ctx.rep.line(f"{int((~keep).sum())} selected cells dropped by tokenization (see the QC report)")
        _restrict_selection(ctx, keep)
    order = {c: i for i, c in enumerate(ids)}
    ds = ds.select([order[c] for c in ctx.out.selection.cell_ids])
    ctx.out.dataset = ds
    ctx.out.tokenize_report = report
    lengths = np.asarray(ds["length"])
    ctx.rep.line(f"tokenized {len(ds)} cells: length median {np.median(lengths):.0f}, max {lengths.max()}")


def stage_checkpoint_check(ctx: Context) -> None:
    """A user's masked-LM checkpoint on a seeded sample of their training cells: masked-gene accuracy against
    the gene-frequency baseline (`pipeline.models.checkpoint_check`), stored on the run; one warning when it is no
    better (random weights, or dictionaries that are not the model's own)."""
    from pipeline.models.checkpoint_check import masked_gene_check
    from store import results as R

    train = np.flatnonzero(ctx.out.split == "train")
    ids = ctx.out.dataset.select(train.tolist())["input_ids"]
    check = masked_gene_check(ctx.out.model_dir, ids, ctx.out.dicts, seed=ctx.seed, device=ctx.device)
    if check is None:
        ctx.rep.line(f"checkpoint {ctx.out.model_dir} has no masked-LM head: its masked-gene check is skipped")
        return
    ctx.store.put_json(ctx.run_id, R.JSON_CHECKPOINT_CHECK, check)
    if check["ok"]:
        ctx.rep.line(check["message"])
    else:
        ctx.warn("checkpoint", check["message"])


def _use_tokenized(ctx: Context) -> None:
    """A dataset tokenized by Geneformer (or `gfattn tokenize`): its selected cells, checked against the
    model's vocabulary and input size, its top ranks kept up to model.max_len."""
    from pipeline.io import folder_hash
    from pipeline.tokenize.encode import load_tokenized

    path = Path(ctx.out.data_path)
    ds = load_tokenized(path)
    ctx.out.data_hash = folder_hash(path)
    ctx.store.set_inputs(ctx.run_id, data_path=str(path), data_hash=ctx.out.data_hash)
    order = {str(c): i for i, c in enumerate(ds["cell_id"])}
    ds = ds.select([order[c] for c in ctx.out.selection.cell_ids])
    vocab = len(ctx.out.dicts.token_dict)
    top = max((max(x) for x in ds["input_ids"] if len(x)), default=0)
    if top >= vocab:
        raise InputError(
            f"{path}: token id {top} is outside the model's vocabulary of {vocab} tokens; tokenize "
            "with the model's own dictionaries (--geneformer-dir, V1 = gc30M, V2 = gc104M)"
        )
    n = ctx.out.max_len
    ds = ds.map(
        lambda b: {"input_ids": [x[:n] for x in b["input_ids"]], "length": [min(len(x), n) for x in b["input_ids"]]},
        batched=True,
    )
    ds, report = _fixed_length(ctx, ds, {"source": str(path), "tokenized_by": "given", "cells_out": len(ds)})
    if len(ds) != len(ctx.out.selection.cell_ids):
        _restrict_selection(ctx, np.isin(ctx.out.selection.cell_ids, list(ds["cell_id"])))
    ctx.out.dataset = ds
    ctx.out.tokenize_report = report
    ctx.rep.line(f"tokenized dataset {path}: {len(ds)} cells (no counts: UMAP and DE are skipped)")


def _fixed_length(ctx: Context, ds, report: dict):
    """The thesis's fixed-length experiment (5.1): every cell keeps exactly N genes (`data.fixed_length`)."""
    n = int(ctx.cfg["data"]["fixed_length"])
    if not n:
        return ds, report
    from pipeline.data.fixed_length import fix_length

    ds, fixed = fix_length(
        ds, n, mode=ctx.cfg["data"]["fixed_length_mode"], seed=ctx.seed, special_ids=ctx.out.dicts.special_ids
    )
    if len(ds) == 0:
        raise InputError(f"data.fixed_length {n}: no selected cell has {n} genes; choose a smaller length")
    ctx.rep.line(
        f"fixed length {n} ({fixed.mode}): {fixed.cells_out} cells kept, {fixed.cells_dropped} with fewer genes dropped"
    )
    return ds, {**report, "fixed_length": fixed.to_dict()}


def _restrict_selection(ctx: Context, keep: np.ndarray) -> None:
    ctx.out.selection = ctx.out.selection.subset(keep)
    ctx.out.split = ctx.out.split[keep]
    if ctx._adata is not None:
        ctx._adata = ctx._adata[keep].copy()


def task_datasets(ctx: Context, task: str):
    """train / validation / test datasets of one task, with an integer `label` column."""
    ds, split, sel = ctx.out.dataset, ctx.out.split, ctx.out.selection
    labels, names = sel.labels(task)
    ds = ds.remove_columns([c for c in ("label", "group_name") if c in ds.column_names])
    # the analysis groups cells by the task's own classes (per-class rank means)
    ds = ds.add_column("label", labels.tolist()).add_column("group_name", sel.class_names(task).tolist())
    parts = {s: ds.select(np.flatnonzero(split == s).tolist()) for s in ("train", "validation", "test")}
    return parts, names


# ----------------------------------------------------------------------------------------- finetune
def model_out_dir(ctx: Context, task: str, mode: str) -> Path:
    """Where a fine-tuned model of this run lives: under the store's own identity, never shared."""
    from pipeline.paths import file_name

    return ctx.cache / "runs" / ctx.store.uid / str(ctx.run_id) / f"{file_name(task)}__{mode}"


PERMUTED = " (permuted labels)"


def permuted_parts(parts: dict, seed: int) -> dict:
    """The training and validation cells with their labels permuted (seeded; test cells keep theirs): the
    label-permutation control of the sanity checks, same cells, classes and class sizes."""
    out = dict(parts)
    for i, split in enumerate(("train", "validation")):
        labels = np.asarray(parts[split]["label"])
        shuffled = np.random.default_rng([int(seed), 104, i]).permutation(labels)
        out[split] = parts[split].remove_columns("label").add_column("label", shuffled.tolist())
    return out


def stage_finetune(ctx: Context, task: str, mode: str, *, permuted: bool = False) -> None:
    """Fine-tune one (task, mode) and record metrics, confusion and the best model (thesis 2.3, 4.1).
    With `permuted`, on permuted training labels (`permuted_parts`), as the mode "<mode> (permuted labels)"."""
    from pipeline.training.finetune import recorded_weights_hash, verify_checkpoint

    key = mode + (PERMUTED if permuted else "")
    name = f"{task}/{key}"
    out_dir = model_out_dir(ctx, task, mode + ("__permuted" if permuted else ""))
    mode, train_mode = key, mode
    done = ctx.completed_child(name, "finetune")
    if done is not None:
        recorded = _recorded_checkpoint(ctx, done)
        if recorded is not None and recorded.get("path") == str(out_dir):
            ctx.out.checkpoint_hashes[(task, mode)] = verify_checkpoint(out_dir, recorded.get("weights_sha256"))
            ctx.rep.line(f"{name}: already fine-tuned (resumed), checkpoint verified")
            ctx.out.models[(task, mode)] = out_dir
            from store import results as R

            gate = R.model_gate(ctx.store, done)
            if gate is not None:
                ctx.out.gates[(task, mode)] = gate
            return
        ctx.store.delete_run(done)  # completed without a usable checkpoint record: fine-tune again
    from pipeline.models.load import load_classifier
    from pipeline.training.finetune import TrainConfig, finetune

    parts, names = task_datasets(ctx, task)
    if permuted:
        parts = permuted_parts(parts, ctx.seed)
    t = ctx.cfg["train"]
    tc = TrainConfig(
        lr=float(t["lr"]) if not (train_mode == "frozen" and t["head_lr"]) else float(t["head_lr"]),
        weight_decay=float(t["weight_decay"]),
        warmup_ratio=float(t["warmup_ratio"]),
        epochs=int(t["epochs"]),
        min_steps=int(t["min_steps"]),
        max_epochs=int(t["max_epochs"]),
        patience=int(t["patience"]),
        batch_size=int(t["batch_size"]),
        grad_accum=int(t["grad_accum"]),
        class_weights=bool(t["class_weights"]),
        seed=ctx.seed,
        device=ctx.device,
        amp=t["amp"],
        max_len=ctx.out.max_len,
    )
    child = ctx.new_child(
        name, "finetune", {"task": task, "mode": mode, "labels": names, "train": t}, model_path=str(ctx.out.model_dir)
    )
    with ctx.store.track(child):
        ctx.store.put_labels(child, task, names)
        nproc = int(ctx.cfg["compute"]["nproc"])
        if nproc > 1:
            from pipeline.parallel.launch import finetune_distributed

            result = finetune_distributed(
                ctx.out.model_dir,
                parts,
                label_names=names,
                mode=train_mode,
                config=tc,
                nproc=nproc,
                store_path=str(ctx.store.path),
                run_id=child,
                out_dir=out_dir,
                dicts=ctx.out.dicts,
            )
        else:
            model = load_classifier(
                ctx.out.model_dir, len(names), dicts=ctx.out.dicts, max_len=ctx.out.max_len, seed=ctx.seed
            )
            result = finetune(
                model,
                parts["train"],
                parts["validation"],
                parts["test"],
                label_names=names,
                mode=train_mode,
                config=tc,
                store=ctx.store,
                run_id=child,
                out_dir=out_dir,
                dicts=ctx.out.dicts,
                progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="steps", **kw),
            )
        digest = recorded_weights_hash(out_dir)
        ctx.store.put_json(child, CHECKPOINT_JSON, {"path": str(out_dir), "weights_sha256": digest})
        from pipeline.training.finetune import save_split

        save_split(out_dir, ctx.out.selection.cell_ids, ctx.out.split, data=ctx.out.data_path)
        acc, f1 = result.test_metrics["accuracy"], result.test_metrics["macro_f1"]
        ctx.rep.line(f"{name}: test accuracy {acc:.3f}, macro-F1 {f1:.3f} (best epoch {result.best_epoch})")
        if not permuted and result.test_predictions is not None:
            _baseline_and_gate(ctx, child, task, mode, parts, names, result, step=len(result.history))
    ctx.out.models[(task, mode)] = out_dir
    ctx.out.checkpoint_hashes[(task, mode)] = digest


def _baseline_and_gate(ctx: Context, child: int, task: str, mode: str, parts, names, result, *, step: int) -> None:
    """Beside the model, on the same cells: the gene-set logistic regression and the majority-class rate
    (`pipeline.training.baseline`); then the gate before interpretation (did the model learn?), stored on the child
    and, when it did not, a warning kept on the run."""
    from pipeline.training.baseline import gene_set_baseline, learning_gate
    from store import results as R

    base = gene_set_baseline(
        parts,
        len(names),
        len(ctx.out.dicts.token_dict),
        special_ids=ctx.out.dicts.special_ids,
        seed=ctx.seed,
        balanced=bool(ctx.cfg["train"]["class_weights"]),
    )
    y_test = np.asarray(parts["test"]["label"], dtype=np.int64)
    gate = learning_gate(y_test, result.test_predictions, names, seed=ctx.seed)
    values = {
        R.METRIC_BASELINE_ACCURACY: base.accuracy,
        R.METRIC_BASELINE_MACRO_F1: base.macro_f1,
        R.METRIC_MAJORITY_RATE: base.majority_rate,
        R.METRIC_BALANCED_ACCURACY: gate["balanced_accuracy"],
    }
    ctx.store.log_metrics(
        child,
        [
            {"name": k, "value": float(v), "step": step, "epoch": result.best_epoch, "split": R.SPLIT_TEST}
            for k, v in values.items()
        ],
    )
    ctx.store.put_json(child, R.JSON_GATE, gate)
    ctx.out.gates[(task, mode)] = gate
    ctx.rep.line(
        f"{task}/{mode}: baseline (logistic regression on the gene sets) accuracy {base.accuracy:.3f}, "
        f"macro-F1 {base.macro_f1:.3f}; majority class {base.majority_rate:.3f}; model balanced accuracy "
        f"{gate['balanced_accuracy']:.3f} (95% CI {gate['balanced_accuracy_ci'][0]:.3f}-"
        f"{gate['balanced_accuracy_ci'][1]:.3f}, chance {gate['chance']:.3f})"
    )
    if not gate["learned"]:
        ctx.warn(
            "gate",
            f"{task}/{mode} did not learn: {'; '.join(gate['reasons'])}; its key genes are not findings",
            task=task,
            mode=mode,
        )


def _did_not_learn(ctx: Context, task: str, mode: str) -> bool:
    gate = ctx.out.gates.get((task, mode))
    return gate is not None and not gate.get("learned", True)


def _de_for(ctx: Context, task: str):
    """The DE table an analysis of `task` compares attention with: the task's one comparison (binary
    tasks), else None (several one-vs-rest tables; each is in its own DE run)."""
    tables = [de for (t, _, _), de in ctx.out.de.items() if t == task]
    return tables[0] if len(tables) == 1 else None


def _recorded_checkpoint(ctx: Context, run_id: int) -> dict | None:
    try:
        return ctx.store.get_json(run_id, CHECKPOINT_JSON)
    except Exception:
        return None


# --------------------------------------------------------------------------------------- DE
def de_comparisons(cfg: dict, sel) -> list[tuple[str, str, str]]:
    """(task, group, reference) of every DE comparison, as scanpy's `rank_genes_groups` would be asked.

    `de.groupby` (a task; default: each analysed task), `de.groups` and `de.reference` (a class or
    `rest`); by default a binary task compares its second class with its first, a task with more
    classes each class with the rest.
    """
    from pipeline.config import analysed_tasks

    if not cfg["analysis"]["de"] or cfg["data"]["tokenized"]:
        return []
    d = cfg["de"]
    out = []
    for task in [d["groupby"]] if d["groupby"] else analysed_tasks(cfg):
        names = sel.names[task]
        binary = len(names) == 2
        groups = [str(g) for g in d["groups"]] or ([names[1]] if binary else list(names))
        reference = str(d["reference"]) or (names[0] if binary else "rest")
        for g in [*groups, reference]:
            if g not in names and g != "rest":
                raise InputError(f"de: {g!r} is not a class of task {task!r}; classes: {', '.join(names)}")
        out.extend((task, g, reference) for g in groups if g != reference)
    return out


def de_child_name(cfg: dict, task: str, group: str, reference: str) -> str:
    """`de: high vs low`; the task is named too when DE runs for several tasks."""
    from pipeline.config import analysed_tasks

    several = not cfg["de"]["groupby"] and len(analysed_tasks(cfg)) > 1
    return f"de {task}: {group} vs {reference}" if several else f"de: {group} vs {reference}"


def stage_de(ctx: Context, task: str, group: str, reference: str) -> None:
    """scanpy's Wilcoxon of one class against another (or the rest) on the selected cells (thesis fig. 7)."""
    name = de_child_name(ctx.cfg, task, group, reference)
    done = ctx.completed_child(name, "de")
    if done is not None:
        ctx.rep.line(f"{name}: already computed (resumed)")
        de = ctx.store.gene_table_df(done, "de")
        ctx.out.de[(task, group, reference)] = (
            _held_out_de(de, group, reference) if "de_all_cells" in ctx.store.gene_tables(done) else de
        )
        return
    from pipeline.analysis.pair import de_wilcoxon
    from pipeline.data.counts import ensembl_indexed

    adata = ensembl_indexed(
        ctx.selected_adata(), ctx.out.dicts, ctx.cfg["data"]["gene_id_column"] or None, source=ctx.out.data_path
    )
    adata.obs["_class"] = ctx.out.selection.class_names(task)
    child = ctx.new_child(name, "de", {"task": task, "groupby": task, "group": group, "reference": reference})
    with ctx.store.track(child):
        # the DE the analysis compares with sees no test cell (the analysed cells); every cell's DE: its own table
        held_out = np.asarray(ctx.out.split) != "test"
        tables = {}
        for table, keep in (("de", held_out), ("de_all_cells", np.ones(len(held_out), dtype=bool))):
            de = de_wilcoxon(adata[keep], "_class", group, reference)
            if "symbol" not in de.columns:
                de.insert(1, "symbol", [""] * len(de))
            de["symbol"] = _fill_symbols(
                de, ctx.out.dicts, ctx.selected_adata(), ctx.cfg["data"]["gene_id_column"] or None
            )
            ctx.store.put_gene_table(child, table, de)
            tables[table] = de
        de = _held_out_de(tables["de"], group, reference)
    ctx.out.de[(task, group, reference)] = de
    top = de.head(10)
    labels = [
        str(sym) if isinstance(sym, str) and sym else str(ens) for sym, ens in zip(top["symbol"], top["ensembl_id"])
    ]
    ctx.rep.line(f"top DE genes ({group} vs {reference}): " + ", ".join(labels))


def _held_out_de(de, group: str, reference: str):
    """The DE table the analysis uses, saying which classes it compares and that test cells were held out."""
    from pipeline.analysis.pair import DE_ATTR_CELLS, DE_ATTR_CLASSES

    de.attrs[DE_ATTR_CLASSES] = (str(group), str(reference))
    de.attrs[DE_ATTR_CELLS] = "training and validation cells (the analysed test cells held out)"
    return de


def _fill_symbols(de, dicts, adata, gene_id_column) -> list[str]:
    """Gene symbols for a DE table: the dictionaries' where they name the gene, else the data's own var."""
    from pipeline.data.counts import gene_symbols_of

    from_data = gene_symbols_of(adata, dicts, gene_id_column)
    out = []
    for gid, sym in zip(de["ensembl_id"], de["symbol"]):
        sym = sym if isinstance(sym, str) and sym else dicts.id_to_symbol.get(gid, "") or from_data.get(gid, "")
        out.append(sym)
    return out


def analysis_cells(ctx: Context, task: str):
    """The test cells every analysis of `task` reads (each model's and each pair's): the task's test split,
    at most `analysis.max_cells` of them drawn with the run's seed."""
    from pipeline.tokenize.cells import subsample

    parts, _ = task_datasets(ctx, task)
    return subsample(parts["test"], int(ctx.cfg["analysis"]["max_cells"]), ctx.seed)


# ----------------------------------------------------------------------------------- one model
def stage_model_analysis(ctx: Context, task: str, mode: str, pairs: list[str]) -> None:
    """One model's analysis, once per run however many pairs compare it: its own attention pass (the gene
    table its rankings come from), attribution, deletion and the randomisation cascade, into a "model"
    child run (`results.model_analysis_name`) that every pair's analysis run reads (`_copy_model_results`).

    Each of these is a function of the model and the task's analysis cells alone: the gene table is the
    model's own (`pipeline.analysis.pair.gene_table` of a one-model attention pass; its key-score fit is
    per model), never the pair's, whose row order follows the other model's key score."""
    from pipeline.analysis.attention import analyze_attention
    from pipeline.analysis.pair import gene_table
    from pipeline.models.load import load_for_attention
    from pipeline.training.finetune import verify_checkpoint
    from store import results as R

    name = R.model_analysis_name(task, mode)
    used = f"used by {len(pairs)} pair{'s' if len(pairs) != 1 else ''} ({'; '.join(pairs)})"
    if ctx.completed_child(name, R.KIND_MODEL) is not None:
        ctx.rep.line(f"{name}: already analysed (resumed), {used}")
        return
    import torch

    a_cfg = ctx.cfg["analysis"]
    test = analysis_cells(ctx, task)
    path = ctx.out.models[(task, mode)]
    verify_checkpoint(path, ctx.out.checkpoint_hashes.get((task, mode)))
    child = ctx.new_child(
        name, R.KIND_MODEL, {"task": task, "model": mode, "pairs": pairs, "analysis": a_cfg, "cells": len(test)}
    )
    fault_point("stage", f"model {name}")
    with ctx.store.track(child):
        model = load_for_attention(path)  # attention, attribution and deletion leave the weights as they are
        result = analyze_attention(
            model,
            None,
            test,
            pad_id=ctx.out.dicts.pad_id,
            special_ids=ctx.out.dicts.special_ids,
            group_column="group_name",
            batch_size=int(a_cfg["batch_size"]),
            device=ctx.device,
            dtype=torch.float32,
            names=(mode,),
            progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
        )
        genes = gene_table(result, ctx.out.dicts.id_to_gene, ctx.out.dicts.id_to_symbol)  # columns `_a`
        del result
        attribution = _attribution(ctx, child, task, test, mode, model, genes)
        _deletion(ctx, child, task, test, mode, model, genes, attribution)
        del model
        _sanity(ctx, child, task, test, mode, genes, attribution)
        ctx.store.put_gene_table(child, R.TABLE_GENES, genes)
        ctx.store.put_json(child, R.JSON_MODEL_ANALYSIS, {"task": task, "model": mode, "pairs": pairs})
    ctx.rep.line(f"{name}: analysed once, {used}")


def _gate_skips(ctx: Context, task: str, mode: str, what: str) -> bool:
    """Whether `analysis.gate = "skip"` leaves out this costly analysis of a model that did not learn (said
    in the run log); with "mark" it is computed and shown as no findings."""
    if not _did_not_learn(ctx, task, mode):
        return False
    if ctx.cfg["analysis"]["gate"] == "mark":
        ctx.rep.line(f"{task}: {what} of {mode} computed, but {mode} did not learn: no findings (analysis.gate mark)")
        return False
    ctx.rep.line(f"{task}: {what} of {mode} skipped: the model did not learn (analysis.gate skip)")
    return True


# The model analysis's own gene table is a one-model table: its columns end in "_a" (`MODEL_SUFFIX`).
MODEL_SUFFIX = "a"


def _attribution(ctx: Context, child: int, task: str, test, mode: str, model, genes):
    """Attribution (Hao et al., integrated gradients, rollout) of one model on the analysis's test cells,
    written with its agreement with the model's attention and with DE; returns the `AttributionResult`."""
    methods = tuple(ctx.cfg["analysis"]["attribution"])
    if not methods:
        return None
    from pipeline.analysis.attribution import run_attribution, write_attribution
    from pipeline.tokenize.cells import Cells
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    labels = np.asarray(test["label"], dtype=np.int64)
    result = run_attribution(
        model,
        Cells(test),
        labels,
        methods=methods,
        dicts=ctx.out.dicts,
        hao_steps=int(a_cfg["hao_steps"]),
        ig_steps=int(a_cfg["ig_steps"]),
        ig_max_steps=int(a_cfg["ig_max_steps"]),
        ig_gap_p95=float(a_cfg["ig_gap_p95"]),
        batch_size=int(a_cfg["batch_size"]),
        device=ctx.device,
        seed=ctx.seed,
        progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
    )
    ig = result.meta.get("ig") or {}
    if ig.get("gap_converged") is False:
        ctx.warn(
            "integrated_gradients",
            f"{task}/{mode}: integrated gradients' 95th percentile completeness gap"
            f" {ig['gap_p95_tried'][-1]:.1%} stays above {ig['gap_p95_threshold']:.0%} at {ig['steps']}"
            " steps (analysis.ig_max_steps); its per-token scores are approximate",
            task=task,
            mode=mode,
        )
    doc = write_attribution(
        ctx.store,
        child,
        result,
        dicts=ctx.out.dicts,
        model_name=mode,
        de=_de_for(ctx, task),
        attention_genes=genes,
        attention_columns=(R.col_attn(MODEL_SUFFIX),),
    )
    gap = (doc.get("completeness") or {}).get("relative_gap_total")
    ctx.rep.line(
        f"{task}: attribution of {mode} ({', '.join(methods)}) on {len(labels)} cells"
        + (f"; integrated gradients' completeness gap {gap:.2%}" if gap is not None else "")
    )
    return result


def _one_vs_rest_overlaps(ctx: Context, child: int, task: str, genes) -> None:
    """A task with several DE comparisons (one-vs-rest per class): the key genes' overlap with each, as
    `by_group` of the `de_overlap` document (its top level: the first comparison)."""
    tables = {(g, ref): de for (t, g, ref), de in ctx.out.de.items() if t == task}
    if len(tables) < 2:
        return
    from pipeline.analysis.keygenes import key_score_column
    from pipeline.analysis.pair import compare_de_attention
    from store import results as R
    from store.jsonsafe import plain

    a_cfg = ctx.cfg["analysis"]
    column = key_score_column("b" if key_score_column("b") in genes.columns else "a")
    by_group = {}
    for (group, reference), de in tables.items():
        by_group[f"{group} vs {reference}"] = compare_de_attention(
            de,
            genes,
            genes["ensembl_id"].tolist(),
            ks=a_cfg["top_k"],
            attention_column=column,
            null_bins=tuple(a_cfg["null_bins"]),
            null_permutations=int(a_cfg["null_permutations"]),
            seed=ctx.seed,
        )
    first = next(iter(by_group))
    ctx.store.put_json(child, R.JSON_DE_OVERLAP, plain({**by_group[first], "group": first, "by_group": by_group}))


def _deletion(ctx: Context, child: int, task: str, test, mode: str, model, genes, attribution) -> None:
    """In-silico deletion of the model's top genes by every score (and of matched random sets) from the
    test cells, and single-gene deletion of each score's top genes (`pipeline.analysis.deletion`). The rankings
    come from the model's own gene table (`stage_model_analysis`), so every pair reads the same result."""
    a_cfg = ctx.cfg["analysis"]
    if not a_cfg["deletion"] or _gate_skips(ctx, task, mode, "deletion"):
        return
    from pipeline.analysis.deletion_report import run_deletion, write_deletion

    labels = np.asarray(test["label"], dtype=np.int64)
    suffix = MODEL_SUFFIX
    result = run_deletion(
        model,
        test,
        labels,
        genes=genes,
        suffix=suffix,
        attribution=attribution,
        de=_de_for(ctx, task),
        dicts=ctx.out.dicts,
        ks=tuple(int(k) for k in a_cfg["deletion_k"]),
        n_random=int(a_cfg["deletion_random_sets"]),
        max_random=int(a_cfg["deletion_max_random_sets"]),
        match_pool=int(a_cfg["deletion_match_pool"]),
        top_genes=int(a_cfg["deletion_top_genes"]),
        null_bins=tuple(a_cfg["null_bins"]),
        n_boot=int(a_cfg["n_boot"]),
        device=ctx.device,
        seed=ctx.seed,
    )
    doc = write_deletion(ctx.store, child, result, model_name=mode, suffix=suffix, genes=genes)
    ctx.rep.line(f"{task}: deletion from {mode}: " + doc["headline"])


def _sanity(ctx: Context, child: int, task: str, test, mode: str, genes, attribution) -> None:
    """Cascading randomisation of one model (Adebayo et al. 2018): how its key-gene scores change as the
    head, then the layers top down, then the embeddings are re-initialised."""
    if not ctx.cfg["analysis"]["sanity"] or _gate_skips(ctx, task, mode, "randomisation cascade"):
        return
    from pipeline.analysis.attribution import attribution_gene_table
    from pipeline.analysis.keygenes import min_cells_for
    from pipeline.analysis.sanity import ATTENTION_SCORES, FLAG_RHO, randomisation_cascade
    from pipeline.models.load import load_for_attention
    from pipeline.training.finetune import verify_checkpoint
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    labels = np.asarray(test["label"], dtype=np.int64)
    methods = tuple(a_cfg["attribution"]) if a_cfg["sanity_attribution"] else ()
    suffix = MODEL_SUFFIX
    trained = genes.set_index("ensembl_id")[["symbol", "n_cells", *[f"{c}_{suffix}" for c in ATTENTION_SCORES]]]
    trained = trained.rename(columns={f"{c}_{suffix}": c for c in ATTENTION_SCORES})
    if attribution is not None:
        table = attribution_gene_table(attribution, ctx.out.dicts.id_to_gene).set_index("ensembl_id")
        trained = trained.join(table[[f"{m}_mean" for m in methods]], how="left")
    scoring = dict(
        dicts=ctx.out.dicts,
        methods=methods if attribution is not None else (),
        hao_steps=int(a_cfg["hao_steps"]),
        ig_steps=int(a_cfg["ig_steps"]),
        batch_size=int(a_cfg["batch_size"]),
        device=ctx.device,
        seed=ctx.seed,
    )
    doc = randomisation_cascade(
        load_for_attention(ctx.out.models[(task, mode)]),  # re-initialised in place: a copy of its own
        test,
        labels,
        min_cells=min_cells_for(len(labels)),
        trained_scores=trained,
        progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="randomisation steps", **kw),
        **scoring,
    )
    doc["model"] = mode
    permuted = ctx.out.models.get((task, mode + PERMUTED))
    if permuted is not None:
        from pipeline.analysis.sanity import compare_scores, key_gene_scores

        verify_checkpoint(permuted, ctx.out.checkpoint_hashes.get((task, mode + PERMUTED)))
        scores = key_gene_scores(load_for_attention(permuted), test, labels, **scoring)
        doc["label_permutation"] = compare_scores(trained, scores, min_cells=min_cells_for(len(labels)))
        doc["label_permutation_flagged"] = [
            c for c, v in doc["label_permutation"].items() if (v.get("spearman") or 0.0) >= FLAG_RHO
        ]
    ctx.store.put_json(child, R.json_sanity(mode), doc)
    flagged = ", ".join(doc["flagged"]) or "none"
    ctx.rep.line(f"{task}: randomisation cascade of {mode}: scores that survive randomisation: {flagged}")


# ------------------------------------------------------------------------------------ a pair reads
def _model_gene_columns(suffix: str) -> list[str]:
    """The columns of a model's gene table that a pair's gene table carries (`write_deletion`'s)."""
    from store import results as R

    logit = R.col_deletion_logit(suffix)
    return [logit, logit + "_low", logit + "_high", R.col_deletion_prob(suffix)]


def _copy_model_results(ctx: Context, child: int, task: str, mode: str, suffix: str, genes) -> None:
    """Write one model's analysis (its "model" run) onto a pair's analysis run, under the names the pair
    always had: every gene table (but its own `genes`), vector, grid and JSON document as stored, the
    attribution's agreement naming the pair's attention column (`attn_<suffix>`), and the single-gene
    deletion columns added to the pair's gene table `genes` (in place) with the pair's suffix."""
    from store import results as R

    st = ctx.store
    unit = ctx.completed_child(R.model_analysis_name(task, mode), R.KIND_MODEL)
    if unit is None:
        raise RuntimeError(f"the analysis of {task}/{mode} is missing; resume the run to compute it")
    for table in st.gene_tables(unit):
        if table != R.TABLE_GENES:
            st.put_gene_table(child, table, st.gene_table_df(unit, table))
    for name in st.vector_names(unit):
        meta = {k: v for k, v in st.vector_meta(unit, name).items() if k not in ("dtype", "shape")}
        st.put_vector(child, name, st.vector(unit, name), meta=meta)
    for name in st.grid_names(unit):
        grid = st.grid(unit, name)
        st.put_grid(child, name, grid["values"], lower=grid["lower"], upper=grid["upper"])
    own_column, pair_column = R.col_attn(MODEL_SUFFIX), R.col_attn(suffix)
    for name in st.json_names(unit):
        if name == R.JSON_MODEL_ANALYSIS:
            continue
        doc = st.get_json(unit, name)
        if name == R.json_attribution(mode) and own_column != pair_column:
            for pair in (doc.get("agreement") or {}).get("pairs", []):
                for side in ("a", "b"):
                    if pair.get(side) == own_column:
                        pair[side] = pair_column
        st.put_json(child, name, doc)
    own = st.gene_table_df(unit, R.TABLE_GENES).set_index("token_id")
    token = genes["token_id"].astype(np.int64)
    for own_name, pair_name in zip(_model_gene_columns(MODEL_SUFFIX), _model_gene_columns(suffix)):
        if own_name in own.columns:
            genes[pair_name] = token.map(own[own_name]).astype(float)


# --------------------------------------------------------------------------------------- attention
def stage_attention(ctx: Context, task: str, mode_a: str, mode_b: str) -> None:
    """Weight- and norm-based attention of two fine-tuned models on the test cells (thesis 3.3-4.5), and
    each model's attribution, deletion and cascade read from its model analysis (`stage_model_analysis`)."""
    name = f"{task}: {mode_a} vs {mode_b}"
    if ctx.completed_child(name, "analysis") is not None:
        ctx.rep.line(f"{name}: already analysed (resumed)")
        return
    import torch

    from pipeline.analysis.deletion_report import adjust_multiplicity
    from pipeline.analysis.pair import run_pair_analysis
    from pipeline.models.load import load_for_attention
    from pipeline.training.finetune import verify_checkpoint
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    test = analysis_cells(ctx, task)
    models = ctx.out.models
    for mode in (mode_a, mode_b):  # the checkpoints are the ones this run fine-tuned and recorded
        verify_checkpoint(models[(task, mode)], ctx.out.checkpoint_hashes.get((task, mode)))
    child = ctx.new_child(
        name, "analysis", {"task": task, "model_a": mode_a, "model_b": mode_b, "analysis": a_cfg, "cells": len(test)}
    )
    fault_point("stage", f"attention {name}")
    with ctx.store.track(child):
        model_a = load_for_attention(models[(task, mode_a)])
        model_b = load_for_attention(models[(task, mode_b)])
        summary = run_pair_analysis(
            ctx.store,
            child,
            model_a,
            model_b,
            test,
            dicts=ctx.out.dicts,
            names=(mode_a, mode_b),
            group_column="group_name",
            de=_de_for(ctx, task),
            reference_set=a_cfg["reference_set"] or None,
            top_k=a_cfg["top_k"],
            null_bins=tuple(a_cfg["null_bins"]),
            null_permutations=int(a_cfg["null_permutations"]),
            n_boot=int(a_cfg["n_boot"]),
            batch_size=int(a_cfg["batch_size"]),
            device=ctx.device,
            dtype=torch.float32,
            seed=ctx.seed,
            progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
        )
        del model_a, model_b
        for line in summary.get("frequency_warnings", []):
            ctx.rep.line(f"warning: {line}")
        genes = ctx.store.gene_table_df(child, R.TABLE_GENES)  # read once; deletion adds its columns
        _one_vs_rest_overlaps(ctx, child, task, genes)
        if model_analysis_on(ctx.cfg):
            for mode, suffix in zip((mode_a, mode_b), R.MODEL_SUFFIXES):
                _copy_model_results(ctx, child, task, mode, suffix, genes)
            if a_cfg["deletion"]:
                ctx.store.put_gene_table(child, R.TABLE_GENES, genes)
            ctx.rep.line(f"{name}: attribution, deletion and cascade of each model read from its analysis")
        adjust_multiplicity(ctx.store, child)  # q-values over the pair's overlap tests and its deletion tests
    ctx.rep.line(f"{name}: analysed {len(test)} test cells")


# ----------------------------------------------------------------------------------------- driver
def _stages(ctx: Context) -> None:
    cfg = ctx.cfg

    def stage(name: str):
        # Libraries reset the OpenMP pool torch shares (scanpy's UMAP leaves it at the core count), and
        # CPU results depend on the thread count: every stage starts from the run's own count.
        pin_threads(ctx.threads)
        return ctx.rep.stage(name)

    with stage("data"):
        stage_data(ctx)
    with stage("model"):
        stage_model(ctx)
    with stage("tokenize"):
        stage_tokenize(ctx)
    if cfg["model"]["path"]:
        with stage("checkpoint"):
            stage_checkpoint_check(ctx)
    from pipeline.run.plan import record_plan

    # JSON `plan` on the run: work and estimated time per stage, the stages' first ETAs
    record_plan(ctx, de_comparisons(cfg, ctx.out.selection), PERMUTED)
    with stage("record"):
        stage_record_data(ctx)
    for task in trained_tasks(cfg):
        for mode in cfg["train"]["modes"]:
            with stage(f"finetune {task}/{mode}"):
                stage_finetune(ctx, task, mode)
    if cfg["analysis"]["label_permutation"]:
        for task in analysed_tasks(cfg):
            for mode in dict.fromkeys(m for pair in cfg["analysis"]["pairs"] for m in pair):
                with stage(f"finetune {task}/{mode}{PERMUTED}"):
                    stage_finetune(ctx, task, mode, permuted=True)
    comparisons = de_comparisons(cfg, ctx.out.selection)
    if not comparisons:
        ctx.rep.skip("de", "analysis.de is off" if ctx.has_counts else "a tokenized dataset has no counts to test")
    for task, group, reference in comparisons:
        label = "de" if len(comparisons) == 1 else f"de {task}: {group} vs {reference}"
        with stage(label):
            stage_de(ctx, task, group, reference)
    for task in analysed_tasks(cfg):
        if model_analysis_on(cfg):  # each model once, whatever the number of pairs comparing it
            for mode, pairs in analysed_models(cfg).items():
                with stage(f"model {task}: {mode}"):
                    stage_model_analysis(ctx, task, mode, pairs)
        for mode_a, mode_b in cfg["analysis"]["pairs"]:
            with stage(f"attention {task}: {mode_a} vs {mode_b}"):
                stage_attention(ctx, task, mode_a, mode_b)


def quiet_library_warnings():
    """Library warnings that gfattn's code answers itself never reach the terminal raw: scipy's constant-input
    warnings (a correlation with a constant ranking is undefined; the callers store it as missing) and
    scikit-learn's convergence and undefined-metric warnings (the baseline caps its iterations; metrics
    count an undefined ratio as 0)."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    from scipy import stats

    for name in ("ConstantInputWarning", "NearConstantInputWarning", "DegenerateDataWarning"):
        category = getattr(stats, name, None)
        if category is not None:
            warnings.filterwarnings("ignore", category=category)
    try:
        from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning

        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        pass
    return stack


def open_store(store_path):
    """The store a pipeline writes to, opened before anything else so a bad `--store` fails first."""
    from pipeline import paths

    return paths.open_store(store_path)


def run_pipeline(cfg: dict, store_path, *, resume_id: int | None = None, stdout=None, store=None) -> int:
    """Run (or resume) the experiment; returns the exit code (0 done, 1 failed, 2 bad input, 130 interrupted)."""
    import sys

    from pipeline.compute import configure_determinism, determinism_report, pin_threads, resolve_device
    from pipeline.io import DiskFullError, remove_stale_temporaries
    from store import StoreFullError

    stdout = stdout or sys.stdout
    store = store or open_store(store_path)
    pre = preflight(cfg, cache_dir_for_store(store_path))
    device = pre.device
    threads = pin_threads(int(cfg["compute"]["threads"]) or None)
    configure_determinism(resolve_device(device))
    cache = cache_dir_for_store(store_path)
    for sub in ("data", "models", "tokenized"):
        remove_stale_temporaries(cache / sub)
    name = cfg["run"]["name"] or f"{cfg['run']['preset']} {time.strftime('%Y-%m-%d %H:%M')}"
    fresh = resume_id is None
    if fresh:
        run_id = store.create_run(
            name,
            "pipeline",
            cfg,
            data_path=cfg["data"]["path"] or None,
            model_path=cfg["model"]["path"] or None,
            device=device,
            tags=[cfg["run"]["preset"]],
        )
    else:
        run_id = resume_id
        store.reopen_run(run_id)
        name = store.get_run(run_id)["name"]
    store.put_json(run_id, DETERMINISM_JSON, determinism_report(resolve_device(device), threads))
    rep = Reporter(store, run_id)
    ctx = Context(
        cfg=cfg, store=store, run_id=run_id, rep=rep, cache=cache, device=device, preflight=pre, threads=threads
    )
    rep.line(f"run {run_id} '{name}' in store {Path(store_path).resolve()} on {device}")
    if device == "cuda":
        rep.line(
            "CUDA: deterministic algorithms requested; some kernels may still vary in the last bits "
            "(see the run's determinism record)",
            level="warning",
        )
    t0 = time.monotonic()
    try:
        with store.track(run_id), quiet_library_warnings():
            _stages(ctx)
    except InputError:
        rep.close()
        if fresh:  # bad input found after recording: leave no half-written run behind
            import shutil

            store.delete_run(run_id)
            shutil.rmtree(cache / "runs" / store.uid / str(run_id), ignore_errors=True)
        raise
    except KeyboardInterrupt:
        rep.close()
        print(f"run {run_id} interrupted; continue it with `gfattn pipeline --resume {run_id}`", file=sys.stderr)
        return 130
    except (DiskFullError, StoreFullError) as exc:
        rep.close()
        print(f"run {run_id} failed: {exc} (`gfattn pipeline --resume {run_id}`)", file=sys.stderr)
        return 1
    except Exception as exc:
        rep.close()
        from pipeline.io import is_disk_full

        if _run_deleted(store, run_id):  # `gfattn rm` or the TUI deleted it: there is nothing to resume
            import shutil

            shutil.rmtree(cache / "runs" / store.uid / str(run_id), ignore_errors=True)
            print(
                f"run {run_id} was deleted from the store while it ran; it stopped (nothing to resume)", file=sys.stderr
            )
            return 1
        if is_disk_full(exc):
            print(
                f"run {run_id} failed: out of disk space under {cache} ({exc}); free space and continue with "
                f"`gfattn pipeline --resume {run_id}`",
                file=sys.stderr,
            )
            return 1
        print(f"run {run_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"continue it with `gfattn pipeline --resume {run_id}` once fixed", file=sys.stderr)
        if os.environ.get("GFATTN_TRACEBACK"):
            raise
        return 1
    finally:
        rep.close()
    from pipeline.report.summary import format_summary

    print(format_summary(store, run_id, elapsed_s=time.monotonic() - t0), file=stdout)
    return 0


def _run_deleted(store, run_id: int) -> bool:
    from store import RunNotFoundError

    try:
        store.get_run(run_id)
    except RunNotFoundError:
        return True
    except Exception:  # the store itself failing says nothing about the run
        return False
    return False


def resume_pipeline(ref: str, store_path) -> int:
    store = open_store(store_path)
    try:
        run_id = store.resolve_run(ref)
    except Exception as exc:
        raise InputError(f"no run {ref!r} in store {store_path}: {exc}") from None
    run = store.get_run(run_id)
    if run["kind"] != "pipeline":
        raise InputError(f"run {ref} is a {run['kind']} run; --resume takes a pipeline run")
    if run["status"] == "completed":
        raise InputError(f"run {ref} already completed; start a new run instead")
    if run["status"] == "running":
        raise InputError(f"run {ref} is still running (pid {run.get('pid')} on {run.get('host')})")
    return run_pipeline(run["config"], store_path, resume_id=run_id, store=store)
