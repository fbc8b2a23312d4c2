"""Fine-tuning Geneformer for cell classification (thesis sections 2.3 and 4.1).

The loop a researcher would trust, with Geneformer's 6-layer defaults (learning rate 5e-5, weight decay
0.001, linear warm-up and linear decay; Geneformer's `Classifier` warms up over 500 steps, gfattn over a
ratio of the run so small data sets leave warm-up too): AdamW (no decay on biases and LayerNorm weights),
gradient clipping at 1.0, gradient accumulation, optional inverse-frequency class weights, seeds for
everything, length-grouped batches padded only to their own longest cell (`pipeline.tokenize.batching`), autocast
(bf16/fp16) on CUDA, validation every epoch, the best epoch's weights kept (validation macro-F1 by
default), then test accuracy, macro-F1, per-class precision/recall and the confusion matrix.

Training modes are `pipeline.models.load.apply_training_mode`'s (`frozen`, `unfrozen`, `last-K`, `freeze-N`).
In `frozen` mode (the linear probe) the encoder never changes, so by default its output at the first
position is computed once per cell in eval mode and only the head (pooler, dropout, classifier) trains on
those cached features for every epoch. This equals plain training with the encoder in train mode except
for the encoder's dropout (absent here, as in any evaluation of a frozen encoder); with dropout 0 both
give the same model. `TrainConfig(cache_frozen_features=False)` runs the plain path.

Several processes (`pipeline.parallel.distributed`): each optimisation step takes a global batch of
`batch_size * grad_accum * world_size` cells from the same length-grouped plan on every rank and splits
it into micro-batches; each micro-batch's loss is normalised by the global batch's total (class) weight,
so the averaged gradient equals one process's on the same global batch. Evaluation shards batches over
ranks and sums logits, so every rank computes the same metrics; only rank 0 reports and writes to disk.

Recording: this module never holds a store. What a run reports while it runs (events, progress, metrics,
the test confusion matrix) goes to a `FinetuneRecorder` its caller passes; the fine-tune stage's recorder
(`pipeline.run.stages.finetune.FinetuneStoreRecorder`) writes it to the store under the names
`store.results` owns, and a worker of several processes forwards it to its parent
(`pipeline.parallel.launch`).

One module: the fine-tuning plan, epoch loop, evaluation, checkpointing and the frozen-feature cache share the
plan's state; each step is a function of its own.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from pipeline.compute import DEVICE_CHOICES, configure_determinism, fault_point, resolve_device, seed_everything
from pipeline.config import Train as _TrainSchema
from pipeline.config import parse_mode
from pipeline.errors import InputError
from pipeline.parallel import distributed
from pipeline.tokenize.batching import length_grouped_batches, pad_batch
from pipeline.tokenize.cells import Cells

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
BEST_METRICS = ("macro_f1", "accuracy", "loss")
# the splits a run reports metrics of (`FinetuneRecorder.metrics`)
SPLIT_TRAIN, SPLIT_VALIDATION, SPLIT_TEST = "train", "validation", "test"
PER_LABEL_METRICS = ("precision", "recall", "f1")
PROGRESS_EVERY_S = 1.0  # the least seconds between two progress reports (the first and last are always sent)


class FinetuneRecorder(Protocol):
    """What a fine-tuning run reports while it runs, on rank 0 only. The caller decides where it goes (the
    store, the terminal, a parent process); this module names nothing in the store.

    Metric names are this module's: `loss` and `lr` (split "train", every `log_every` steps), `cells_per_s`
    (split "train", every epoch), and `classification_metrics`' keys: `accuracy`, `macro_f1`, `loss`
    (validation every epoch, test at the end, at the best epoch), `<m>/<label>` for m in
    `PER_LABEL_METRICS` (test only)."""

    def event(self, message: str) -> None:
        """A line for the run's log."""

    def progress(
        self,
        done: float,
        total: float | None,
        *,
        unit: str,
        throughput: float | None = None,
        eta_s: float | None = None,
        message: str | None = None,
    ) -> None:
        """`done` of `total` `unit`s ("steps", "cells encoded"); `throughput` in units per second. At most
        one a `PROGRESS_EVERY_S`, besides the first and the last."""

    def metrics(self, split: str, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Values of one split ("train", "validation", "test") at optimisation step `step` of epoch `epoch`."""

    def confusion(self, split: str, labels: Sequence[str], matrix) -> None:
        """The confusion matrix of `split` (rows: true label, columns: predicted)."""


@dataclass
class TrainConfig:
    """Fine-tuning hyperparameters; defaults are Geneformer's for 6-layer models where it has them.

    The keys shared with the config's [train] section take its defaults, except the adaptive schedule
    (`min_steps`, `patience`, `class_weights`): this loop is plain unless asked (exactly `epochs`, no early
    stop, an unweighted loss), while the pipeline's configuration turns them on."""

    # the keys shared with the config's [train] section take its defaults (pipeline/config.py)
    lr: float = _TrainSchema.lr
    weight_decay: float = _TrainSchema.weight_decay
    warmup_ratio: float = _TrainSchema.warmup_ratio  # fraction of optimisation steps of linear warm-up
    warmup_steps: int | None = None  # overrides warmup_ratio (Geneformer's Classifier: 500)
    epochs: int = _TrainSchema.epochs  # the thesis trained 5 epochs (the least, with min_steps)
    min_steps: int = 0  # small training sets train more epochs to reach this many steps (0: exactly `epochs`)
    max_epochs: int = _TrainSchema.max_epochs  # the most epochs min_steps may ask for
    patience: int = 0  # stop once validation `best_metric` has not improved for this many epochs (0: never)
    batch_size: int = _TrainSchema.batch_size  # cells per micro-batch per process (Geneformer: 12)
    grad_accum: int = _TrainSchema.grad_accum
    class_weights: bool = False  # inverse-frequency weights n / (C * n_c) in the loss
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = _TrainSchema.amp  # auto | bf16 | fp16 | off (autocast is used on CUDA only)
    max_len: int | None = None  # keep each cell's top max_len tokens (None: all; must fit the model)
    eval_every_epoch: bool = True
    keep_best: bool = True  # restore the best validation epoch's weights at the end
    best_metric: str = "macro_f1"  # macro_f1 | accuracy | loss (validation)
    num_workers: int = 0  # DataLoader workers padding evaluation / feature-encoding batches
    eval_batch_size: int | None = None  # default: 2 x batch_size
    max_grad_norm: float | None = 1.0
    head_lr: float | None = None  # learning rate in frozen mode (None/0: lr)
    cache_frozen_features: bool = True  # frozen mode: encode each cell once, train the head on the cache
    log_every: int = 10  # optimisation steps between train-loss records

    def validate(self) -> TrainConfig:
        if self.device not in DEVICE_CHOICES:
            raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.amp not in AMP_CHOICES:
            raise InputError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.best_metric not in BEST_METRICS:
            raise InputError(f"best_metric must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "max_epochs"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.min_steps) < 0 or int(self.patience) < 0:
            raise InputError(f"min_steps and patience must be 0 or more, got {self.min_steps}, {self.patience}")
        if self.lr <= 0:
            raise InputError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_len is not None and int(self.max_len) < 1:
            raise InputError(f"max_len must be at least 1, got {self.max_len}")
        return self


@dataclass
class FinetuneResult:
    model: Any  # the best (or last) model, unwrapped, in eval mode
    best_epoch: int  # 1-based; the epoch whose weights the model holds
    val_metrics: dict  # validation metrics of best_epoch
    test_metrics: dict  # accuracy, macro_f1, loss, precision/<label>, recall/<label>, f1/<label>
    confusion: np.ndarray | None  # test confusion matrix, rows = true label, columns = predicted
    test_predictions: np.ndarray | None  # predicted label per test cell, in test_ds order
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    test_probabilities: np.ndarray | None = None  # softmax per test cell (n_cells x n_labels)
    label_names: list[str] = field(default_factory=list)
    mode: str = ""
    out_dir: str | None = None


# ------------------------------------------------------------------------------------------- helpers
def autocast_dtype(amp: str, device):
    """The autocast dtype for `amp` on `device` (None: no autocast). Autocast is used on CUDA only."""
    import torch

    if amp not in AMP_CHOICES:
        raise InputError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _autocast(device, dtype):
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def warmup_decay_factor(step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier at optimisation step `step` (0-based): a linear rise over `warmup` steps
    (never 0 at the first step), then a linear decay to 0 at step `total`. The one schedule of fine-tuning
    and pretraining (`pipeline.models.pretrain.LrSchedule` re-aims `total` under a time budget)."""
    warmup = max(0, int(warmup))
    total = max(1, int(total))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """`warmup_decay_factor` for a fixed `warmup` and `total`, as a `LambdaLR` factor."""

    def factor(step: int) -> float:
        return warmup_decay_factor(step, warmup, total)

    return factor


def decay_parameter_groups(named_params, weight_decay: float, lr: float) -> list[dict]:
    """AdamW groups as Hugging Face's Trainer makes them: no weight decay on biases and LayerNorm."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr": lr})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr})
    return groups


def classification_metrics(y_true, y_pred, label_names: Sequence[str], logits=None) -> tuple[dict, np.ndarray]:
    """Accuracy, macro-F1 (scikit-learn's over every class of the task, absent classes counting 0: the one
    macro-F1 of the project, `pipeline.training.baseline.macro_f1`), per-class precision/recall/F1 (0 where
    undefined), cross-entropy (when logits are given) and the confusion matrix (rows: true label, columns:
    predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from pipeline.training.baseline import macro_f1

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    c = len(label_names)
    labels = list(range(c))
    confusion = confusion_matrix(y_true, y_pred, labels=labels).astype(np.int64)
    if len(y_true):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=None, zero_division=0
        )
    else:
        precision = recall = f1 = np.zeros(c)
    metrics: dict[str, float] = {
        "accuracy": float(np.trace(confusion) / max(1, len(y_true))),
        "macro_f1": macro_f1(y_true, y_pred, c),
        "n_cells": int(len(y_true)),
    }
    if logits is not None and len(y_true):
        metrics["loss"] = cross_entropy(logits, y_true)
    for i, name in enumerate(label_names):
        metrics[per_label_key("precision", name)] = float(precision[i])
        metrics[per_label_key("recall", name)] = float(recall[i])
        metrics[per_label_key("f1", name)] = float(f1[i])
    return metrics, confusion


def per_label_key(metric: str, label: str) -> str:
    """ "precision/high": the key of a per-class metric in `classification_metrics`' dictionary."""
    return f"{metric}/{label}"


def cross_entropy(logits, labels) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), np.asarray(labels)].mean())


def softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- data
def prepare_cells(ds, split: str, *, num_labels: int | None, max_len: int | None, max_positions: int) -> Cells:
    """Token arrays, lengths and labels of a dataset with `input_ids` (and `label`), checked for training."""
    try:
        cells = Cells(ds, label_column="label" if num_labels is not None else None, name=split)
    except KeyError as exc:
        cols = getattr(ds, "column_names", None) or (list(ds.keys()) if hasattr(ds, "keys") else [])
        raise InputError(f"{split} data has no column {exc.args[0]!r} (columns: {', '.join(map(str, cols))})") from None
    cells.truncate(max_len)
    cells.lengths = np.array([len(x) for x in cells.ids], dtype=np.int64)
    lengths = cells.lengths
    if len(lengths) and lengths.min() < 1:
        raise InputError(f"{split} data has a cell with no tokens; drop empty cells before fine-tuning")
    if len(lengths) and lengths.max() > max_positions:
        raise InputError(
            f"{split} data has cells of up to {int(lengths.max())} tokens but the model takes at most "
            f"{max_positions} (max_position_embeddings); set max_len to {max_positions} or re-tokenize"
        )
    labels = cells.labels
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_labels):
        raise InputError(
            f"{split} data has label values outside 0..{num_labels - 1} "
            f"(found {int(labels.min())}..{int(labels.max())}); labels must index label_names"
        )
    return cells


