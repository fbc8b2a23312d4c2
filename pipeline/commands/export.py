"""`gfattn export RUN --out DIR`: every table of a run and of its child runs, as csv, parquet or json.

One file per table plus `manifest.json` (see `store.export`); the files hold every row that
`gfattn show` summarises.
"""

from __future__ import annotations

import argparse

from pipeline.commands.runs import add_store_argument, open_store, resolve_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id or exact run name (the newest run of that name)")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder to write the tables into (created)")
    parser.add_argument("--format", choices=["csv", "parquet", "json"], default="csv", help="file format (default csv)")
    add_store_argument(parser)


def run(args: argparse.Namespace) -> int:
    with open_store(args.store, readonly=True) as st:
        run_id = resolve_run(st, args.run)
        paths = st.export(run_id, args.out, args.format)
    n = len(paths) - 1  # the manifest is not a table
    print(f"exported run {run_id}: {n} table{'' if n == 1 else 's'} to {args.out} (see manifest.json)")
    return 0
