"""`gfattn show` and `gfattn export`: a run and its child runs as one JSON document or as table files.

The show document summarises (metric curves as last/min/max per name and split, grids and vectors as
shapes, gene tables as row counts); the export writes every row those summaries are computed from, one
file per table, so that every number `show` reports can be recomputed from the exported files.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from store.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from store.core import Store

SHOW_FORMAT = "gfattn.show/1"
EXPORT_FORMATS = ("csv", "parquet", "json")
RUN_EXPORT_FIELDS = (
    "id",
    "name",
    "kind",
    "status",
    "stored_status",
    "created",
    "finished",
    "parent_id",
    "config",
    "versions",
    "git_commit",
    "host",
    "pid",
    "heartbeat",
    "device",
    "data_path",
    "data_hash",
    "model_path",
    "model_hash",
    "error",
    "note",
    "tags",
)


def jsonable(obj: Any) -> Any:
    """`obj` with numpy values as Python values and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def metric_summaries(rows: list[dict]) -> list[dict]:
    """Per (name, split): count, last value (latest logged), its step and epoch, min and max."""
    groups: dict[tuple, dict] = {}
    for r in rows:  # rows come in logging order
        key = (r["name"], r["split"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "name": r["name"],
                "split": r["split"],
                "count": 0,
                "last": None,
                "last_step": None,
                "last_epoch": None,
                "min": None,
                "max": None,
            }
        g["count"] += 1
        g["last"], g["last_step"], g["last_epoch"] = r["value"], r["step"], r["epoch"]
        v = r["value"]
        if v is not None and math.isfinite(v):
            g["min"] = v if g["min"] is None else min(g["min"], v)
            g["max"] = v if g["max"] is None else max(g["max"], v)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1] or ""))]


def _grid_summary(name: str, g: dict) -> dict:
    v = g["values"]
    finite = v[np.isfinite(v)]
    return {
        "name": name,
        "shape": list(v.shape),
        "mean": float(finite.mean()) if finite.size else None,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "has_bounds": g["lower"] is not None or g["upper"] is not None,
    }


def show_document(store: Store, run_id: int, _depth: int = 0) -> dict:
    run = store.get_run(run_id)
    events = store.events(run_id)
    split = store.split(run_id)
    split_counts: dict[str, int] = {}
    for s in split.values():
        split_counts[s] = split_counts.get(s, 0) + 1
    cells = store.cells(run_id)
    vectors = []
    for name in store.vector_names(run_id):
        meta = store.vector_meta(run_id, name)
        vectors.append({"name": name, "dtype": meta.pop("dtype"), "shape": meta.pop("shape"), "meta": meta})
    doc = {
        "format": SHOW_FORMAT,
        "run": run,
        "stages": store.stages(run_id),
        "events": {"count": len(events), "last": events[-20:]},
        "metrics": metric_summaries(store.metrics(run_id)),
        "confusions": [
            {"split": c["split"], "labels": c["labels"], "matrix": c["matrix"].tolist()}
            for c in store.confusions(run_id)
        ],
        "grids": [_grid_summary(n, store.grid(run_id, n)) for n in store.grid_names(run_id)],
        "vectors": vectors,
        "gene_tables": [
            {"name": t, "rows": store.gene_table_count(run_id, t), "columns": store.gene_table_columns(run_id, t)}
            for t in store.gene_tables(run_id)
        ],
        "labels": store.labels(run_id),
        "split_counts": dict(sorted(split_counts.items())),
        "cells": {"rows": int(len(cells)), "columns": list(cells.columns)},
        "json": {n: store.get_json(run_id, n) for n in store.json_names(run_id)},
        "children": [show_document(store, c, _depth + 1) for c in run["children"]],
    }
    return jsonable(doc)


# ---------------------------------------------------------------------------------------------- export
def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return s or "table"


def _write_frame(df, base: Path, fmt: str) -> Path:
    if fmt == "csv":
        path = base.with_name(base.name + ".csv")
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        path = base.with_name(base.name + ".parquet")
        df.to_parquet(path, index=False)
    else:
        path = base.with_name(base.name + ".json")
        records = jsonable(df.astype(object).where(df.notna(), None).to_dict(orient="records"))
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1, allow_nan=False) + "\n")
    return path


