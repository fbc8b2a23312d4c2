"""Stage `finetune <task>/<mode>`: one fine-tuning per task and mode, its checkpoint recorded by hash, the
bag-of-genes baseline beside it and the gate before interpretation.

The stage's recorder, `FinetuneStoreRecorder`, writes what fine-tuning reports (`pipeline.training.finetune`
never holds a store) to the finetune run under the names `store.results` owns; `gfattn finetune` records
through it too. In several processes the reports reach it over the job channel of `pipeline.parallel.launch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from pipeline.config import finetune_stages
from pipeline.paths import CHECKPOINT_JSON  # CHECKPOINT_JSON: {"path", "weights_sha256"}
from pipeline.run.stages.tokenize import task_datasets
from pipeline.training import finetune as T
from store import results as R

if TYPE_CHECKING:  # annotations only
    from pipeline.run.context import Context


# ----------------------------------------------------------------------------------------- recording
# fine-tuning's own names (`pipeline.training.finetune.FinetuneRecorder`) -> the names stored; the
# per-class metrics ("precision/high") follow `stored_metric`
STORED_SPLITS = {T.SPLIT_TRAIN: R.SPLIT_TRAIN, T.SPLIT_VALIDATION: R.SPLIT_VALIDATION, T.SPLIT_TEST: R.SPLIT_TEST}
STORED_METRICS = {
    "loss": R.METRIC_LOSS,
    "lr": R.METRIC_LR,
    "cells_per_s": R.METRIC_CELLS_PER_S,
    "accuracy": R.METRIC_ACCURACY,
    "macro_f1": R.METRIC_MACRO_F1,
}


def stored_metric(name: str) -> str:
    """The stored name of one of fine-tuning's metrics ("precision/high" -> `R.per_label_metric`)."""
    if name in STORED_METRICS:
        return STORED_METRICS[name]
    for metric in T.PER_LABEL_METRICS:
        prefix = T.per_label_key(metric, "")
        if name.startswith(prefix):
            return R.per_label_metric(metric, name[len(prefix) :])
    raise ValueError(f"fine-tuning reported a metric {name!r} that has no stored name")


class FinetuneStoreRecorder:
    """The fine-tune stage's recorder (a `pipeline.training.finetune.FinetuneRecorder`): events, progress,
    metrics and the confusion matrix of one fine-tuning, written to its finetune run `run_id`; progress is
    also handed to `on_progress(done, total, unit=, throughput=, eta_s=, message=)` (the terminal, and in a
    pipeline the pipeline run's progress row)."""

    def __init__(self, store, run_id: int, *, on_progress: Callable[..., None] | None = None):
        self.store, self.run_id, self.on_progress = store, run_id, on_progress

    def event(self, message: str) -> None:
        self.store.log_event(self.run_id, message, stage=R.STAGE_FINETUNE)

    def progress(self, done, total, *, unit: str, throughput=None, eta_s=None, message=None) -> None:
        self.store.set_progress(
            self.run_id, R.STAGE_FINETUNE, done, total, unit=unit, throughput=throughput, eta_s=eta_s
        )
        if self.on_progress is not None:
            self.on_progress(done, total, unit=unit, throughput=throughput, eta_s=eta_s, message=message)

    def metrics(self, split: str, step: int, epoch: int, values: Mapping[str, float]) -> None:
        rows = [
            {"name": stored_metric(k), "value": v, "step": step, "epoch": epoch, "split": STORED_SPLITS[split]}
            for k, v in values.items()
        ]
        self.store.log_metrics(self.run_id, rows)

    def confusion(self, split: str, labels: Sequence[str], matrix) -> None:
        matrix = np.asarray(matrix, dtype=np.int64)
        self.store.put_confusion(self.run_id, [str(x) for x in labels], matrix, split=STORED_SPLITS[split])


# ----------------------------------------------------------------------------------------- finetune
def model_out_dir(ctx: Context, task: str, mode: str) -> Path:
    """Where a fine-tuned model of this run lives: under the store's own identity, never shared."""
    from pipeline.paths import file_name

    return ctx.cache / "runs" / ctx.store.uid / str(ctx.run_id) / f"{file_name(task)}__{mode}"


PERMUTED = " (permuted labels)"