class _PaddedBatches:
    """Index batches -> (indices, input_ids, attention_mask); a Dataset so DataLoader workers can pad."""

    def __init__(self, cells: Cells, batches: Sequence[np.ndarray], pad_id: int):
        self.cells, self.batches, self.pad_id = cells, list(batches), pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        idx = self.batches[i]
        ids, mask = pad_batch([self.cells.ids[j] for j in idx], pad_token_id=self.pad_id)
        return idx, ids, mask


def _iterate(cells: Cells, batches, pad_id: int, num_workers: int):
    data = _PaddedBatches(cells, batches, pad_id)
    if num_workers and num_workers > 0 and len(data):
        from torch.utils.data import DataLoader

        yield from DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers)
    else:
        for i in range(len(data)):
            yield data[i]


# ---------------------------------------------------------------------------------------- evaluation
def _encode_first_token(
    model, cells: Cells, device, amp_dtype, batch_size: int, pad_id: int, num_workers: int, on_batch=None
):
    """Encoder output at the first position for every cell (eval mode), sharded over ranks and summed."""
    import torch

    rank, world = distributed.rank(), distributed.world_size()
    hidden = model.config.hidden_size
    out = torch.zeros(len(cells), hidden, dtype=torch.float32, device=device)
    batches = length_grouped_batches(cells.lengths, batch_size)[rank::world]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx, ids, mask in _iterate(cells, batches, pad_id, num_workers):
            with _autocast(device, amp_dtype):
                h = model.bert(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state[:, 0]
            out[torch.as_tensor(idx, device=device)] = h.float()
            if on_batch:
                on_batch(len(idx))
    model.train(was_training)
    distributed.all_reduce_sum(out)
    return out


def _head_logits(model, features):
    """The sequence-classification head on first-position encoder outputs (pooler, dropout, classifier)."""
    return model.classifier(model.dropout(model.bert.pooler.activation(model.bert.pooler.dense(features))))


def predict_logits(
    model, cells: Cells, device, amp_dtype, batch_size: int, pad_id: int, num_workers: int = 0, features=None
) -> np.ndarray:
    """Logits for every cell (eval mode), sharded over ranks; every rank gets all of them."""
    import torch

    n_labels = model.config.num_labels
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if features is not None:
            out = (
                torch.cat([_head_logits(model, features[i : i + 4096]).float() for i in range(0, len(features), 4096)])
                if len(features)
                else torch.zeros(0, n_labels, device=device)
            )
        else:
            rank, world = distributed.rank(), distributed.world_size()
            out = torch.zeros(len(cells), n_labels, dtype=torch.float32, device=device)
            batches = length_grouped_batches(cells.lengths, batch_size)[rank::world]
            for idx, ids, mask in _iterate(cells, batches, pad_id, num_workers):
                with _autocast(device, amp_dtype):
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out[torch.as_tensor(idx, device=device)] = logits.float()
            distributed.all_reduce_sum(out)
    model.train(was_training)
    return out.cpu().numpy()


def evaluate(
    model, ds, label_names: Sequence[str], *, config: TrainConfig | None = None, batch_size: int | None = None
):
    """Metrics, confusion matrix, predictions and probabilities of `model` on a labelled dataset."""
    config = (config or TrainConfig()).validate()
    device = next(model.parameters()).device
    cells = prepare_cells(
        ds,
        "evaluation",
        num_labels=len(label_names),
        max_len=config.max_len,
        max_positions=int(model.config.max_position_embeddings),
    )
    logits = predict_logits(
        model,
        cells,
        device,
        autocast_dtype(config.amp, device),
        batch_size or config.eval_batch_size or 2 * config.batch_size,
        int(model.config.pad_token_id or 0),
        config.num_workers,
    )
    preds = logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)
    metrics, confusion = classification_metrics(cells.labels, preds, label_names, logits)
    return metrics, confusion, preds, softmax(logits) if len(logits) else logits


