"""Benchmark of the experiment store's live-view reads (docs/architecture.md, "The store").

1. A page (100 rows) of a 20,000-gene table sorted by a result column, as the TUI's gene browser asks
   for it, with the per-column index the store creates versus the same query after dropping that index
   (the baseline: SQLite sorts the run's rows for every page). The store holds several runs' tables so
   the run filter matters as it does in a real store.
2. `list_runs()` over 200 runs (tags, progress and `lost` resolution included) versus the baseline of a
   bare `SELECT * FROM runs` on the same connection.

Usage: python bench/bench_store.py [--genes 20000] [--runs 200] [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import Store  # noqa: E402


def timed(fn, repeat: int) -> float:
    """Median wall time of `fn()` in milliseconds."""
    fn()  # warm the page cache and the statement cache
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def gene_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "ensembl_id": [f"ENSG{i:011d}" for i in range(n)],
            "symbol": [f"GENE{i}" for i in range(n)],
            "total": rng.random(n),
            "mean": rng.random(n),
            "scaled": rng.random(n),
            "n_cells": rng.integers(0, 500, n),
            "rank_std": rng.random(n) * 100,
            "p53_target": rng.random(n) < 0.01,
        }
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--tables", type=int, default=4, help="gene tables (runs) in the store")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        st = Store(Path(tmp) / "bench.db")
        run_ids = []
        t0 = time.perf_counter()
        for k in range(args.tables):
            r = st.create_run(f"analysis {k}", "analysis")
            st.put_gene_table(r, "genes", gene_frame(args.genes, k))
            st.finish_run(r, "completed")
            run_ids.append(r)
        put_s = (time.perf_counter() - t0) / args.tables
        r = run_ids[-1]

        def first_page():
            return st.gene_table(r, "genes", order_by="total", limit=100)

        def deep_page():
            return st.gene_table(r, "genes", order_by="total", descending=False, limit=100, offset=args.genes // 2)

        def searched():
            return st.gene_table(r, "genes", order_by="total", limit=100, search="GENE12")

        with_index = [timed(f, args.repeat) for f in (first_page, deep_page, searched)]
        reference = [first_page(), deep_page()]
        st._conn.execute('DROP INDEX "gene_rows__total"')
        without_index = [timed(f, args.repeat) for f in (first_page, deep_page, searched)]
        assert [first_page(), deep_page()] == reference  # same answer, only slower

        print(
            f"store benchmark: {args.tables} gene tables x {args.genes} genes in one store, "
            f"put_gene_table {put_s:.2f} s per table (8 columns, indexes included)"
        )
        print(f"{'gene-table page sorted by a column':<44} {'indexed ms':>11} {'no index ms':>12} {'speed-up':>9}")
        for label, a, b in zip(
            ("first page (top 100)", f"page at offset {args.genes // 2}", "search 'GENE12' + sort"),
            with_index,
            without_index,
        ):
            print(f"  {label:<42} {a:>11.2f} {b:>12.2f} {b / a:>8.1f}x")

        for i in range(args.runs - len(run_ids)):
            parent = run_ids[0] if i % 4 else None
            rid = st.create_run(
                f"run {i}", "finetune", {"i": i}, parent_id=parent, tags=["bench"] if i % 3 == 0 else ()
            )
            st.set_progress(rid, "train", i, 100)
            st.finish_run(rid, "completed" if i % 5 else "failed", None if i % 5 else "boom")
        n_runs = len(st.list_runs())
        ms_list = timed(lambda: st.list_runs(), args.repeat)
        ms_raw = timed(lambda: st._conn.execute("SELECT * FROM runs").fetchall(), args.repeat)
        ms_version = timed(lambda: st.data_version(), args.repeat * 10)
        print(
            f"list_runs() over {n_runs} runs: {ms_list:.2f} ms vs bare SELECT * FROM runs {ms_raw:.2f} ms "
            f"(ratio {ms_list / ms_raw:.1f}x); data_version() {ms_version * 1000:.0f} us"
        )
        st.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
