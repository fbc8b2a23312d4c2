"""`gfattn analyze`: attention analysis of one fine-tuned model, or two that share a tokenization.

Thesis sections 3.3-4.5: weight- and norm-based attention per layer/head, per rank and per gene, the
cosine between the two models, position-controlled key genes, optional DE agreement and statistics.
Records an "analysis" run in the store (`pipeline.analysis.pair.run_pair_analysis`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import InputError
from pipeline.paths import add_store_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-a", required=True, metavar="DIR", help="first model (e.g. the frozen fine-tune)")
    p.add_argument("--model-b", metavar="DIR", help="second model on the same tokenization (e.g. unfrozen)")
    p.add_argument("--data", required=True, metavar="TOKENIZED_DIR", help="tokenized cells (`gfattn tokenize`)")
    p.add_argument("--group-column", metavar="COL", help="dataset column with label groups (mean rank per group)")
    p.add_argument(
        "--reference-set",
        metavar="FILE",
        help="reference genes: TSV with an ensembl_id column, or one Ensembl ID or symbol per line",
    )
    p.add_argument("--adata", metavar="H5AD", help="raw counts for differential expression (needs --de-groupby)")
    p.add_argument("--de-groupby", metavar="COL", help="obs column for DE groups")
    p.add_argument("--de-group", metavar="LABEL", help="DE group (e.g. high)")
    p.add_argument("--de-reference", metavar="LABEL", help="DE reference group (e.g. low)")
    p.add_argument("--gene-id-column", metavar="COL", help="var column with gene IDs for DE (default: var index)")
    p.add_argument("--top-k", default="10,20,50,100", help="k for the DE vs attention overlap (default 10,20,50,100)")
    p.add_argument(
        "--cells",
        default="test",
        metavar="test|all|FILE",
        help="cells analysed: the held-out test cells of --model-a's fine-tuning (default; all cells when the "
        "model carries no split), all cells, or a file with one cell id per line",
    )
    p.add_argument("--max-cells", type=int, default=0, help="then a seeded random subset of this many cells (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="cells per batch (default 8)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for confidence intervals (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsampling, bootstrap and permutations (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device")
    p.add_argument("--name", help="run name (default: 'A vs B' from the model directory names)")
    add_store_argument(p)


def _check_dir(path, what: str):
    from pathlib import Path

    from pipeline.errors import InputError

    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"{what} {p} is not a directory")
    return p


def run(args) -> int:
    import contextlib

    from pipeline.errors import InputError

    model_a = _check_dir(args.model_a, "--model-a")
    model_b = _check_dir(args.model_b, "--model-b") if args.model_b else None
    data = _check_dir(args.data, "--data")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        top_k = [int(k) for k in str(args.top_k).split(",") if k.strip()]
    except ValueError:
        raise InputError(f"--top-k {args.top_k!r} must be comma-separated integers, e.g. 10,20,50") from None
    de_args = (args.de_groupby, args.de_group, args.de_reference)
    if args.adata and not all(de_args):
        raise InputError("--adata needs --de-groupby, --de-group and --de-reference")
    if any(de_args) and not args.adata:
        raise InputError("--de-groupby/--de-group/--de-reference need --adata (raw counts)")
    if args.reference_set:
        from pathlib import Path

        if not Path(args.reference_set).expanduser().is_file():
            raise InputError(f"--reference-set {args.reference_set} does not exist")

    import torch

    from pipeline.analysis.pair import de_wilcoxon, load_reference_set, run_pair_analysis
    from pipeline.models.load import load_for_attention, model_dictionaries
    from pipeline.tokenize.encode import load_tokenized
    from store import results as R

    dicts = model_dictionaries(model_a)
    if dicts is None:
        raise InputError(f"{model_a} carries no token_dictionary*.pkl; save the model with its dictionaries")
    if model_b is not None:
        dicts_b = model_dictionaries(model_b)
        if dicts_b is None or dicts_b.fingerprint() != dicts.fingerprint():
            raise InputError(
                f"{model_a} and {model_b} do not share a tokenization (different dictionaries); "
                "compare models fine-tuned from the same checkpoint"
            )
    from pipeline.training.finetune import verify_checkpoint

    # a gfattn fine-tuned model carries the sha256 of its weights: a changed file is refused, not analysed
    hashes = {str(m): verify_checkpoint(m) for m in (model_a, model_b) if m is not None}
    ds = load_tokenized(data)
    if "input_ids" not in ds.column_names:
        raise InputError(f"{data}: no input_ids column; tokenize with `gfattn tokenize`")
    if args.group_column and args.group_column not in ds.column_names:
        raise InputError(f"{data}: no column {args.group_column!r} (columns: {', '.join(ds.column_names)})")
    ds = _select_cells(ds, args.cells, model_a, data)
    from pipeline.tokenize.cells import subsample

    ds = subsample(ds, args.max_cells, args.seed)
    lengths = ds["length"] if "length" in ds.column_names else [len(x) for x in ds["input_ids"]]
    longest = int(max(lengths)) if len(lengths) else 0
    from pipeline.compute import resolve_device

    device = resolve_device(args.device).type

    from pipeline.paths import open_store

    store = open_store(args.store)
    names = (model_a.name, model_b.name if model_b is not None else "")
    name = args.name or (f"{names[0]} vs {names[1]}" if model_b is not None else f"attention: {names[0]}")
    config = {
        "model_a": str(model_a),
        "model_b": str(model_b) if model_b is not None else None,
        "weights_sha256": hashes,
        "data": str(data),
        "group_column": args.group_column,
        "reference_set": args.reference_set,
        "top_k": top_k,
        "batch_size": args.batch_size,
        "n_boot": args.n_boot,
        "seed": args.seed,
        "cells": len(ds),
        "de": {"adata": args.adata, "groupby": args.de_groupby, "group": args.de_group, "reference": args.de_reference}
        if args.adata
        else None,
    }
    run_id = store.create_run(name, "analysis", config, data_path=str(data), model_path=str(model_a), device=device)
    from pipeline.progress import Reporter

    rep = Reporter(store, run_id)
    with store.track(run_id), contextlib.closing(rep):
        de = None
        if args.adata:
            import anndata as ad

            store.set_stage(run_id, "de", "running")
            adata = ad.read_h5ad(args.adata)
            de = de_wilcoxon(
                adata,
                args.de_groupby,
                args.de_group,
                args.de_reference,
                dicts=dicts,
                gene_id_column=args.gene_id_column,
            )
            store.put_gene_table(run_id, "de", de)
            store.set_stage(run_id, "de", "completed")
        reference = (
            load_reference_set(args.reference_set, symbol_to_id=dicts.name_to_id) if args.reference_set else None
        )
        store.set_stage(run_id, "attention", "running")
        source = f"cells in {data}"
        m_a = load_for_attention(model_a, dicts=dicts, max_len=longest, data_source=source)
        m_b = load_for_attention(model_b, dicts=dicts, max_len=longest, data_source=source) if model_b else None
        out = run_pair_analysis(
            m_a,
            m_b,
            ds,
            dicts=dicts,
            names=names if model_b is not None else names[:1],
            group_column=args.group_column,
            de=de,
            reference_set=reference,
            top_k=top_k,
            n_boot=args.n_boot,
            batch_size=args.batch_size,
            device=device,
            dtype=torch.float32,
            seed=args.seed,
            progress=rep.callback("cells", stage="attention"),
        )
        out["records"].write(store, run_id)
        summary = out["records"].json(R.JSON_SUMMARY)
        for line in out["key_genes"]["warnings"]:
            store.log_event(run_id, line, stage="attention", level="warning")
        store.set_stage(run_id, "attention", "completed")
    print(f"{name}: {summary['n_cells']} cells, median length {summary['median_length']:.0f}")
    if "cosine_per_layer" in summary:
        per_layer = ", ".join(f"{v:.3f}" for v in summary["cosine_per_layer"])
        print(f"cosine similarity per layer: {per_layer}; heads differing (BH 5%): {summary['heads_differing']}")
    for s, model in summary["models"].items():
        if f"top_genes_{s}" in summary:
            print(f"top attended genes, {model}: {', '.join(summary[f'top_genes_{s}'])}")
    if de is not None:
        from pipeline.report.summary import overlap_lines

        for line in overlap_lines(store.get_json(run_id, "de_overlap")):
            print(line.removeprefix("  "))
    print(f"run {run_id}")
    return 0


def _select_cells(ds, which: str, model_dir: Path, data: Path):
    """The dataset rows to analyse: the model's test split, all, or the cell ids listed in a file."""
    from pipeline.training.finetune import load_split

    ids = [str(c) for c in ds["cell_id"]]
    if which == "all":
        return ds
    if which == "test":
        split = load_split(model_dir)
        if split is None:
            print(f"note: {model_dir} carries no split (gfattn_split.json); analysing all cells of {data}")
            return ds
        wanted = {c for c, s in split.items() if s == "test"}
        what = f"the test cells of {model_dir}"
    else:
        path = Path(which)
        if not path.is_file():
            raise InputError(f"--cells {which}: use test, all, or a file with one cell id per line")
        wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        what = f"the cells listed in {path}"
    rows = [i for i, c in enumerate(ids) if c in wanted]
    if not rows:
        raise InputError(f"none of {what} is in {data}; is it the dataset the model was fine-tuned on?")
    return ds.select(rows)
