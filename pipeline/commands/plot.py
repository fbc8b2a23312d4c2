"""`gfattn plot RUN --out DIR`: the thesis's figures of a run as PNG and SVG."""

from __future__ import annotations

import argparse

from pipeline.paths import add_store_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="pipeline run id or name")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the figures")
    add_store_argument(p)


def run(args) -> int:
    from pipeline.errors import InputError
    from pipeline.paths import resolve_store_path
    from pipeline.report.plot import plot_run
    from store import Store

    path = resolve_store_path(args.store)
    store = Store(path, create=False, readonly=True)  # a StoreError is one line and exit 2 (pipeline.cli)
    try:
        run_id = store.resolve_run(args.run)
    except Exception as exc:
        raise InputError(f"no run {args.run!r} in {path} ({exc}); list them with `gfattn runs`") from None
    written = plot_run(store, run_id, args.out)
    for p in written:
        print(p)
    return 0
