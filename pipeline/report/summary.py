"""The short text summary `gfattn pipeline` prints at the end, read back from the store."""

from __future__ import annotations

import numpy as np

from store import results as R

# The thesis's test accuracies (section 4.1): lowhigh 0.85 frozen (linear probing) and 0.91 unfrozen,
# dose (5 classes) 0.5 for both; it trained no last-1 model.
THESIS_ACCURACY: dict[str, dict[str, float]] = {
    R.TASK_LOWHIGH: {R.MODE_FROZEN: 0.85, R.MODE_UNFROZEN: 0.91},
    R.TASK_DOSE: {R.MODE_FROZEN: 0.5, R.MODE_UNFROZEN: 0.5},
}
COMPARED_MODES = (R.MODE_FROZEN, R.MODE_UNFROZEN, "last-1")


def _grid_text(values: np.ndarray) -> list[str]:
    layers, heads = values.shape
    lines = ["        " + " ".join(f"h{h:<5d}" for h in range(heads))]
    for layer in range(layers):
        lines.append(f"  L{layer:<4d} " + " ".join(f"{v:6.3f}" for v in values[layer]))
    return lines


def is_thesis_design(cfg: dict) -> bool:
    """Whether a pipeline run asked the thesis's questions (the sci-Plex presets' tasks: the five doses and
    low vs high, on synthetic or real data), so that its accuracies can stand beside the thesis's."""
    from pipeline.config import SCIPLEX_TASKS

    tasks = [{k: v for k, v in t.items() if k != "scale"} for t in (cfg.get("tasks") or [])]
    return tasks == SCIPLEX_TASKS


def comparison_lines(finetunes: list, thesis: bool) -> list[str]:
    """One line per task: test accuracy of frozen vs unfrozen vs last-1 and what fine-tuning the encoder
    added over the frozen probe; with `thesis`, the thesis's numbers beside them."""
    by_task: dict[str, dict[str, float]] = {}
    for ft in finetunes:
        if ft.accuracy is not None:
            by_task.setdefault(ft.task, {})[ft.mode] = float(ft.accuracy)
    lines = []
    for task in sorted(by_task, key=lambda t: (R.TASK_ORDER.get(t, 2), t)):
        acc = by_task[task]
        modes = [m for m in COMPARED_MODES if m in acc]
        if len(modes) < 2:
            continue
        ref = THESIS_ACCURACY.get(task, {}) if thesis else {}
        parts = []
        for mode in modes:
            text = f"{mode} {acc[mode]:.3f}"
            if thesis:
                text += f" (thesis {ref[mode]:.2f})" if mode in ref else " (thesis -)"
            parts.append(text)
        line = f"  {task:<8} " + ", ".join(parts)
        if R.MODE_FROZEN in acc and R.MODE_UNFROZEN in acc:
            line += f"; fine-tuning adds {acc[R.MODE_UNFROZEN] - acc[R.MODE_FROZEN]:+.3f}"
            if thesis and R.MODE_FROZEN in ref and R.MODE_UNFROZEN in ref:
                line += f" (thesis {ref[R.MODE_UNFROZEN] - ref[R.MODE_FROZEN]:+.2f})"
        lines.append(line)
    return lines


