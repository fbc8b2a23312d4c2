"""Benchmark: the per-model analysis sharded over N processes (torchrun, `--analysis-nproc`) against one.

Runs `gfattn pipeline` twice on the same preset in one folder (the synthetic data, the embedded model and
the tokenization cached by the first run, so the second differs only in its analysis processes):

- baseline: `--analysis-nproc 1`, every model analysed in the pipeline's own process;
- sharded:  `--analysis-nproc N` (default 2), each model's attention pass, attribution, deletion and
            randomisation cascade sharing the cells' batches over N processes started once per run, when
            the cells are tokenized (their start runs beside the record and fine-tuning stages).

Printed: the seconds of every model analysis (its "model" run in the store, created to finished) in each,
their sums, and baseline / sharded (the speed-up); the whole pipeline's seconds in each (what the processes'
start costs where the stages before the analysis do not hide it shows there); then
whether every stored number of the model analyses agrees (to relative 1e-12, the stated tolerance of
sums reduced in another order). On CPUs each of the N processes runs one thread (torchrun's default); the
one process runs the preset's `compute.threads` (the default and quick presets pin one thread: their small
models' kernels gain nothing from a second thread on 2 cores, while a second process takes half the batches).

    python bench/bench_sharded.py [--preset default] [--nproc 2] [--device cpu] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pipeline(folder: Path, db: str, preset: str, nproc: int, device: str) -> None:
    cmd = [sys.executable, "-m", "pipeline", "pipeline", "--preset", preset, "--store", db, "--device", device]
    cmd += ["--analysis-nproc", str(nproc)]
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"gfattn pipeline --analysis-nproc {nproc} failed:\n{out.stderr[-3000:]}")


def _model_runs(db: Path) -> dict[str, dict]:
    from store import Store

    st = Store(db)
    try:
        return {r["name"]: r for r in st.list_runs() if r["kind"] == "model"}
    finally:
        st.close()


def _pipeline_seconds(db: Path) -> float:
    from store import Store

    st = Store(db)
    try:
        (run,) = st.list_runs(kind="pipeline")
        return run["finished"] - run["created"]
    finally:
        st.close()


def _agree(a, b, rtol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        skip = {"seconds", "peak_rss_bytes", "peak_memory_source", "world_size"}
        return set(a) == set(b) and all(_agree(a[k], b[k], rtol) for k in a if k not in skip)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_agree(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


def _stored(db: Path, run_id: int) -> dict:
    from store import Store

    st = Store(db)
    try:
        tables = {t: st.gene_table_df(run_id, t).to_dict(orient="list") for t in st.gene_tables(run_id)}
        docs = {name: st.get_json(run_id, name) for name in st.json_names(run_id)}
        return {"tables": tables, "json": docs}
    finally:
        st.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--keep", metavar="DIR", help="run in DIR and keep its stores (default: a temporary folder)")
    args = p.parse_args(argv)

    folder = Path(args.keep or tempfile.mkdtemp(prefix="gfattn-bench-sharded-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"preset {args.preset}, device {args.device}, in {folder}")
    _pipeline(folder, "one.db", args.preset, 1, args.device)
    _pipeline(folder, "sharded.db", args.preset, args.nproc, args.device)
    one, sharded = _model_runs(folder / "one.db"), _model_runs(folder / "sharded.db")
    total_one = total_sharded = 0.0
    agree = True
    print(f"{'model analysis':<28} {'1 process':>10} {f'{args.nproc} processes':>12}")
    for name, run in one.items():
        other = sharded[name]
        s1 = run["finished"] - run["created"]
        s2 = other["finished"] - other["created"]
        total_one, total_sharded = total_one + s1, total_sharded + s2
        same = _agree(_stored(folder / "one.db", run["id"]), _stored(folder / "sharded.db", other["id"]), 1e-12)
        agree &= same
        print(f"{name:<28} {s1:>9.1f}s {s2:>11.1f}s  {'same results' if same else 'RESULTS DIFFER'}")
    print(f"{'all model analyses':<28} {total_one:>9.1f}s {total_sharded:>11.1f}s")
    print(f"speed-up of {args.nproc} processes over 1: {total_one / total_sharded:.2f}x (baseline: 1 process)")
    whole = [_pipeline_seconds(folder / db) for db in ("one.db", "sharded.db")]
    print(f"{'whole pipeline':<28} {whole[0]:>9.1f}s {whole[1]:>11.1f}s  ({whole[0] / whole[1]:.2f}x)")
    print("stored results agree (relative 1e-12)" if agree else "stored results DIFFER")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
