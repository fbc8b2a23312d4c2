"""Stage `model`: the user's checkpoint with its dictionaries, the embedded model (shipped or pretrained on
a synthetic corpus), or gfattn's small model pretrained on the user's training cells."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InputError
from pipeline.io import digest as _digest

if TYPE_CHECKING:  # annotations only
    from pipeline.run.context import Context


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