def format_summary(store, run_id: int, elapsed_s: float | None = None, top_n: int = 10) -> str:
    scope = R.collect_scope(store, run_id, depth=1)
    run = scope.run
    lines = [
        f"run {run_id} '{run['name']}' {run['status']}"
        + (f" in {elapsed_s:.0f} s" if elapsed_s is not None else "")
        + f"; store {store.path}"
    ]
    lines += warning_lines(store, run_id)
    lines += checkpoint_check_lines(store, run_id)
    cfg = R.run_config(run)
    if (cfg.get("data") or {}).get("path") and not (cfg.get("model") or {}).get("path"):
        from pipeline.models.pretrain import pretraining_objective

        lines.append(
            f"model: gfattn's small model, pretrained by {pretraining_objective(cfg.get('pretrain') or {})} on this "
            "data's training cells (not Geneformer)"
        )
    finetunes = [R.read_finetune(store, c) for c in scope.of_kind(R.KIND_FINETUNE)]
    gates = {(ft.task, ft.mode): R.model_gate(store, ft.run_id) for ft in finetunes}
    if finetunes:
        lines.append("")
        lines += finetune_table_lines(store, finetunes, gates)
        thesis = is_thesis_design(R.run_config(run))
        comparison = comparison_lines(finetunes, thesis)
        if comparison:
            lines.append("")
            lines.append(
                "frozen encoder vs fine-tuned, test accuracy" + (" (the thesis's beside them):" if thesis else ":")
            )
            lines += comparison
    for c in scope.analyses:
        an = R.read_pair_analysis(store, c)
        lines.append("")
        lines.append(f"{an.name}:")
        if R.GRID_COSINE in an.grids:
            lines.append("  attention cosine similarity per layer (rows) and head (columns):")
            lines += ["  " + ln for ln in _grid_text(an.grids[R.GRID_COSINE].values)]
        docs = R.read_json(store, an.run_id, (R.JSON_KEY_GENES,))
        key_genes = docs.get(R.JSON_KEY_GENES) or {}
        task = str(R.run_config(R.full_run(store, c)).get("task") or "")
        for suffix, model in zip(R.MODEL_SUFFIXES, an.models):
            mark = gate_mark(gates.get((task, model)))
            genes = R.top_genes(store, an.run_id, R.col_key_score(suffix), top_n)
            if genes:
                lines.append(f"  key genes (controlled score), {model}{mark}: {', '.join(genes)}")
            genes = R.top_genes(store, an.run_id, R.col_attn(suffix), top_n)
            if genes:
                lines.append(f"  most attended genes (summed attention), {model}{mark}: {', '.join(genes)}")
        lines += overlap_lines(an.de_overlap)
        lines += key_score_fit_lines(key_genes, an.models)
        lines += [f"  warning: {w}" for w in key_genes.get("warnings", [])]
        for suffix, model in zip(R.MODEL_SUFFIXES, an.models):
            lines += attribution_lines(store, an.run_id, model, R.col_attn(suffix))
        for model in an.models:
            lines += deletion_lines(store, an.run_id, model, mark=gate_mark(gates.get((task, model))))
        for model in an.models:
            lines += sanity_lines(store, an.run_id, model, mark=gate_mark(gates.get((task, model))))
    return "\n".join(lines)


def gate_mark(gate: dict | None) -> str:
    """ " (did not learn: not findings)" beside a model whose gate failed, else ""."""
    return " (did not learn: not findings)" if gate is not None and not gate.get("learned", True) else ""


def finetune_table_lines(store, finetunes: list, gates: dict | None = None) -> list[str]:
    """Test accuracy and macro-F1 per task and mode, each beside what the data allow without a transformer
    (the gene-set logistic regression, the majority-class rate) and the model's gate."""
    gates = gates if gates is not None else {(ft.task, ft.mode): R.model_gate(store, ft.run_id) for ft in finetunes}
    lines = [
        "test accuracy / macro-F1 per task and mode, beside the baseline (logistic regression on each cell's gene "
        "set, same cells) and the majority class:"
    ]
    width = max([24] + [len(ft.name) for ft in finetunes])
    for ft in finetunes:
        if ft.accuracy is None:
            continue
        f1 = f"{ft.macro_f1:6.3f}" if ft.macro_f1 is not None else f"{'-':>6}"
        line = f"  {ft.name:<{width}} {ft.accuracy:6.3f}  {f1}"
        base = R.baseline_scores(store, ft.run_id)
        if base[R.METRIC_BASELINE_ACCURACY] is not None:
            line += (
                f"   baseline {base[R.METRIC_BASELINE_ACCURACY]:.3f} / {base[R.METRIC_BASELINE_MACRO_F1]:.3f},"
                f" majority {base[R.METRIC_MAJORITY_RATE]:.3f}"
            )
        gate = gates.get((ft.task, ft.mode))
        if gate is not None and not gate.get("learned", True):
            line += "   DID NOT LEARN: " + "; ".join(gate.get("reasons") or [])
        lines.append(line)
    return lines


