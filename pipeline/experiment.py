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
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.compute import fault_point, pin_threads
from pipeline.config import analysed_tasks, trained_tasks
from pipeline.errors import InputError
from pipeline.io import digest as _digest
from pipeline.paths import cache_dir_for_store
from pipeline.progress import Reporter

CHECKPOINT_JSON = "checkpoint"  # json result on a finetune run: {"path", "weights_sha256"}
DETERMINISM_JSON = "determinism"  # json result on a pipeline run: `pipeline.compute.determinism_report`
REAL_DATA_PRESET = "sciplex2-nutlin"  # a preset that needs the user's data (--data or --tokenized)


# ------------------------------------------------------------------------------------------- preflight
@dataclass
class Preflight:
    """What the checks before recording learned: the device, the resolved model and the cell selection."""

    device: str
    selection: Any = None  # pipeline.design.Selection (None for the synthetic data, made in the data stage)
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
            from pipeline.data import loom_as_h5ad

            read_path = str(loom_as_h5ad(p, (cache or p.parent / ".gfattn-cache") / "data"))
    model_path = cfg["model"]["path"]
    dicts = None
    if model_path:
        m = Path(model_path)
        if not m.is_dir():
            raise InputError(f"model directory {m} does not exist; pass a local Hugging Face checkpoint dir to --model")
        from pipeline.model import read_model_config

        read_model_config(m)  # config.json present, valid, BERT, weights beside it
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
        from pipeline.data import validate_counts

        obs = read_obs(read_path)
        out.selection, out.split = select_and_split(obs, cfg)
        out.obs_rows = len(obs)
        if not model_path:
            _check_embedded_genes(read_path, cfg)
        validate_counts(
            read_path,
            out.selection.index,
            dicts,
            layer=cfg["data"]["layer"] or None,
            gene_id_column=cfg["data"]["gene_id_column"] or None,
        )
    return out


def tokenized_obs(path: str):
    """A tokenized dataset's cell columns (everything but the tokens) as an obs table indexed by cell id."""
    import pandas as pd

    from pipeline.tokenize import load_tokenized

    ds = load_tokenized(path)
    columns = [c for c in ds.column_names if c not in ("input_ids", "length", "cell_id")]
    obs = pd.DataFrame({c: ds[c] for c in columns}, index=pd.Index([str(c) for c in ds["cell_id"]]))
    if obs.index.duplicated().any():
        raise InputError(f"{path}: duplicated cell_id values; give every cell a unique id")
    return obs


def read_obs(data_path: str):
    """The obs table of an .h5ad without loading X; duplicated cell IDs are refused."""
    import anndata as ad

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
    from pipeline.design import select_cells, stratified_split

    sel = select_cells(obs, cfg)
    split = stratified_split(sel.strata, cfg["split"]["validation"], cfg["split"]["test"], int(cfg["run"]["seed"]))
    de_comparisons(cfg, sel)  # refuses DE groups that name no class, before anything is recorded
    return sel, split


# -------------------------------------------------------------------------------------------- context
@dataclass
class Products:
    """What the stages hand on to later stages (typed; filled in stage order)."""

    data_path: str = ""
    data_hash: str | None = None
    selection: Any = None  # pipeline.design.Selection
    split: np.ndarray | None = None
    model_dir: Path | None = None
    dicts: Any = None  # pipeline.dictionaries.GeneDictionaries
    max_len: int = 0
    dataset: Any = None  # datasets.Dataset of the selected cells, in selection order
    tokenize_report: dict = field(default_factory=dict)
    models: dict[tuple[str, str], Path] = field(default_factory=dict)
    checkpoint_hashes: dict[tuple[str, str], str] = field(default_factory=dict)
    de: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (task, group, reference) -> DE table
    pretrain_metrics: dict = field(default_factory=dict)
    attributions: dict[tuple[str, str], Any] = field(default_factory=dict)  # (task, mode) -> AttributionResult


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
            from pipeline.data import read_selected

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
    )


