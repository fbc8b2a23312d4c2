"""Stages `model <task>: <mode>` and `attention <task>: <a> vs <b>`: each model analysed once (its own
attention pass, attribution, deletion, randomisation cascade), then each pair compared and given both
models' results."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.compute import fault_point
from pipeline.config import model_analysis_on
from pipeline.run.stages.de import _de_for
from pipeline.run.stages.finetune import PERMUTED, _did_not_learn
from pipeline.run.stages.tokenize import task_datasets

if TYPE_CHECKING:  # annotations only
    from pipeline.run.context import Context


def analysis_cells(ctx: Context, task: str):
    """The test cells every analysis of `task` reads (each model's and each pair's): the task's test split,
    at most `analysis.max_cells` of them drawn with the run's seed."""
    from pipeline.tokenize.cells import subsample

    parts, _ = task_datasets(ctx, task)
    return subsample(parts["test"], int(ctx.cfg["analysis"]["max_cells"]), ctx.seed)


# ----------------------------------------------------------------------------------- one model
def stage_model_analysis(ctx: Context, task: str, mode: str, pairs: list[str]) -> None:
    """One model's analysis, once per run however many pairs compare it: its own attention pass (the gene
    table its rankings come from), attribution, deletion and the randomisation cascade, into a "model"
    child run (`results.model_analysis_name`) that every pair's analysis run reads (`_copy_model_results`).

    Each of these is a function of the model and the task's analysis cells alone: the gene table is the
    model's own (`pipeline.analysis.pair.gene_table` of a one-model attention pass; its key-score fit is
    per model), never the pair's, whose row order follows the other model's key score."""
    from pipeline.analysis.attention import analyze_attention
    from pipeline.analysis.pair import gene_table
    from pipeline.models.load import load_for_attention
    from pipeline.training.finetune import verify_checkpoint
    from store import results as R

    name = R.model_analysis_name(task, mode)
    used = f"used by {len(pairs)} pair{'s' if len(pairs) != 1 else ''} ({'; '.join(pairs)})"
    if ctx.completed_child(name, R.KIND_MODEL) is not None:
        ctx.rep.line(f"{name}: already analysed (resumed), {used}")
        return
    import torch

    a_cfg = ctx.cfg["analysis"]
    test = analysis_cells(ctx, task)
    path = ctx.out.models[(task, mode)]
    verify_checkpoint(path, ctx.out.checkpoint_hashes.get((task, mode)))
    child = ctx.new_child(
        name, R.KIND_MODEL, {"task": task, "model": mode, "pairs": pairs, "analysis": a_cfg, "cells": len(test)}
    )
    fault_point("stage", f"model {name}")
    with ctx.store.track(child):
        model = load_for_attention(path)  # attention, attribution and deletion leave the weights as they are
        result = analyze_attention(
            model,
            None,
            test,
            pad_id=ctx.out.dicts.pad_id,
            special_ids=ctx.out.dicts.special_ids,
            group_column="group_name",
            batch_size=int(a_cfg["batch_size"]),
            device=ctx.device,
            dtype=torch.float32,
            names=(mode,),
            progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
        )
        genes = gene_table(result, ctx.out.dicts.id_to_gene, ctx.out.dicts.id_to_symbol)  # columns `_a`
        del result
        attribution = _attribution(ctx, child, task, test, mode, model, genes)
        _deletion(ctx, child, task, test, mode, model, genes, attribution)
        del model
        _sanity(ctx, child, task, test, mode, genes, attribution)
        ctx.store.put_gene_table(child, R.TABLE_GENES, genes)
        ctx.store.put_json(child, R.JSON_MODEL_ANALYSIS, {"task": task, "model": mode, "pairs": pairs})
    ctx.rep.line(f"{name}: analysed once, {used}")


def _gate_skips(ctx: Context, task: str, mode: str, what: str) -> bool:
    """Whether `analysis.gate = "skip"` leaves out this costly analysis of a model that did not learn (said
    in the run log); with "mark" it is computed and shown as no findings."""
    if not _did_not_learn(ctx, task, mode):
        return False
    if ctx.cfg["analysis"]["gate"] == "mark":
        ctx.rep.line(f"{task}: {what} of {mode} computed, but {mode} did not learn: no findings (analysis.gate mark)")
        return False
    ctx.rep.line(f"{task}: {what} of {mode} skipped: the model did not learn (analysis.gate skip)")
    return True


# The model analysis's own gene table is a one-model table: its columns end in "_a" (`MODEL_SUFFIX`).
MODEL_SUFFIX = "a"