def finetune_gate_lines(store, run_id: int) -> list[str]:
    """A finetune run's baseline and gate in two lines, for `gfattn show`."""
    lines = []
    base = R.baseline_scores(store, run_id)
    if base[R.METRIC_BASELINE_ACCURACY] is not None:
        lines.append(
            f"  baseline  logistic regression on the gene sets: accuracy {base[R.METRIC_BASELINE_ACCURACY]:.3f}, "
            f"macro-F1 {base[R.METRIC_BASELINE_MACRO_F1]:.3f}; majority class {base[R.METRIC_MAJORITY_RATE]:.3f}"
        )
    gate = R.model_gate(store, run_id)
    if gate is not None:
        lo, hi = gate.get("balanced_accuracy_ci") or [None, None]
        verdict = "learned" if gate.get("learned") else "DID NOT LEARN: " + "; ".join(gate.get("reasons") or [])
        ci = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None else ""
        lines.append(f"  gate      balanced accuracy {gate.get('balanced_accuracy', 0):.3f}{ci}: {verdict}")
    return lines


def checkpoint_check_lines(store, run_id: int) -> list[str]:
    """The masked-gene check of the user's checkpoint (`results.JSON_CHECKPOINT_CHECK`) in one line."""
    check = R.checkpoint_check(store, run_id)
    if check is None:
        return []
    return [
        f"checkpoint check: masked-gene top-1 {check['top1']:.3f}, top-10 {check['top10']:.3f} on "
        f"{check['cells']} of your cells (most frequent genes: {check['baseline_top1']:.3f}, "
        f"{check['baseline_top10']:.3f}; chance top-10 {check.get('chance_top10', 0):.4f})"
        + ("" if check.get("ok") else ": it knows nothing of your cells' genes")
    ]


def warning_lines(store, run_id: int) -> list[str]:
    """A pipeline run's warnings (`results.run_warnings`), one line each."""
    return [f"warning: {w['message']}" for w in R.run_warnings(store, run_id)]


def _overlap_item_text(item: dict) -> str:
    """`k=20: 3 (p=0.01, matched p=0.04, q=0.03 *)`: stars on the matched null's q (else the raw q) only."""
    text = f"k={item['k']}: {item['overlap']} (p={item['p_value']:.2g}"
    if item.get("p_matched") is not None:
        text += f", matched p={item['p_matched']:.2g}"
    q = item.get("q_matched", item.get("q_value"))
    if isinstance(q, (int, float)):
        text += f", q={q:.2g}" + (" *" if q < 0.05 else "")
    return text + ")"


def overlap_lines(doc: dict | None) -> list[str]:
    """The key genes' overlap with DE genes, for each comparison and direction in the user's class names
    (up in one class, up in the other, either direction), with raw, matched and BH-adjusted p."""
    if not doc:
        return []
    lines = []
    overlaps = doc.get("by_group") or {"": doc}
    for group, overlap in overlaps.items():
        column = overlap.get("attention_column", "")
        what = "key genes" if column.startswith("key_score") else "top attended"
        blocks = overlap.get("directions") or [{"label": "", "overlap": overlap.get("overlap", [])}]
        n = overlap.get("population", overlap.get("background"))
        head = f"  {what} vs top DE genes" + (f" ({group})" if group else "") + f", among the {n} genes the score ranks"
        cells = overlap.get("de_cells")
        head += f"; DE on {cells}" if cells else "; DE on every cell, the analysed test cells included"
        skipped = overlap.get("ks_not_tested")
        if skipped:
            head += f" (k = {', '.join(map(str, skipped))} not tested: no fewer than the genes it ranks)"
        lines.append(head + ":")
        for block in blocks:
            parts = [_overlap_item_text(item) for item in block.get("overlap", [])]
            if parts:
                lines.append(f"    {block.get('label') or 'DE'}: " + "; ".join(parts))
    family = doc.get(R.FIELD_MULTIPLICITY)
    if family:
        n_tests = (family.get("n_tests") or {}).get("p_matched") or (family.get("n_tests") or {}).get("p_value")
        lines.append(f"    q: Benjamini-Hochberg over the run's {n_tests} overlap tests; * q < 0.05")
    return lines


def key_score_fit_lines(key_genes: dict, models) -> list[str]:
    """The empirical-Bayes fit of each model's key score: prior variance, noise, share of genes shrunk, and
    a plain statement when nothing (or everything) was shrunk."""
    lines = []
    names = key_genes.get("models") or {}
    for suffix, fit in (key_genes.get("fit") or {}).items():
        if not fit or fit.get("tau2") is None:
            continue
        model = names.get(suffix, suffix)
        text = (
            f"  key score fit, {model}: prior variance tau^2={fit['tau2']:.3g}, noise s^2={fit['s2']:.3g}"
            f" over {fit.get('n_scored')} genes"
        )
        share = fit.get("share_shrunk")
        if isinstance(share, (int, float)):
            text += f"; {share:.0%} of genes shrunk by 10% or more"
        lines.append(text)
        if fit.get("note"):
            lines.append(f"    {fit['note']}")
    return lines


