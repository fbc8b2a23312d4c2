"""Length-grouped batching shared by training and attention analysis.

Cells differ a lot in length (detected genes), so batches are formed from cells of similar length and
padded only to their own longest cell (docs/architecture.md, "Batching: length-bucketed, padded per batch"). For training, the
grouping follows Hugging Face's `LengthGroupedSampler` idea (random mega-batches, sorted inside),
which keeps batches random across epochs while padding little.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    mega_factor: int = 50,
) -> list[np.ndarray]:
    """Index batches of cells with similar lengths.

    Without `shuffle`, cells are sorted by length (longest first) and cut into consecutive batches, which
    is deterministic and pads the least. With `shuffle`, indices are permuted by `seed`, cut into
    mega-batches of `mega_factor * batch_size`, each sorted by length and cut into batches, and the batch
    order is shuffled again.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    mega = max(batch_size * mega_factor, batch_size)
    batches: list[np.ndarray] = []
    for start in range(0, n, mega):
        chunk = perm[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int = 0, pad_to: int | None = None):
    """Pad token sequences to the longest one (or to `pad_to`). Returns torch (input_ids, attention_mask)."""
    import torch

    longest = max(len(s) for s in sequences)
    width = max(longest, pad_to or 0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    return ids, mask
