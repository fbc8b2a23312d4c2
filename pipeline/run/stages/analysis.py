"""Stages `model <task>: <mode>` and `attention <task>: <a> vs <b>`: each model analysed once (its own
attention pass, attribution, deletion, randomisation cascade), then each pair compared and given both
models' results."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.analysis.model import MODEL_SUFFIX
from pipeline.compute import fault_point
from pipeline.config import analysis_processes, model_analysis_on
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
    table its rankings come from), attribution, deletion and the randomisation cascade
    (`pipeline.analysis.model.analyse_model`, in one process or sharded over `analysis_processes`), recorded
    into a "model" child run (`results.model_analysis_name`) that every pair's analysis run reads
    (`_copy_model_results`).

    Each of these is a function of the model and the task's analysis cells alone: the gene table is the
    model's own (`pipeline.analysis.pair.gene_table` of a one-model attention pass; its key-score fit is
    per model), never the pair's, whose row order follows the other model's key score."""
    from pipeline.analysis.model import analyse_model
    from pipeline.training.finetune import verify_checkpoint
    from store import results as R

    name = R.model_analysis_name(task, mode)
    used = f"used by {len(pairs)} pair{'s' if len(pairs) != 1 else ''} ({'; '.join(pairs)})"
    if ctx.completed_child(name, R.KIND_MODEL) is not None:
        ctx.rep.line(f"{name}: already analysed (resumed), {used}")
        return
    a_cfg = ctx.cfg["analysis"]
    test = analysis_cells(ctx, task)
    path = ctx.out.models[(task, mode)]
    verify_checkpoint(path, ctx.out.checkpoint_hashes.get((task, mode)))
    permuted = ctx.out.models.get((task, mode + PERMUTED))
    if permuted is not None:
        verify_checkpoint(permuted, ctx.out.checkpoint_hashes.get((task, mode + PERMUTED)))
    nproc = analysis_processes(ctx.cfg)
    child = ctx.new_child(
        name,
        R.KIND_MODEL,
        {"task": task, "model": mode, "pairs": pairs, "analysis": a_cfg, "cells": len(test)},
    )
    fault_point("stage", f"model {name}")
    with ctx.store.track(child):
        deletion, sanity = _parts(ctx, task, mode, say=True)

        def progress(done, total, **kw):
            ctx.rep.update(done, total, **kw)

        if nproc > 1:
            ctx.rep.line(f"{name}: analysed in {nproc} processes (torchrun), the cells' batches shared out")
            result = _sharded(ctx, task, mode, test).result((task, mode), progress)
        else:
            result = analyse_model(
                path,
                test,
                dicts=ctx.out.dicts,
                analysis=a_cfg,
                de=_de_for(ctx, task),
                seed=ctx.seed,
                device=ctx.device,
                deletion=deletion,
                sanity=sanity,
                permuted_path=permuted,
                progress=progress,
            )
        record_model_analysis(ctx, child, task, mode, result, n_cells=len(test))
        ctx.store.put_json(child, R.JSON_MODEL_ANALYSIS, {"task": task, "model": mode, "pairs": pairs})
    ctx.rep.line(f"{name}: analysed once, {used}")


def _parts(ctx: Context, task: str, mode: str, *, say: bool = False) -> tuple[bool, bool]:
    """Whether the model's deletion and randomisation cascade run (the configuration and the gate); `say`:
    the gate's line in the run log."""
    a_cfg = ctx.cfg["analysis"]

    def skips(what: str) -> bool:
        if say:
            return _gate_skips(ctx, task, mode, what)
        return _did_not_learn(ctx, task, mode) and a_cfg["gate"] != "mark"

    deletion = bool(a_cfg["deletion"]) and not skips("deletion")
    sanity = bool(a_cfg["sanity"]) and not skips("randomisation cascade")
    return deletion, sanity


def _pending_models(ctx: Context, task: str) -> list[str]:
    """The task's models whose analysis is not yet recorded (all of them, unless the run was resumed)."""
    from pipeline.config import analysed_models
    from store import results as R

    done = {
        c["name"] for c in ctx.store.children(ctx.run_id) if c["kind"] == R.KIND_MODEL and c["status"] == "completed"
    }
    return [m for m in analysed_models(ctx.cfg) if R.model_analysis_name(task, m) not in done]


