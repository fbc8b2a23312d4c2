"""Everything a pipeline run stored, minus what legitimately differs between identical runs.

`stored_results(db, run_id)` walks the run and its children (keyed by child name, never by id) and
returns every metric value, confusion matrix, grid (with bounds), vector (bytes), gene table, label list,
split, cell table and JSON result. Left out: ids, times, durations, throughput metrics, measured seconds and memory inside JSON
results, paths that name the store's folder or run, and the events log (its lines carry timings). A checkpoint is compared by the
sha256 of its weights, so identical results mean bit-identical fine-tuned models.
"""

from __future__ import annotations

import numpy as np

TIMING_METRICS = {"cells_per_s", "seconds", "steps_per_s"}
MEASURED_KEYS = {"seconds", "peak_rss_bytes", "peak_memory_source", "train_seconds"}  # timings and memory, not results


def _without_measurements(obj):
    if isinstance(obj, dict):
        return {k: _without_measurements(v) for k, v in obj.items() if k not in MEASURED_KEYS}
    if isinstance(obj, list):
        return [_without_measurements(v) for v in obj]
    return obj


def _child_key(run: dict) -> str:
    return f"{run['kind']}:{run['name']}"


def stored_results(db, run_id: int) -> dict:
    from store import Store

    st = Store(db)
    try:
        return _collect(st, st.get_run(run_id), top=True)
    finally:
        st.close()


def _collect(st, run: dict, top: bool = False) -> dict:
    rid = run["id"]
    out: dict = {
        "kind": run["kind"],
        "status": run["status"],
        "data_hash": run.get("data_hash"),
        "model_hash": run.get("model_hash"),
    }
    if not top:
        out["config"] = run.get("config")
    out["metrics"] = sorted(
        (m["name"], m["split"], m["step"], m["epoch"], m["value"])
        for m in st.metrics(rid)
        if m["name"] not in TIMING_METRICS
    )
    out["confusions"] = [(c["split"], list(c["labels"]), np.asarray(c["matrix"]).tolist()) for c in st.confusions(rid)]
    grids = {}
    for name in st.grid_names(rid):
        g = st.grid(rid, name)
        grids[name] = {k: np.asarray(v).tolist() for k, v in g.items() if k in ("values", "lower", "upper")}
    out["grids"] = grids
    out["vectors"] = {
        name: (st.vector(rid, name).tobytes(), st.vector_meta(rid, name)) for name in st.vector_names(rid)
    }
    out["gene_tables"] = {t: st.gene_table_df(rid, t).to_dict(orient="list") for t in st.gene_tables(rid)}
    out["labels"] = st.labels(rid)
    out["split"] = st.split(rid)
    cells = st.cells(rid)
    out["cells"] = None if cells is None else cells.to_dict(orient="list")
    js = {}
    for name in st.json_names(rid):
        value = st.get_json(rid, name)
        if name == "checkpoint":
            value = value.get("weights_sha256")
        if name in ("determinism", "plan", "gpu_memory"):  # the machine's report and its timings, not results
            continue
        js[name] = _without_measurements(value)
    out["json"] = js
    out["stages"] = [(s["stage"], s["status"]) for s in st.stages(rid)]
    out["children"] = {_child_key(c): _collect(st, c) for c in st.children(rid)}
    return out


def differences(a, b, path: str = "", *, rtol: float = 0.0) -> list[str]:
    """Paths where two `stored_results` differ (empty when identical). `rtol` > 0: floats (and float vectors)
    that agree to that relative tolerance count as equal; everything else must be identical."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                diffs.append(f"{path}/{k}: only in {'first' if k in a else 'second'}")
            else:
                diffs.extend(differences(a[k], b[k], f"{path}/{k}", rtol=rtol))
        return diffs
    if isinstance(a, float) and isinstance(b, float):
        if (np.isnan(a) and np.isnan(b)) or a == b or (rtol and abs(a - b) <= rtol * max(abs(a), abs(b))):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    if rtol and _is_vector(a) and _is_vector(b) and a[1] == b[1] and a[0] != b[0]:
        x, y = (np.frombuffer(v[0], dtype=v[1].get("dtype", "float64")) for v in (a, b))
        if x.dtype.kind == "f" and x.shape == y.shape and np.allclose(x, y, rtol=rtol, atol=0.0, equal_nan=True):
            return []
        return [f"{path}: vectors differ beyond rtol {rtol}"]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        diffs = []
        for i, (x, y) in enumerate(zip(a, b)):
            diffs.extend(differences(x, y, f"{path}[{i}]", rtol=rtol))
            if len(diffs) > 20:
                break
        return diffs
    return [] if a == b else [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]


def _is_vector(v) -> bool:
    """A stored vector as `stored_results` keeps it: (bytes, meta)."""
    return isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], bytes) and isinstance(v[1], dict)