POOR_MATCH = 0.2  # random sets removing more than 20% more or fewer tokens per cell than the top set


def deletion_lines(store, run_id: int, model: str, mark: str = "") -> list[str]:
    """A model's set deletion in a few lines: per score, the change of the true-class probability when its
    top k genes are deleted beside matched random sets (and the empirical p); the frequency Spearmans."""
    doc = R.read_json(store, run_id, (R.json_deletion(model),)).get(R.json_deletion(model))
    if not doc or not doc.get("sets"):
        return []
    from pipeline.analysis.deletion_report import p_text

    cap = doc.get("max_random")
    sets = f"{doc.get('n_random')} per set" + (f", up to {cap} while p is at its floor" if cap else "")
    lines = [
        f"  deletion from {model}{mark}: change of the true-class probability, top k genes / matched random sets "
        f"({sets}; {doc.get('n_cells')} cells, accuracy {doc.get('accuracy_before', 0):.3f}):"
    ]
    by_score: dict[str, list[str]] = {}
    matching: dict[str, list[str]] = {}
    for row in doc["sets"]:
        rnd = row.get("random_delta_prob_mean")
        rnd_text = f"/{rnd:+.3f}" if isinstance(rnd, (int, float)) else ""
        by_score.setdefault(row["score"], []).append(
            f"k={row['k']} {row['delta_prob_mean']:+.3f}{rnd_text}{p_text(row)}"
        )
        tpc, rtpc = row.get("tokens_per_cell"), row.get("random_tokens_per_cell")
        if isinstance(tpc, (int, float)) and isinstance(rtpc, (int, float)):
            text = f"k={row['k']} {tpc:.2f}/{rtpc:.2f}"
            if abs(rtpc - tpc) > POOR_MATCH * max(tpc, 1e-12):
                text += " (!)"
            rr, rrr = row.get("read_removed"), row.get("random_read_removed")
            if isinstance(rr, (int, float)) and isinstance(rrr, (int, float)) and (rr > 0 or rrr > 0):
                text += f" (read position {rr:.0%}/{rrr:.0%})"
            matching.setdefault(row["score"], []).append(text)
    width = max(len(s) for s in by_score)
    lines += [f"    {score:<{width}}  " + "  ".join(parts) for score, parts in by_score.items()]
    if matching:
        lines.append(
            "    matching: tokens removed per cell, top set / random sets (mean over cells; (!) off by more than"
            f" {POOR_MATCH:.0%}: no other genes are as frequent; the token the classifier reads is never deleted):"
        )
        lines += [f"    {score:<{width}}  " + "  ".join(parts) for score, parts in matching.items()]
    family = doc.get(R.FIELD_MULTIPLICITY)
    if family:
        lines.append(f"    q: Benjamini-Hochberg over the run's {family.get('n_tests')} deletion tests; * q < 0.05")
    rho = doc.get("frequency_spearman") or {}
    if rho.get("deletion_effect") is not None and rho.get("key_score_same_genes") is not None:
        lines.append(
            f"    Spearman with detection frequency over the {rho.get('n_genes_deleted')} genes deleted one at a "
            f"time: deletion effect {rho['deletion_effect']:.2f}, key score {rho['key_score_same_genes']:.2f}"
        )
    return lines


def key_gene_table_lines(store, run_id: int, top_n: int = 10) -> list[str]:
    """Top genes of each model by every score, each with its single-gene deletion effect (change of the
    true-class logit over the cells expressing it), for `gfattn show`."""
    an = R.read_pair_analysis(store, run_id)
    lines = []
    for model in an.models:
        table = R.table_deletion(model)
        if table not in store.gene_tables(run_id):
            continue
        single = store.gene_table_df(run_id, table)
        if not len(single):
            continue
        effect = dict(zip(single["token_id"].astype(int), single["delta_logit_mean"].astype(float)))
        label = {
            int(t): (sym if isinstance(sym, str) and sym else ens)
            for t, sym, ens in zip(single["token_id"], single["symbol"], single["ensembl_id"])
        }
        lines.append(f"  top genes of {model} by score (single-gene deletion: change of the true-class logit)")
        doc = R.read_json(store, run_id, (R.json_deletion(model),)).get(R.json_deletion(model)) or {}
        scores = {k: [int(t) for t in v if int(t) in label] for k, v in (doc.get("top_tokens") or {}).items()}
        scores = {k: v for k, v in scores.items() if v}
        if not scores:
            continue
        width = max(len(s) for s in scores)
        for score, tokens in scores.items():
            parts = [f"{label[t]} {effect[t]:+.2f}" if np.isfinite(effect[t]) else label[t] for t in tokens[:top_n]]
            lines.append(f"    {score:<{width}}  " + ", ".join(parts))
    return lines