def _attribution(ctx: Context, child: int, task: str, test, mode: str, model, genes):
    """Attribution (Hao et al., integrated gradients, rollout) of one model on the analysis's test cells,
    written with its agreement with the model's attention and with DE; returns the `AttributionResult`."""
    methods = tuple(ctx.cfg["analysis"]["attribution"])
    if not methods:
        return None
    from pipeline.analysis.attribution import run_attribution, write_attribution
    from pipeline.tokenize.cells import Cells
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    labels = np.asarray(test["label"], dtype=np.int64)
    result = run_attribution(
        model,
        Cells(test),
        labels,
        methods=methods,
        dicts=ctx.out.dicts,
        hao_steps=int(a_cfg["hao_steps"]),
        ig_steps=int(a_cfg["ig_steps"]),
        ig_max_steps=int(a_cfg["ig_max_steps"]),
        ig_gap_p95=float(a_cfg["ig_gap_p95"]),
        batch_size=int(a_cfg["batch_size"]),
        device=ctx.device,
        seed=ctx.seed,
        progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
    )
    ig = result.meta.get("ig") or {}
    if ig.get("gap_converged") is False:
        ctx.warn(
            "integrated_gradients",
            f"{task}/{mode}: integrated gradients' 95th percentile completeness gap"
            f" {ig['gap_p95_tried'][-1]:.1%} stays above {ig['gap_p95_threshold']:.0%} at {ig['steps']}"
            " steps (analysis.ig_max_steps); its per-token scores are approximate",
            task=task,
            mode=mode,
        )
    doc = write_attribution(
        ctx.store,
        child,
        result,
        dicts=ctx.out.dicts,
        model_name=mode,
        de=_de_for(ctx, task),
        attention_genes=genes,
        attention_columns=(R.col_attn(MODEL_SUFFIX),),
    )
    gap = (doc.get("completeness") or {}).get("relative_gap_total")
    ctx.rep.line(
        f"{task}: attribution of {mode} ({', '.join(methods)}) on {len(labels)} cells"
        + (f"; integrated gradients' completeness gap {gap:.2%}" if gap is not None else "")
    )
    return result


def _one_vs_rest_overlaps(ctx: Context, child: int, task: str, genes) -> None:
    """A task with several DE comparisons (one-vs-rest per class): the key genes' overlap with each, as
    `by_group` of the `de_overlap` document (its top level: the first comparison)."""
    tables = {(g, ref): de for (t, g, ref), de in ctx.out.de.items() if t == task}
    if len(tables) < 2:
        return
    from pipeline.analysis.keygenes import key_score_column
    from pipeline.analysis.pair import compare_de_attention
    from store import results as R
    from store.jsonsafe import plain

    a_cfg = ctx.cfg["analysis"]
    column = key_score_column("b" if key_score_column("b") in genes.columns else "a")
    by_group = {}
    for (group, reference), de in tables.items():
        by_group[f"{group} vs {reference}"] = compare_de_attention(
            de,
            genes,
            genes["ensembl_id"].tolist(),
            ks=a_cfg["top_k"],
            attention_column=column,
            null_bins=tuple(a_cfg["null_bins"]),
            null_permutations=int(a_cfg["null_permutations"]),
            seed=ctx.seed,
        )
    first = next(iter(by_group))
    ctx.store.put_json(child, R.JSON_DE_OVERLAP, plain({**by_group[first], "group": first, "by_group": by_group}))


def _deletion(ctx: Context, child: int, task: str, test, mode: str, model, genes, attribution) -> None:
    """In-silico deletion of the model's top genes by every score (and of matched random sets) from the
    test cells, and single-gene deletion of each score's top genes (`pipeline.analysis.deletion`). The rankings
    come from the model's own gene table (`stage_model_analysis`), so every pair reads the same result."""
    a_cfg = ctx.cfg["analysis"]
    if not a_cfg["deletion"] or _gate_skips(ctx, task, mode, "deletion"):
        return
    from pipeline.analysis.deletion_report import run_deletion, write_deletion

    labels = np.asarray(test["label"], dtype=np.int64)
    suffix = MODEL_SUFFIX
    result = run_deletion(
        model,
        test,
        labels,
        genes=genes,
        suffix=suffix,
        attribution=attribution,
        de=_de_for(ctx, task),
        dicts=ctx.out.dicts,
        ks=tuple(int(k) for k in a_cfg["deletion_k"]),
        n_random=int(a_cfg["deletion_random_sets"]),
        max_random=int(a_cfg["deletion_max_random_sets"]),
        match_pool=int(a_cfg["deletion_match_pool"]),
        top_genes=int(a_cfg["deletion_top_genes"]),
        null_bins=tuple(a_cfg["null_bins"]),
        n_boot=int(a_cfg["n_boot"]),
        device=ctx.device,
        seed=ctx.seed,
    )
    doc = write_deletion(ctx.store, child, result, model_name=mode, suffix=suffix, genes=genes)
    ctx.rep.line(f"{task}: deletion from {mode}: " + doc["headline"])


