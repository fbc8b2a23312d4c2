"""`gfattn compare A B`: two pipeline runs side by side, e.g. the thesis's experiment at variable and at
fixed length (`--fixed-length N`, thesis 5.1): test accuracy per task and mode with B - A, each analysis's
cosine, key genes and their overlap with DE; `--out DIR` also draws the figure (accuracy bars, the
rank curves of both runs overlaid, DE overlap against k). Read through `store.results`, as the TUI's
Compare screen reads.
"""

from __future__ import annotations

import argparse

from pipeline.commands.runs import add_store_argument, open_store, resolve_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="A", help="first pipeline run (id or name)")
    parser.add_argument("run_b", metavar="B", help="second pipeline run (id or name)")
    parser.add_argument("--out", metavar="DIR", help="also write the comparison figure (PNG and SVG) here")
    add_store_argument(parser)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _p(item: dict) -> str:
    """Raw and matched p, and the run's BH q (stars on q only)."""
    matched = item.get("p_matched")
    text = f"p={item['p_value']:.2g}" + (f", matched p={matched:.2g}" if matched is not None else "")
    q = item.get("q_matched", item.get("q_value"))
    if isinstance(q, (int, float)):
        text += f", q={q:.2g}" + (" *" if q < 0.05 else "")
    return text


def _gate_mark(st, row) -> str:
    """ "*" after a model that did not learn (`results.model_gate`)."""
    from store import results as R

    gate = R.model_gate(st, row.run_id) if row is not None else None
    return "*" if gate is not None and not gate.get("learned", True) else ""


def compare_text(st, a: int, b: int) -> str:
    from store import results as R

    sa, sb = R.read_results_summary(st, a), R.read_results_summary(st, b)
    name = {a: st.get_run(a)["name"], b: st.get_run(b)["name"]}
    lines = [f"A = run {a} '{name[a]}', B = run {b} '{name[b]}'"]
    for label, run_id in (("A", a), ("B", b)):
        lines += [f"{label} warning: {w['message']}" for w in R.run_warnings(st, run_id)]
    procs = R.run_process_count(st, a), R.run_process_count(st, b)
    if procs[0] != procs[1]:
        lines.append(
            f"fine-tuned in {procs[0]} process{'es' if procs[0] > 1 else ''} (A) and {procs[1]} "
            f"process{'es' if procs[1] > 1 else ''} (B): data-parallel fine-tuning composes its batches by process "
            "count, so the two are not bit-identical even with the same seed; differences include that"
        )
    lines += ["", "test accuracy / macro-F1, and the baseline's macro-F1 (logistic regression on the gene sets):"]
    rows_a = {(r.task, r.mode): r for r in sa.finetunes}
    rows_b = {(r.task, r.mode): r for r in sb.finetunes}
    lines.append(
        f"  {'task/mode':<24} {'A acc':>7} {'B acc':>7} {'B - A':>7}   {'A F1':>6} {'B F1':>6}   {'A base':>6} {'B base':>6}"
    )
    unlearned = False
    for key in sorted(set(rows_a) | set(rows_b), key=lambda k: (k[0], k[1])):
        ra, rb = rows_a.get(key), rows_b.get(key)
        acc_a, acc_b = (ra.accuracy if ra else None), (rb.accuracy if rb else None)
        diff = f"{acc_b - acc_a:+.3f}" if acc_a is not None and acc_b is not None else "-"
        base = [R.baseline_scores(st, r.run_id)[R.METRIC_BASELINE_MACRO_F1] if r else None for r in (ra, rb)]
        marks = [_gate_mark(st, r) for r in (ra, rb)]
        unlearned |= any(marks)
        lines.append(
            f"  {key[0] + '/' + key[1]:<24} {_fmt(acc_a) + marks[0]:>7} {_fmt(acc_b) + marks[1]:>7} {diff:>7}   "
            f"{_fmt(ra.macro_f1 if ra else None):>6} {_fmt(rb.macro_f1 if rb else None):>6}   "
            f"{_fmt(base[0]):>6} {_fmt(base[1]):>6}"
        )
    if unlearned:
        lines.append("  * did not learn (one class for >= 90% of test cells, or not above chance): no findings")
    heads_b = {h.name: h for h in sb.analyses}
    for ha in sa.analyses:
        hb = heads_b.get(ha.name)
        lines.append("")
        lines.append(f"{ha.name}:")
        lines.append(f"  mean attention cosine: A {_fmt(ha.cosine_mean)}, B {_fmt(hb.cosine_mean if hb else None)}")
        for suffix, model in zip(R.MODEL_SUFFIXES, ha.models):
            genes_a = ha.key_genes.get(suffix) or ha.top_genes.get(suffix, [])
            lines.append(f"  key genes, {model}: A {', '.join(genes_a[:8])}")
            if hb:
                genes_b = hb.key_genes.get(suffix) or hb.top_genes.get(suffix, [])
                lines.append(f"  {'':>{len(model) + 12}}B {', '.join(genes_b[:8])}")
        what = "key genes" if str(ha.de_attention_column or "").startswith("key_score") else "top attended"
        blocks_a = ha.de_directions or [{"direction": "up", "label": "", "overlap": ha.de_overlap}]
        blocks_b = {d.get("direction"): d for d in (hb.de_directions if hb else [])}
        if hb and not blocks_b:
            blocks_b = {"up": {"overlap": hb.de_overlap}}
        for block in blocks_a:
            ov_b = {o.get("k"): o for o in (blocks_b.get(block.get("direction")) or {}).get("overlap", [])}
            parts = []
            for o in block.get("overlap", []):
                ob = ov_b.get(o.get("k"))
                part = f"k={o['k']}: A {o['overlap']} ({_p(o)})"
                if ob:
                    part += f", B {ob['overlap']} ({_p(ob)})"
                parts.append(part)
            if parts:
                label = f" {block['label']}" if block.get("label") else ""
                lines.append(f"  {what} vs top DE genes{label}: " + "; ".join(parts))
    return "\n".join(lines)


