"""Preflight: everything a run checks before it is recorded (paths, model, obs and labels, counts, gene
mapping), and the obs readers the TUI's New run form and `gfattn inspect` share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.run.stages.de import de_comparisons
from pipeline.run.stages.model import _check_embedded_genes, _dictionaries_for, model_input_size

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
