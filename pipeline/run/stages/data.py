"""Stage `data`: the user's data or the synthetic data set (cached with its manifest), the selection and
split; stage `record`: the data child run (cells, labels, split, UMAP, QC report)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.compute import fault_point
from pipeline.io import digest as _digest
from pipeline.run.preflight import read_obs, select_and_split

if TYPE_CHECKING:  # annotations only
    from pipeline.run.context import Context


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