def _sanity(ctx: Context, child: int, task: str, test, mode: str, genes, attribution) -> None:
    """Cascading randomisation of one model (Adebayo et al. 2018): how its key-gene scores change as the
    head, then the layers top down, then the embeddings are re-initialised."""
    if not ctx.cfg["analysis"]["sanity"] or _gate_skips(ctx, task, mode, "randomisation cascade"):
        return
    from pipeline.analysis.attribution import attribution_gene_table
    from pipeline.analysis.keygenes import min_cells_for
    from pipeline.analysis.sanity import ATTENTION_SCORES, FLAG_RHO, randomisation_cascade
    from pipeline.models.load import load_for_attention
    from pipeline.training.finetune import verify_checkpoint
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    labels = np.asarray(test["label"], dtype=np.int64)
    methods = tuple(a_cfg["attribution"]) if a_cfg["sanity_attribution"] else ()
    suffix = MODEL_SUFFIX
    trained = genes.set_index("ensembl_id")[["symbol", "n_cells", *[f"{c}_{suffix}" for c in ATTENTION_SCORES]]]
    trained = trained.rename(columns={f"{c}_{suffix}": c for c in ATTENTION_SCORES})
    if attribution is not None:
        table = attribution_gene_table(attribution, ctx.out.dicts.id_to_gene).set_index("ensembl_id")
        trained = trained.join(table[[f"{m}_mean" for m in methods]], how="left")
    scoring = dict(
        dicts=ctx.out.dicts,
        methods=methods if attribution is not None else (),
        hao_steps=int(a_cfg["hao_steps"]),
        ig_steps=int(a_cfg["ig_steps"]),
        batch_size=int(a_cfg["batch_size"]),
        device=ctx.device,
        seed=ctx.seed,
    )
    doc = randomisation_cascade(
        load_for_attention(ctx.out.models[(task, mode)]),  # re-initialised in place: a copy of its own
        test,
        labels,
        min_cells=min_cells_for(len(labels)),
        trained_scores=trained,
        progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="randomisation steps", **kw),
        **scoring,
    )
    doc["model"] = mode
    permuted = ctx.out.models.get((task, mode + PERMUTED))
    if permuted is not None:
        from pipeline.analysis.sanity import compare_scores, key_gene_scores

        verify_checkpoint(permuted, ctx.out.checkpoint_hashes.get((task, mode + PERMUTED)))
        scores = key_gene_scores(load_for_attention(permuted), test, labels, **scoring)
        doc["label_permutation"] = compare_scores(trained, scores, min_cells=min_cells_for(len(labels)))
        doc["label_permutation_flagged"] = [
            c for c, v in doc["label_permutation"].items() if (v.get("spearman") or 0.0) >= FLAG_RHO
        ]
    ctx.store.put_json(child, R.json_sanity(mode), doc)
    flagged = ", ".join(doc["flagged"]) or "none"
    ctx.rep.line(f"{task}: randomisation cascade of {mode}: scores that survive randomisation: {flagged}")


# ------------------------------------------------------------------------------------ a pair reads
def _model_gene_columns(suffix: str) -> list[str]:
    """The columns of a model's gene table that a pair's gene table carries (`write_deletion`'s)."""
    from store import results as R

    logit = R.col_deletion_logit(suffix)
    return [logit, logit + "_low", logit + "_high", R.col_deletion_prob(suffix)]