def export_tables(store: Store, run_id: int) -> dict[str, tuple[Any, dict]]:
    """Every table of the run and its descendants: file stem -> (DataFrame, manifest entry)."""
    import pandas as pd

    ids = [int(run_id)] + store.descendants(run_id)
    out: dict[str, tuple[Any, dict]] = {}

    def add(stem: str, rows: list[dict] | Any, columns: list[str], **info: Any) -> None:
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(rows, columns=columns)
        out[stem] = (df, {"table": info.pop("table", stem), **info, "rows": int(len(df))})

    runs, stages, progress, events, metrics, confusions, grids = [], [], [], [], [], [], []
    vectors, vector_meta, labels, splits, json_rows = [], [], [], [], []
    per_run: list[tuple[str, Any, dict]] = []
    for rid in ids:
        run = store.get_run(rid)
        row = {k: run.get(k) for k in RUN_EXPORT_FIELDS}
        row["config"] = json.dumps(jsonable(run["config"]), ensure_ascii=False)
        row["versions"] = json.dumps(run["versions"], ensure_ascii=False)
        row["tags"] = json.dumps(run["tags"], ensure_ascii=False)
        runs.append(row)
        stages += [{"run_id": rid, **s} for s in store.stages(rid)]
        p = store.progress(rid)
        if p:
            progress.append({"run_id": rid, **p})
        events += [{"run_id": rid, **e} for e in store.events(rid)]
        metrics += [{"run_id": rid, **m} for m in store.metrics(rid)]
        for c in store.confusions(rid):
            for i, t in enumerate(c["labels"]):
                for j, p_ in enumerate(c["labels"]):
                    confusions.append(
                        {
                            "run_id": rid,
                            "split": c["split"],
                            "true_label": t,
                            "predicted_label": p_,
                            "count": float(c["matrix"][i, j]),
                        }
                    )
        for name in store.grid_names(rid):
            g = store.grid(rid, name)
            for layer in range(g["values"].shape[0]):
                for head in range(g["values"].shape[1]):
                    grids.append(
                        {
                            "run_id": rid,
                            "name": name,
                            "layer": layer,
                            "head": head,
                            "value": g["values"][layer, head],
                            "lower": None if g["lower"] is None else g["lower"][layer, head],
                            "upper": None if g["upper"] is None else g["upper"][layer, head],
                        }
                    )
        for name in store.vector_names(rid):
            meta = store.vector_meta(rid, name)
            flat = store.vector(rid, name).reshape(-1)
            vector_meta.append(
                {
                    "run_id": rid,
                    "name": name,
                    "dtype": meta.pop("dtype"),
                    "shape": json.dumps(meta.pop("shape")),
                    "meta": json.dumps(jsonable(meta)),
                }
            )
            vectors += [{"run_id": rid, "name": name, "index": i, "value": float(v)} for i, v in enumerate(flat)]
        for task, names in store.labels(rid).items():
            labels += [{"run_id": rid, "task": task, "position": i, "label": n} for i, n in enumerate(names)]
        splits += [{"run_id": rid, "cell_id": c, "split": s} for c, s in store.split(rid).items()]
        for name in store.json_names(rid):
            json_rows.append(
                {
                    "run_id": rid,
                    "name": name,
                    "value": json.dumps(jsonable(store.get_json(rid, name)), ensure_ascii=False),
                }
            )
        for t in store.gene_tables(rid):
            per_run.append(
                (
                    f"genes__run{rid}__{_safe(t)}",
                    store.gene_table_df(rid, t),
                    {"table": "gene_table", "run_id": rid, "name": t},
                )
            )
        cells = store.cells(rid)
        if len(cells):
            per_run.append((f"cells__run{rid}", cells, {"table": "cells", "run_id": rid}))

    add("runs", runs, list(RUN_EXPORT_FIELDS))
    add("stages", stages, ["run_id", "stage", "status", "started", "finished"])
    add("progress", progress, ["run_id", "stage", "done", "total", "unit", "throughput", "eta_s", "updated"])
    add("events", events, ["run_id", "id", "time", "stage", "level", "message"])
    add("metrics", metrics, ["run_id", "id", "name", "value", "step", "epoch", "split", "time"])
    add("confusions", confusions, ["run_id", "split", "true_label", "predicted_label", "count"])
    add("grids", grids, ["run_id", "name", "layer", "head", "value", "lower", "upper"])
    add("vectors", vectors, ["run_id", "name", "index", "value"])
    add("vector_meta", vector_meta, ["run_id", "name", "dtype", "shape", "meta"])
    add("labels", labels, ["run_id", "task", "position", "label"])
    add("splits", splits, ["run_id", "cell_id", "split"])
    add("json_results", json_rows, ["run_id", "name", "value"])
    for stem, df, info in per_run:
        add(stem, df, list(df.columns), **info)
    return out


def export_run(store: Store, run_id: int, out_dir: str | os.PathLike, fmt: str = "csv") -> list[Path]:
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"export folder {out_dir} exists and is not a folder; pass --out a folder path")
    tables = export_tables(store, run_id)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create export folder {out_dir}: {exc.strerror or exc}") from None
    written: list[Path] = []
    manifest = {"format": "gfattn.export/1", "run_id": int(run_id), "file_format": fmt, "files": {}}
    for stem, (df, info) in tables.items():
        if info["rows"] == 0 and stem != "runs":
            continue  # an empty table says nothing and only clutters the folder
        path = _write_frame(df, out_dir / stem, fmt)
        written.append(path)
        manifest["files"][path.name] = info
    mpath = out_dir / "manifest.json"
    mpath.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    written.append(mpath)
    return written
