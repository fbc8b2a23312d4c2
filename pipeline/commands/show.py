"""`gfattn show RUN`: everything about one run, its metrics and result summaries, and its child runs.

`--json` prints the document described in `store.Store.show`; without it, a readable summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.commands.runs import (
    add_store_argument,
    format_duration,
    format_time,
    open_store,
    resolve_run,
    run_duration,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id or exact run name (the newest run of that name)")
    parser.add_argument("--json", action="store_true", help="print the JSON document (shape: see Store.show)")
    add_store_argument(parser)


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_show(doc: dict, depth: int = 0, extra: dict | None = None) -> str:
    """The readable summary; `extra` maps run ids to further lines shown under that run (key genes)."""
    pad = "    " * depth
    extra = extra or {}
    r = doc["run"]
    lines = [f"{pad}run {r['id']}  {r['name']}  [{r['kind']}]  {r['status']}"]
    info = [
        ("created", format_time(r["created"])),
        ("time", format_duration(run_duration(r))),
        ("parent", r["parent_id"]),
        ("tags", ", ".join(r["tags"]) or None),
        ("note", r["note"]),
        ("error", r["error"]),
        ("host/pid", f"{r['host']} / {r['pid']}" if r.get("host") else None),
        ("device", r["device"]),
        ("git", r["git_commit"][:12] if r.get("git_commit") else None),
        ("data", r["data_path"]),
        ("model", r["model_path"]),
    ]
    if r.get("progress"):
        p = r["progress"]
        total = f"/{_num(p['total'])}" if p.get("total") is not None else ""
        info.append(("progress", f"{p['stage']}: {_num(p['done'])}{total} {p.get('unit') or ''}".rstrip()))
    for k, v in info:
        if v not in (None, "", "-") or k in ("created", "time"):
            lines.append(f"{pad}  {k:<9} {v}")
    if depth == 0 and r.get("config"):
        cfg = json.dumps(r["config"], ensure_ascii=False, sort_keys=True)
        lines.append(f"{pad}  {'config':<9} {cfg if len(cfg) <= 200 else cfg[:199] + '…'}")
    if doc["stages"]:
        lines.append(f"{pad}  stages    " + "  ".join(f"{s['stage']}:{s['status']}" for s in doc["stages"]))
    if doc["metrics"]:
        lines.append(f"{pad}  metrics (last value; n rows)")
        for m in doc["metrics"]:
            label = m["name"] + (f" [{m['split']}]" if m["split"] else "")
            lines.append(f"{pad}    {label:<32} {_num(m['last']):>10}   n={m['count']}")
    for c in doc["confusions"]:
        lines.append(f"{pad}  confusion [{c['split']}] (rows true, columns predicted)")
        width = max([len(x) for x in c["labels"]] + [6])
        lines.append(f"{pad}    {'':<{width}} " + " ".join(f"{x:>{width}}" for x in c["labels"]))
        for label, row in zip(c["labels"], c["matrix"]):
            lines.append(f"{pad}    {label:<{width}} " + " ".join(f"{_num(v):>{width}}" for v in row))
    if doc["grids"]:
        lines.append(
            f"{pad}  grids     " + ", ".join(f"{g['name']} {g['shape'][0]}x{g['shape'][1]}" for g in doc["grids"])
        )
    if doc["vectors"]:
        lines.append(
            f"{pad}  vectors   " + ", ".join(f"{v['name']} {'x'.join(map(str, v['shape']))}" for v in doc["vectors"])
        )
    if doc["gene_tables"]:
        lines.append(f"{pad}  genes     " + ", ".join(f"{t['name']} ({t['rows']} rows)" for t in doc["gene_tables"]))
    if doc["labels"]:
        lines.append(f"{pad}  labels    " + "; ".join(f"{k}: {', '.join(v)}" for k, v in doc["labels"].items()))
    if doc["split_counts"]:
        lines.append(f"{pad}  split     " + ", ".join(f"{k} {v}" for k, v in doc["split_counts"].items()))
    if doc["cells"]["rows"]:
        lines.append(f"{pad}  cells     {doc['cells']['rows']} rows: {', '.join(doc['cells']['columns'])}")
    if doc["json"]:
        lines.append(f"{pad}  results   " + ", ".join(doc["json"]))
    if doc["events"]["count"]:
        last = doc["events"]["last"][-1]
        lines.append(f"{pad}  events    {doc['events']['count']} (last: {last['message'].splitlines()[0][:80]})")
    lines += [pad + line for line in extra.get(r["id"], [])]
    for child in doc["children"]:
        lines.append("")
        lines.append(format_show(child, depth + 1, extra))
    return "\n".join(lines)


def _runs(doc: dict):
    yield doc["run"]
    for child in doc["children"]:
        yield from _runs(child)


def run(args: argparse.Namespace) -> int:
    with open_store(args.store, readonly=True) as st:
        doc = st.show(resolve_run(st, args.run))
        if args.json:
            json.dump(doc, sys.stdout, indent=1, ensure_ascii=False, allow_nan=False)
            sys.stdout.write("\n")
            return 0
        from pipeline.report.summary import (
            attribution_lines,
            checkpoint_check_lines,
            deletion_lines,
            finetune_gate_lines,
            key_gene_table_lines,
            key_score_fit_lines,
            overlap_lines,
            warning_lines,
        )
        from store import results as R

        extra = {}
        for r in _runs(doc):
            if r["kind"] == R.KIND_PIPELINE:
                lines = warning_lines(st, r["id"]) + checkpoint_check_lines(st, r["id"])
                extra[r["id"]] = ["  " + line for line in lines]
            elif r["kind"] == R.KIND_FINETUNE:
                extra[r["id"]] = finetune_gate_lines(st, r["id"])
            elif r["kind"] == R.KIND_ANALYSIS:
                models = [m for m in st.json_names(r["id"]) if m.startswith("deletion_")]
                docs = R.read_json(st, r["id"], (R.JSON_DE_OVERLAP, R.JSON_KEY_GENES))
                lines = overlap_lines(docs.get(R.JSON_DE_OVERLAP))
                lines += key_score_fit_lines(docs.get(R.JSON_KEY_GENES) or {}, ())
                names = (docs.get(R.JSON_KEY_GENES) or {}).get("models") or {}
                for suffix, model in names.items():
                    lines += attribution_lines(st, r["id"], model, R.col_attn(suffix))
                lines += key_gene_table_lines(st, r["id"])
                for name in models:
                    lines += deletion_lines(st, r["id"], st.get_json(r["id"], name).get("model", ""))
                extra[r["id"]] = lines
    print(format_show(doc, extra=extra))
    return 0
