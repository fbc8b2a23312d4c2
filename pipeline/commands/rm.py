"""`gfattn rm RUN`: delete a run, its child runs and all their results from the experiment store."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands.runs import add_store_argument, open_store, resolve_run
from pipeline.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id or exact run name")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_store_argument(parser)


def run(args: argparse.Namespace) -> int:
    with open_store(args.store) as st:
        run_id = resolve_run(st, args.run)
        info = st.get_run(run_id)
        n_desc = len(st.descendants(run_id))
        what = f"run {run_id} ({info['name']!r}, {info['status']})" + (
            f" and its {n_desc} child runs" if n_desc else ""
        )
        if info["status"] == "running":
            what += "; it is still running"
        if not args.yes:
            if not sys.stdin.isatty():
                raise InputError(f"refusing to delete {what} without confirmation; pass --yes")
            answer = input(f"delete {what}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("nothing deleted")
                return 1
        deleted = st.delete_run(run_id)
    print(f"deleted {len(deleted)} run(s): {', '.join(map(str, deleted))}")
    return 0