def permuted_parts(parts: dict, seed: int) -> dict:
    """The training and validation cells with their labels permuted (seeded; test cells keep theirs): the
    label-permutation control of the sanity checks, same cells, classes and class sizes."""
    out = dict(parts)
    for i, split in enumerate(("train", "validation")):
        labels = np.asarray(parts[split]["label"])
        shuffled = np.random.default_rng([int(seed), 104, i]).permutation(labels)
        out[split] = parts[split].remove_columns("label").add_column("label", shuffled.tolist())
    return out


def stage_finetune(ctx: Context, task: str, mode: str, *, permuted: bool = False) -> None:
    """Fine-tune one (task, mode) and record metrics, confusion and the best model (thesis 2.3, 4.1).
    With `permuted`, on permuted training labels (`permuted_parts`), as the mode "<mode> (permuted labels)"."""
    key = mode + (PERMUTED if permuted else "")
    name = finetune_name(task, mode, permuted)
    out_dir = model_out_dir(ctx, task, mode + ("__permuted" if permuted else ""))
    mode, train_mode = key, mode
    done = ctx.completed_child(name, R.KIND_FINETUNE)
    if done is not None:
        recorded = _recorded_checkpoint(ctx, done)
        if recorded is not None and recorded.get("path") == str(out_dir):
            ctx.out.checkpoint_hashes[(task, mode)] = T.verify_checkpoint(out_dir, recorded.get("weights_sha256"))
            ctx.rep.line(f"{name}: already fine-tuned (resumed), checkpoint verified")
            ctx.out.models[(task, mode)] = out_dir
            gate = R.model_gate(ctx.store, done)
            if gate is not None:
                ctx.out.gates[(task, mode)] = gate
            return
        ctx.store.delete_run(done)  # completed without a usable checkpoint record: fine-tune again
    from pipeline.parallel.launch import finetune_model

    parts, names = task_datasets(ctx, task)
    if permuted:
        parts = permuted_parts(parts, ctx.seed)
    t = ctx.cfg["train"]
    tc = T.TrainConfig(
        lr=float(t["lr"]) if not (train_mode == "frozen" and t["head_lr"]) else float(t["head_lr"]),
        weight_decay=float(t["weight_decay"]),
        warmup_ratio=float(t["warmup_ratio"]),
        epochs=int(t["epochs"]),
        min_steps=int(t["min_steps"]),
        max_epochs=int(t["max_epochs"]),
        patience=int(t["patience"]),
        batch_size=int(t["batch_size"]),
        grad_accum=int(t["grad_accum"]),
        class_weights=bool(t["class_weights"]),
        seed=ctx.seed,
        device=ctx.device,
        amp=t["amp"],
        max_len=ctx.out.max_len,
    )
    child = ctx.new_child(
        name,
        R.KIND_FINETUNE,
        {"task": task, "mode": mode, "labels": names, "train": t},
        model_path=str(ctx.out.model_dir),
    )
    with ctx.store.track(child):
        ctx.store.put_labels(child, task, names)
        result = finetune_model(
            ctx.out.model_dir,
            parts,
            label_names=names,
            mode=train_mode,
            config=tc,
            nproc=int(ctx.cfg["compute"]["nproc"]),
            recorder=FinetuneStoreRecorder(ctx.store, child, on_progress=ctx.rep.update),
            out_dir=out_dir,
            dicts=ctx.out.dicts,
            load_options={"max_len": ctx.out.max_len},
            workers=start_finetune_workers(ctx),
        )
        digest = T.recorded_weights_hash(out_dir)
        ctx.store.put_json(child, CHECKPOINT_JSON, {"path": str(out_dir), "weights_sha256": digest})
        T.save_split(out_dir, ctx.out.selection.cell_ids, ctx.out.split, data=ctx.out.data_path)
        acc, f1 = result.test_metrics["accuracy"], result.test_metrics["macro_f1"]
        ctx.rep.line(f"{name}: test accuracy {acc:.3f}, macro-F1 {f1:.3f} (best epoch {result.best_epoch})")
        if not permuted and result.test_predictions is not None:
            _baseline_and_gate(ctx, child, task, mode, parts, names, result, step=len(result.history))
    ctx.out.models[(task, mode)] = out_dir
    ctx.out.checkpoint_hashes[(task, mode)] = digest


def finetune_name(task: str, mode: str, permuted: bool = False) -> str:
    """The fine-tuning child run's name (and its stage's, after "finetune "): `<task>/<mode>`, with
    PERMUTED for the model trained on permuted labels."""
    return f"{task}/{mode}{PERMUTED if permuted else ''}"