def _copy_model_results(ctx: Context, child: int, task: str, mode: str, suffix: str, genes) -> None:
    """Write one model's analysis (its "model" run) onto a pair's analysis run, under the names the pair
    always had: every gene table (but its own `genes`), vector, grid and JSON document as stored, the
    attribution's agreement naming the pair's attention column (`attn_<suffix>`), and the single-gene
    deletion columns added to the pair's gene table `genes` (in place) with the pair's suffix."""
    from store import results as R

    st = ctx.store
    unit = ctx.completed_child(R.model_analysis_name(task, mode), R.KIND_MODEL)
    if unit is None:
        raise RuntimeError(f"the analysis of {task}/{mode} is missing; resume the run to compute it")
    for table in st.gene_tables(unit):
        if table != R.TABLE_GENES:
            st.put_gene_table(child, table, st.gene_table_df(unit, table))
    for name in st.vector_names(unit):
        meta = {k: v for k, v in st.vector_meta(unit, name).items() if k not in ("dtype", "shape")}
        st.put_vector(child, name, st.vector(unit, name), meta=meta)
    for name in st.grid_names(unit):
        grid = st.grid(unit, name)
        st.put_grid(child, name, grid["values"], lower=grid["lower"], upper=grid["upper"])
    own_column, pair_column = R.col_attn(MODEL_SUFFIX), R.col_attn(suffix)
    for name in st.json_names(unit):
        if name == R.JSON_MODEL_ANALYSIS:
            continue
        doc = st.get_json(unit, name)
        if name == R.json_attribution(mode) and own_column != pair_column:
            for pair in (doc.get("agreement") or {}).get("pairs", []):
                for side in ("a", "b"):
                    if pair.get(side) == own_column:
                        pair[side] = pair_column
        st.put_json(child, name, doc)
    own = st.gene_table_df(unit, R.TABLE_GENES).set_index("token_id")
    token = genes["token_id"].astype(np.int64)
    for own_name, pair_name in zip(_model_gene_columns(MODEL_SUFFIX), _model_gene_columns(suffix)):
        if own_name in own.columns:
            genes[pair_name] = token.map(own[own_name]).astype(float)


# --------------------------------------------------------------------------------------- attention
def stage_attention(ctx: Context, task: str, mode_a: str, mode_b: str) -> None:
    """Weight- and norm-based attention of two fine-tuned models on the test cells (thesis 3.3-4.5), and
    each model's attribution, deletion and cascade read from its model analysis (`stage_model_analysis`)."""
    name = f"{task}: {mode_a} vs {mode_b}"
    if ctx.completed_child(name, "analysis") is not None:
        ctx.rep.line(f"{name}: already analysed (resumed)")
        return
    import torch

    from pipeline.analysis.pair import adjust_overlap_family, run_pair_analysis
    from pipeline.models.load import load_for_attention
    from pipeline.training.finetune import verify_checkpoint
    from store import results as R

    a_cfg = ctx.cfg["analysis"]
    test = analysis_cells(ctx, task)
    models = ctx.out.models
    for mode in (mode_a, mode_b):  # the checkpoints are the ones this run fine-tuned and recorded
        verify_checkpoint(models[(task, mode)], ctx.out.checkpoint_hashes.get((task, mode)))
    child = ctx.new_child(
        name, "analysis", {"task": task, "model_a": mode_a, "model_b": mode_b, "analysis": a_cfg, "cells": len(test)}
    )
    fault_point("stage", f"attention {name}")
    with ctx.store.track(child):
        model_a = load_for_attention(models[(task, mode_a)])
        model_b = load_for_attention(models[(task, mode_b)])
        summary = run_pair_analysis(
            ctx.store,
            child,
            model_a,
            model_b,
            test,
            dicts=ctx.out.dicts,
            names=(mode_a, mode_b),
            group_column="group_name",
            de=_de_for(ctx, task),
            reference_set=a_cfg["reference_set"] or None,
            top_k=a_cfg["top_k"],
            null_bins=tuple(a_cfg["null_bins"]),
            null_permutations=int(a_cfg["null_permutations"]),
            n_boot=int(a_cfg["n_boot"]),
            batch_size=int(a_cfg["batch_size"]),
            device=ctx.device,
            dtype=torch.float32,
            seed=ctx.seed,
            progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
        )
        del model_a, model_b
        for line in summary.get("frequency_warnings", []):
            ctx.rep.line(f"warning: {line}")
        genes = ctx.store.gene_table_df(child, R.TABLE_GENES)  # read once; deletion adds its columns
        _one_vs_rest_overlaps(ctx, child, task, genes)
        if model_analysis_on(ctx.cfg):
            for mode, suffix in zip((mode_a, mode_b), R.MODEL_SUFFIXES):
                _copy_model_results(ctx, child, task, mode, suffix, genes)
            if a_cfg["deletion"]:
                ctx.store.put_gene_table(child, R.TABLE_GENES, genes)
            ctx.rep.line(f"{name}: attribution, deletion and cascade of each model read from its analysis")
        # q-values over the pair's overlap tests; its deletion tests' q come from the run's whole family
        # (`adjust_run_deletion_family`, once every model is analysed)
        adjust_overlap_family(ctx.store, child)
    ctx.rep.line(f"{name}: analysed {len(test)} test cells")
