"""The thesis experiment end to end (docs/architecture.md, "Data flow of one pipeline run").

data -> model -> tokenize -> record -> fine-tune (task x mode) -> DE -> attention (task x model pair) ->
summary. Every stage reports to the store; a pipeline run owns one child run per data set, fine-tuning,
DE and analysis.

Same seed, same numbers: every stage draws from the run's seed alone (`pipeline.compute`), so a clean
run, a run with warm caches and a run killed and resumed at any stage store identical results. A
child interrupted mid-way is restarted cleanly on `--resume` (its partial records are removed).

Nothing is recorded before the input is known to be usable: `preflight` opens the store and checks
paths, the model's config and vocabulary, obs (labels, duplicated cell IDs, the split) and every count
of the selected cells (raw integer counts, at least one cell with counts) and the gene mapping; a
problem found later in a fresh run removes that run again.

Products are cached next to the store (`.gfattn-cache/`): the synthetic data and the embedded model by
their configuration, tokenizations by data content hash + dictionaries + options (each with a sha256
manifest verified on reuse), and fine-tuned models under `runs/<store uid>/<run id>/`, so two stores in
one folder never share a checkpoint; each checkpoint's weights hash is recorded on its finetune run and
verified before it is reused (`--resume`) or analysed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.compute import pin_threads
from pipeline.config import analysed_models, analysed_tasks, finetune_stages, model_analysis_on
from pipeline.errors import InputError
from pipeline.paths import cache_dir_for_store  # CHECKPOINT_JSON: {"path", "weights_sha256"}
from pipeline.progress import Reporter
from pipeline.run.context import Context
from pipeline.run.preflight import preflight
from pipeline.run.stages.analysis import (
    close_analysis_workers,
    stage_attention,
    stage_model_analysis,
    start_analysis_workers,
)
from pipeline.run.stages.data import stage_data, stage_record_data
from pipeline.run.stages.de import de_comparisons, stage_de
from pipeline.run.stages.finetune import (
    PERMUTED,
    close_finetune_workers,
    finetune_name,
    stage_finetune,
    start_finetune_workers,
)
from pipeline.run.stages.model import stage_model
from pipeline.run.stages.tokenize import stage_checkpoint_check, stage_tokenize

DETERMINISM_JSON = "determinism"  # json result on a pipeline run: `pipeline.compute.determinism_report`
REAL_DATA_PRESET = "sciplex2-nutlin"  # a preset that needs the user's data (--data or --tokenized)


DETERMINISM_JSON = "determinism"  # json result on a pipeline run: `pipeline.compute.determinism_report`


# ----------------------------------------------------------------------------------------- driver
def _stages(ctx: Context) -> None:
    cfg = ctx.cfg

    def stage(name: str):
        # Libraries reset the OpenMP pool torch shares (scanpy's UMAP leaves it at the core count), and
        # CPU results depend on the thread count: every stage starts from the run's own count.
        pin_threads(ctx.threads)
        return ctx.rep.stage(name)

    with stage("data"):
        stage_data(ctx)
    with stage("model"):
        stage_model(ctx)
    with stage("tokenize"):
        stage_tokenize(ctx)
    if cfg["model"]["path"]:
        with stage("checkpoint"):
            stage_checkpoint_check(ctx)
    from pipeline.run.plan import record_plan

    # JSON `plan` on the run: work and estimated time per stage, the stages' first ETAs
    record_plan(ctx, de_comparisons(cfg, ctx.out.selection), PERMUTED)
    # the processes of fine-tuning and of a sharded analysis in N processes start beside the stages before them
    start_finetune_workers(ctx, early=True)
    start_analysis_workers(ctx)
    try:
        _stages_after_tokenize(ctx, stage)
    finally:
        close_finetune_workers(ctx)
        close_analysis_workers(ctx)
    if analysed_tasks(cfg) and cfg["analysis"]["deletion"]:
        from pipeline.analysis.deletion_report import adjust_run_deletion_family

        adjust_run_deletion_family(ctx.store, ctx.run_id)  # BH q over every deletion test of the run


def _stages_after_tokenize(ctx: Context, stage) -> None:
    cfg = ctx.cfg
    with stage("record"):
        stage_record_data(ctx)
    try:  # every model fine-tuned in N processes by the same processes, ended before the analysis
        for task, mode, permuted in finetune_stages(cfg):
            with stage(f"finetune {finetune_name(task, mode, permuted)}"):
                stage_finetune(ctx, task, mode, permuted=permuted)
    finally:
        close_finetune_workers(ctx)
    comparisons = de_comparisons(cfg, ctx.out.selection)
    if not comparisons:
        ctx.rep.skip("de", "analysis.de is off" if ctx.has_counts else "a tokenized dataset has no counts to test")
    for task, group, reference in comparisons:
        label = "de" if len(comparisons) == 1 else f"de {task}: {group} vs {reference}"
        with stage(label):
            stage_de(ctx, task, group, reference)
    for task in analysed_tasks(cfg):
        if model_analysis_on(cfg):  # each model once, whatever the number of pairs comparing it
            for mode, pairs in analysed_models(cfg).items():
                with stage(f"model {task}: {mode}"):
                    stage_model_analysis(ctx, task, mode, pairs)
        for mode_a, mode_b in cfg["analysis"]["pairs"]:
            with stage(f"attention {task}: {mode_a} vs {mode_b}"):
                stage_attention(ctx, task, mode_a, mode_b)


def quiet_library_warnings():
    """Library warnings that gfattn's code answers itself never reach the terminal raw: scipy's constant-input
    warnings (a correlation with a constant ranking is undefined; the callers store it as missing) and
    scikit-learn's convergence and undefined-metric warnings (the baseline caps its iterations; metrics
    count an undefined ratio as 0)."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    from scipy import stats

    for name in ("ConstantInputWarning", "NearConstantInputWarning", "DegenerateDataWarning"):
        category = getattr(stats, name, None)
        if category is not None:
            warnings.filterwarnings("ignore", category=category)
    try:
        from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning

        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        pass
    return stack


