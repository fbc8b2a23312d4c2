"""The short text summary `gfattn pipeline` prints at the end, read back from the store."""

from __future__ import annotations

import numpy as np


def _grid_text(values: np.ndarray) -> list[str]:
    layers, heads = values.shape
    lines = ["        " + " ".join(f"h{h:<5d}" for h in range(heads))]
    for layer in range(layers):
        lines.append(f"  L{layer:<4d} " + " ".join(f"{v:6.3f}" for v in values[layer]))
    return lines


def format_summary(store, run_id: int, elapsed_s: float | None = None, top_n: int = 10) -> str:
    run = store.get_run(run_id)
    children = store.children(run_id)
    lines = [f"run {run_id} '{run['name']}' {run['status']}"
             + (f" in {elapsed_s:.0f} s" if elapsed_s is not None else "")
             + f"; store {store.path}"]
    finetunes = [c for c in children if c["kind"] == "finetune"]
    if finetunes:
        lines.append("")
        lines.append("test accuracy / macro-F1 per task and mode:")
        for c in finetunes:
            metrics = {m["name"]: m["value"] for m in store.metrics(c["id"], split="test")}
            acc, f1 = metrics.get("accuracy"), metrics.get("macro_f1")
            if acc is not None:
                lines.append(f"  {c['name']:<24} {acc:6.3f}  {f1:6.3f}")
    for c in children:
        if c["kind"] != "analysis":
            continue
        lines.append("")
        lines.append(f"{c['name']}:")
        if "cosine" in store.grid_names(c["id"]):
            lines.append("  attention cosine similarity per layer (rows) and head (columns):")
            lines += ["  " + ln for ln in _grid_text(store.grid(c["id"], "cosine")["values"])]
        cfg = c.get("config") or store.get_run(c["id"]).get("config") or {}
        names = (cfg.get("model_a", "a"), cfg.get("model_b", "b"))
        if "genes" in store.gene_tables(c["id"]):
            columns = store.gene_table_columns(c["id"], "genes")
            for suffix, model in zip(("a", "b"), names):
                col = f"attn_{suffix}"
                if col in columns:
                    rows = store.gene_table(c["id"], "genes", order_by=col, descending=True, limit=top_n)
                    genes = ", ".join(str(r.get("symbol") or r["ensembl_id"]) for r in rows)
                    lines.append(f"  top attended genes, {model}: {genes}")
        if "de_overlap" in store.json_names(c["id"]):
            ov = store.get_json(c["id"], "de_overlap")
            parts = []
            for item in ov.get("overlap", []):
                parts.append(f"k={item['k']}: {item['overlap']} (p={item['p_value']:.2g})")
            if parts:
                lines.append("  top attended vs top DE genes: " + "; ".join(parts))
    return "\n".join(lines)
