"""`gfattn runs`: list the runs in the experiment store (docs/architecture.md, "The store").

Also holds `open_store`, the way every store command opens the store: an existing store only (read-only
for the commands that only read, so a shared store in a read-only folder can be browsed), and store
problems the user can fix (no store there, a newer schema, a network filesystem, a read-only store for
a command that writes, an unknown run) reported as one-line `InputError`s (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from pipeline.errors import InputError
from pipeline.paths import add_store_argument

__all__ = ["add_store_argument", "open_store", "resolve_run"]


@contextmanager
def open_store(store_arg: str | None, *, create: bool = False, readonly: bool = False) -> Iterator[object]:
    """Open the store named by `--store` (or the default); StoreError becomes InputError.

    `readonly=True` (runs, show, export) never migrates or writes: see `store.Store`."""
    from pipeline import paths
    from store import StoreError

    try:
        st = paths.open_store(store_arg, create=create and not readonly, readonly=readonly)
    except StoreError as exc:
        raise InputError(str(exc)) from None
    try:
        yield st
    except StoreError as exc:
        raise InputError(str(exc)) from None
    finally:
        st.close()


def resolve_run(st, ref: str) -> int:
    from store import StoreError

    try:
        return st.resolve_run(ref)
    except StoreError as exc:
        raise InputError(str(exc)) from None


def format_time(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def run_duration(run: dict, now: float | None = None) -> float | None:
    end = run.get("finished")
    if end is None:
        end = (now or time.time()) if run.get("status") == "running" else run.get("heartbeat")
    return None if end is None else end - run["created"]


def _tree_order(runs: list[dict]) -> list[tuple[dict, int]]:
    """Top-level runs newest first, each followed by its children (oldest first), indented."""
    by_parent: dict[int | None, list[dict]] = {}
    ids = {r["id"] for r in runs}
    for r in runs:
        parent = r["parent_id"] if r["parent_id"] in ids else None
        by_parent.setdefault(parent, []).append(r)
    out: list[tuple[dict, int]] = []

    def walk(parent: int | None, depth: int) -> None:
        kids = by_parent.get(parent, [])
        kids = sorted(kids, key=lambda r: r["id"], reverse=(depth == 0))
        for r in kids:
            out.append((r, depth))
            walk(r["id"], depth + 1)

    walk(None, 0)
    return out


def format_table(runs: list[dict], *, tree: bool = True) -> str:
    if not runs:
        return "no runs"
    now = time.time()
    rows = _tree_order(runs) if tree else [(r, 0) for r in runs]
    header = ("ID", "NAME", "KIND", "STATUS", "CREATED", "TIME", "TAGS")
    table = [header]
    for r, depth in rows:
        name = ("  " * (depth - 1) + "└ " if depth else "") + r["name"]
        if len(name) > 48:
            name = name[:47] + "…"
        table.append(
            (
                str(r["id"]),
                name,
                r["kind"],
                r["status"],
                format_time(r["created"]),
                format_duration(run_duration(r, now)),
                ",".join(r["tags"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status", choices=["running", "completed", "failed", "interrupted", "lost"], help="only runs with this status"
    )
    parser.add_argument(
        "--name", metavar="GLOB", help="only runs whose name matches this shell pattern (e.g. 'dose/*')"
    )
    parser.add_argument("--tag", help="only runs carrying this tag")
    parser.add_argument("--kind", help="only runs of this kind (pipeline, data, finetune, analysis, ...)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N runs (newest first)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    add_store_argument(parser)


def run(args: argparse.Namespace) -> int:
    from store.export import jsonable

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    with open_store(args.store, readonly=True) as st:
        runs = st.list_runs(status=args.status, name_glob=args.name, tag=args.tag, kind=args.kind, limit=args.limit)
    if args.json:
        json.dump(jsonable(runs), sys.stdout, indent=1, ensure_ascii=False, allow_nan=False)
        sys.stdout.write("\n")
    else:
        filtered = any(v is not None for v in (args.status, args.name, args.tag, args.kind, args.limit))
        print(format_table(runs, tree=not filtered))
    return 0
