"""Masked-gene pretraining of a small Geneformer-style BERT (Theodoris et al. 2023, "Pretraining").

Geneformer pretrains with Hugging Face's `DataCollatorForLanguageModeling(mlm_probability=0.15)`: 15% of
each cell's real (non-special) tokens are selected; of those, 80% become `<mask>`, 10% a random token of
the vocabulary and 10% stay as they are; the model predicts the original gene at every selected position
(cross-entropy). gfattn does the same, computing the prediction head only at the selected positions
(which gives the same loss as scoring every position and ignoring the rest, at a fraction of the cost),
with length-grouped batches padded to their own longest cell, AdamW, linear warm-up and linear decay.

An optional cell-level objective (`cell_loss_weight`, off by default) trains the first position, which
masked-gene prediction never scores unless it is masked but which the frozen mode reads: the
gene-prediction head applied to it must predict the cell's own genes, weighted by inverse document
frequency (`cell_gene_loss`). It uses tokens only, never a label.

`cell_objective = "components"` trains the first position on a different cell-level target: a linear head
on it regresses the cell's scores on the top `cell_components` principal components of the training
cells' gene sets (which genes each cell's encoding holds; scikit-learn's PCA, ARPACK on the sparse
matrix, each score scaled to unit variance; `cell_component_targets`). The principal components are
the corpus's main axes of variation, types and states alike, so the first position learns to report
where a cell sits on them. The head is dropped afterwards, like a contrastive projection head.

One departure from Geneformer's initialisation: the gene-prediction bias starts at each gene's log
frequency in the training cells (`init_output_bias`), so a short run starts from the unigram baseline
instead of spending its steps learning it.

A time budget bounds the run: the decay horizon follows the measured step time so the learning rate still
anneals before the budget ends. Held-out cells measure what was learned: 15% of each held-out cell's
genes are replaced by `<mask>` and the top-1 prediction is scored, against two baselines computed on the
training cells and scored on the same positions: always predicting the most frequent gene (chance), and
predicting the most frequent gene at that rank position (rank-aware frequency).

The output directory looks like a Geneformer checkpoint (`config.json` with `BertForMaskedLM`,
`model.safetensors`, the token and median dictionaries) plus `gfattn_pretrain.json` with the metrics.

`pretrain` is four steps: `plan_pretraining` (checks, held-out split, `PretrainPlan` with the model
configuration, seeds, batches and `LrSchedule`), `start_run` and `run_epoch` per epoch (`PretrainRun`
holds the model, optimiser and counters), `evaluate_heldout`, and `record_pretraining` (checkpoint,
JSON, store). One seed decides every draw, and the caller's global RNG state is left as it was.

One module: the masked-gene objective, the cell objectives, the corpus batches and the training loop share one
plan object (`plan_pretraining`) and its seeded state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import InputError
from pipeline.tokenize.batching import length_grouped_batches, pad_batch
from pipeline.training.finetune import decay_parameter_groups, warmup_decay_factor

MASK_PROBABILITY = 0.15
CELL_OBJECTIVES = ("genes", "components")
PACE_FROM_STEP = 3  # steps before a time budget measures the pace (allocation, kernel selection)
STAGE = "pretrain"


def pretraining_objective(pcfg: dict) -> str:
    """The objective gfattn's small model is pretrained by, in words (`pretrain.cell_objective`, weight)."""
    weight = float(pcfg.get("cell_loss_weight") or 0.0)
    if weight <= 0:
        return "masked genes"
    if pcfg.get("cell_objective") == "components":
        cell = f"the first position regressing the cell's top {int(pcfg['cell_components'])} principal components"
    else:
        cell = "the first position predicting its cell's genes"
    return f"masked genes plus {cell} (weight {weight:g})"


def select_masked_positions(input_ids, attention_mask, special_ids, probability: float, generator):
    """Bernoulli(`probability`) selection over real, non-special tokens (the collator's rule)."""
    import torch

    candidates = attention_mask.bool()
    for sid in special_ids:
        candidates &= input_ids != int(sid)
    probs = torch.full(input_ids.shape, float(probability))
    selected = torch.bernoulli(probs, generator=generator).bool() & candidates
    return selected