# ------------------------------------------------------------------------------------------ finetune
def finetune(
    model,
    train_ds,
    val_ds,
    test_ds,
    *,
    out_dir: str | os.PathLike | None = None,
    dicts=None,
    **options,
) -> FinetuneResult:
    """Fine-tune a `BertForSequenceClassification` in a training mode and evaluate it.

    `options` are `plan_finetuning`'s: `label_names` (required), `mode` (default frozen), `config`
    (`TrainConfig`) and `recorder`. Datasets carry `input_ids`, `length` and an int `label` indexing
    `label_names`; `val_ds` and `test_ds` may be None. With a `recorder` (`FinetuneRecorder`), rank 0
    reports its events, its progress (steps, with "epoch E, loss L, lr X, N cells/s"; in frozen mode first
    the cells encoded), train loss and learning rate every `log_every` steps, validation metrics every
    epoch, and the test metrics and confusion matrix. With `out_dir`, rank 0 saves the model
    (`save_pretrained`), its gene dictionaries (`dicts`, or the ones next to the checkpoint it was loaded
    from) and `gfattn_finetune.json`.

    The work runs in four steps: `plan_finetuning` (cells, optimiser, schedule, seeds), the frozen
    feature cache (`encode_frozen_features`), one `run_epoch` + `validate_epoch` per epoch (stopping early
    once the validation score has not improved for `config.patience` epochs), and `finish_finetuning`
    (best weights, test metrics, records, the saved checkpoint).
    """
    plan = plan_finetuning(model, train_ds, val_ds, test_ds, **options)
    encode_frozen_features(plan)
    state = _TrainState(plan)
    for epoch in range(1, plan.epochs + 1):
        entry = run_epoch(plan, state, epoch)
        validate_epoch(plan, state, epoch, entry)
        record_epoch(plan, entry)
        state.history.append(entry)
        if early_stop(plan, state, epoch):
            break
    return finish_finetuning(plan, state, out_dir=out_dir, dicts=dicts)


def planned_epochs(config: TrainConfig, n_train: int, global_bs: int) -> int:
    """Epochs so that small training sets get enough optimisation steps: ceil(min_steps / steps per epoch),
    at least `epochs`, at most `max_epochs` (never below `epochs`)."""
    epochs = int(config.epochs)
    if not config.min_steps:
        return epochs
    per_epoch = max(1, math.ceil(int(n_train) / int(global_bs)))
    wanted = math.ceil(int(config.min_steps) / per_epoch)
    return max(epochs, min(wanted, max(epochs, int(config.max_epochs))))


def early_stop(plan: FinetunePlan, state: _TrainState, epoch: int) -> bool:
    """Whether the validation score has not improved for `config.patience` epochs (0: never stop early)."""
    patience = int(plan.config.patience)
    if not patience or plan.val is None or not plan.config.eval_every_epoch or epoch >= plan.epochs:
        return False
    if epoch - int(state.best["epoch"] or 0) < patience:
        return False
    state.stopped_early = epoch
    if plan.record:
        plan.recorder.event(
            f"early stop after epoch {epoch}: validation {plan.config.best_metric} has not improved for "
            f"{patience} epochs (best: epoch {state.best['epoch']})"
        )
    return True


@dataclass
class FinetunePlan:
    """Everything one fine-tuning decides before its first step (`plan_finetuning`)."""

    model: Any
    config: TrainConfig
    mode: str
    kind: str
    label_names: list[str]
    train: Cells
    val: Cells | None
    test: Cells | None
    device: Any
    rank: int
    world: int
    record: bool  # rank 0 with a recorder
    recorder: FinetuneRecorder | None
    params: list
    trainable: list
    amp_dtype: Any
    eval_bs: int
    pad_id: int
    cached: bool
    cell_weight: np.ndarray
    class_weight: Any  # tensor on device
    global_bs: int
    total_steps: int
    epochs: int  # planned epochs (`planned_epochs`); early stopping may end sooner
    optimizer: Any
    scheduler: Any
    scaler: Any
    ddp: Any = None
    features: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def forward_model(self):
        return self.ddp or self.model


