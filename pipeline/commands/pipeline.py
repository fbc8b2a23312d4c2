"""`gfattn pipeline`: the thesis experiment end to end, headless (see pipeline/run/driver.py)."""

from __future__ import annotations

import argparse

from pipeline.paths import add_store_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.config import PRESETS

    add_store_argument(p)
    p.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="; ".join(f"{k}: {v}" for k, v in PRESETS.items())
    )
    p.add_argument("--quick", action="store_true", help="alias of --preset quick: a tiny run for smoke tests")
    p.add_argument("--config", metavar="FILE.toml", help="TOML config (see --print-config for every key)")
    p.add_argument(
        "--data", metavar="FILE.h5ad", help="raw-count AnnData, .h5ad or .loom (default: synthetic sci-Plex-like data)"
    )
    p.add_argument(
        "--tokenized", metavar="DIR", help="a dataset tokenized by Geneformer, with its cell columns, instead of --data"
    )
    p.add_argument(
        "--model",
        metavar="DIR",
        help="Geneformer checkpoint dir (default `embedded`: gfattn's small model, pretrained on your data)",
    )
    p.add_argument("--geneformer-dir", metavar="DIR", help="Geneformer dictionaries when the model dir has none")
    p.add_argument("--layer", metavar="NAME", help="layer of --data holding the raw counts (data.layer; default: X)")
    p.add_argument(
        "--gene-id-column",
        metavar="NAME",
        help="var column of --data with Ensembl IDs or symbols (data.gene_id_column; default: the var index)",
    )
    p.add_argument(
        "--n-counts-column",
        metavar="NAME",
        help="obs column of --data with each cell's total counts (data.n_counts_column)",
    )
    p.add_argument(
        "--label-column",
        metavar="COL",
        help="classify cells by this obs column (one task named after it; replaces the preset's tasks)",
    )
    p.add_argument("--classes", metavar="A,B", help="with --label-column: the values kept as classes, in order")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COL=V1,V2",
        help="keep only cells whose COL is one of the values (`*` wildcards); repeat for AND",
    )
    p.add_argument("--fixed-length", type=int, metavar="N", help="every cell keeps exactly N genes (thesis 5.1)")
    p.add_argument("--name", help="run name")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs")
    p.add_argument("--seed", type=int, help="seed for everything")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device")
    p.add_argument("--nproc", type=int, help="processes for data-parallel fine-tuning (torchrun)")
    p.add_argument(
        "--reference-set", metavar="FILE", help="reference gene set (e.g. p53 targets) marked in gene tables"
    )
    p.add_argument(
        "--resume", metavar="RUN", help="continue a failed or interrupted run from its first unfinished stage"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print each stage's work and estimated time on this device (a few timed batches) and exit; "
        "records nothing",
    )


def run(args) -> int:
    from pipeline import config
    from pipeline.paths import resolve_store_path

    preset = (
        "quick"
        if args.quick
        else (
            args.preset or ("sciplex2-nutlin" if args.data and args.model and args.model != "embedded" else "default")
        )
    )
    flags = {
        "data.path": args.data,
        "data.tokenized": args.tokenized,
        "data.fixed_length": args.fixed_length,
        "data.layer": args.layer,
        "data.gene_id_column": args.gene_id_column,
        "data.n_counts_column": args.n_counts_column,
        "model.path": args.model,
        "model.geneformer_dir": args.geneformer_dir,
        "run.name": args.name,
        "run.seed": args.seed,
        "train.epochs": args.epochs,
        "compute.device": args.device,
        "compute.nproc": args.nproc,
        "analysis.reference_set": args.reference_set,
    }
    flags.update(_task_flags(args))
    store_path = resolve_store_path(args.store)
    if args.resume and args.plan:
        from pipeline.errors import InputError

        raise InputError("--plan plans a new run; it does not take --resume")
    if args.resume:
        from pipeline.run.driver import resume_pipeline

        return resume_pipeline(args.resume, store_path)
    cfg = config.resolve(preset, args.config, flags)
    if args.print_config:
        print(config.to_toml(cfg))
        return 0
    if args.plan:
        import sys

        from pipeline.run.plan import format_plan, plan_before_run

        def say(message: str) -> None:
            print(f"plan: {message}", file=sys.stderr, flush=True)

        print("\n".join(format_plan(plan_before_run(cfg, store_path, say=say))))
        return 0
    from pipeline.run.driver import run_pipeline

    return run_pipeline(cfg, store_path)


def _task_flags(args) -> dict:
    """`--label-column`, `--classes` and `--filter` as config overrides (a task named after its column)."""
    from pipeline.errors import InputError

    out: dict = {}
    if args.classes and not args.label_column:
        raise InputError("--classes needs --label-column (the obs column whose values they are)")
    if args.label_column:
        task = {"name": args.label_column, "column": args.label_column}
        if args.classes:
            classes = [c.strip() for c in args.classes.split(",") if c.strip()]
            if len(classes) < 2:
                raise InputError(f"--classes {args.classes!r}: name at least two classes, separated by commas")
            task["classes"] = classes
        out["tasks"] = [task]
    if args.filter:
        filters: dict = {}
        for item in args.filter:
            column, sep, values = item.partition("=")
            if not sep or not column.strip() or not values.strip():
                raise InputError(f"--filter {item!r}: write COLUMN=VALUE1,VALUE2")
            filters.setdefault(column.strip(), []).extend(v.strip() for v in values.split(",") if v.strip())
        out["data.filter"] = filters
    return out
