"""Stage `finetune <task>/<mode>`: one fine-tuning per task and mode, its checkpoint recorded by hash, the
bag-of-genes baseline beside it and the gate before interpretation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.paths import CHECKPOINT_JSON  # CHECKPOINT_JSON: {"path", "weights_sha256"}
from pipeline.run.stages.tokenize import task_datasets

if TYPE_CHECKING:  # annotations only
    from pipeline.run.context import Context


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
    from pipeline.training.finetune import recorded_weights_hash, verify_checkpoint

    key = mode + (PERMUTED if permuted else "")
    name = f"{task}/{key}"
    out_dir = model_out_dir(ctx, task, mode + ("__permuted" if permuted else ""))
    mode, train_mode = key, mode
    done = ctx.completed_child(name, "finetune")
    if done is not None:
        recorded = _recorded_checkpoint(ctx, done)
        if recorded is not None and recorded.get("path") == str(out_dir):
            ctx.out.checkpoint_hashes[(task, mode)] = verify_checkpoint(out_dir, recorded.get("weights_sha256"))
            ctx.rep.line(f"{name}: already fine-tuned (resumed), checkpoint verified")
            ctx.out.models[(task, mode)] = out_dir
            from store import results as R

            gate = R.model_gate(ctx.store, done)
            if gate is not None:
                ctx.out.gates[(task, mode)] = gate
            return
        ctx.store.delete_run(done)  # completed without a usable checkpoint record: fine-tune again
    from pipeline.models.load import load_classifier
    from pipeline.training.finetune import TrainConfig, finetune

    parts, names = task_datasets(ctx, task)
    if permuted:
        parts = permuted_parts(parts, ctx.seed)
    t = ctx.cfg["train"]
    tc = TrainConfig(
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
        name, "finetune", {"task": task, "mode": mode, "labels": names, "train": t}, model_path=str(ctx.out.model_dir)
    )
    with ctx.store.track(child):
        ctx.store.put_labels(child, task, names)
        nproc = int(ctx.cfg["compute"]["nproc"])
        if nproc > 1:
            from pipeline.parallel.launch import finetune_distributed

            result = finetune_distributed(
                ctx.out.model_dir,
                parts,
                label_names=names,
                mode=train_mode,
                config=tc,
                nproc=nproc,
                store_path=str(ctx.store.path),
                run_id=child,
                out_dir=out_dir,
                dicts=ctx.out.dicts,
            )
        else:
            model = load_classifier(
                ctx.out.model_dir, len(names), dicts=ctx.out.dicts, max_len=ctx.out.max_len, seed=ctx.seed
            )
            result = finetune(
                model,
                parts["train"],
                parts["validation"],
                parts["test"],
                label_names=names,
                mode=train_mode,
                config=tc,
                store=ctx.store,
                run_id=child,
                out_dir=out_dir,
                dicts=ctx.out.dicts,
                progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="steps", **kw),
            )
        digest = recorded_weights_hash(out_dir)
        ctx.store.put_json(child, CHECKPOINT_JSON, {"path": str(out_dir), "weights_sha256": digest})
        from pipeline.training.finetune import save_split

        save_split(out_dir, ctx.out.selection.cell_ids, ctx.out.split, data=ctx.out.data_path)
        acc, f1 = result.test_metrics["accuracy"], result.test_metrics["macro_f1"]
        ctx.rep.line(f"{name}: test accuracy {acc:.3f}, macro-F1 {f1:.3f} (best epoch {result.best_epoch})")
        if not permuted and result.test_predictions is not None:
            _baseline_and_gate(ctx, child, task, mode, parts, names, result, step=len(result.history))
    ctx.out.models[(task, mode)] = out_dir
    ctx.out.checkpoint_hashes[(task, mode)] = digest


def _baseline_and_gate(ctx: Context, child: int, task: str, mode: str, parts, names, result, *, step: int) -> None:
    """Beside the model, on the same cells: the gene-set logistic regression and the majority-class rate
    (`pipeline.training.baseline`); then the gate before interpretation (did the model learn?), stored on the child
    and, when it did not, a warning kept on the run."""
    from pipeline.training.baseline import gene_set_baseline, learning_gate
    from store import results as R

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
