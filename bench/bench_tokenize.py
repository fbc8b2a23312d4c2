"""Tokenization throughput, `.h5ad` on disk -> tokenized dataset on disk.

Data: a sci-Plex-like raw-count matrix (4,611 cells x 5,000 genes, about 700 detected per cell),
generated here. Baseline: the straightforward per-cell encoder in `tests/_helpers_tokenize.py`
(Geneformer's algorithm one cell at a time, then `Dataset.from_dict` + `save_to_disk`), run in the
same invocation on the same file. Dictionary loading is excluded from both timings.

Uses the real V2 dictionaries from $GFATTN_SHARED/geneformer when available, otherwise a synthetic
vocabulary with the same layout.

    python bench/bench_tokenize.py [--cells 4611] [--genes 5000] [--detected 700] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.dictionaries import GeneDictionaries  # noqa: E402
from pipeline.paths import shared_dir  # noqa: E402
from pipeline.tokenize.encode import load_tokenized, tokenize_to_disk  # noqa: E402

from tests._helpers_tokenize import assert_same_ranking, load_raw_dicts, reference_gene_ids, reference_tokenize  # noqa: E402


def synthetic_raw_dicts(n_genes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{10_000_000 + i:011d}" for i in range(n_genes)]
    tok = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    tok.update({g: i + 4 for i, g in enumerate(genes)})
    med = {g: float(m) for g, m in zip(genes, rng.lognormal(0.5, 0.8, size=n_genes))}
    return {"version": "V2", "token": tok, "median": med, "names": {}, "mapping": {g: g for g in genes}}


def sciplex_like_h5ad(path: Path, raw: dict, n_cells: int, n_genes: int, detected: int, seed: int) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    vocab = sorted(k for k in raw["token"] if not k.startswith("<"))
    genes = list(rng.choice(vocab, size=n_genes, replace=False))
    # Gene-specific detection rates (a few genes in every cell, a long tail of rare ones).
    rate = rng.lognormal(0.0, 1.2, size=n_genes)
    p = rate / rate.sum()
    lengths = np.clip(rng.normal(detected, detected * 0.25, size=n_cells).astype(int), 50, n_genes)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int32)
    for i, k in enumerate(lengths):
        indices[indptr[i] : indptr[i + 1]] = np.sort(rng.choice(n_genes, size=k, replace=False, p=p))
    data = (rng.negative_binomial(1, 0.35, size=indices.size) + 1).astype(np.float32)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    totals = np.asarray(X.sum(axis=1)).ravel()
    obs = pd.DataFrame(
        {
            "n_counts": totals * rng.uniform(1.5, 3.0, size=n_cells),
            "perturbation": pd.Categorical(rng.choice(["nutlin", "control"], size=n_cells)),
            "dose_value": rng.choice([0.0, 10.0, 100.0, 1000.0, 10000.0], size=n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


def reference_end_to_end(h5ad: Path, raw: dict, out: Path, obs_columns) -> int:
    import anndata as ad
    import datasets

    adata = ad.read_h5ad(h5ad)
    gene_ids = reference_gene_ids(list(adata.var_names), raw)
    cells = reference_tokenize(adata.X, list(adata.obs_names), adata.obs["n_counts"].to_numpy(), gene_ids, raw)
    keep = {cid: k for k, (cid, *_rest) in enumerate(cells)}
    rows = [adata.obs_names.get_loc(cid) for cid in keep]
    d = {
        "input_ids": [c[1] for c in cells],
        "length": [len(c[1]) for c in cells],
        "cell_id": [c[0] for c in cells],
    }
    for col in obs_columns:
        d[col] = adata.obs[col].iloc[rows].astype(object).tolist()
    datasets.Dataset.from_dict(d).save_to_disk(str(out))
    return len(cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=4611)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--detected", type=int, default=700)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import datasets

    datasets.disable_progress_bars()
    shared = shared_dir()
    gdir = shared / "geneformer" if shared is not None else None
    work = Path(tempfile.mkdtemp(prefix="gfattn-bench-tok-"))
    try:
        if gdir is not None and (gdir / "token_dictionary_gc104M.pkl").exists():
            raw = load_raw_dicts(gdir, "V2")
            dicts = GeneDictionaries.from_geneformer_dir(gdir, "V2")
            vocab = "real Geneformer V2 dictionaries"
        else:
            raw = synthetic_raw_dicts(20_000, args.seed)
            dicts = GeneDictionaries(raw["token"], raw["median"], None, raw["mapping"], "V2")
            vocab = "synthetic V2-style dictionaries (GFATTN_SHARED not set)"
        h5ad = work / "sciplex_like.h5ad"
        sciplex_like_h5ad(h5ad, raw, args.cells, args.genes, args.detected, args.seed)
        obs_columns = ["perturbation", "dose_value"]
        print(f"data: {args.cells:,} cells x {args.genes:,} genes, ~{args.detected} detected per cell; {vocab}")

        # Warm-up (imports, first use of the dictionaries), not timed.
        tokenize_to_disk(h5ad, dicts, work / "warm", obs_columns=obs_columns)
        walls, cpus = [], []
        for r in range(args.repeats):
            out = work / f"ours{r}"
            t0, c0 = time.perf_counter(), time.process_time()
            report = tokenize_to_disk(h5ad, dicts, out, obs_columns=obs_columns)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        best, med, cpu = min(walls), statistics.median(walls), min(cpus)
        cells = report.cells_out

        t0, c0 = time.perf_counter(), time.process_time()
        ref_cells = reference_end_to_end(h5ad, raw, work / "reference", obs_columns)
        ref_time, ref_cpu = time.perf_counter() - t0, time.process_time() - c0

        # The two outputs agree (up to the order of equal-valued genes).
        ours = load_tokenized(work / "ours0")
        import anndata as ad

        adata = ad.read_h5ad(h5ad)
        ref = reference_tokenize(
            adata.X,
            list(adata.obs_names),
            adata.obs["n_counts"].to_numpy(),
            reference_gene_ids(list(adata.var_names), raw),
            raw,
        )
        assert len(ours) == ref_cells == cells
        got = ours["input_ids"]
        for k in range(0, len(ref), max(1, len(ref) // 200)):
            assert_same_ranking(got[k], ref[k][1], ref[k][2], ref[k][3], "V2")

        load = os.getloadavg()[0]
        print(
            f"gfattn tokenize:   {cells / best:10,.0f} cells/s (best of {args.repeats}: {best:.3f} s wall, "
            f"median {cells / med:,.0f} cells/s; {cells / cpu:,.0f} cells/s of CPU time)"
        )
        print(
            f"per-cell baseline: {ref_cells / ref_time:10,.0f} cells/s ({ref_time:.3f} s wall; "
            f"{ref_cells / ref_cpu:,.0f} cells/s of CPU time)"
        )
        print(
            f"ratio vs per-cell baseline: {ref_time / best:.1f}x wall, {ref_cpu / cpu:.1f}x CPU time  "
            f"(target: >= 20,000 cells/s end to end; load average {load:.1f} on {os.cpu_count()} CPUs)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