def compare_figure(st, a: int, b: int, out_dir) -> list:
    """Accuracy per task x mode, rank curves overlaid, DE overlap against k: A solid, B dashed."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from store import results as R

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sa, sb = R.read_results_summary(st, a), R.read_results_summary(st, b)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    keys = sorted({(r.task, r.mode) for r in sa.finetunes + sb.finetunes})
    x = np.arange(len(keys))
    for offset, summary, label in ((-0.2, sa, f"A: run {a}"), (0.2, sb, f"B: run {b}")):
        acc = {(r.task, r.mode): r.accuracy for r in summary.finetunes}
        axes[0].bar(x + offset, [acc.get(k) or 0.0 for k in keys], width=0.4, label=label)
    axes[0].set_xticks(x, [f"{t}/{m}" for t, m in keys], rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    for run, summary, style in ((a, sa, "-"), (b, sb, "--")):
        for head in summary.analyses[:1]:
            an = R.read_pair_analysis(st, R.full_run(st, head.run_id))
            for suffix, model in zip(R.MODEL_SUFFIXES, an.models):
                curve = an.ranks.received.get(suffix)
                if curve is not None:
                    axes[1].plot(np.asarray(curve, dtype=float), style, label=f"run {run} {model}")
            axes[2].plot(
                [o["k"] for o in head.de_overlap],
                [o["overlap"] for o in head.de_overlap],
                style + "o",
                label=f"run {run}",
            )
    axes[1].set_xlabel("rank position")
    axes[1].set_ylabel("attention received")
    axes[1].legend(fontsize=7)
    axes[2].set_xlabel("k")
    axes[2].set_ylabel("top-k attended genes among top-k DE")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    written = []
    for ext in ("png", "svg"):
        path = out / f"compare_{a}_{b}.{ext}"
        fig.savefig(path, dpi=120)
        written.append(path)
    plt.close(fig)
    return written


def run(args: argparse.Namespace) -> int:
    with open_store(args.store) as st:
        a, b = resolve_run(st, args.run_a), resolve_run(st, args.run_b)
        print(compare_text(st, a, b))
        if args.out:
            for path in compare_figure(st, a, b, args.out):
                print(f"wrote {path}")
    return 0