class _TrainState:
    """What changes while training: the step, the loss windows, the best epoch so far, the history."""

    def __init__(self, plan: FinetunePlan):
        import torch

        self.history: list[dict] = []
        self.best = {"epoch": 0, "score": None, "state": None, "val": {}}
        self.last_val: dict = {}
        self.step = 0
        self.cells_seen = 0
        self.t0 = time.perf_counter()
        self.last_progress = 0.0  # when progress was last reported (perf_counter)
        self.message: str | None = None  # the latest logged step's "epoch E, loss L, lr X, N cells/s"
        self.window_loss = torch.zeros((), dtype=torch.float64, device=plan.device)
        self.window_steps = 0
        self.stopped_early = 0  # the epoch after which early stopping ended training (0: it did not)


def plan_finetuning(
    model,
    train_ds,
    val_ds,
    test_ds,
    *,
    label_names: Sequence[str],
    mode: str = "frozen",
    config: TrainConfig | None = None,
    recorder: FinetuneRecorder | None = None,
) -> FinetunePlan:
    """Check the inputs, set the training mode, seed, and build the optimiser and schedule."""
    import torch

    from pipeline.models.load import apply_training_mode

    config = (config or TrainConfig()).validate()
    label_names = [str(x) for x in label_names]
    n_labels = len(label_names)
    if n_labels < 2:
        raise InputError(f"fine-tuning needs at least 2 labels, got {label_names}")
    if int(model.config.num_labels) != n_labels:
        raise InputError(
            f"the model's head has {model.config.num_labels} labels but label_names has {n_labels}; "
            "load the model with num_labels=len(label_names)"
        )
    kind, _ = parse_mode(mode, len(model.bert.encoder.layer))

    device = resolve_device(config.device, distributed.env_local_rank())
    configure_determinism(device)
    distributed.init_from_env(device)
    rank, world = distributed.rank(), distributed.world_size()
    record = recorder is not None and rank == 0
    seed_everything(config.seed)

    max_positions = int(model.config.max_position_embeddings)
    pad_id = int(model.config.pad_token_id or 0)
    train = prepare_cells(
        train_ds, "training", num_labels=n_labels, max_len=config.max_len, max_positions=max_positions
    )
    if len(train) == 0:
        raise InputError("the training split is empty")
    val = (
        None
        if val_ds is None
        else prepare_cells(
            val_ds, "validation", num_labels=n_labels, max_len=config.max_len, max_positions=max_positions
        )
    )
    test = (
        None
        if test_ds is None
        else prepare_cells(test_ds, "test", num_labels=n_labels, max_len=config.max_len, max_positions=max_positions)
    )
    if val is not None and len(val) == 0:
        val = None

    trainable = apply_training_mode(model, mode)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # Ranks may have drawn different random heads; every rank starts from rank 0's.
    distributed.broadcast_parameters(params)
    amp_dtype = autocast_dtype(config.amp, device)
    cached = kind == "frozen" and config.cache_frozen_features

    # Class weights and the loss normaliser (total weight of the global batch).
    if config.class_weights:
        counts = np.bincount(train.labels, minlength=n_labels).astype(float)
        cw = np.where(counts > 0, len(train) / (n_labels * np.maximum(counts, 1)), 0.0)
    else:
        cw = np.ones(n_labels)

    # One plan for every rank: global batches of batch_size x grad_accum x world cells, each split into
    # micro-batches. With cached frozen features every rank runs all micro-batches (the head is tiny),
    # so the ranks stay identical without gradient communication.
    global_bs = config.batch_size * config.grad_accum * world
    epochs = planned_epochs(config, len(train), global_bs)
    total_steps = math.ceil(len(train) / global_bs) * epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total_steps)
    lr = config.head_lr if (kind == "frozen" and config.head_lr) else config.lr
    optimizer = torch.optim.AdamW(
        decay_parameter_groups(model.named_parameters(), config.weight_decay, lr), lr=lr, betas=(0.9, 0.999), eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(warmup, total_steps))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    ddp = None
    if world > 1 and not cached:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    plan = FinetunePlan(
        model=model,
        config=config,
        mode=mode,
        kind=kind,
        label_names=label_names,
        train=train,
        val=val,
        test=test,
        device=device,
        rank=rank,
        world=world,
        record=record,
        recorder=recorder if record else None,
        params=params,
        trainable=trainable,
        amp_dtype=amp_dtype,
        eval_bs=config.eval_batch_size or 2 * config.batch_size,
        pad_id=pad_id,
        cached=cached,
        cell_weight=cw[train.labels],
        class_weight=torch.as_tensor(cw, dtype=torch.float32, device=device),
        global_bs=global_bs,
        total_steps=total_steps,
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        ddp=ddp,
    )
    if record:
        recorder.event(
            f"fine-tuning {mode}: {len(train)} training cells, {epochs} epochs, {total_steps} steps on "
            f"{world} x {device.type}"
            + (f", class weights {', '.join(f'{w:.2f}' for w in cw)}" if config.class_weights else "")
        )
        recorder.progress(0, total_steps, unit="steps")
    return plan