def sanity_lines(store, run_id: int, model: str, mark: str = "") -> list[str]:
    """The randomisation cascade of a model in two lines: each score's Spearman with the trained model's once
    everything is re-initialised, and the scores flagged as not model-dependent."""
    doc = R.read_json(store, run_id, (R.json_sanity(model),)).get(R.json_sanity(model))
    if not doc:
        return []
    last = [
        f"{col} {v['spearman'][-1]:.2f}"
        for col, v in doc.get("scores", {}).items()
        if v.get("spearman") and v["spearman"][-1] is not None
    ]
    flagged = ", ".join(doc.get("flagged", [])) or "none"
    lines = [
        f"  randomisation cascade, {model}{mark}: Spearman with the trained scores, all re-initialised: {', '.join(last)}",
        f"    not model-dependent (rho >= 0.8): {flagged}",
    ]
    perm = doc.get("label_permutation")
    if perm:
        rhos = [f"{col} {v['spearman']:.2f}" for col, v in perm.items() if v.get("spearman") is not None]
        same = ", ".join(doc.get("label_permutation_flagged", [])) or "none"
        lines.append(f"    fine-tuned on permuted labels instead: Spearman {', '.join(rhos)}; rho >= 0.8: {same}")
    return lines


def attribution_lines(store, run_id: int, model: str, attention_column: str, top_n: int = 8) -> list[str]:
    """A model's attribution in a few lines: top genes per method, agreement with attention, DE overlap."""
    attr = R.read_attribution(store, run_id, model)
    if attr is None:
        return []
    info = attr.info
    lines = [f"  attribution, {model}:"]
    for method, genes in (info.get("top_genes") or {}).items():
        lines.append(f"    top genes by {method}: {', '.join(map(str, genes[:top_n]))}")
    rhos = [
        f"{p['a'].removesuffix('_mean')} {p['spearman']:.2f}"
        for p in (info.get("agreement") or {}).get("pairs", [])
        if p.get("b") == attention_column and p.get("spearman") is not None
    ]
    if rhos:
        lines.append(f"    Spearman with attention received: {', '.join(rhos)}")
    de_parts = []
    for method, cmp in (info.get("de") or {}).items():
        hit = next((o for o in cmp.get("overlap", []) if o.get("k") == 20), None)
        if hit is not None:
            de_parts.append(f"{method} {_overlap_item_text(hit).removeprefix('k=20: ')}")
    if de_parts:
        first = next(iter((info.get("de") or {}).values()), {})
        label = next((d.get("label") for d in first.get("directions") or [] if d.get("direction") == "up"), None)
        lines.append(f"    top-20 overlap with DE genes{' ' + label if label else ''}: {', '.join(de_parts)}")
    comp = info.get("completeness") or {}
    gap = comp.get("relative_gap_total")
    if gap is not None:
        text = f"    integrated gradients' completeness gap {gap:.2%}"
        if comp.get("relative_gap_p95") is not None:
            text += (
                f"; per cell: median {comp['relative_gap_median']:.2%}, 95th percentile {comp['relative_gap_p95']:.2%}"
            )
        ig = (info.get("parameters") or {}).get("ig") or {}
        if ig.get("steps"):
            text += f" ({ig['steps']} steps)"
        lines.append(text)
        if ig.get("gap_converged") is False:
            lines.append(
                f"    warning: integrated gradients' 95th percentile gap stays above {ig.get('gap_p95_threshold'):.0%}"
                f" at {ig.get('steps')} steps (the cap): its per-token scores are approximate"
            )
    lines += [f"    warning: {w}" for w in info.get("warnings", [])]
    return lines
