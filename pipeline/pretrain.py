"""Masked-gene pretraining of a small Geneformer-style BERT (Theodoris et al. 2023, "Pretraining").

Geneformer pretrains with Hugging Face's `DataCollatorForLanguageModeling(mlm_probability=0.15)`: 15% of
each cell's real (non-special) tokens are selected; of those, 80% become `<mask>`, 10% a random token of
the vocabulary and 10% stay as they are; the model predicts the original gene at every selected position
(cross-entropy). gfattn does the same, computing the prediction head only at the selected positions
(which gives the same loss as scoring every position and ignoring the rest, at a fraction of the cost),
with length-grouped batches padded to their own longest cell, AdamW, linear warm-up and linear decay.

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
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.batching import length_grouped_batches, pad_batch
from pipeline.errors import InputError

MASK_PROBABILITY = 0.15
PACE_FROM_STEP = 3  # steps before a time budget measures the pace (allocation, kernel selection)
STAGE = "pretrain"


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


def _masked_logits(model, input_ids, attention_mask, selected):
    hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.cls(hidden[selected])


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


def evaluate_masked_genes(model, ids: list, *, pad_id: int, mask_id: int, special_ids, device, seed: int,
                          batch_size: int = 64, top_gene: int | None = None,
                          position_genes: dict[int, int] | None = None) -> dict:
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


def pretrain(
    corpus_ds,
    dicts,
    out_dir: str | os.PathLike,
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
    progress: Callable | None = None,
    holdout_fraction: float = 0.1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.001,
    dropout: float = 0.02,
    device: str = "auto",
    store=None,
    run_id: int | None = None,
    log_every: int = 10,
) -> dict:
    """Pretrain a small BERT on rank-value encoded cells (`input_ids`) by masked-gene prediction.

    `dicts` is the `GeneDictionaries` the corpus was tokenized with (its size is the vocabulary). Returns
    the held-out metrics (also written to `out_dir/gfattn_pretrain.json`): `heldout_accuracy` (top-1 on
    masked genes), `chance_accuracy` (most frequent gene), `position_baseline_accuracy` (most frequent gene
    at the rank), top-5 accuracy and loss, final train loss, steps, seconds. `progress` is called as
    `progress(step, total_steps, throughput=steps_per_s, eta_s=..., message=...)`; with `store` and
    `run_id`, train loss/lr and held-out accuracy per epoch are recorded.
    """
    import torch

    from pipeline.model import _quiet_transformers, build_small_bert
    from pipeline.train import decay_parameter_groups, resolve_device, seed_everything

    t_start = time.perf_counter()
    seed_everything(seed)
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
        raise InputError(f"the corpus uses token id {top_id} but the dictionary has {vocab_size} tokens; "
                         "tokenize the corpus with the same dictionaries")
    pad_id, mask_id = int(dicts.pad_id), int(dicts.mask_id)
    special_ids = sorted(int(s) for s in dicts.special_ids)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_hold = min(len(ids) - 1, max(1, int(round(holdout_fraction * len(ids)))))
    held = [ids[i] for i in order[:n_hold]]
    train = [ids[i] for i in order[n_hold:]]
    train_lengths = np.array([len(x) for x in train])

    dev = resolve_device(device)
    model = build_small_bert(vocab_size, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                             max_len=max_len, dropout=dropout, pad_token_id=pad_id, seed=seed)
    model.to(dev)
    amp_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    optimizer = torch.optim.AdamW(decay_parameter_groups(model.named_parameters(), weight_decay, lr), lr=lr,
                                  betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    planned = steps_per_epoch * int(epochs)
    horizon = [planned]  # shrinks to what the time budget allows
    pace_from = 0.0
    warmup = max(1, math.ceil(warmup_ratio * planned))

    def factor(step: int) -> float:
        w = min(warmup, max(1, horizon[0] // 10)) if horizon[0] < planned else warmup
        if step < w:
            return (step + 1) / (w + 1)
        return max(0.0, (horizon[0] - step) / max(1, horizon[0] - w))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    top_gene, position_genes = frequency_baselines(train, special_ids)
    init_output_bias(model, train, vocab_size, special_ids)
    record = store is not None and run_id is not None
    if record:
        store.log_event(run_id, f"pretraining on {len(train)} cells ({n_hold} held out), vocabulary {vocab_size}, "
                                f"{layers} layers x {hidden}", stage=STAGE)

    step = 0
    cells = 0
    window = []
    losses = []
    stopped_early = False
    epochs_done = 0
    t_train = time.perf_counter()
    last_progress = 0.0
    for epoch in range(1, int(epochs) + 1):
        model.train()
        for idx in length_grouped_batches(train_lengths, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            batch_ids, mask = pad_batch([train[i] for i in idx], pad_token_id=pad_id)
            selected = select_masked_positions(batch_ids, mask, special_ids, MASK_PROBABILITY, gen)
            if not selected.any():
                continue
            corrupted = corrupt_selected(batch_ids, selected, mask_id, vocab_size, gen)
            lr_now = scheduler.get_last_lr()[0]
            ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else _null()
            with ctx:
                logits = _masked_logits(model, corrupted.to(dev), mask.to(dev), selected.to(dev))
            loss = torch.nn.functional.cross_entropy(logits.float(), batch_ids[selected].to(dev))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            cells += len(idx)
            window.append(float(loss.detach()))
            elapsed = time.perf_counter() - t_train
            if time_budget_s and step == PACE_FROM_STEP:
                pace_from = elapsed
            elif time_budget_s and step > PACE_FROM_STEP and elapsed >= 0.1 * time_budget_s:
                # Re-aim the decay at the number of steps the budget still allows, only while the planned
                # steps would overrun it at the pace measured after the first (slow, warming-up) steps: a
                # budget that does not bind leaves the schedule, and so the model, independent of timing.
                per_step = (elapsed - pace_from) / (step - PACE_FROM_STEP)
                if elapsed + (planned - step) * per_step > time_budget_s:
                    horizon[0] = int(min(planned, max(step + 1, step + (time_budget_s - elapsed) / max(per_step, 1e-9))))
                else:
                    horizon[0] = planned
            if step % log_every == 0:
                mean = float(np.mean(window))
                losses.append(mean)
                window = []
                if record:
                    store.log_metrics(run_id, [
                        {"name": "loss", "value": mean, "step": step, "epoch": epoch, "split": "train"},
                        {"name": "lr", "value": lr_now, "step": step, "epoch": epoch, "split": "train"},
                    ])
            total = horizon[0]
            eta = max(0.0, (total - step) * elapsed / step)
            now = time.perf_counter()
            if now - last_progress > 1.0:
                last_progress = now
                if progress:
                    progress(step, total, throughput=step / max(elapsed, 1e-9), eta_s=eta,
                             message=f"epoch {epoch}, loss {window[-1] if window else losses[-1]:.3f}, "
                                     f"{cells / max(elapsed, 1e-9):.0f} cells/s")
                if record:
                    store.set_progress(run_id, STAGE, step, total, unit="steps",
                                       throughput=cells / max(elapsed, 1e-9), eta_s=eta)
            if (time_budget_s and elapsed >= time_budget_s) or step >= horizon[0] and horizon[0] < planned:
                stopped_early = True
                break
        epochs_done = epoch
        if record and not stopped_early:
            ev = evaluate_masked_genes(model, held, pad_id=pad_id, mask_id=mask_id, special_ids=special_ids,
                                       device=dev, seed=seed + 7)
            store.log_metrics(run_id, [
                {"name": "masked_accuracy", "value": ev["masked_accuracy"], "step": step, "epoch": epoch,
                 "split": "validation"},
                {"name": "loss", "value": ev["masked_loss"], "step": step, "epoch": epoch, "split": "validation"},
            ])
        if stopped_early:
            break
    if window:
        losses.append(float(np.mean(window)))
    train_seconds = time.perf_counter() - t_train

    ev = evaluate_masked_genes(model, held, pad_id=pad_id, mask_id=mask_id, special_ids=special_ids, device=dev,
                               seed=seed + 7, top_gene=top_gene, position_genes=position_genes)
    metrics = {
        "heldout_accuracy": ev["masked_accuracy"],
        "heldout_top5_accuracy": ev["masked_top5_accuracy"],
        "heldout_loss": ev["masked_loss"],
        "chance_accuracy": ev["chance_accuracy"],
        "position_baseline_accuracy": ev["position_baseline_accuracy"],
        "heldout_masked_genes": ev["n_masked"],
        "train_loss": losses[-1] if losses else float("nan"),
        "steps": step,
        "epochs": epochs_done,
        "stopped_by_time_budget": bool(stopped_early),
        "train_cells": len(train),
        "heldout_cells": n_hold,
        "vocab_size": vocab_size,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["BertForMaskedLM"]
    model.to("cpu")
    with _quiet_transformers():
        model.save_pretrained(str(out))
    dicts.save(out)
    summary = {
        "metrics": metrics,
        "hyperparameters": {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": intermediate,
                            "max_len": max_len, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                            "time_budget_s": time_budget_s, "holdout_fraction": holdout_fraction,
                            "warmup_ratio": warmup_ratio, "weight_decay": weight_decay, "dropout": dropout,
                            "mask_probability": MASK_PROBABILITY},
        "train_loss_curve": losses,
    }
    (out / "gfattn_pretrain.json").write_text(json.dumps(summary, indent=2))
    if record:
        store.log_metrics(run_id, [
            {"name": name, "value": float(metrics[key]), "step": step, "epoch": epochs_done, "split": "heldout"}
            for name, key in (("masked_accuracy", "heldout_accuracy"), ("masked_top5_accuracy", "heldout_top5_accuracy"),
                              ("loss", "heldout_loss"), ("chance_accuracy", "chance_accuracy"),
                              ("position_baseline_accuracy", "position_baseline_accuracy"))
        ])
        store.put_json(run_id, "pretrain", summary)
        store.set_progress(run_id, STAGE, step, step, unit="steps")
        store.log_event(run_id, f"held-out masked-gene accuracy {metrics['heldout_accuracy']:.3f} "
                                f"(chance {metrics['chance_accuracy']:.3f}, rank-aware "
                                f"{metrics['position_baseline_accuracy']:.3f}) after {step} steps", stage=STAGE)
    return metrics


def _null():
    import contextlib

    return contextlib.nullcontext()
