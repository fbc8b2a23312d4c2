"""`gfattn synth`: write a synthetic sci-Plex 2-like .h5ad, or a healthy pretraining corpus.

See pipeline/data/synth.py for the model (thesis section 2.1-2.2 data, with planted Nutlin-3a biology and
a tunable dose -> detected-genes confound).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import write_h5ad_atomic  # also imported from here by pipeline.run.driver, for now


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="FILE.h5ad", help="output file (written atomically)")
    parser.add_argument(
        "--preset",
        default="raw",
        choices=["raw", "thesis"],
        help="raw: ~4,200 UMIs / ~2,300 genes per cell over 12,000 genes; "
        "thesis: ~680 (max ~1,400) genes per cell over 5,000 genes (default: raw)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="cells relative to sci-Plex 2's Nutlin-3a arm (1 = ~6,000 cells; default 1)",
    )
    parser.add_argument(
        "--length-effect",
        type=float,
        default=1.0,
        help="strength of the dose -> detected genes confound (0 = off; default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--geneformer-dir",
        metavar="DIR",
        help="draw background genes from this Geneformer checkout's vocabulary (default: synthetic ENSG9... IDs)",
    )
    parser.add_argument("--n-genes", type=int, help="genes in the universe (default: the preset's)")
    parser.add_argument(
        "--corpus",
        action="store_true",
        help="write a healthy multi-cell-type pretraining corpus over the same genes instead",
    )
    parser.add_argument("--n-cells", type=int, help="cells of the corpus (default 4000; with --corpus only)")
    parser.add_argument("--n-types", type=int, help="cell types of the corpus, 1-8 (default 8; with --corpus only)")
    parser.add_argument(
        "--atlas",
        action="store_true",
        help="with --corpus: span the states the dosed data varies (graded p53 response that arrests the cycle, "
        "wider library sizes)",
    )


def _check(args: argparse.Namespace) -> Path:
    out = Path(args.out).expanduser()
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name such as {out / 'synthetic.h5ad'}")
    if not args.corpus and (args.n_cells is not None or args.n_types is not None or args.atlas):
        raise InputError(
            "--n-cells, --n-types and --atlas apply to --corpus only; use --scale for the sci-Plex-like data"
        )
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise InputError(f"--scale {args.scale}: must be a positive number (1 = ~6,000 cells)")
    if not (math.isfinite(args.length_effect) and args.length_effect >= 0):
        raise InputError(f"--length-effect {args.length_effect}: must be >= 0 (0 = off)")
    if args.n_cells is not None and args.n_cells < 1:
        raise InputError(f"--n-cells {args.n_cells}: must be >= 1")
    return out


def run(args: argparse.Namespace) -> int:
    out = _check(args)
    from pipeline.data import synth

    t0 = time.perf_counter()
    if args.corpus:
        adata = synth.make_corpus(
            n_cells=4000 if args.n_cells is None else args.n_cells,
            seed=args.seed,
            geneformer_dir=args.geneformer_dir,
            preset=args.preset,
            n_genes=args.n_genes,
            n_types=8 if args.n_types is None else args.n_types,
            atlas=args.atlas,
        )
    else:
        adata = synth.make_sciplex_like(
            scale=args.scale,
            preset=args.preset,
            length_effect=args.length_effect,
            seed=args.seed,
            geneformer_dir=args.geneformer_dir,
            n_genes=args.n_genes,
        )
    elapsed = time.perf_counter() - t0
    write_h5ad_atomic(adata, out)
    d = synth.describe(adata)
    what = "corpus" if args.corpus else "sci-Plex-like data"
    print(
        f"wrote {out}: {what}, {d['n_cells']:,} cells x {d['n_genes']:,} genes "
        f"(preset {args.preset}, seed {args.seed}, {elapsed:.1f} s)"
    )
    print(
        f"  median UMIs {d['median_umis']:,.0f}, detected genes median {d['median_genes']:,.0f} "
        f"max {d['max_genes']:,}, mito {d['median_percent_mito']:.1f}%, ribo {d['median_percent_ribo']:.1f}%"
    )
    if "per_dose" in d:
        print(f"  {'dose (uM)':>9}  {'cells':>6}  {'median UMIs':>11}  {'median genes':>12}")
        for dose, row in d["per_dose"].items():
            print(f"  {dose:>9g}  {row['cells']:>6}  {row['median_umis']:>11,.0f}  {row['median_genes']:>12,.0f}")
        truth = synth.ground_truth(adata)
        n_up = sum(1 for v in truth["responding"]["direction"] if v == "up")
        n_down = len(truth["responding"]["direction"]) - n_up
        print(
            f"  planted: {n_up} p53 targets up, {n_down} cell-cycle genes down (EC50 "
            f"{truth['hill']['ec50_um']:g} uM, Hill {truth['hill']['hill_coefficient']:g}); "
            f"length effect {args.length_effect:g}; ground truth in uns['{synth.TRUTH_KEY}']"
        )
    if "per_type" in d:
        print("  cell types: " + ", ".join(f"{t} {n}" for t, n in d["per_type"].items()))
    return 0