def synthetic_data_path(ctx: Context) -> Path:
    """The embedded default's data set, generated once per configuration and cached."""
    from pipeline.io import write_h5ad_atomic
    from pipeline.synth import make_sciplex_like

    d = ctx.cfg["data"]
    params = {
        "scale": d["synth_scale"],
        "preset": d["synth_preset"],
        "length_effect": d["synth_length_effect"],
        "seed": ctx.seed,
        "v": 1,
    }
    path = ctx.cache / "data" / f"sciplex-like-{_digest(params)}.h5ad"
    if not path.is_file():
        ctx.rep.line(f"generating synthetic sci-Plex-like data (scale {d['synth_scale']}, preset {d['synth_preset']})")
        adata = make_sciplex_like(
            scale=d["synth_scale"], preset=d["synth_preset"], length_effect=d["synth_length_effect"], seed=ctx.seed
        )
        fault_point("write", "synthetic-data")
        write_h5ad_atomic(adata, path)
    return path


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
            from pipeline.data import umap_coordinates

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
        hist, edges = np.histogram(lengths, bins=min(50, max(5, int(lengths.max() - lengths.min() + 1))))
        ctx.store.put_vector(
            child,
            "length_hist",
            hist.astype(np.float32),
            meta={"edges": edges.tolist(), "median": float(np.median(lengths))},
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
    from pipeline.dictionaries import GeneDictionaries
    from pipeline.io import sha256_file
    from pipeline.model import weight_file

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
    from pipeline.model import read_model_config

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
    from pipeline.dictionaries import GeneDictionaries

    version = cfg["model"]["version"]
    if any(model_dir.glob("token_dictionary*.pkl")):
        return GeneDictionaries.from_model_dir(model_dir)
    gdir = cfg["model"]["geneformer_dir"]
    if not gdir:
        raise InputError(
            f"model directory {model_dir} carries no gene dictionaries; pass --geneformer-dir with a Geneformer"
            " checkout's dictionaries (token_dictionary_gc104M.pkl, gene_dictionaries_30m/)"
        )
    if version == "auto":
        version = _guess_version(model_dir)
    return GeneDictionaries.from_geneformer_dir(gdir, version)


def _guess_version(model_dir: Path) -> str:
    """V1 models take 2048 tokens over the gc30M vocabulary; V2 take 4096 over gc104M."""
    config = json.loads((model_dir / "config.json").read_text())
    return "V1" if int(config.get("max_position_embeddings", 2048)) <= 2048 else "V2"


def embedded_model_dir(ctx: Context) -> Path:
    """The embedded default's model (`pipeline.embedded`): the one shipped with gfattn when the run's recipe
    is the shipped one's, else pretrained on the synthetic corpus once per recipe and cached.

    Concurrent pipelines may both pretrain it; the first complete copy is kept (`staging_dir(replace=False)`)
    and both are identical for the same recipe unless the time budget cut one short. A shipped or cached
    copy is verified against its manifest before use."""
    from pipeline import embedded
    from pipeline.io import verify_manifest

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
    """`pipeline.embedded.pretrain_small_model` with the run's config, device and progress line."""
    from pipeline.embedded import pretrain_small_model

    return pretrain_small_model(
        ctx.cfg["pretrain"],
        corpus_ds,
        dicts,
        out,
        seed=seed,
        device=ctx.device,
        progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="steps", **kw),
    )


def _check_embedded_genes(data_path: str, cfg: dict) -> None:
    """Without a checkpoint, the model's vocabulary is the data's own genes as Ensembl IDs: symbols need
    Geneformer's name dictionary (--geneformer-dir) to become IDs."""
    from pipeline.data import looks_like_ensembl, open_counts, var_identifiers

    if cfg["model"]["geneformer_dir"]:
        return
    with open_counts(data_path, cfg["data"]["layer"] or None) as cm:
        ids = var_identifiers(cm.var, cfg["data"]["gene_id_column"] or None)
    if looks_like_ensembl(ids).mean() < 0.5:
        raise InputError(
            f"{data_path}: genes are named by symbol (e.g. {', '.join(map(repr, ids[:3]))}); without --model, gfattn "
            "pretrains its small model on your cells over Ensembl IDs: pass --geneformer-dir (its gene name "
            "dictionary maps symbols to IDs), a var column of Ensembl IDs (data.gene_id_column), or --model DIR"
        )


