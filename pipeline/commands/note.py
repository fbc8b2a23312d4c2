"""`gfattn note RUN TEXT`: set a run's free-text note (an empty TEXT clears it)."""

from __future__ import annotations

import argparse

from pipeline.commands.runs import add_store_argument, open_store, resolve_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id or exact run name")
    parser.add_argument("text", metavar="TEXT", help="the note (replaces the previous one; '' clears it)")
    add_store_argument(parser)


def run(args: argparse.Namespace) -> int:
    with open_store(args.store) as st:
        run_id = resolve_run(st, args.run)
        st.set_note(run_id, args.text if args.text != "" else None)
    print(f"run {run_id}: note {'set' if args.text else 'cleared'}")
    return 0
