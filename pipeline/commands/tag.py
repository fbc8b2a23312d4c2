"""`gfattn tag RUN TAG`: add (or with --remove, remove) a tag on a run in the experiment store."""

from __future__ import annotations

import argparse

from pipeline.commands.runs import add_store_argument, open_store, resolve_run
from pipeline.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id or exact run name")
    parser.add_argument("tag", metavar="TAG", help="the tag (any text)")
    parser.add_argument("--remove", action="store_true", help="remove the tag instead of adding it")
    add_store_argument(parser)


def run(args: argparse.Namespace) -> int:
    if not args.tag.strip():
        raise InputError("TAG must not be empty")
    with open_store(args.store) as st:
        run_id = resolve_run(st, args.run)
        if args.remove:
            st.remove_tag(run_id, args.tag)
        else:
            st.add_tag(run_id, args.tag)
        tags = st.get_run(run_id)["tags"]
    print(f"run {run_id} tags: {', '.join(tags) if tags else '(none)'}")
    return 0