def corrupt_selected(input_ids, selected, mask_id: int, vocab_size: int, generator):
    """BERT's 80/10/10 rule on the selected positions: <mask>, a random token, or unchanged."""
    import torch

    corrupted = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    corrupted[to_mask] = int(mask_id)
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    random_tokens = torch.randint(int(vocab_size), input_ids.shape, generator=generator, dtype=input_ids.dtype)
    corrupted[to_random] = random_tokens[to_random]
    return corrupted


def init_output_bias(model, train_ids: list, vocab_size: int, special_ids) -> None:
    """Start the gene-prediction bias at the log frequency of each gene in the training cells.

    The model then begins at the unigram baseline instead of a uniform guess over the vocabulary; with
    Adam moving each weight by about the learning rate per step, learning those log-odds from zero would
    take thousands of steps that a short CPU budget does not have.
    """
    import torch

    counts = np.bincount(np.concatenate(train_ids), minlength=vocab_size).astype(np.float64)
    counts[list(special_ids)] = 0.0
    log_freq = np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab_size))
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.as_tensor(log_freq - log_freq.mean(), dtype=torch.float32))


def _masked_logits(model, input_ids, attention_mask, selected, *, with_hidden: bool = False):
    """Gene logits at the selected positions (and, `with_hidden`, the encoder output of every position)."""
    hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.cls(hidden[selected])
    return (logits, hidden) if with_hidden else logits


def gene_idf(train_ids: list, vocab_size: int) -> np.ndarray:
    """Inverse document frequency of every token over the training cells: log(1 + cells / cells with it)."""
    df = np.zeros(vocab_size, dtype=np.float64)
    for seq in train_ids:
        df[np.unique(seq)] += 1.0
    return np.log1p(len(train_ids) / np.maximum(df, 1.0)).astype(np.float32)


def cell_gene_loss(model, hidden, batch_ids, attention_mask, special_ids, idf=None):
    """The cell-level objective: the first position's output predicts the genes of its cell.

    The gene-prediction head, applied to the first position, scores every gene of the vocabulary; the loss
    is the cross-entropy against the cell's own genes, each weighted by its inverse document frequency
    `idf` (uniform without it), so the first position has to summarise the whole cell, whatever gene sits
    there, and the genes that tell cells apart (states, types) weigh more than those every cell ranks
    high. Self-supervised like the masked genes: it sees tokens only, never a label.
    """
    import torch

    real = attention_mask.bool().clone()
    for sid in special_ids:
        real &= batch_ids != int(sid)
    weight = real.float() if idf is None else real.float() * idf[batch_ids]
    target = torch.zeros(batch_ids.shape[0], model.config.vocab_size, device=hidden.device)
    target.scatter_add_(1, batch_ids, weight)
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1.0)
    logp = torch.nn.functional.log_softmax(model.cls(hidden[:, 0]).float(), dim=-1)
    return -(target * logp).sum(dim=1).mean()


def cell_component_targets(train_ids: list, vocab_size: int, special_ids, k: int, seed: int) -> np.ndarray:
    """Each training cell's scores on the top `k` principal components of the cells' gene sets (a cell x
    gene indicator of the genes in its encoding, special tokens left out), scaled to unit variance.

    PCA by ARPACK on the sparse matrix (centred implicitly), with `seed` for its start vector and
    scikit-learn's sign convention, so the targets are a function of the cells and the seed."""
    from scipy import sparse
    from sklearn.decomposition import PCA

    rows = np.repeat(np.arange(len(train_ids)), [len(x) for x in train_ids])
    cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in train_ids])
    keep = ~np.isin(cols, np.asarray(sorted(int(s) for s in special_ids), dtype=np.int64))
    x = sparse.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(len(train_ids), int(vocab_size)))
    x.data[:] = 1.0  # a gene is in a cell's encoding once
    k = max(1, min(int(k), min(x.shape) - 1))
    z = PCA(n_components=k, svd_solver="arpack", random_state=int(seed)).fit_transform(x)
    z /= np.maximum(z.std(axis=0, keepdims=True), 1e-8)
    return z.astype(np.float32)