def start_finetune_workers(ctx: Context, *, early: bool = False):
    """With `compute.nproc` above 1, the run's fine-tuning processes (`pipeline.parallel.launch.JobWorkers`),
    one torchrun launch for every model the run fine-tunes; `close_finetune_workers` ends them. `early`
    (once the cells are tokenized): only where a model is left to fine-tune, so that the processes' start
    runs beside the record stage; otherwise at the latest at the first model fine-tuned. None in one
    process."""
    nproc = int(ctx.cfg["compute"]["nproc"])
    if nproc <= 1:
        return None
    if early and ctx.out.finetune_workers is None:
        children = ctx.store.children(ctx.run_id)
        done = {c["name"] for c in children if c["kind"] == R.KIND_FINETUNE and c["status"] == "completed"}
        if all(finetune_name(*stage) in done for stage in finetune_stages(ctx.cfg)):
            return None  # a resumed run with every model fine-tuned
    if ctx.out.finetune_workers is None:
        from pipeline.parallel.launch import finetune_workers

        ctx.out.finetune_workers = finetune_workers(nproc)
        ctx.rep.line(f"fine-tuning in {nproc} processes (torchrun), started once for the run's models")
    return ctx.out.finetune_workers


def close_finetune_workers(ctx: Context) -> None:
    """Stop the run's fine-tuning processes (after the last fine-tuning, or the run interrupted): on GPUs
    they hand their devices' memory back before the analysis."""
    workers, ctx.out.finetune_workers = ctx.out.finetune_workers, None
    if workers is not None:
        workers.close()


def _baseline_and_gate(ctx: Context, child: int, task: str, mode: str, parts, names, result, *, step: int) -> None:
    """Beside the model, on the same cells: the gene-set logistic regression and the majority-class rate
    (`pipeline.training.baseline`); then the gate before interpretation (did the model learn?), stored on the child
    and, when it did not, a warning kept on the run."""
    from pipeline.training.baseline import gene_set_baseline, learning_gate

    base = gene_set_baseline(
        parts,
        len(names),
        len(ctx.out.dicts.token_dict),
        special_ids=ctx.out.dicts.special_ids,
        seed=ctx.seed,
        balanced=bool(ctx.cfg["train"]["class_weights"]),
    )
    y_test = np.asarray(parts["test"]["label"], dtype=np.int64)
    gate = learning_gate(y_test, result.test_predictions, names, seed=ctx.seed)
    values = {
        R.METRIC_BASELINE_ACCURACY: base.accuracy,
        R.METRIC_BASELINE_MACRO_F1: base.macro_f1,
        R.METRIC_MAJORITY_RATE: base.majority_rate,
        R.METRIC_BALANCED_ACCURACY: gate["balanced_accuracy"],
    }
    ctx.store.log_metrics(
        child,
        [
            {"name": k, "value": float(v), "step": step, "epoch": result.best_epoch, "split": R.SPLIT_TEST}
            for k, v in values.items()
        ],
    )
    ctx.store.put_json(child, R.JSON_GATE, gate)
    ctx.out.gates[(task, mode)] = gate
    ctx.rep.line(
        f"{task}/{mode}: baseline (logistic regression on the gene sets) accuracy {base.accuracy:.3f}, "
        f"macro-F1 {base.macro_f1:.3f}; majority class {base.majority_rate:.3f}; model balanced accuracy "
        f"{gate['balanced_accuracy']:.3f} (95% CI {gate['balanced_accuracy_ci'][0]:.3f}-"
        f"{gate['balanced_accuracy_ci'][1]:.3f}, chance {gate['chance']:.3f})"
    )
    if not gate["learned"]:
        ctx.warn(
            "gate",
            f"{task}/{mode} did not learn: {'; '.join(gate['reasons'])}; its key genes are not findings",
            task=task,
            mode=mode,
        )


def _did_not_learn(ctx: Context, task: str, mode: str) -> bool:
    gate = ctx.out.gates.get((task, mode))
    return gate is not None and not gate.get("learned", True)


def _recorded_checkpoint(ctx: Context, run_id: int) -> dict | None:
    try:
        return ctx.store.get_json(run_id, CHECKPOINT_JSON)
    except Exception:
        return None
