"""`gfattn inspect DATA`: what a data set holds, before anything is trained, in one screen.

Obs columns with their value counts (read in backed mode: X is never loaded), where the gene IDs are
and how many map to the V1 and V2 vocabularies, detected genes per cell (from the sparse row pointers,
streamed), and a suggested `gfattn pipeline` command line. `--json` prints the same as one document.
The TUI's New run form lists obs columns with the same readers (`read_obs_table`, `obs_columns`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import InputError

MAX_CLASSES = 50  # a column with more distinct values is described, not suggested as labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA.h5ad", help="raw-count AnnData to describe")
    parser.add_argument(
        "--geneformer-dir", metavar="DIR", help="Geneformer dictionaries, for the V1 / V2 mapping rates"
    )
    parser.add_argument("--model", metavar="DIR", help="a checkpoint: its dictionaries give a mapping rate too")
    parser.add_argument("--layer", help="layer holding raw counts (default: X)")
    parser.add_argument("--gene-id-column", metavar="COL", help="var column with gene IDs (default: auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def read_obs_table(path: str | Path):
    """The obs table of an .h5ad (backed: X is never loaded) or of a .loom (its column attributes only)."""
    path = Path(path)
    if path.suffix == ".loom":
        return _loom_obs(path)
    from pipeline.run.preflight import read_obs

    return read_obs(str(path))


def _loom_obs(path: Path):
    """A .loom's 1-D column attributes as obs, indexed like `pipeline.data.counts.loom_as_h5ad` indexes them."""
    import h5py
    import pandas as pd

    try:
        with h5py.File(path, "r") as fh:
            attrs = fh["col_attrs"]
            data = {}
            for name in attrs:
                values = attrs[name][()]
                if values.ndim != 1:
                    continue
                if values.dtype.kind in "SO":
                    values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
                data[name] = values
    except (OSError, KeyError) as exc:
        raise InputError(f"cannot read {path} as .loom ({type(exc).__name__}: {exc})") from None
    obs = pd.DataFrame(data)
    key = next((k for k in ("CellID", "obs_names", "cell_id") if k in obs.columns), None)
    if key is not None:
        obs.index = obs.pop(key).astype(str).to_numpy()
    return obs


def obs_columns(obs, max_values: int = MAX_CLASSES) -> list[dict]:
    """Every obs column: missing values, number of distinct values, and the value counts (at most
    `max_values`, most frequent first) or, for a numeric column with more than MAX_CLASSES values, its range."""
    import numpy as np
    import pandas as pd

    columns = []
    for name in obs.columns:
        col = obs[name]
        entry: dict = {"name": str(name), "missing": int(col.isna().sum())}
        counts = col.astype(str).where(~col.isna(), None).value_counts()
        entry["n_values"] = int(len(counts))
        if pd.api.types.is_numeric_dtype(col) and len(counts) > MAX_CLASSES:
            values = col.to_numpy(dtype=float)
            entry.update(
                kind="number",
                min=float(np.nanmin(values)),
                median=float(np.nanmedian(values)),
                max=float(np.nanmax(values)),
            )
        else:
            entry.update(
                kind="number" if pd.api.types.is_numeric_dtype(col) else "text",
                values={str(k): int(v) for k, v in counts.head(max_values).items()},
            )
        columns.append(entry)
    return columns


def describe(path: Path, *, geneformer_dir=None, model=None, layer=None, gene_id_column=None) -> dict:
    import numpy as np

    from pipeline.data.counts import map_genes, open_counts
    from pipeline.run.preflight import read_obs

    columns = obs_columns(read_obs(str(path)))
    with open_counts(path, layer) as cm:
        n_cells, n_genes = cm.shape
        detected = []
        gene_counts = np.zeros(n_genes, dtype=np.float64)  # each gene's counts summed over all cells
        for start, stop in cm.chunks(8192):
            block = cm.rows(start, stop)
            detected.append(np.diff(block.indptr))
            gene_counts += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
        detected = np.concatenate(detected) if detected else np.zeros(0, dtype=np.int64)
        mapping = []
        for label, dicts in _dictionaries(geneformer_dir, model):
            gm = map_genes(cm.var, dicts, gene_id_column, source=str(path), min_fraction=0.0)
            mapped, seen = gm.slots >= 0, gene_counts > 0
            mapping.append(
                {
                    "dictionaries": label,
                    "mapped": gm.n_mapped,
                    "unique": gm.n_unique,
                    "genes": gm.n_total,
                    "where": gm.where,
                    # what the pipeline checks: the genes detected in some cell, and the counts they hold
                    "detected": int(seen.sum()),
                    "mapped_detected": int((mapped & seen).sum()),
                    "counts_share": float(gene_counts[mapped].sum() / max(gene_counts.sum(), 1e-12)),
                }
            )
    q = np.percentile(detected, [5, 50, 95]) if len(detected) else [0, 0, 0]
    return {
        "path": str(path),
        "cells": int(n_cells),
        "genes": int(n_genes),
        "counts": cm.where,
        "detected_genes": {
            "p5": float(q[0]),
            "median": float(q[1]),
            "p95": float(q[2]),
            "zero_cells": int((detected == 0).sum()),
        },
        "mapping": mapping,
        "obs": columns,
        "suggested_label_columns": _label_candidates(columns),
    }