def start_analysis_workers(ctx: Context) -> None:
    """With `compute.analysis_nproc` above 1 and models left to analyse, start the run's `AnalysisWorkers`
    now (called once the cells are tokenized), so that their start-up runs beside the record and fine-tuning
    stages; `close_analysis_workers` ends them."""
    from pipeline.config import analysed_tasks

    nproc = analysis_processes(ctx.cfg)
    if nproc <= 1 or not model_analysis_on(ctx.cfg) or ctx.out.analysis_workers is not None:
        return
    if not any(_pending_models(ctx, task) for task in analysed_tasks(ctx.cfg)):
        return
    from pipeline.parallel.analyse import AnalysisWorkers

    ctx.out.analysis_workers = AnalysisWorkers(
        device=ctx.cfg["compute"]["device"], nproc=nproc, threads=int(ctx.cfg["compute"]["threads"])
    )


def _sharded(ctx: Context, task: str, mode: str, test):
    """The run's `AnalysisWorkers`, with every model of `task` not yet analysed handed over at the task's
    first model stage (one batch: the task's cells, DE table and configuration)."""
    start_analysis_workers(ctx)
    workers = ctx.out.analysis_workers
    if (task, mode) in workers.uids:
        return workers
    units = []
    for other in _pending_models(ctx, task):
        deletion, sanity = _parts(ctx, task, other)
        permuted = ctx.out.models.get((task, other + PERMUTED))
        units.append(
            {
                "key": (task, other),
                "model_path": str(ctx.out.models[(task, other)]),
                "permuted_path": None if permuted is None else str(permuted),
                "deletion": deletion,
                "sanity": sanity,
            }
        )
    workers.submit(units, test, dicts=ctx.out.dicts, analysis=ctx.cfg["analysis"], de=_de_for(ctx, task), seed=ctx.seed)
    return workers


def close_analysis_workers(ctx: Context) -> None:
    """Stop the run's `AnalysisWorkers` and remove their work folder (done, or the run interrupted)."""
    workers, ctx.out.analysis_workers = ctx.out.analysis_workers, None
    if workers is not None:
        workers.close()


def record_model_analysis(ctx: Context, child: int, task: str, mode: str, result, *, n_cells: int) -> None:
    """The recorder of one model's analysis (`pipeline.analysis.model.ModelAnalysis`): attribution with its
    agreement with attention and DE, deletion, the cascade and the model's gene table, as `Records` under the
    names `store.results` owns, written into the model's run; with the run log's lines and warnings."""
    from pipeline.analysis.attribution import attribution_records
    from pipeline.analysis.deletion_report import deletion_records
    from store import results as R
    from store.records import Records

    genes = result.genes
    records = Records()
    methods = tuple(ctx.cfg["analysis"]["attribution"])
    if result.attribution is not None:
        ig = result.attribution.meta.get("ig") or {}
        if ig.get("gap_converged") is False:
            ctx.warn(
                "integrated_gradients",
                f"{task}/{mode}: integrated gradients' 95th percentile completeness gap"
                f" {ig['gap_p95_tried'][-1]:.1%} stays above {ig['gap_p95_threshold']:.0%} at {ig['steps']}"
                " steps (analysis.ig_max_steps); its per-token scores are approximate",
                task=task,
                mode=mode,
            )
        attribution = attribution_records(
            result.attribution,
            dicts=ctx.out.dicts,
            model_name=mode,
            de=_de_for(ctx, task),
            attention_genes=genes,
            attention_columns=(R.col_attn(MODEL_SUFFIX),),
        )
        records.extend(attribution)
        doc = attribution.json(R.json_attribution(R.attr_model_key(mode)))
        gap = (doc.get("completeness") or {}).get("relative_gap_total")
        ctx.rep.line(
            f"{task}: attribution of {mode} ({', '.join(methods)}) on {n_cells} cells"
            + (f"; integrated gradients' completeness gap {gap:.2%}" if gap is not None else "")
        )
    if result.deletion is not None:
        deletion = deletion_records(result.deletion, model_name=mode, suffix=MODEL_SUFFIX, genes=genes)
        records.extend(deletion)
        ctx.rep.line(f"{task}: deletion from {mode}: " + deletion.json(R.json_deletion(mode))["headline"])
    if result.sanity is not None:
        doc = dict(result.sanity, model=mode)
        records.put_json(R.json_sanity(mode), doc)
        flagged = ", ".join(doc["flagged"]) or "none"
        ctx.rep.line(f"{task}: randomisation cascade of {mode}: scores that survive randomisation: {flagged}")
    records.put_gene_table(R.TABLE_GENES, genes)
    records.write(ctx.store, child)


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


# ------------------------------------------------------------------------------------ a pair reads
def _model_gene_columns(suffix: str) -> list[str]:
    """The columns of a model's gene table that a pair's gene table carries (`deletion_records`')."""
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
        out = run_pair_analysis(
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
        out["records"].write(ctx.store, child)
        summary = out["records"].json(R.JSON_SUMMARY)
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