def open_store(store_path):
    """The store a pipeline writes to, opened before anything else so a bad `--store` fails first."""
    from pipeline import paths

    return paths.open_store(store_path)


def run_pipeline(cfg: dict, store_path, *, resume_id: int | None = None, stdout=None, store=None) -> int:
    """Run (or resume) the experiment; returns the exit code (0 done, 1 failed, 2 bad input, 130 interrupted)."""
    import sys

    from pipeline.compute import configure_determinism, determinism_report, pin_threads, resolve_device
    from pipeline.io import DiskFullError, remove_stale_temporaries
    from store import StoreFullError

    stdout = stdout or sys.stdout
    store = store or open_store(store_path)
    pre = preflight(cfg, cache_dir_for_store(store_path))
    device = pre.device
    threads = pin_threads(int(cfg["compute"]["threads"]) or None)
    configure_determinism(resolve_device(device))
    cache = cache_dir_for_store(store_path)
    for sub in ("data", "models", "tokenized"):
        remove_stale_temporaries(cache / sub)
    name = cfg["run"]["name"] or f"{cfg['run']['preset']} {time.strftime('%Y-%m-%d %H:%M')}"
    fresh = resume_id is None
    if fresh:
        run_id = store.create_run(
            name,
            "pipeline",
            cfg,
            data_path=cfg["data"]["path"] or None,
            model_path=cfg["model"]["path"] or None,
            device=device,
            tags=[cfg["run"]["preset"]],
        )
    else:
        run_id = resume_id
        store.reopen_run(run_id)
        name = store.get_run(run_id)["name"]
    store.put_json(run_id, DETERMINISM_JSON, determinism_report(resolve_device(device), threads))
    rep = Reporter(store, run_id)
    ctx = Context(
        cfg=cfg, store=store, run_id=run_id, rep=rep, cache=cache, device=device, preflight=pre, threads=threads
    )
    rep.line(f"run {run_id} '{name}' in store {Path(store_path).resolve()} on {device}")
    if device == "cuda":
        rep.line(
            "CUDA: deterministic algorithms requested; some kernels may still vary in the last bits "
            "(see the run's determinism record)",
            level="warning",
        )
    t0 = time.monotonic()
    try:
        with store.track(run_id), quiet_library_warnings():
            _stages(ctx)
    except InputError:
        rep.close()
        if fresh:  # bad input found after recording: leave no half-written run behind
            import shutil

            store.delete_run(run_id)
            shutil.rmtree(cache / "runs" / store.uid / str(run_id), ignore_errors=True)
        raise
    except KeyboardInterrupt:
        rep.close()
        print(f"run {run_id} interrupted; continue it with `gfattn pipeline --resume {run_id}`", file=sys.stderr)
        return 130
    except (DiskFullError, StoreFullError) as exc:
        rep.close()
        print(f"run {run_id} failed: {exc} (`gfattn pipeline --resume {run_id}`)", file=sys.stderr)
        return 1
    except Exception as exc:
        rep.close()
        from pipeline.io import is_disk_full

        if _run_deleted(store, run_id):  # `gfattn rm` or the TUI deleted it: there is nothing to resume
            import shutil

            shutil.rmtree(cache / "runs" / store.uid / str(run_id), ignore_errors=True)
            print(
                f"run {run_id} was deleted from the store while it ran; it stopped (nothing to resume)", file=sys.stderr
            )
            return 1
        if is_disk_full(exc):
            print(
                f"run {run_id} failed: out of disk space under {cache} ({exc}); free space and continue with "
                f"`gfattn pipeline --resume {run_id}`",
                file=sys.stderr,
            )
            return 1
        print(f"run {run_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"continue it with `gfattn pipeline --resume {run_id}` once fixed", file=sys.stderr)
        if os.environ.get("GFATTN_TRACEBACK"):
            raise
        return 1
    finally:
        rep.close()
    from pipeline.report.summary import format_summary

    print(format_summary(store, run_id, elapsed_s=time.monotonic() - t0), file=stdout)
    return 0


def _run_deleted(store, run_id: int) -> bool:
    from store import RunNotFoundError

    try:
        store.get_run(run_id)
    except RunNotFoundError:
        return True
    except Exception:  # the store itself failing says nothing about the run
        return False
    return False


def resume_pipeline(ref: str, store_path) -> int:
    store = open_store(store_path)
    try:
        run_id = store.resolve_run(ref)
    except Exception as exc:
        raise InputError(f"no run {ref!r} in store {store_path}: {exc}") from None
    run = store.get_run(run_id)
    if run["kind"] != "pipeline":
        raise InputError(f"run {ref} is a {run['kind']} run; --resume takes a pipeline run")
    if run["status"] == "completed":
        raise InputError(f"run {ref} already completed; start a new run instead")
    if run["status"] == "running":
        raise InputError(f"run {ref} is still running (pid {run.get('pid')} on {run.get('host')})")
    return run_pipeline(run["config"], store_path, resume_id=run_id, store=store)