def _dictionaries(geneformer_dir, model):
    from pipeline.data.dictionaries import GeneDictionaries
    from pipeline.models.load import model_dictionaries

    out = []
    if model:
        dicts = model_dictionaries(model)
        if dicts is not None:
            out.append((f"model {model}", dicts))
    if geneformer_dir:
        for version in ("V1", "V2"):
            try:
                out.append((version, GeneDictionaries.from_geneformer_dir(geneformer_dir, version)))
            except InputError:
                continue
    return out


def _label_candidates(columns: list[dict]) -> list[str]:
    """Columns that read as labels: 2 to MAX_CLASSES values, every class with at least 3 cells."""
    good = [
        c for c in columns if "values" in c and 2 <= c["n_values"] <= MAX_CLASSES and min(c["values"].values()) >= 3
    ]
    return [c["name"] for c in sorted(good, key=lambda c: c["n_values"])]


def format_description(doc: dict, *, geneformer_dir=None, model=None) -> str:
    d = doc["detected_genes"]
    lines = [
        f"{doc['path']}: {doc['cells']:,} cells x {doc['genes']:,} genes, raw counts in {doc['counts']}",
        f"detected genes per cell: median {d['median']:.0f} (5% {d['p5']:.0f}, 95% {d['p95']:.0f})"
        + (f"; {d['zero_cells']:,} cells without counts" if d["zero_cells"] else ""),
    ]
    if doc["mapping"]:
        for m in doc["mapping"]:
            pct = 100.0 * m["mapped"] / max(1, m["genes"])
            line = f"genes in {m['where']} map to {m['dictionaries']}: {m['mapped']:,} of {m['genes']:,} ({pct:.1f}%)"
            if "detected" in m:
                share = 100.0 * m["mapped_detected"] / max(1, m["detected"])
                line += (
                    f"; of the {m['detected']:,} genes detected in some cell, {m['mapped_detected']:,} ({share:.1f}%), "
                    f"holding {100.0 * m['counts_share']:.1f}% of the counts"
                )
            lines.append(line)
    else:
        lines.append("gene mapping: pass --geneformer-dir DIR (or --model DIR) for the V1 / V2 mapping rates")
    lines.append("obs columns:")
    width = max([len(c["name"]) for c in doc["obs"]] + [4])
    for c in doc["obs"]:
        if "values" in c:
            shown = ", ".join(f"{k} {v:,}" for k, v in list(c["values"].items())[:6])
            more = f", ... ({c['n_values']} values)" if c["n_values"] > 6 else ""
            lines.append(f"  {c['name']:<{width}}  {shown}{more}")
        else:
            lines.append(f"  {c['name']:<{width}}  {c['kind']}, {c['min']:g} .. {c['max']:g} (median {c['median']:g})")
    candidates = doc["suggested_label_columns"]
    if candidates:
        parts = ["gfattn pipeline", f"--data {doc['path']}", f"--model {model or 'DIR'}"]
        if geneformer_dir:
            parts.append(f"--geneformer-dir {geneformer_dir}")
        parts.append(f"--label-column {candidates[0]}")
        lines.append("suggested (label columns: " + ", ".join(candidates[:5]) + "):")
        lines.append("  " + " ".join(parts))
    else:
        lines.append("no obs column reads as labels (2 to 50 values with at least 3 cells each)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    path = Path(args.data)
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass the .h5ad file itself")
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    if args.geneformer_dir and not Path(args.geneformer_dir).is_dir():
        raise InputError(f"--geneformer-dir {args.geneformer_dir} does not exist")
    doc = describe(
        path, geneformer_dir=args.geneformer_dir, model=args.model, layer=args.layer, gene_id_column=args.gene_id_column
    )
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_description(doc, geneformer_dir=args.geneformer_dir, model=args.model))
    return 0