def encode_frozen_features(plan: FinetunePlan) -> None:
    """Frozen mode: the encoder's first-position output of every cell, computed once (eval mode)."""
    if not plan.cached:
        return
    recorder = plan.recorder
    t_enc = time.perf_counter()
    n_enc = sum(len(c) for c in (plan.train, plan.val, plan.test) if c is not None)
    done_enc = [0]
    last = [0.0]

    def on_batch(n):
        done_enc[0] += n * plan.world
        now = time.perf_counter()
        if plan.record and now - last[0] > PROGRESS_EVERY_S:
            last[0] = now
            rate = done_enc[0] / max(now - t_enc, 1e-9)
            recorder.progress(
                min(done_enc[0], n_enc),
                n_enc,
                unit="cells encoded",
                throughput=rate,
                eta_s=max(n_enc - done_enc[0], 0) / max(rate, 1e-9),
            )

    for cells in (plan.train, plan.val, plan.test):
        if cells is not None:
            plan.features[cells.name] = _encode_first_token(
                plan.model,
                cells,
                plan.device,
                plan.amp_dtype,
                plan.eval_bs,
                plan.pad_id,
                plan.config.num_workers,
                on_batch,
            )
    if plan.record:
        recorder.event(
            f"frozen encoder: {n_enc} cells encoded once in {time.perf_counter() - t_enc:.1f} s; training the head"
        )


