"""Checkpoint sanity before fine-tuning: does a user's masked-LM checkpoint know the user's cells?

On a seeded sample of the training cells, 15% of each cell's genes (the pretraining collator's rule,
`pipeline.models.pretrain.select_masked_positions`) are replaced by <mask> and the checkpoint predicts them;
its top-1 and top-10 accuracy stand against the gene-frequency baseline, which always guesses the genes
detected in the most training cells, and against chance (10 / genes in the vocabulary). A checkpoint no
better than that baseline and within `MIN_LIFT` times chance has random weights, or reads the cells through
dictionaries that are not its own (V1 dictionaries with a V2 model: the token ids mean other genes), and
its attention says nothing about the genes. A small model may know the cells' genes (many times chance)
without beating their frequency on a one-cell-line data set (gfattn's shipped model on sci-Plex-like
cells); that is said, not warned. Only masked-LM checkpoints have the
head this needs; cells are cut to their top `MAX_POSITIONS` ranks to keep the check cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SAMPLE_CELLS = 96
MAX_POSITIONS = 512
TOP_K = 10
MIN_LIFT = 3.0  # a model under the frequency baseline must still beat chance (10 / genes) this many times


def frequency_ranking(train_ids: Sequence[Sequence[int]], special_ids) -> np.ndarray:
    """Token ids by the number of training cells that hold them, most frequent first (special tokens left out)."""
    special = set(int(s) for s in special_ids)
    counts: dict[int, int] = {}
    for seq in train_ids:
        for tok in set(int(t) for t in seq):
            if tok not in special:
                counts[tok] = counts.get(tok, 0) + 1
    return np.asarray(sorted(counts, key=lambda t: (-counts[t], t)), dtype=np.int64)


def masked_gene_check(
    model_dir,
    train_ids: Sequence[Sequence[int]],
    dicts,
    *,
    seed: int,
    device: str = "cpu",
    cells: int = SAMPLE_CELLS,
    batch_size: int = 16,
    max_positions: int = MAX_POSITIONS,
) -> dict | None:
    """{"cells", "top1", "top10", "baseline_top1", "baseline_top10", "ok", "message"} of a masked-LM
    checkpoint on a seeded sample of `train_ids`; None when the checkpoint has no masked-LM head."""
    import torch
    from transformers import BertForMaskedLM

    from pipeline.models.load import MASKED_LM_ARCHITECTURES, _quiet_transformers, read_model_config
    from pipeline.models.pretrain import MASK_PROBABILITY, select_masked_positions
    from pipeline.tokenize.batching import length_grouped_batches, pad_batch

    config = read_model_config(model_dir)
    if not any(a in MASKED_LM_ARCHITECTURES for a in (getattr(config, "architectures", None) or [])):
        return None
    if not len(train_ids):
        return None
    special = sorted(int(s) for s in dicts.special_ids)
    ranking = frequency_ranking(train_ids, special)
    rng = np.random.default_rng([int(seed), 4])
    pick = np.sort(rng.choice(len(train_ids), min(int(cells), len(train_ids)), replace=False))
    limit = min(int(max_positions), int(config.max_position_embeddings))
    ids = [list(train_ids[i])[:limit] for i in pick]
    with _quiet_transformers():
        model = BertForMaskedLM.from_pretrained(
            str(Path(model_dir)), local_files_only=True, weights_only=True, dtype=torch.float32
        )
    model.to(device).eval()
    gen = torch.Generator().manual_seed(int(seed))
    top_freq = torch.as_tensor(ranking[:TOP_K])
    n = hit1 = hit10 = base1 = base10 = 0
    lengths = np.array([len(x) for x in ids])
    with torch.no_grad():
        for idx in length_grouped_batches(lengths, batch_size):
            batch, mask = pad_batch([ids[i] for i in idx], pad_token_id=int(config.pad_token_id or 0))
            selected = select_masked_positions(batch, mask, special, MASK_PROBABILITY, gen)
            if not selected.any():
                continue
            masked = batch.clone()
            masked[selected] = int(dicts.mask_id)
            hidden = model.bert(input_ids=masked.to(device), attention_mask=mask.to(device)).last_hidden_state
            logits = model.cls(hidden[selected.to(device)]).float().cpu()
            target = batch[selected]
            top = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices
            hit1 += int((top[:, 0] == target).sum())
            hit10 += int((top == target[:, None]).any(dim=1).sum())
            if len(top_freq):
                base1 += int((target == top_freq[0]).sum())
                base10 += int((target[:, None] == top_freq[None, :]).any(dim=1).sum())
            n += int(selected.sum())
    del model
    out = {
        "cells": int(len(ids)),
        "masked_genes": int(n),
        "top1": hit1 / max(n, 1),
        "top10": hit10 / max(n, 1),
        "baseline_top1": base1 / max(n, 1),
        "baseline_top10": base10 / max(n, 1),
    }
    n_genes = max(1, len(dicts.token_dict) - len(special))
    out["chance_top10"] = min(TOP_K, n_genes) / n_genes
    lift = out["top10"] / out["chance_top10"]
    beats_frequency = out["top10"] > out["baseline_top10"]
    out["ok"] = bool(n == 0 or beats_frequency or lift >= MIN_LIFT)
    scores = (
        f"top-10 {out['top10']:.3f} vs {out['baseline_top10']:.3f} for the most frequent genes and "
        f"{out['chance_top10']:.4f} by chance; top-1 {out['top1']:.3f} vs {out['baseline_top1']:.3f}; {out['cells']} cells"
    )
    if beats_frequency:
        out["message"] = (
            f"checkpoint {model_dir} predicts masked genes of your cells better than their frequency ({scores})"
        )
    elif out["ok"]:
        out["message"] = (
            f"checkpoint {model_dir} predicts masked genes of your cells {lift:.0f}x better than chance but not better "
            f"than guessing the most frequent genes ({scores})"
        )
    else:
        out["message"] = (
            f"checkpoint {model_dir} predicts masked genes of your cells no better than guessing the most frequent "
            f"genes, and at most {MIN_LIFT:.0f}x chance ({scores}): random weights, or dictionaries that are not its "
            f"own ({dicts.version}; check --geneformer-dir and model.version); its attention says nothing about genes"
        )
    return out
