"""Stage `tokenize`: Geneformer's rank-value encoding of the selected cells (cached), the fixed-length
variant, the tokenized dataset given instead of counts; stage `checkpoint`: the masked-gene check of a
user's checkpoint on their cells."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InputError

if TYPE_CHECKING:  # annotations only
    from pipeline.run.context import Context


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
