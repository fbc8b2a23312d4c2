"""`gfattn tokenize`: rank-value encode an .h5ad exactly as Geneformer does (thesis section 2.2).

    gfattn tokenize DATA.h5ad --out DIR [--model-version V1|V2]
        [--geneformer-dir DIR | --token-dictionary F --gene-median F [--gene-mapping F] [--gene-name-id F]]
        [--obs-columns a,b] [--n-counts-column NAME] [--gene-id-column NAME] [--layer NAME] [--max-len N]

Writes a Hugging Face `datasets` directory (`input_ids`, `length`, `cell_id` and the requested obs
columns) atomically: on any error nothing is left at --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA.h5ad", help="raw counts (cells x genes) in X or --layer")
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument(
        "--model-version",
        choices=("V1", "V2"),
        default=None,
        help="model series: V1 (2048 tokens, gc30M dictionaries) or V2 (4096 with <cls>/<eos>, gc104M); "
        "default V2 with --geneformer-dir, else inferred from the token dictionary",
    )
    src = parser.add_argument_group("dictionaries (one of)")
    src.add_argument(
        "--geneformer-dir",
        metavar="DIR",
        help="a Geneformer checkout (or its geneformer/ package folder); dictionaries are found in it",
    )
    src.add_argument("--token-dictionary", metavar="F", help="token_dictionary*.pkl")
    src.add_argument("--gene-median", metavar="F", help="gene_median_dictionary*.pkl")
    src.add_argument("--gene-mapping", metavar="F", help="ensembl_mapping_dict*.pkl (optional)")
    src.add_argument("--gene-name-id", metavar="F", help="gene_name_id_dict*.pkl, needed for gene symbols (optional)")
    parser.add_argument("--obs-columns", default="", metavar="A,B", help="obs columns to carry into the dataset")
    parser.add_argument(
        "--n-counts-column",
        metavar="NAME",
        help="obs column with each cell's total count (default: n_counts, ncounts, n.umi or "
        "total_counts; computed from X when none exists)",
    )
    parser.add_argument(
        "--gene-id-column",
        metavar="NAME",
        help="var column with Ensembl IDs or gene symbols (default: the var index, or a column that maps better)",
    )
    parser.add_argument("--layer", metavar="NAME", help="layer holding the raw counts (default: X)")
    parser.add_argument(
        "--max-len",
        type=int,
        metavar="N",
        help="model input size incl. special tokens (default: 2048 for V1, 4096 for V2)",
    )


def load_dictionaries(args):
    """The dictionaries named on the command line (shared with other commands that tokenize)."""
    from pipeline.data.dictionaries import GeneDictionaries

    files = (args.token_dictionary, args.gene_median, args.gene_mapping, args.gene_name_id)
    if args.geneformer_dir and any(files):
        raise InputError("give either --geneformer-dir or --token-dictionary/--gene-median, not both")
    if args.geneformer_dir:
        return GeneDictionaries.from_geneformer_dir(args.geneformer_dir, args.model_version or "V2")
    if args.token_dictionary or args.gene_median:
        if not (args.token_dictionary and args.gene_median):
            raise InputError("--token-dictionary and --gene-median go together; give both")
        return GeneDictionaries.from_files(
            args.token_dictionary,
            args.gene_median,
            gene_mapping=args.gene_mapping,
            gene_name_id=args.gene_name_id,
            version=args.model_version,
        )
    raise InputError(
        "no gene dictionaries: pass --geneformer-dir DIR (a Geneformer checkout) or "
        "--token-dictionary F --gene-median F"
    )


def run(args) -> int:
    data = Path(args.data)
    if not data.exists():
        raise InputError(f"{data}: no such file")
    if data.is_dir():
        raise InputError(f"{data}: is a directory, expected an .h5ad file")
    out = Path(args.out)
    if out.exists() and not args.overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(f"{out}: already exists; remove it, choose another --out or pass --overwrite")
    if args.max_len is not None and args.max_len < 3:
        raise InputError(f"--max-len {args.max_len} is too small")
    obs_columns = [c.strip() for c in args.obs_columns.split(",") if c.strip()]
    dicts = load_dictionaries(args)

    import os

    from pipeline.tokenize.encode import tokenize_to_disk

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    report = tokenize_to_disk(
        data,
        dicts,
        out,
        overwrite=args.overwrite,
        max_len=args.max_len,
        obs_columns=obs_columns,
        n_counts_column=args.n_counts_column,
        gene_id_column=args.gene_id_column,
        layer=args.layer,
    )
    for line in report.lines():
        print(line)
    print(f"wrote {out} ({report.cells_out:,} cells, {dicts.version})")
    return 0