def run_epoch(plan: FinetunePlan, state: _TrainState, epoch: int) -> dict:
    """One pass over the training cells in the epoch's seeded length-grouped order; returns its history entry."""
    import torch

    config, train, device, world = plan.config, plan.train, plan.device, plan.world
    model, ddp, optimizer, scheduler, scaler = plan.model, plan.ddp, plan.optimizer, plan.scheduler, plan.scaler
    model.train()
    epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
    t_epoch = time.perf_counter()
    order = length_grouped_batches(train.lengths, plan.global_bs, shuffle=True, seed=config.seed * 1000 + epoch)
    for gbatch in order:
        w_total = float(plan.cell_weight[gbatch].sum()) or 1.0
        parts = np.array_split(gbatch, world * config.grad_accum)
        if plan.cached:
            mine = [part for part in parts if len(part)]
        else:
            mine = parts[plan.rank * config.grad_accum : (plan.rank + 1) * config.grad_accum]
        lr_now = scheduler.get_last_lr()[0]
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for a, part in enumerate(mine):
            # DDP averages gradients over ranks; scaling by world makes the result the global sum.
            scale = 1.0 if plan.cached else float(world)
            if len(part) == 0:
                # Every rank must take part in each gradient reduction: run one cell with zero weight.
                part, scale = gbatch[:1], 0.0
            labels = torch.as_tensor(train.labels[part], device=device)
            sync = ddp is None or a == len(mine) - 1
            ctx = plan.forward_model.no_sync() if (ddp is not None and not sync) else _nullcontext()
            with ctx:
                with _autocast(device, plan.amp_dtype):
                    if plan.cached:
                        logits = _head_logits(model, plan.features["training"][torch.as_tensor(part, device=device)])
                    else:
                        ids, mask = pad_batch([train.ids[j] for j in part], pad_token_id=plan.pad_id)
                        logits = plan.forward_model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
                part_loss = (ce * plan.class_weight[labels]).sum() / w_total
                loss = part_loss * scale
                (scaler.scale(loss) if scaler else loss).backward()
            step_loss += part_loss.detach().double() * (1.0 if scale else 0.0)
        if scaler:
            scaler.unscale_(optimizer)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(plan.params, config.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        state.cells_seen += len(gbatch)
        state.window_loss += step_loss
        epoch_loss += step_loss
        state.window_steps += 1
        _after_step(plan, state, epoch, lr_now)
        fault_point("finetune-step", f"{plan.mode}:{state.step}")

    if not plan.cached:
        distributed.all_reduce_sum(epoch_loss)
    seconds = time.perf_counter() - t_epoch
    return {
        "epoch": epoch,
        "step": state.step,
        "train_loss": float(epoch_loss) / max(1, len(order)),
        "lr": scheduler.get_last_lr()[0],
        "seconds": seconds,
        "cells_per_s": len(train) / max(seconds, 1e-9),
    }


def _after_step(plan: FinetunePlan, state: _TrainState, epoch: int, lr_now: float) -> None:
    """Train loss and learning rate every `log_every` steps; progress at most once a `PROGRESS_EVERY_S`."""
    step, total = state.step, plan.total_steps
    if step % plan.config.log_every == 0 or step == total:
        if not plan.cached:
            distributed.all_reduce_sum(state.window_loss)
        loss_value = float(state.window_loss) / state.window_steps
        state.window_loss.zero_()
        state.window_steps = 0
        if plan.record:
            rate = state.cells_seen / max(time.perf_counter() - state.t0, 1e-9)
            state.message = f"epoch {epoch}, loss {loss_value:.4f}, lr {lr_now:.2e}, {rate:.0f} cells/s"
            plan.recorder.metrics(SPLIT_TRAIN, step, epoch, {"loss": loss_value, "lr": lr_now})
    now = time.perf_counter()
    if plan.record and (now - state.last_progress > PROGRESS_EVERY_S or step == total):
        state.last_progress = now
        elapsed = now - state.t0
        plan.recorder.progress(
            step,
            total,
            unit="steps",
            throughput=step / max(elapsed, 1e-9),
            eta_s=(total - step) * elapsed / step,
            message=state.message,
        )


def validate_epoch(plan: FinetunePlan, state: _TrainState, epoch: int, entry: dict) -> None:
    """Validation metrics of this epoch; keeps the best epoch's trainable weights (`config.best_metric`)."""
    config = plan.config
    if plan.val is None or not (config.eval_every_epoch or epoch == plan.epochs):
        return
    logits = predict_logits(
        plan.model,
        plan.val,
        plan.device,
        plan.amp_dtype,
        plan.eval_bs,
        plan.pad_id,
        config.num_workers,
        features=plan.features.get("validation"),
    )
    vm, _ = classification_metrics(plan.val.labels, logits.argmax(axis=1), plan.label_names, logits)
    state.last_val = vm
    entry.update({"val_loss": vm["loss"], "val_accuracy": vm["accuracy"], "val_macro_f1": vm["macro_f1"]})
    if plan.record:
        plan.recorder.metrics(SPLIT_VALIDATION, state.step, epoch, {k: vm[k] for k in ("accuracy", "macro_f1", "loss")})
    best = state.best
    score = -vm["loss"] if config.best_metric == "loss" else vm[config.best_metric]
    if (
        best["score"] is None
        or score > best["score"]
        or (score == best["score"] and vm["loss"] < best["val"].get("loss", math.inf))
    ):
        best.update(epoch=epoch, score=score, val=vm)
        if config.keep_best and epoch < plan.epochs:
            best["state"] = {
                n: p.detach().to("cpu", copy=True) for n, p in plan.model.named_parameters() if p.requires_grad
            }
        else:
            best["state"] = None  # the current weights are the best


def record_epoch(plan: FinetunePlan, entry: dict) -> None:
    if not plan.record:
        return
    plan.recorder.metrics(SPLIT_TRAIN, entry["step"], entry["epoch"], {"cells_per_s": entry["cells_per_s"]})
    msg = f"epoch {entry['epoch']}/{plan.epochs}: train loss {entry['train_loss']:.4f}"
    if "val_accuracy" in entry:
        msg += f", validation accuracy {entry['val_accuracy']:.3f}, macro-F1 {entry['val_macro_f1']:.3f}"
    plan.recorder.event(msg)


def finish_finetuning(plan: FinetunePlan, state: _TrainState, *, out_dir=None, dicts=None) -> FinetuneResult:
    """Restore the best epoch's weights, evaluate on the test cells, record, and save the checkpoint."""
    import torch

    config, model, label_names = plan.config, plan.model, plan.label_names
    # Restore the best epoch's weights (only trainable parameters ever change).
    best_epoch, val_metrics = len(state.history) or plan.epochs, state.last_val
    if plan.val is not None and config.keep_best and state.best["epoch"]:
        best_epoch, val_metrics = state.best["epoch"], state.best["val"]
        if state.best["state"] is not None:
            with torch.no_grad():
                named = dict(model.named_parameters())
                for n, value in state.best["state"].items():
                    named[n].copy_(value.to(named[n].device))
    if plan.cached and plan.world > 1:
        # Every rank trained the same head on the same features; make them bit-identical.
        distributed.broadcast_parameters(plan.params)

    test_metrics, confusion, preds, probs = {}, None, None, None
    if plan.test is not None and len(plan.test):
        logits = predict_logits(
            model,
            plan.test,
            plan.device,
            plan.amp_dtype,
            plan.eval_bs,
            plan.pad_id,
            config.num_workers,
            features=plan.features.get("test"),
        )
        preds = logits.argmax(axis=1)
        probs = softmax(logits)
        test_metrics, confusion = classification_metrics(plan.test.labels, preds, label_names, logits)
        if plan.record:
            names = ["accuracy", "macro_f1", "loss"] + [
                per_label_key(m, lab) for lab in label_names for m in PER_LABEL_METRICS
            ]
            plan.recorder.metrics(SPLIT_TEST, state.step, best_epoch, {n: test_metrics[n] for n in names})
            plan.recorder.confusion(SPLIT_TEST, label_names, confusion)
            plan.recorder.event(
                f"test accuracy {test_metrics['accuracy']:.3f}, macro-F1 "
                f"{test_metrics['macro_f1']:.3f} (epoch {best_epoch} weights)"
            )

    model.eval()
    model.config.id2label = {i: name for i, name in enumerate(label_names)}
    model.config.label2id = {name: i for i, name in enumerate(label_names)}
    if out_dir is not None:
        if plan.main:
            save_finetuned(
                model,
                out_dir,
                dicts=dicts,
                summary={
                    "mode": plan.mode,
                    "label_names": label_names,
                    "best_epoch": best_epoch,
                    "val_metrics": val_metrics,
                    "test_metrics": test_metrics,
                    "confusion": None if confusion is None else confusion.tolist(),
                    "history": state.history,
                    "config": asdict(config),
                    "trainable_parameters": len(plan.trainable),
                    "world_size": plan.world,
                },
            )
        distributed.barrier()
    return FinetuneResult(
        model=model,
        best_epoch=best_epoch,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        confusion=confusion,
        test_predictions=preds,
        history=state.history,
        test_probabilities=probs,
        label_names=label_names,
        mode=plan.mode,
        out_dir=None if out_dir is None else str(out_dir),
    )


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def save_finetuned(model, out_dir, *, dicts=None, summary: dict | None = None) -> Path:
    """`save_pretrained` + the gene dictionaries + `gfattn_finetune.json`, so the directory is a checkpoint
    every later step (attention analysis, another fine-tuning) loads like any other.

    The directory appears complete or not at all (`pipeline.io.staging_dir`); the summary records the
    sha256 of the weights file (`weights_sha256`), which `verify_checkpoint` checks on reuse."""
    from pipeline.io import atomic_write_json, sha256_file, staging_dir
    from pipeline.models.load import _quiet_transformers, weight_file

    out = Path(out_dir)
    if dicts is None:
        source = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
        if source and Path(source).is_dir() and Path(source).resolve() != out.resolve():
            from pipeline.models.load import model_dictionaries

            dicts = model_dictionaries(source)
    with staging_dir(out) as tmp:
        with _quiet_transformers():
            model.save_pretrained(str(tmp))
        fault_point("save", out.name)
        if dicts is not None:
            dicts.save(tmp)
        if summary is not None:
            summary = dict(summary, weights_sha256=sha256_file(weight_file(tmp)))
            atomic_write_json(tmp / "gfattn_finetune.json", summary, indent=2)
    return out


SPLIT_FILE = "gfattn_split.json"


def save_split(out_dir, cell_ids, split, *, data: str | None = None) -> Path:
    """Which cells trained, selected and tested a fine-tuned model (`gfattn_split.json` beside it), so
    `gfattn analyze` can analyse exactly the held-out test cells."""
    from pipeline.io import atomic_write_json

    doc = {"data": data, "cells": {str(c): str(s) for c, s in zip(cell_ids, split)}}
    return atomic_write_json(Path(out_dir) / SPLIT_FILE, doc)


def load_split(model_dir) -> dict[str, str] | None:
    """cell id -> train / validation / test of a fine-tuned model, or None when it carries no split."""
    path = Path(model_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["cells"])
    except (ValueError, KeyError):
        raise InputError(f"{path} is damaged; fine-tune again or pass --cells all") from None


def recorded_weights_hash(out_dir) -> str:
    """The weights sha256 `save_finetuned` wrote into `gfattn_finetune.json` (no second read of the weights)."""
    meta = Path(out_dir) / "gfattn_finetune.json"
    try:
        return json.loads(meta.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError):
        raise InputError(
            f"{meta} is missing or damaged; the fine-tuned model in {out_dir} cannot be recorded"
        ) from None


def verify_checkpoint(out_dir, expected_sha256: str | None = None) -> str:
    """The sha256 of a fine-tuned checkpoint's weights, checked against `expected_sha256` (or, when None,
    against the hash its `gfattn_finetune.json` recorded); a mismatch is an `InputError`."""
    from pipeline.io import sha256_file
    from pipeline.models.load import weight_file

    out = Path(out_dir)
    weights = weight_file(out) if out.is_dir() else None
    if weights is None:
        raise InputError(f"fine-tuned model {out} is missing (no config.json and weights); it cannot be reused")
    actual = sha256_file(weights)
    if expected_sha256 is None:
        meta = out / "gfattn_finetune.json"
        if meta.is_file():
            try:
                expected_sha256 = json.loads(meta.read_text()).get("weights_sha256")
            except ValueError:
                raise InputError(f"{meta} is not valid JSON; the checkpoint {out} is damaged") from None
    if expected_sha256 and actual != expected_sha256:
        raise InputError(
            f"fine-tuned model {out} has weights sha256 {actual[:12]}... but {expected_sha256[:12]}... was recorded;"
            " it was overwritten or belongs to another run: do not reuse it (start a new run)"
        )
    return actual