def self_pretrained_model_dir(ctx: Context) -> Path:
    """No checkpoint given: gfattn's small model pretrained by masked genes on the user's own training cells
    (test cells stay unseen), over the genes they express; cached by data, cells and pretraining config."""
    from pipeline.io import verify_manifest
    from pipeline.tokenize import build_vocabulary, hash_file, tokenize_anndata

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
        from pipeline.dictionaries import GeneDictionaries

        version = cfg["model"]["version"] if cfg["model"]["version"] != "auto" else "V2"
        name_to_id = GeneDictionaries.from_geneformer_dir(cfg["model"]["geneformer_dir"], version).name_to_id
    cells = ctx.selected_adata()[np.flatnonzero(train)].copy()
    ctx.rep.line(
        f"no --model: pretraining gfattn's small model ({pcfg['layers']} layers x {pcfg['hidden']}) by masked genes "
        f"on the {len(train_ids):,} training cells of this data; it is small and self-pretrained, not Geneformer"
    )
    opts = {
        "gene_id_column": columns["gene_id_column"] or None,
        "n_counts_column": columns["n_counts_column"] or None,
        "layer": columns["layer"] or None,
    }
    dicts = build_vocabulary(cells, name_to_id=name_to_id, special_tokens=bool(pcfg.get("cls_token", False)), **opts)
    corpus, _ = tokenize_anndata(cells, dicts, max_len=int(pcfg["max_len"]), **opts)
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
    from pipeline.tokenize import (
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


def _use_tokenized(ctx: Context) -> None:
    """A dataset tokenized by Geneformer (or `gfattn tokenize`): its selected cells, checked against the
    model's vocabulary and input size, its top ranks kept up to model.max_len."""
    from pipeline.io import folder_hash
    from pipeline.tokenize import load_tokenized

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
    from pipeline.fixed_length import fix_length

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
    return ctx.cache / "runs" / ctx.store.uid / str(ctx.run_id) / f"{task}__{mode}"


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
    from pipeline.train import recorded_weights_hash, verify_checkpoint

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
            return
        ctx.store.delete_run(done)  # completed without a usable checkpoint record: fine-tune again
    from pipeline.model import load_classifier
    from pipeline.train import TrainConfig, finetune

    parts, names = task_datasets(ctx, task)
    if permuted:
        parts = permuted_parts(parts, ctx.seed)
    t = ctx.cfg["train"]
    tc = TrainConfig(
        lr=float(t["lr"]) if not (train_mode == "frozen" and t["head_lr"]) else float(t["head_lr"]),
        weight_decay=float(t["weight_decay"]),
        warmup_ratio=float(t["warmup_ratio"]),
        epochs=int(t["epochs"]),
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
            from pipeline.launch import finetune_distributed

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
        from pipeline.train import save_split

        save_split(out_dir, ctx.out.selection.cell_ids, ctx.out.split, data=ctx.out.data_path)
        acc, f1 = result.test_metrics["accuracy"], result.test_metrics["macro_f1"]
        ctx.rep.line(f"{name}: test accuracy {acc:.3f}, macro-F1 {f1:.3f} (best epoch {result.best_epoch})")
    ctx.out.models[(task, mode)] = out_dir
    ctx.out.checkpoint_hashes[(task, mode)] = digest


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
        ctx.out.de[(task, group, reference)] = ctx.store.gene_table_df(done, "de")
        return
    from pipeline.analysis import de_wilcoxon
    from pipeline.data import ensembl_indexed

    adata = ensembl_indexed(
        ctx.selected_adata(), ctx.out.dicts, ctx.cfg["data"]["gene_id_column"] or None, source=ctx.out.data_path
    )
    adata.obs["_class"] = ctx.out.selection.class_names(task)
    child = ctx.new_child(name, "de", {"task": task, "groupby": task, "group": group, "reference": reference})
    with ctx.store.track(child):
        de = de_wilcoxon(adata, "_class", group, reference)
        if "symbol" not in de.columns:
            de.insert(1, "symbol", [""] * len(de))
        de["symbol"] = _fill_symbols(de, ctx.out.dicts, ctx.selected_adata(), ctx.cfg["data"]["gene_id_column"] or None)
        ctx.store.put_gene_table(child, "de", de)
    ctx.out.de[(task, group, reference)] = de
    top = de.head(10)
    labels = [
        str(sym) if isinstance(sym, str) and sym else str(ens) for sym, ens in zip(top["symbol"], top["ensembl_id"])
    ]
    ctx.rep.line(f"top DE genes ({group} vs {reference}): " + ", ".join(labels))


def _fill_symbols(de, dicts, adata, gene_id_column) -> list[str]:
    """Gene symbols for a DE table: the dictionaries' where they name the gene, else the data's own var."""
    from pipeline.data import gene_symbols_of

    from_data = gene_symbols_of(adata, dicts, gene_id_column)
    out = []
    for gid, sym in zip(de["ensembl_id"], de["symbol"]):
        sym = sym if isinstance(sym, str) and sym else dicts.id_to_symbol.get(gid, "") or from_data.get(gid, "")
        out.append(sym)
    return out


# --------------------------------------------------------------------------------------- attention
def stage_attention(ctx: Context, task: str, mode_a: str, mode_b: str) -> None:
    """Weight- and norm-based attention of two fine-tuned models on the test cells (thesis 3.3-4.5)."""
    name = f"{task}: {mode_a} vs {mode_b}"
    if ctx.completed_child(name, "analysis") is not None:
        ctx.rep.line(f"{name}: already analysed (resumed)")
        return
    import torch

    from pipeline.analysis import run_pair_analysis
    from pipeline.model import load_for_attention
    from pipeline.train import verify_checkpoint
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    parts, names = task_datasets(ctx, task)
    test = parts["test"]
    if a_cfg["max_cells"] and len(test) > a_cfg["max_cells"]:
        rng = np.random.default_rng(ctx.seed)
        test = test.select(sorted(rng.choice(len(test), int(a_cfg["max_cells"]), replace=False).tolist()))
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
        _attribution(ctx, child, task, test, (mode_a, mode_b))
        _deletion(ctx, child, task, test, (mode_a, mode_b), genes)
        _sanity(ctx, child, task, test, (mode_a, mode_b), genes)
    ctx.rep.line(f"{name}: analysed {len(test)} test cells")


def _attribution(ctx: Context, child: int, task: str, test, modes: tuple[str, str]) -> None:
    """Attribution (Hao et al., integrated gradients, rollout) of both models on the analysis's test cells,
    written beside the attention results with their agreement with attention and DE."""
    methods = tuple(ctx.cfg["analysis"]["attribution"])
    if not methods:
        return
    from pipeline.attribution import run_attribution, write_attribution
    from pipeline.cells import Cells
    from pipeline.model import load_for_attention
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    genes = ctx.store.gene_table_df(child, R.TABLE_GENES) if R.TABLE_GENES in ctx.store.gene_tables(child) else None
    labels = np.asarray(test["label"], dtype=np.int64)
    for mode, suffix in zip(modes, R.MODEL_SUFFIXES):
        # a model in several pairs (frozen) is attributed once: same model, same test cells, same result
        result = ctx.out.attributions.get((task, mode))
        if result is None:
            model = load_for_attention(ctx.out.models[(task, mode)])
            result = run_attribution(
                model,
                Cells(test),
                labels,
                methods=methods,
                dicts=ctx.out.dicts,
                hao_steps=int(a_cfg["hao_steps"]),
                ig_steps=int(a_cfg["ig_steps"]),
                batch_size=int(a_cfg["batch_size"]),
                device=ctx.device,
                seed=ctx.seed,
                progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
            )
            ctx.out.attributions[(task, mode)] = result
        doc = write_attribution(
            ctx.store,
            child,
            result,
            dicts=ctx.out.dicts,
            model_name=mode,
            de=_de_for(ctx, task),
            attention_genes=genes,
            attention_columns=(R.col_attn(suffix),),
        )
        gap = (doc.get("completeness") or {}).get("relative_gap_total")
        ctx.rep.line(
            f"{task}: attribution of {mode} ({', '.join(methods)}) on {len(labels)} cells"
            + (f"; integrated gradients' completeness gap {gap:.2%}" if gap is not None else "")
        )


def _one_vs_rest_overlaps(ctx: Context, child: int, task: str, genes) -> None:
    """A task with several DE comparisons (one-vs-rest per class): the key genes' overlap with each, as
    `by_group` of the `de_overlap` document (its top level: the first comparison)."""
    tables = {(g, ref): de for (t, g, ref), de in ctx.out.de.items() if t == task}
    if len(tables) < 2:
        return
    from pipeline.analysis import compare_de_attention
    from pipeline.keygenes import key_score_column
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


def _deletion(ctx: Context, child: int, task: str, test, modes: tuple[str, str], genes) -> None:
    """In-silico deletion of each model's top genes by every score (and of matched random sets) from the
    test cells, and single-gene deletion of each score's top genes (`pipeline.deletion`)."""
    a_cfg = ctx.cfg["analysis"]
    if not a_cfg["deletion"]:
        return
    from pipeline.deletion_report import run_deletion, write_deletion
    from pipeline.model import load_for_attention
    from store import results as R

    labels = np.asarray(test["label"], dtype=np.int64)
    # computed per pair, never reused from another pair: the rankings come from this pair's gene table, and
    # a run resumed between two pairs must store what an uninterrupted one does
    for mode, suffix in zip(modes, R.MODEL_SUFFIXES):
        result = run_deletion(
            load_for_attention(ctx.out.models[(task, mode)]),
            test,
            labels,
            genes=genes,
            suffix=suffix,
            attribution=ctx.out.attributions.get((task, mode)),
            de=_de_for(ctx, task),
            dicts=ctx.out.dicts,
            ks=tuple(int(k) for k in a_cfg["deletion_k"]),
            n_random=int(a_cfg["deletion_random_sets"]),
            top_genes=int(a_cfg["deletion_top_genes"]),
            null_bins=tuple(a_cfg["null_bins"]),
            n_boot=int(a_cfg["n_boot"]),
            device=ctx.device,
            seed=ctx.seed,
        )
        doc = write_deletion(ctx.store, child, result, model_name=mode, suffix=suffix, genes=genes)
        ctx.rep.line(f"{task}: deletion from {mode}: " + doc["headline"])
    ctx.store.put_gene_table(child, R.TABLE_GENES, genes)


def _sanity(ctx: Context, child: int, task: str, test, modes: tuple[str, str], genes) -> None:
    """Cascading randomisation of each model of the pair (Adebayo et al. 2018): how its key-gene scores
    change as the head, then the layers top down, then the embeddings are re-initialised."""
    if not ctx.cfg["analysis"]["sanity"]:
        return
    from pipeline.attribution import attribution_gene_table
    from pipeline.keygenes import min_cells_for
    from pipeline.model import load_for_attention
    from pipeline.sanity import ATTENTION_SCORES, FLAG_RHO, randomisation_cascade
    from pipeline.train import verify_checkpoint
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    labels = np.asarray(test["label"], dtype=np.int64)
    methods = tuple(a_cfg["attribution"]) if a_cfg["sanity_attribution"] else ()
    for mode, suffix in zip(modes, R.MODEL_SUFFIXES):  # per pair, like the deletion (its reference scores)
        trained = genes.set_index("ensembl_id")[["symbol", "n_cells", *[f"{c}_{suffix}" for c in ATTENTION_SCORES]]]
        trained = trained.rename(columns={f"{c}_{suffix}": c for c in ATTENTION_SCORES})
        attr = ctx.out.attributions.get((task, mode))
        if attr is not None:
            table = attribution_gene_table(attr, ctx.out.dicts.id_to_gene).set_index("ensembl_id")
            trained = trained.join(table[[f"{m}_mean" for m in methods]], how="left")
        scoring = dict(
            dicts=ctx.out.dicts,
            methods=methods if attr is not None else (),
            hao_steps=int(a_cfg["hao_steps"]),
            ig_steps=int(a_cfg["ig_steps"]),
            batch_size=int(a_cfg["batch_size"]),
            device=ctx.device,
            seed=ctx.seed,
        )
        doc = randomisation_cascade(
            load_for_attention(ctx.out.models[(task, mode)]),
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
            from pipeline.sanity import compare_scores, key_gene_scores

            verify_checkpoint(permuted, ctx.out.checkpoint_hashes.get((task, mode + PERMUTED)))
            scores = key_gene_scores(load_for_attention(permuted), test, labels, **scoring)
            doc["label_permutation"] = compare_scores(trained, scores, min_cells=min_cells_for(len(labels)))
            doc["label_permutation_flagged"] = [
                c for c, v in doc["label_permutation"].items() if (v.get("spearman") or 0.0) >= FLAG_RHO
            ]
        ctx.store.put_json(child, R.json_sanity(mode), doc)
        flagged = ", ".join(doc["flagged"]) or "none"
        ctx.rep.line(f"{task}: randomisation cascade of {mode}: scores that survive randomisation: {flagged}")


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
    from pipeline.plan import record_plan

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
        for mode_a, mode_b in cfg["analysis"]["pairs"]:
            with stage(f"attention {task}: {mode_a} vs {mode_b}"):
                stage_attention(ctx, task, mode_a, mode_b)


def open_store(store_path):
    """The store a pipeline writes to, opened before anything else so a bad `--store` fails first."""
    from store import Store

    return Store(store_path)


def run_pipeline(cfg: dict, store_path, *, resume_id: int | None = None, stdout=None, store=None) -> int:
    """Run (or resume) the experiment; returns the exit code (0 done, 1 failed, 2 bad input, 130 interrupted)."""
    import sys

    from pipeline.compute import configure_determinism, determinism_report, pin_threads, resolve_device
    from pipeline.io import DiskFullError, remove_stale_temporaries

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
        with store.track(run_id):
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
    except DiskFullError as exc:
        rep.close()
        print(f"run {run_id} failed: {exc} (`gfattn pipeline --resume {run_id}`)", file=sys.stderr)
        return 1
    except Exception as exc:
        rep.close()
        from pipeline.io import is_disk_full

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
    from pipeline.summary import format_summary

    print(format_summary(store, run_id, elapsed_s=time.monotonic() - t0), file=stdout)
    return 0


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
