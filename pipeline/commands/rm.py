"""`gfattn rm RUN`: delete a run, its child runs and all their results from the experiment store, and the
files it owns: a pipeline run's fine-tuned models under `.gfattn-cache/runs/<store uid>/<run>/` (a
fine-tuning child's own folder when only the child is deleted). A run still running in a live process
is refused: stop it first (its files are in use, and it would go on writing to a run that is gone)."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands.runs import add_store_argument, open_store, resolve_run
from pipeline.errors import InputError
from pipeline.paths import run_folders


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
        running = [r for r in [run_id, *st.descendants(run_id)] if st.get_run(r)["status"] == "running"]
        if running:
            r = st.get_run(running[0])
            raise InputError(
                f"run {running[0]} ({r['name']!r}) is still running (pid {r.get('pid')} on {r.get('host')}); "
                f"stop it first (Ctrl-C where it runs, `kill {r.get('pid')}`, or the TUI's stop), then delete it"
            )
        owned = run_folders(st, run_id)
        if not args.yes:
            if not sys.stdin.isatty():
                raise InputError(f"refusing to delete {what} without confirmation; pass --yes")
            answer = input(f"delete {what}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("nothing deleted")
                return 1
        deleted = st.delete_run(run_id)
    import shutil

    for folder in owned:
        shutil.rmtree(folder, ignore_errors=True)
    removed = f"; removed {len(owned)} checkpoint folder(s)" if owned else ""
    print(f"deleted {len(deleted)} run(s): {', '.join(map(str, deleted))}{removed}")
    return 0
