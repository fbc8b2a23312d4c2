"""The short text summary `gfattn pipeline` prints at the end, read back from the store."""

from __future__ import annotations

import numpy as np

from store import results as R


def _grid_text(values: np.ndarray) -> list[str]:
    layers, heads = values.shape
    lines = ["        " + " ".join(f"h{h:<5d}" for h in range(heads))]
    for layer in range(layers):
        lines.append(f"  L{layer:<4d} " + " ".join(f"{v:6.3f}" for v in values[layer]))
    return lines


def format_summary(store, run_id: int, elapsed_s: float | None = None, top_n: int = 10) -> str:
    scope = R.collect_scope(store, run_id, depth=1)
    run = scope.run
    lines = [
        f"run {run_id} '{run['name']}' {run['status']}"
        + (f" in {elapsed_s:.0f} s" if elapsed_s is not None else "")
        + f"; store {store.path}"
    ]
    finetunes = [R.read_finetune(store, c) for c in scope.of_kind(R.KIND_FINETUNE)]
    if finetunes:
        lines.append("")
        lines.append("test accuracy / macro-F1 per task and mode:")
        for ft in finetunes:
            if ft.accuracy is not None:
                f1 = f"{ft.macro_f1:6.3f}" if ft.macro_f1 is not None else f"{'-':>6}"
                lines.append(f"  {ft.name:<24} {ft.accuracy:6.3f}  {f1}")
    for c in scope.analyses:
        an = R.read_pair_analysis(store, c)
        lines.append("")
        lines.append(f"{an.name}:")
        if R.GRID_COSINE in an.grids:
            lines.append("  attention cosine similarity per layer (rows) and head (columns):")
            lines += ["  " + ln for ln in _grid_text(an.grids[R.GRID_COSINE].values)]
        for suffix, model in zip(R.MODEL_SUFFIXES, an.models):
            genes = R.top_genes(store, an.run_id, R.col_attn(suffix), top_n)
            if genes:
                lines.append(f"  top attended genes, {model}: {', '.join(genes)}")
        parts = []
        for item in (an.de_overlap or {}).get("overlap", []):
            parts.append(f"k={item['k']}: {item['overlap']} (p={item['p_value']:.2g})")
        if parts:
            lines.append("  top attended vs top DE genes: " + "; ".join(parts))
    return "\n".join(lines)