def cell_component_loss(head, hidden, targets):
    """The `components` cell-level objective: mean squared error of `head(first position)` against the
    cell's principal-component scores."""
    import torch

    return torch.nn.functional.mse_loss(head(hidden[:, 0]).float(), targets)


def frequency_baselines(train_ids: list, special_ids) -> tuple[int, dict[int, int]]:
    """Most frequent gene overall, and per rank position, among the training cells."""
    special = set(int(s) for s in special_ids)
    counts: dict[int, int] = {}
    by_position: list[dict[int, int]] = []
    for seq in train_ids:
        for pos, tok in enumerate(seq.tolist()):
            if tok in special:
                continue
            counts[tok] = counts.get(tok, 0) + 1
            while len(by_position) <= pos:
                by_position.append({})
            by_position[pos][tok] = by_position[pos].get(tok, 0) + 1
    top = max(counts, key=counts.get) if counts else -1
    per_pos = {p: max(c, key=c.get) for p, c in enumerate(by_position) if c}
    return top, per_pos


def evaluate_masked_genes(
    model,
    ids: list,
    *,
    pad_id: int,
    mask_id: int,
    special_ids,
    device,
    seed: int,
    batch_size: int = 64,
    top_gene: int | None = None,
    position_genes: dict[int, int] | None = None,
) -> dict:
    """Top-1/top-5 accuracy and loss on 15% of each cell's genes replaced by <mask> (deterministic)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    n = correct = correct5 = chance = positional = 0
    loss_sum = 0.0
    lengths = np.array([len(x) for x in ids])
    with torch.no_grad():
        for idx in length_grouped_batches(lengths, batch_size):
            batch_ids, mask = pad_batch([ids[i] for i in idx], pad_token_id=pad_id)
            selected = select_masked_positions(batch_ids, mask, special_ids, MASK_PROBABILITY, gen)
            if not selected.any():
                continue
            masked = batch_ids.clone()
            masked[selected] = int(mask_id)
            logits = _masked_logits(model, masked.to(device), mask.to(device), selected.to(device)).float()
            target = batch_ids[selected].to(device)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct += int((top5[:, 0] == target).sum())
            correct5 += int((top5 == target[:, None]).any(dim=1).sum())
            n += int(selected.sum())
            target_cpu = batch_ids[selected]
            if top_gene is not None:
                chance += int((target_cpu == top_gene).sum())
            if position_genes is not None:
                pos = selected.nonzero()[:, 1].tolist()
                guess = torch.tensor([position_genes.get(p, top_gene if top_gene is not None else -1) for p in pos])
                positional += int((guess == target_cpu).sum())
    model.train(was_training)
    out = {
        "masked_accuracy": correct / max(n, 1),
        "masked_top5_accuracy": correct5 / max(n, 1),
        "masked_loss": loss_sum / max(n, 1),
        "n_masked": n,
    }
    if top_gene is not None:
        out["chance_accuracy"] = chance / max(n, 1)
    if position_genes is not None:
        out["position_baseline_accuracy"] = positional / max(n, 1)
    return out


# ------------------------------------------------------------------------------------------- plan
@dataclass
class LrSchedule:
    """Linear warm-up, then linear decay to zero at `horizon` (a `LambdaLR` factor of the base rate; the
    formula is fine-tuning's, `pipeline.training.finetune.warmup_decay_factor`).

    `horizon` starts at the planned number of steps; with a time budget, `observe` re-aims it at the steps
    the budget still allows, only while the planned steps would overrun it at the pace measured after the
    first `PACE_FROM_STEP` (slow, warming-up) steps. A budget that does not bind leaves the schedule, and so
    the model, independent of timing.
    """

    planned: int
    warmup: int
    time_budget_s: float | None = None
    horizon: int = field(init=False)
    pace_from: float = 0.0

    def __post_init__(self):
        self.horizon = self.planned

    def factor(self, step: int) -> float:
        w = min(self.warmup, max(1, self.horizon // 10)) if self.horizon < self.planned else self.warmup
        return warmup_decay_factor(step, w, self.horizon)

    def observe(self, step: int, elapsed: float) -> None:
        """Measure the pace after `step` steps taking `elapsed` seconds; re-aim the decay if the budget binds."""
        budget = self.time_budget_s
        if budget and step == PACE_FROM_STEP:
            self.pace_from = elapsed
        elif budget and step > PACE_FROM_STEP and elapsed >= 0.1 * budget:
            per_step = (elapsed - self.pace_from) / (step - PACE_FROM_STEP)
            if elapsed + (self.planned - step) * per_step > budget:
                self.horizon = int(min(self.planned, max(step + 1, step + (budget - elapsed) / max(per_step, 1e-9))))
            else:
                self.horizon = self.planned

    def should_stop(self, step: int, elapsed: float) -> bool:
        """The budget is spent, or a re-aimed (shortened) horizon is reached."""
        return bool(
            (self.time_budget_s and elapsed >= self.time_budget_s)
            or step >= self.horizon
            and self.horizon < self.planned
        )


@dataclass(frozen=True)
class PretrainPlan:
    """What a pretraining run does, fixed before its first step: the cells of each split, the model, the
    seeds, the batches and the learning-rate schedule.

    Every random draw of the run comes from `seed`: the held-out split (`numpy` generator `seed`), the
    initial weights and then dropout (torch's global generator, seeded to `init_seed` inside the run and
    restored afterwards, see `_seeded_torch_rng`), the masked positions and their corruption (a torch
    generator seeded `masking_seed`), the batch order of each epoch (`batch_seed(epoch)`) and the held-out
    masking (`eval_seed`).
    """

    train: list
    held: list
    vocab_size: int
    pad_id: int
    mask_id: int
    special_ids: list
    model: dict  # keyword arguments of `build_small_bert` besides the vocabulary size and the seed
    seed: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    time_budget_s: float | None
    log_every: int
    hyperparameters: dict
    cell_loss_weight: float = 0.0  # weight of the cell-level objective beside the masked genes (0: masked genes only)
    cell_objective: str = "genes"  # `genes` (`cell_gene_loss`) or `components` (`cell_component_loss`)
    cell_components: int = 32  # principal components the `components` objective regresses

    @property
    def init_seed(self) -> int:
        return int(self.seed)

    @property
    def masking_seed(self) -> int:
        return int(self.seed) + 1

    @property
    def eval_seed(self) -> int:
        return self.seed + 7

    def batch_seed(self, epoch: int) -> int:
        return self.seed * 1000 + epoch

    def batches(self, epoch: int) -> list:
        """The training batches of `epoch` (1-based): length-grouped, shuffled by `batch_seed(epoch)`."""
        lengths = np.array([len(x) for x in self.train])
        return length_grouped_batches(lengths, self.batch_size, shuffle=True, seed=self.batch_seed(epoch))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    @property
    def planned_steps(self) -> int:
        return self.steps_per_epoch * int(self.epochs)

    @property
    def warmup_steps(self) -> int:
        return max(1, math.ceil(self.warmup_ratio * self.planned_steps))

    def schedule(self) -> LrSchedule:
        return LrSchedule(self.planned_steps, self.warmup_steps, self.time_budget_s)


def plan_pretraining(
    corpus_ds,
    dicts,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    intermediate: int = 256,
    max_len: int = 256,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-3,
    seed: int = 0,
    time_budget_s: float | None = None,
    holdout_fraction: float = 0.1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.001,
    dropout: float = 0.02,
    log_every: int = 10,
    cell_loss_weight: float = 0.0,
    cell_objective: str = "genes",
    cell_components: int = 32,
) -> PretrainPlan:
    """Check the corpus against the dictionaries, split off the held-out cells and fix the run's plan."""
    try:
        raw = corpus_ds["input_ids"]
    except (KeyError, ValueError):
        raise InputError("the pretraining corpus has no input_ids column; tokenize it first") from None
    ids = [np.asarray(x, dtype=np.int64)[: int(max_len)] for x in raw]
    ids = [x for x in ids if len(x)]
    if len(ids) < 10:
        raise InputError(f"the pretraining corpus has {len(ids)} non-empty cells; give it at least 10")
    vocab_size = len(dicts.token_dict)
    top_id = max(int(x.max()) for x in ids)
    if top_id >= vocab_size:
        raise InputError(
            f"the corpus uses token id {top_id} but the dictionary has {vocab_size} tokens; "
            "tokenize the corpus with the same dictionaries"
        )

    if cell_objective not in CELL_OBJECTIVES:
        raise InputError(f"cell objective {cell_objective!r}: use one of {', '.join(CELL_OBJECTIVES)}")
    if int(cell_components) < 1:
        raise InputError(f"cell_components {cell_components} must be at least 1")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_hold = min(len(ids) - 1, max(1, int(round(holdout_fraction * len(ids)))))
    return PretrainPlan(
        train=[ids[i] for i in order[n_hold:]],
        held=[ids[i] for i in order[:n_hold]],
        vocab_size=vocab_size,
        pad_id=int(dicts.pad_id),
        mask_id=int(dicts.mask_id),
        special_ids=sorted(int(s) for s in dicts.special_ids),
        model=dict(
            layers=layers, hidden=hidden, heads=heads, intermediate=intermediate, max_len=max_len, dropout=dropout
        ),
        seed=seed,
        epochs=int(epochs),
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        time_budget_s=time_budget_s,
        log_every=log_every,
        cell_loss_weight=float(cell_loss_weight),
        cell_objective=str(cell_objective),
        cell_components=int(cell_components),
        hyperparameters={
            "layers": layers,
            "hidden": hidden,
            "heads": heads,
            "intermediate": intermediate,
            "max_len": max_len,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "time_budget_s": time_budget_s,
            "holdout_fraction": holdout_fraction,
            "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay,
            "dropout": dropout,
            "mask_probability": MASK_PROBABILITY,
            "cell_loss_weight": float(cell_loss_weight),
            "cell_objective": str(cell_objective),
            "cell_components": int(cell_components),
        },
    )


@contextlib.contextmanager
def _seeded_torch_rng(seed: int, device):
    """Within the block, torch's global generator (CPU, and `device`'s when it is a GPU) starts at `seed`;
    afterwards the caller's state is back. Weight initialisation and dropout draw from it, so pretraining
    neither depends on nor disturbs the RNG state of the code around it."""
    import torch

    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"):
        torch.default_generator.manual_seed(int(seed))
        for index in gpus:
            torch.cuda.default_generators[index].manual_seed(int(seed))
        yield


class _RunRecord:
    """The store calls of a run; nothing is recorded without both a store and a run id."""

    def __init__(self, store, run_id):
        self.enabled = store is not None and run_id is not None
        self.store, self.run_id = store, run_id

    def event(self, message: str) -> None:
        if self.enabled:
            self.store.log_event(self.run_id, message, stage=STAGE)

    def metrics(self, rows: list) -> None:
        if self.enabled:
            self.store.log_metrics(self.run_id, rows)

    def progress(self, done: int, total: int, **kw) -> None:
        if self.enabled:
            self.store.set_progress(self.run_id, STAGE, done, total, unit="steps", **kw)

    def json(self, name: str, obj) -> None:
        if self.enabled:
            self.store.put_json(self.run_id, name, obj)


# -------------------------------------------------------------------------------------------- epochs
@dataclass
class PretrainRun:
    """The model, optimiser and counters of a run in progress (see `start_run`, `run_epoch`)."""

    model: object
    optimizer: object
    scheduler: object
    schedule: LrSchedule
    generator: object  # masking and corruption
    device: object
    amp_dtype: object
    step: int = 0
    cells: int = 0
    window: list = field(default_factory=list)  # train losses since the last logged mean
    losses: list = field(default_factory=list)  # logged means (the train loss curve)
    stopped_early: bool = False
    epochs_done: int = 0
    t_train: float = 0.0
    last_progress: float = 0.0
    idf: object = None  # `gene_idf` of the training cells on the device, for the cell-level objective
    component_head: object = None  # `components` objective: the linear head on the first position
    component_targets: object = None  # `components` objective: `cell_component_targets`, one row per training cell

    def flush_losses(self) -> None:
        if self.window:
            self.losses.append(float(np.mean(self.window)))
            self.window = []


def start_run(plan: PretrainPlan, device) -> PretrainRun:
    """Build the model (initial weights from torch's global generator, see `_seeded_torch_rng`), AdamW with
    Hugging Face's decay groups, the schedule and the masking generator; start the output bias at the
    training cells' log gene frequencies."""
    import torch

    from pipeline.models.load import build_small_bert

    model = build_small_bert(plan.vocab_size, pad_token_id=plan.pad_id, seed=None, **plan.model)
    model.to(device)
    components = plan.cell_loss_weight and plan.cell_objective == "components"
    head, named = None, list(model.named_parameters())
    if components:
        head = torch.nn.Linear(int(plan.model["hidden"]), plan.cell_components).to(device)
        named += [(f"component_head.{n}", p) for n, p in head.named_parameters()]
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    optimizer = torch.optim.AdamW(
        decay_parameter_groups(named, plan.weight_decay, plan.lr),
        lr=plan.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    schedule = plan.schedule()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    generator = torch.Generator().manual_seed(plan.masking_seed)
    init_output_bias(model, plan.train, plan.vocab_size, plan.special_ids)
    run = PretrainRun(model, optimizer, scheduler, schedule, generator, device, amp_dtype)
    if components:
        run.component_head = head
        targets = cell_component_targets(plan.train, plan.vocab_size, plan.special_ids, plan.cell_components, plan.seed)
        run.component_targets = torch.as_tensor(targets, device=device)
    elif plan.cell_loss_weight:
        run.idf = torch.as_tensor(gene_idf(plan.train, plan.vocab_size), device=device)
    return run


def _train_step(run: PretrainRun, plan: PretrainPlan, batch_ids, mask, cells=None) -> float | None:
    """One masked-gene step on a padded batch (`cells`: the batch's rows of `plan.train`); None when the
    batch has no position to mask."""
    import torch

    selected = select_masked_positions(batch_ids, mask, plan.special_ids, MASK_PROBABILITY, run.generator)
    if not selected.any():
        return None
    corrupted = corrupt_selected(batch_ids, selected, plan.mask_id, plan.vocab_size, run.generator)
    dev = run.device
    ctx = torch.autocast("cuda", dtype=run.amp_dtype) if run.amp_dtype is not None else _null()
    with ctx:
        logits, hidden = _masked_logits(run.model, corrupted.to(dev), mask.to(dev), selected.to(dev), with_hidden=True)
    loss = torch.nn.functional.cross_entropy(logits.float(), batch_ids[selected].to(dev))
    if run.component_head is not None:
        with ctx:
            targets = run.component_targets[torch.as_tensor(np.asarray(cells), device=dev)]
            loss = loss + plan.cell_loss_weight * cell_component_loss(run.component_head, hidden, targets)
    elif plan.cell_loss_weight:
        with ctx:
            loss = loss + plan.cell_loss_weight * cell_gene_loss(
                run.model, hidden, batch_ids.to(dev), mask.to(dev), plan.special_ids, run.idf
            )
    loss.backward()
    params = list(run.model.parameters())
    if run.component_head is not None:
        params += list(run.component_head.parameters())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return float(loss.detach())


def run_epoch(
    run: PretrainRun,
    plan: PretrainPlan,
    epoch: int,
    *,
    progress: Callable | None = None,
    record: _RunRecord | None = None,
) -> bool:
    """Train one epoch; returns whether the time budget stopped it. Logs the mean train loss and the
    learning rate every `plan.log_every` steps, and reports progress at most once a second."""
    import torch

    record = record or _RunRecord(None, None)
    run.model.train()
    for idx in plan.batches(epoch):
        batch_ids, mask = pad_batch([plan.train[i] for i in idx], pad_token_id=plan.pad_id)
        lr_now = run.scheduler.get_last_lr()[0]
        loss = _train_step(run, plan, batch_ids, mask, idx)
        if loss is None:
            continue
        run.step += 1
        step = run.step
        run.cells += len(idx)
        run.window.append(loss)
        elapsed = time.perf_counter() - run.t_train
        run.schedule.observe(step, elapsed)
        if step % plan.log_every == 0:
            mean = float(np.mean(run.window))
            run.losses.append(mean)
            run.window = []
            record.metrics(
                [
                    {"name": "loss", "value": mean, "step": step, "epoch": epoch, "split": "train"},
                    {"name": "lr", "value": lr_now, "step": step, "epoch": epoch, "split": "train"},
                ]
            )
        total = run.schedule.horizon
        eta = max(0.0, (total - step) * elapsed / step)
        now = time.perf_counter()
        if now - run.last_progress > 1.0:
            run.last_progress = now
            if progress:
                gpus = [run.device.index or 0] if run.device.type == "cuda" else []
                with torch.random.fork_rng(devices=gpus, device_type="cuda"):  # the callback cannot move dropout
                    progress(
                        step,
                        total,
                        throughput=step / max(elapsed, 1e-9),
                        eta_s=eta,
                        message=f"epoch {epoch}, loss {run.window[-1] if run.window else run.losses[-1]:.3f}, "
                        f"{run.cells / max(elapsed, 1e-9):.0f} cells/s",
                    )
            record.progress(step, total, throughput=run.cells / max(elapsed, 1e-9), eta_s=eta)
        if run.schedule.should_stop(step, elapsed):
            run.stopped_early = True
            return True
    return False


# ------------------------------------------------------------------------------------------ evaluate
def evaluate_heldout(run: PretrainRun, plan: PretrainPlan, *, baselines: tuple | None = None) -> dict:
    """`evaluate_masked_genes` on the held-out cells (the same masked positions every time: `eval_seed`);
    with `baselines` (`frequency_baselines` of the training cells) also the chance and rank-aware scores."""
    top_gene, position_genes = baselines if baselines is not None else (None, None)
    return evaluate_masked_genes(
        run.model,
        plan.held,
        pad_id=plan.pad_id,
        mask_id=plan.mask_id,
        special_ids=plan.special_ids,
        device=run.device,
        seed=plan.eval_seed,
        top_gene=top_gene,
        position_genes=position_genes,
    )


def pretraining_metrics(
    ev: dict, run: PretrainRun, plan: PretrainPlan, *, train_seconds: float, seconds: float
) -> dict:
    """The metrics `pretrain` returns, from the final held-out evaluation and the run's counters."""
    return {
        "heldout_accuracy": ev["masked_accuracy"],
        "heldout_top5_accuracy": ev["masked_top5_accuracy"],
        "heldout_loss": ev["masked_loss"],
        "chance_accuracy": ev["chance_accuracy"],
        "position_baseline_accuracy": ev["position_baseline_accuracy"],
        "heldout_masked_genes": ev["n_masked"],
        "train_loss": run.losses[-1] if run.losses else float("nan"),
        "steps": run.step,
        "epochs": run.epochs_done,
        "stopped_by_time_budget": bool(run.stopped_early),
        "train_cells": len(plan.train),
        "heldout_cells": len(plan.held),
        "vocab_size": plan.vocab_size,
        "train_seconds": train_seconds,
        "seconds": seconds,
    }


# -------------------------------------------------------------------------------------------- record
def record_pretraining(
    model,
    dicts,
    out_dir: str | os.PathLike,
    plan: PretrainPlan,
    metrics: dict,
    losses: list,
    record: _RunRecord | None = None,
) -> dict:
    """Write the Geneformer-like checkpoint (`config.json`, `model.safetensors`, the dictionaries) and
    `gfattn_pretrain.json`; with a store, record the held-out metrics, the summary and the final event.
    Returns the summary. Moves the model to the CPU."""
    from pipeline.models.load import _quiet_transformers

    record = record or _RunRecord(None, None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["BertForMaskedLM"]
    model.to("cpu")
    with _quiet_transformers():
        model.save_pretrained(str(out))
    dicts.save(out)
    summary = {"metrics": metrics, "hyperparameters": plan.hyperparameters, "train_loss_curve": losses}
    (out / "gfattn_pretrain.json").write_text(json.dumps(summary, indent=2))
    step, epochs_done = metrics["steps"], metrics["epochs"]
    record.metrics(
        [
            {"name": name, "value": float(metrics[key]), "step": step, "epoch": epochs_done, "split": "heldout"}
            for name, key in (
                ("masked_accuracy", "heldout_accuracy"),
                ("masked_top5_accuracy", "heldout_top5_accuracy"),
                ("loss", "heldout_loss"),
                ("chance_accuracy", "chance_accuracy"),
                ("position_baseline_accuracy", "position_baseline_accuracy"),
            )
        ]
    )
    record.json("pretrain", summary)
    record.progress(step, step)
    record.event(
        f"held-out masked-gene accuracy {metrics['heldout_accuracy']:.3f} "
        f"(chance {metrics['chance_accuracy']:.3f}, rank-aware "
        f"{metrics['position_baseline_accuracy']:.3f}) after {step} steps"
    )
    return summary


def pretrain(
    corpus_ds,
    dicts,
    out_dir: str | os.PathLike,
    *,
    progress: Callable | None = None,
    device: str = "auto",
    store=None,
    run_id: int | None = None,
    **recipe,
) -> dict:
    """Pretrain a small BERT on rank-value encoded cells (`input_ids`) by masked-gene prediction.

    `dicts` is the `GeneDictionaries` the corpus was tokenized with (its size is the vocabulary). Returns
    the held-out metrics (also written to `out_dir/gfattn_pretrain.json`): `heldout_accuracy` (top-1 on
    masked genes), `chance_accuracy` (most frequent gene), `position_baseline_accuracy` (most frequent gene
    at the rank), top-5 accuracy and loss, final train loss, steps, seconds. `progress` is called as
    `progress(step, total_steps, throughput=steps_per_s, eta_s=..., message=...)`; with `store` and
    `run_id`, train loss/lr and held-out accuracy per epoch are recorded. `recipe`: the keywords of
    `plan_pretraining` (model size, epochs, batch size, learning rate, seed, time budget, objectives).

    The same arguments give the same weights and metrics whatever ran before in the process: every draw
    comes from `seed` (see `PretrainPlan`), and the caller's global RNG state is left as it was.
    Steps: `plan_pretraining`, `start_run`, `run_epoch` per epoch (then `evaluate_heldout`, recorded),
    `evaluate_heldout` with the baselines, `record_pretraining`.
    """
    from pipeline.compute import resolve_device

    t_start = time.perf_counter()
    plan = plan_pretraining(corpus_ds, dicts, **recipe)
    dev = resolve_device(device)
    record = _RunRecord(store, run_id)
    with _seeded_torch_rng(plan.init_seed, dev):
        run = start_run(plan, dev)
        record.event(
            f"pretraining on {len(plan.train)} cells ({len(plan.held)} held out), vocabulary "
            f"{plan.vocab_size}, {plan.model['layers']} layers x {plan.model['hidden']}"
        )
        run.t_train = time.perf_counter()
        for epoch in range(1, plan.epochs + 1):
            stopped = run_epoch(run, plan, epoch, progress=progress, record=record)
            run.epochs_done = epoch
            if stopped:
                break
            if record.enabled:
                ev = evaluate_heldout(run, plan)
                record.metrics(
                    [
                        {
                            "name": "masked_accuracy",
                            "value": ev["masked_accuracy"],
                            "step": run.step,
                            "epoch": epoch,
                            "split": "validation",
                        },
                        {
                            "name": "loss",
                            "value": ev["masked_loss"],
                            "step": run.step,
                            "epoch": epoch,
                            "split": "validation",
                        },
                    ]
                )
        run.flush_losses()
        train_seconds = time.perf_counter() - run.t_train
        ev = evaluate_heldout(run, plan, baselines=frequency_baselines(plan.train, plan.special_ids))
    metrics = pretraining_metrics(ev, run, plan, train_seconds=train_seconds, seconds=time.perf_counter() - t_start)
    record_pretraining(run.model, dicts, out_dir, plan, metrics, run.losses, record)
    return metrics


def _null():
    return contextlib.nullcontext()
