"""The fixed-length experiment the thesis proposes (thesis 4.4, 5.1): every cell has exactly N genes.

Attention per rank position is confounded by cell length: a rank that is the last gene of a short cell
is a middle gene of a long one. Giving every cell the same number of genes removes that confound.
`fix_length(ds, n, mode=...)` works on a tokenized `datasets.Dataset` (`input_ids` in Geneformer's rank
order, docs/architecture.md "The tokenizer"):

- `mode="top"`: each cell keeps its N top-ranked genes (the first N gene tokens);
- `mode="subsample"`: N of the cell's genes drawn uniformly without replacement, kept in their relative
  rank order; cell i draws from `numpy.random.default_rng((seed, i))` (i its index in the input
  dataset), so a cell's draw depends neither on the other cells nor on batching.

Only gene tokens count: special tokens (V2's `<cls>` first and `<eos>` last, and any other id in
`special_ids`) stay where they are. Cells with fewer than N genes are dropped and counted in the
report. The `length` column, when present, is rewritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

MODES = ("top", "subsample")


@dataclass
class FixedLengthReport:
    """What `fix_length` did: cells in, kept and dropped (with fewer than `n` genes)."""

    n: int
    mode: str
    seed: int | None
    cells_in: int
    cells_out: int
    cells_dropped: int
    genes_before_median: float | None = None  # median gene count of the input cells
    dropped_cell_ids: list[str] = field(default_factory=list)  # at most the first 100

    def to_dict(self) -> dict:
        return asdict(self)


def _keep_genes(ids: np.ndarray, gene: np.ndarray, n: int, mode: str, rng) -> np.ndarray:
    """The tokens of one cell with exactly `n` gene tokens; special tokens keep their places."""
    positions = np.flatnonzero(gene)
    if mode == "top":
        chosen = positions[:n]
    else:
        chosen = np.sort(rng.choice(positions, size=n, replace=False))
    keep = ~gene
    keep[chosen] = True
    return ids[keep]


def fix_length(
    ds,
    n: int,
    *,
    mode: str = "top",
    seed: int | None = 0,
    special_ids: Iterable[int] = (),
    batch_size: int = 1000,
):
    """Every cell of `ds` with exactly `n` gene tokens; cells with fewer are dropped.

    `ds`: a tokenized `datasets.Dataset` with `input_ids` (and optionally `length`, `cell_id`, obs
    columns, which are kept). `special_ids`: token ids that are not genes (`GeneDictionaries.special_ids`,
    pad and mask included). Returns `(dataset, FixedLengthReport)`.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"fixed length must be at least 1 gene, got {n}")
    if mode not in MODES:
        raise ValueError(f"fixed_length_mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "subsample" and seed is None:
        raise ValueError("subsample mode needs a seed")
    special = np.asarray(sorted(int(s) for s in special_ids), dtype=np.int64)

    def genes_of(ids: np.ndarray) -> np.ndarray:
        return ~np.isin(ids, special) if special.size else np.ones(len(ids), dtype=bool)

    counts = np.asarray([int(genes_of(np.asarray(x, dtype=np.int64)).sum()) for x in ds["input_ids"]], dtype=np.int64)
    keep_idx = np.flatnonzero(counts >= n)
    cell_ids = ds["cell_id"] if "cell_id" in ds.column_names else [str(i) for i in range(len(ds))]
    dropped = [str(cell_ids[i]) for i in np.flatnonzero(counts < n)[:100]]
    out = ds.select(keep_idx.tolist())

    def transform(batch, indices):
        new_ids = []
        for ids, index in zip(batch["input_ids"], indices):
            arr = np.asarray(ids, dtype=np.int64)
            rng = np.random.default_rng((int(seed), int(keep_idx[index]))) if mode == "subsample" else None
            new_ids.append(_keep_genes(arr, genes_of(arr), n, mode, rng).tolist())
        result = {"input_ids": new_ids}
        if "length" in batch:
            result["length"] = [len(x) for x in new_ids]
        return result

    if len(out):
        features = out.features.copy()
        out = out.map(transform, batched=True, batch_size=batch_size, with_indices=True, features=features)
    report = FixedLengthReport(
        n=n,
        mode=mode,
        seed=None if seed is None else int(seed),
        cells_in=len(ds),
        cells_out=len(out),
        cells_dropped=int(len(ds) - len(out)),
        genes_before_median=float(np.median(counts)) if len(counts) else None,
        dropped_cell_ids=dropped,
    )
    return out, report
