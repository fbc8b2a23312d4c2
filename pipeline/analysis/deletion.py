"""In-silico deletion on a fine-tuned classifier: how the prediction changes when genes are removed.

A cell is a rank-value encoded sequence x = (x_1, ..., x_L) of gene token ids, most expressed first (V2:
`<cls>` first and `<eos>` last; V1: no special tokens). Deleting a set S of genes is Geneformer's
deletion perturbation: x \\ S keeps the order of the remaining tokens, the genes after a deleted one move
up one position, nothing new enters and special tokens are never deleted. For the classifier's logits
z(x) (`BertForSequenceClassification(input_ids, attention_mask).logits`) and the cell's true class y:

    delta_logit = z_y(x \\ S) - z_y(x)
    delta_prob  = softmax(z(x \\ S))_y - softmax(z(x))_y
    correct_after = argmax_c z_c(x \\ S) == y

A cell that holds none of S is unchanged: its deltas are exactly 0 and it costs no forward pass. Gene-set
summaries (`set_deletion`) average over all cells (unaffected cells count as 0, so a set of frequent genes
can matter more than one of rare genes) with a percentile bootstrap CI over cells
(`pipeline.analysis.pair.bootstrap_ci`), and compare a score's top-k genes with random gene sets matched to it
gene by gene on cells expressing and mean rank (`matching_features`, `nearest_matched_sets`; or on
quantile bins, `frequency_rank_bins`, `matched_random_sets`): the empirical p-value
p = (1 + #{random sets r: mean delta_prob(r) <= mean delta_prob(top)}) / (1 + R) is small when
deleting the top-k genes lowers the true-class probability more than deleting matched genes does. R
doubles while p sits at its floor 1 / (R + 1), up to a cap (`set_deletion`'s `max_random`).

Why it is written here: Geneformer's `InSilicoPerturber` deletes one gene (or a set) at a time and
measures the cosine shift of the cell and gene embeddings of the pretrained or fine-tuned encoder, not the
classifier's prediction; it is not importable here (it needs the Geneformer package and its dataset
layout). No library batches deletions across gene sets: a loop over sets and cells runs one short forward
pass each and mostly recomputes unaffected cells.

Cost: one forward pass per distinct deleted sequence of a (set, affected cell) pair plus one baseline
pass per cell, nothing for unaffected cells. `DeletionEngine.effects` builds an inverted index token -> (cell, position) once, pools
every (set, affected cell) deleted sequence of a call, sorts the pool by length and runs it in batches of
`batch_size` padded to their own longest sequence, so many small sets share full batches; a deleted
sequence that several sets produce (the same genes of the cell removed) runs once. Only one batch
of padded tensors exists at a time; the pool itself is integer arrays (set, cell, deleted positions).
Results are float64 numpy arrays on any device. `bench/bench_deletion.py` (525 sets, one CPU thread):
22x a loop of single forwards for the `default` preset's model and cells, within 1.08x of the bare
forward passes it needs; for a 4-layer, 64-wide model on 100-256 tokens, whose forward pass is
compute-bound on CPU, 3.8x (the bare forwards are 95% of the batched time there).

One module: the deletion engine (pooled, length-batched forwards), its naive reference loop and the matched
random sets share the sequence builder they are tested against.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np

from pipeline.tokenize.batching import length_grouped_batches
from pipeline.tokenize.cells import Cells

DEFAULT_KS = (1, 5, 10, 20, 50)
CHUNK_VALUES = 1 << 24  # set_deletion: (cells x sets) values held at once per chunk of sets


# ------------------------------------------------------------------------------------ sequences
def delete_tokens(ids: np.ndarray, tokens, special_ids=()) -> np.ndarray:
    """`ids` without any of `tokens`, order kept. Tokens in `special_ids` are never deleted."""
    ids = np.asarray(ids, dtype=np.int64)
    drop = np.setdiff1d(np.asarray(tokens, dtype=np.int64).ravel(), np.asarray(list(special_ids), dtype=np.int64))
    return ids[~np.isin(ids, drop)]


# ------------------------------------------------------------------------- matched random sets
def gene_frequency_rank(cells, tokens: np.ndarray, special_ids=()) -> tuple[np.ndarray, np.ndarray]:
    """Per token of `tokens`: the number of cells expressing it and its mean rank over those cells.

    The rank is the 0-based position among the cell's gene tokens (special tokens skipped; a repeated
    token counts at its first position). Mean rank is NaN for a token no cell expresses.
    """
    ids = cells.ids if isinstance(cells, Cells) else [np.asarray(x, dtype=np.int64) for x in cells]
    tokens = np.asarray(tokens, dtype=np.int64)
    special = np.asarray(sorted({int(s) for s in special_ids}), dtype=np.int64)
    genes = [x[~np.isin(x, special)] for x in ids]
    n_cells = np.zeros(len(tokens), dtype=np.int64)
    rank_mean = np.full(len(tokens), np.nan)
    if not genes or not sum(len(g) for g in genes):
        return n_cells, rank_mean
    flat = np.concatenate(genes)
    cell = np.repeat(np.arange(len(genes)), [len(g) for g in genes])
    rank = np.concatenate([np.arange(len(g)) for g in genes])
    vocab = int(max(flat.max(), tokens.max(initial=0))) + 1
    _, first = np.unique(cell * vocab + flat, return_index=True)  # each (cell, token) once: its first rank
    count = np.bincount(flat[first], minlength=vocab)
    rank_sum = np.bincount(flat[first], weights=rank[first].astype(np.float64), minlength=vocab)
    valid = tokens >= 0
    n_cells[valid] = count[tokens[valid]]
    with np.errstate(invalid="ignore", divide="ignore"):
        rank_mean[valid] = np.where(n_cells[valid] > 0, rank_sum[tokens[valid]] / n_cells[valid], np.nan)
    return n_cells, rank_mean


def _fallback_order(b: int, present: np.ndarray, n_rank_bins: int) -> list[int]:
    """The bins of `present` other than `b`, nearest first: by |frequency bin difference|, then |rank bin
    difference|, then the lower frequency bin, then the lower rank bin."""
    f0, r0 = divmod(int(b), n_rank_bins)
    others = [int(x) for x in present if int(x) != int(b)]
    return sorted(
        others,
        key=lambda x: (abs(x // n_rank_bins - f0), abs(x % n_rank_bins - r0), x // n_rank_bins, x % n_rank_bins),
    )


def matched_random_sets(
    gene_set: np.ndarray, bins: np.ndarray, n_sets: int, rng, exclude=None, *, n_rank_bins: int = 5
) -> list[np.ndarray]:
    """`n_sets` random gene sets matched to `gene_set` on `bins` (indices into the gene arrays, sorted).

    Each set has, for every bin b, as many genes as `gene_set` has in b, drawn without replacement from
    the genes of b outside `gene_set` and `exclude` (indices never drawn). Where a bin runs out, the
    missing genes come from the nearest bins that still have genes, nearest by frequency bin first and
    then by rank bin (bin ids as `frequency_rank_bins` makes them; `n_rank_bins` must be the one used
    there); each bin first serves its own genes, then the shortfalls in increasing bin order. Raises
    ValueError when fewer genes remain than the set needs. `rng` is a `numpy.random.Generator` (or a seed);
    the draws depend only on it and the arguments.
    """
    rng = np.random.default_rng(rng)
    bins = np.asarray(bins, dtype=np.int64)
    gene_set = np.unique(np.asarray(gene_set, dtype=np.int64))
    if gene_set.size and (gene_set.min() < 0 or gene_set.max() >= len(bins)):
        raise ValueError("gene_set holds indices outside the gene arrays")
    available = np.ones(len(bins), dtype=bool)
    available[gene_set] = False
    if exclude is not None:
        available[np.asarray(exclude, dtype=np.int64)] = False
    if int(available.sum()) < len(gene_set):
        raise ValueError(f"{int(available.sum())} genes to draw from for a set of {len(gene_set)}")
    want_bins, want = np.unique(bins[gene_set], return_counts=True)
    present = np.unique(bins[available])
    pools = {int(b): np.flatnonzero(available & (bins == b)) for b in present}
    out = []
    for _ in range(int(n_sets)):
        left = {b: p for b, p in pools.items()}
        drawn, short = [], []
        for b, c in zip(want_bins.tolist(), want.tolist()):
            pool = left.get(b, np.zeros(0, dtype=np.int64))
            take = min(c, len(pool))
            if take:
                pick = rng.choice(len(pool), size=take, replace=False)
                drawn.append(pool[pick])
                left[b] = np.delete(pool, pick)
            if c > take:
                short.append((b, c - take))
        for b, c in short:
            for nb in _fallback_order(b, present, n_rank_bins):
                pool = left[nb]
                take = min(c, len(pool))
                if take:
                    pick = rng.choice(len(pool), size=take, replace=False)
                    drawn.append(pool[pick])
                    left[nb] = np.delete(pool, pick)
                    c -= take
                if not c:
                    break
        out.append(np.sort(np.concatenate(drawn)) if drawn else np.zeros(0, dtype=np.int64))
    return out


def matching_features(n_cells, rank_mean, n_read=None) -> np.ndarray:
    """Per gene, what a random gene is matched on: log2 of the cells expressing it (the tokens deleting it
    removes), its mean rank, and, where any gene holds it, log2(1 + the cells in which it sits at the
    position the classifier reads) (V1 cells without `<cls>`: the first gene)."""
    cols = [np.log2(np.maximum(np.asarray(n_cells, dtype=np.float64), 1.0))]
    cols.append(np.nan_to_num(np.asarray(rank_mean, dtype=np.float64), nan=np.nanmax(rank_mean, initial=0.0) + 1))
    if n_read is not None and np.any(np.asarray(n_read) > 0):
        cols.append(np.log2(1.0 + np.asarray(n_read, dtype=np.float64)))
    return np.column_stack(cols)


def nearest_matched_sets(
    gene_set: np.ndarray, features: np.ndarray, n_sets: int, rng, exclude=None, *, pool: int = 10
) -> list[np.ndarray]:
    """`n_sets` random gene sets matched gene by gene to `gene_set` (indices into the rows of `features`).

    Each gene g of the set is replaced by a gene drawn uniformly from the `pool` genes nearest to g (L1
    distance of the features, each divided by its standard deviation over the genes; ties in index order)
    among those outside `gene_set` and `exclude` and not already drawn for this set. With the features of
    `matching_features`, a random set removes about as many tokens per cell as the set, at the same ranks,
    and the position the classifier reads about as often, at the resolution of single genes (no
    quantile bins). `rng` is a `numpy.random.Generator` (or a seed); sets are drawn one after another, so
    asking for more sets later from the same generator continues the same sequence.
    """
    rng = np.random.default_rng(rng)
    features = np.asarray(features, dtype=np.float64)
    if features.ndim == 1:
        features = features[:, None]
    gene_set = np.unique(np.asarray(gene_set, dtype=np.int64))
    available = np.ones(len(features), dtype=bool)
    available[gene_set] = False
    if exclude is not None:
        available[np.asarray(exclude, dtype=np.int64)] = False
    if int(available.sum()) < len(gene_set):
        raise ValueError(f"{int(available.sum())} genes to draw from for a set of {len(gene_set)}")
    scale = features.std(axis=0)
    z = features / np.where(scale > 0, scale, 1.0)
    cand = np.flatnonzero(available)
    # per gene of the set: the candidates nearest first (enough for the pool even if the others took theirs)
    depth = min(len(cand), int(pool) + len(gene_set))
    near = [cand[np.argsort(np.abs(z[cand] - z[g]).sum(axis=1), kind="stable")[:depth]] for g in gene_set.tolist()]
    out = []
    for _ in range(int(n_sets)):
        taken: set[int] = set()
        drawn = []
        for order in near:
            free = [int(c) for c in order if int(c) not in taken][: int(pool)]
            pick = free[int(rng.integers(len(free)))]
            taken.add(pick)
            drawn.append(pick)
        out.append(np.sort(np.asarray(drawn, dtype=np.int64)))
    return out


# ------------------------------------------------------------------------------------- engine
@dataclass
class SetEffect:
    """One gene set's deletion, per cell (in the engine's cell order).

    `delta_logit` and `delta_prob`: change of the true-class logit and softmax probability (exactly 0 for
    unaffected cells; NaN for a cell the deletion would leave without tokens); `correct_after`: whether the
    prediction is the true class after the deletion (the baseline's for unaffected cells); `affected`:
    whether the cell holds any of the set's tokens; `n_deleted`: tokens removed from the cell.
    """

    delta_logit: np.ndarray
    delta_prob: np.ndarray
    correct_after: np.ndarray
    affected: np.ndarray
    n_deleted: np.ndarray


@dataclass
class _Pool:
    """Every (set, affected cell) pair of one `effects` call: integer arrays, one entry per pair."""

    set_idx: np.ndarray  # (E,) which set
    cell: np.ndarray  # (E,) which cell
    n_deleted: np.ndarray  # (E,) tokens removed
    length: np.ndarray  # (E,) tokens left
    deleted: np.ndarray  # flat indices (into the engine's concatenated cells) of the removed tokens
    offsets: np.ndarray  # (E + 1,) entry e's removed tokens are deleted[offsets[e]:offsets[e + 1]]
    source: np.ndarray = field(init=False)  # (E,) the first entry with the same deleted sequence (itself if first)

    def __post_init__(self):
        # Two sets that remove the same tokens from a cell (nested top-k sets, shared genes) give the same
        # sequence: it runs once. The flat indices name both the cell and the positions.
        first: dict[bytes, int] = {}
        d, off = self.deleted, self.offsets.tolist()
        self.source = np.asarray(
            [first.setdefault(d[off[e] : off[e + 1]].tobytes(), e) for e in range(len(self.cell))], dtype=np.int64
        )


def _softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _as_cells(cells) -> Cells:
    """A `Cells`; a dict of columns or a dataset with a "label" column brings its labels along."""
    if isinstance(cells, Cells):
        return cells
    has_label = (isinstance(cells, dict) and "label" in cells) or "label" in (
        getattr(cells, "column_names", None) or ()
    )
    return Cells(cells, label_column="label" if has_label else None)


def _model_parts(model):
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "classifier"):
        raise TypeError(f"{type(model).__name__} is not a BertForSequenceClassification (no config/classifier)")
    return config


class DeletionEngine:
    """Batched in-silico deletion of token sets for one classifier and one set of cells.

    `model`: a `BertForSequenceClassification` (put in eval mode and moved to `device`; its dtype kept);
    `cells`: a `pipeline.tokenize.cells.Cells` or anything it accepts; `labels`: the true class per cell (default
    `cells.labels`, or a dict's or dataset's "label" column); `special_ids`: tokens never deleted (V2:
    `<cls>`, `<eos>`; `pad_id` never is either); `pad_id` pads batches; `batch_size`: sequences per forward.

    `baseline` is the (n_cells, n_classes) float64 logits of the intact cells (NaN for a cell without
    tokens), computed once in length-grouped batches. `effects(token_sets)` returns one `SetEffect` per
    set; see the module docstring for what is pooled and batched. No gradients are computed. Building the
    engine indexes the cells (one int64 per token); `cells_holding(token)` reads that index.
    """

    def __init__(
        self,
        model,
        cells,
        labels=None,
        *,
        pad_id: int = 0,
        special_ids=(),
        batch_size: int = 64,
        device="cpu",
        keep_read_position: bool = False,
    ):
        import torch

        self._torch = torch
        config = _model_parts(model)
        self.device = torch.device(device)
        model.eval()
        model.to(self.device)
        self.model = model
        self.cells = _as_cells(cells)
        if labels is None:
            labels = self.cells.labels
        if labels is None:
            raise ValueError("labels (the true class of each cell) are needed")
        self.labels = np.asarray(labels, dtype=np.int64)
        n = len(self.cells)
        if self.labels.shape != (n,):
            raise ValueError(f"{len(self.labels)} labels for {n} cells")
        self.n_classes = int(getattr(config, "num_labels", 0) or model.classifier.out_features)
        if n and (self.labels.min() < 0 or self.labels.max() >= self.n_classes):
            raise ValueError(f"labels must be class indices 0..{self.n_classes - 1}")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = int(batch_size)
        self.pad_id = int(pad_id)
        self.special_ids = np.asarray(sorted({int(s) for s in special_ids} | {self.pad_id}), dtype=np.int64)
        self.ids = self.cells.ids
        self.lengths = np.asarray([len(x) for x in self.ids], dtype=np.int64)
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        if limit and n and int(self.lengths.max()) > limit:
            raise ValueError(f"cells have up to {int(self.lengths.max())} tokens but the model has {limit} positions")
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        # Inverted index: the flat positions (cells concatenated) of each token id, as CSR over token ids.
        self._cell_off = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        flat = np.concatenate(self.ids) if n and self._cell_off[-1] else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or (vocab and flat.max() >= vocab)):
            raise ValueError(f"token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
        self._vocab = int(flat.max()) + 1 if flat.size else 0
        self._occ = np.argsort(flat, kind="stable")
        self._tok_off = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=self._vocab))]).astype(np.int64)
        self._baseline = None
        # with `keep_read_position`, the token at position 0 (what the classifier reads; V1: the first gene)
        # is never deleted, so no set removes it and every set is matched on it
        self.keep_read_position = bool(keep_read_position)
        first = self._cell_off[:-1][self.lengths > 0]
        self._protected = np.sort(first) if self.keep_read_position else np.zeros(0, dtype=np.int64)

    @property
    def read_tokens(self) -> np.ndarray:
        """Per cell, the token at the position the classifier reads (position 0: V1's first gene), or -1 where
        that position cannot be deleted: a special token (V2's `<cls>`), `keep_read_position`, an empty cell."""
        first = np.asarray([int(x[0]) if len(x) else -1 for x in self.ids], dtype=np.int64)
        return np.where(np.isin(first, self.special_ids) | self.keep_read_position, -1, first)

    def cells_holding(self, token: int) -> np.ndarray:
        """The indices of the cells that hold `token` (sorted, each once)."""
        t = int(token)
        if not 0 <= t < self._vocab:
            return np.zeros(0, dtype=np.int64)
        flat = self._occ[self._tok_off[t] : self._tok_off[t + 1]]
        return np.unique(np.searchsorted(self._cell_off, flat, side="right") - 1)

    # ---------------------------------------------------------------------------- forward passes
    def _forward(self, ids: np.ndarray, mask: np.ndarray):
        torch = self._torch
        input_ids = torch.from_numpy(ids).to(self.device, non_blocking=True)
        attention_mask = torch.from_numpy(mask).to(self.device, non_blocking=True)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _padded(self, seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        return ids, mask

    def _logits(self, batches: Sequence[np.ndarray], inputs, lengths) -> tuple[np.ndarray, np.ndarray]:
        """The rows `batches` list (in order) and their logits, (rows, n_classes) float64, one forward pass per
        batch; `inputs(batch)` pads a batch, whose rows have `lengths[batch]` tokens. In a process group
        (`pipeline.parallel.distributed`) each rank runs its share of the batches (`share`, by padded tokens)
        and every rank receives all of them: the same batches as one process, so the same numbers."""
        from pipeline.parallel.distributed import batch_cost, gather, shard, share

        torch = self._torch
        world = shard()[1]
        chunks, rows = [], []
        mine = share([batch_cost(b, lengths) for b in batches])  # every batch in one process
        with torch.inference_mode():
            for b in (batches[i] for i in mine):
                chunks.append(self._forward(*inputs(b)))
                rows.append(b)
        logits = torch.cat(chunks).to("cpu", torch.float64).numpy() if chunks else np.zeros((0, self.n_classes))
        rows_ = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)
        if world > 1:
            parts = gather((rows_, logits))
            rows_ = np.concatenate([p[0] for p in parts])
            logits = np.concatenate([p[1] for p in parts])
        return rows_, logits

    @property
    def baseline(self) -> np.ndarray:
        """The intact cells' logits, (n_cells, n_classes) float64, computed once."""
        if self._baseline is None:
            out = np.full((len(self.cells), self.n_classes), np.nan)
            batches = [idx[self.lengths[idx] > 0] for idx in length_grouped_batches(self.lengths, self.batch_size)]
            rows, logits = self._logits(
                [b for b in batches if len(b)], lambda b: self._padded([self.ids[i] for i in b]), self.lengths
            )
            out[rows] = logits
            self._baseline = out
        return self._baseline

    # ------------------------------------------------------------------------------------ pool
    def _pool(self, token_sets: Sequence[np.ndarray]) -> _Pool:
        parts_set, parts_cell, parts_n, parts_del = [], [], [], []
        for s, tokens in enumerate(token_sets):
            t = np.unique(np.asarray(tokens, dtype=np.int64).ravel())
            t = t[(t >= 0) & (t < self._vocab) & ~np.isin(t, self.special_ids)]
            if not t.size:
                continue
            starts, ends = self._tok_off[t], self._tok_off[t + 1]
            counts = ends - starts
            total = int(counts.sum())
            if not total:
                continue
            # occ[starts[i]:ends[i]] for every token, without a Python loop
            idx = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)
            flat = np.sort(self._occ[idx])
            if self._protected.size:
                flat = flat[~np.isin(flat, self._protected)]
                if not flat.size:
                    continue
            cell = np.searchsorted(self._cell_off, flat, side="right") - 1
            cells, n_del = np.unique(cell, return_counts=True)
            parts_set.append(np.full(len(cells), s, dtype=np.int64))
            parts_cell.append(cells)
            parts_n.append(n_del)
            parts_del.append(flat)
        if not parts_set:
            z = np.zeros(0, dtype=np.int64)
            return _Pool(z, z, z, z, z, np.zeros(1, dtype=np.int64))
        cell = np.concatenate(parts_cell)
        n_del = np.concatenate(parts_n)
        return _Pool(
            set_idx=np.concatenate(parts_set),
            cell=cell,
            n_deleted=n_del,
            length=self.lengths[cell] - n_del,
            deleted=np.concatenate(parts_del),
            offsets=np.concatenate([[0], np.cumsum(n_del)]).astype(np.int64),
        )

    def _entry_batches(self, pool: _Pool) -> list[np.ndarray]:
        """Distinct pool entries with tokens left, longest first, cut into batches of `batch_size`."""
        live = np.flatnonzero((pool.length > 0) & (pool.source == np.arange(len(pool.source))))
        order = live[np.argsort(-pool.length[live], kind="stable")]
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _sequences(self, pool: _Pool, entries: np.ndarray) -> list[np.ndarray]:
        seqs = []
        for e in entries.tolist():
            c = int(pool.cell[e])
            seq = self.ids[c]
            keep = np.ones(len(seq), dtype=bool)
            keep[pool.deleted[pool.offsets[e] : pool.offsets[e + 1]] - self._cell_off[c]] = False
            seqs.append(seq[keep])
        return seqs

    def deleted_batches(self, token_sets: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, ...]]:
        """The batches `effects` runs, as numpy arrays: (set index, cell index, input_ids, attention_mask)
        per batch, built one at a time. Pairs whose deletion leaves no token are not included, and a
        deleted sequence another set already produced runs once (under the first such set)."""
        pool = self._pool(token_sets)
        for entries in self._entry_batches(pool):
            ids, mask = self._padded(self._sequences(pool, entries))
            yield pool.set_idx[entries], pool.cell[entries], ids, mask

    def _run(self, token_sets: Sequence[np.ndarray]) -> tuple[_Pool, np.ndarray]:
        """The pool and each entry's logits after the deletion, (E, n_classes) float64 (NaN rows for
        entries left without tokens)."""
        pool = self._pool(token_sets)
        logits = np.full((len(pool.cell), self.n_classes), np.nan)
        rows, values = self._logits(
            self._entry_batches(pool), lambda entries: self._padded(self._sequences(pool, entries)), pool.length
        )
        logits[rows] = values
        return pool, logits[pool.source]

    def _entry_deltas(self, pool: _Pool, logits: np.ndarray):
        """Per pool entry: delta logit, delta prob (true class) and whether the prediction is still right."""
        base = self.baseline
        y = self.labels[pool.cell]
        rows = np.arange(len(y))
        d_logit = logits[rows, y] - base[pool.cell, y]
        d_prob = _softmax64(logits)[rows, y] - _softmax64(base)[pool.cell, y] if len(y) else np.zeros(0)
        with np.errstate(invalid="ignore"):
            correct = np.nan_to_num(logits, nan=-np.inf).argmax(1) == y
        correct &= ~np.isnan(d_logit)
        return d_logit, d_prob, correct

    def effects(self, token_sets: Sequence[np.ndarray]) -> list[SetEffect]:
        """One `SetEffect` per set of token ids (special tokens and ids no cell holds are ignored).

        Every (set, affected cell) pair of the call is pooled: sorted by length, run in batches of
        `batch_size` shared across sets, each distinct deleted sequence once. Unaffected cells cost nothing.
        """
        token_sets = list(token_sets)
        pool, logits = self._run(token_sets)
        d_logit, d_prob, correct = self._entry_deltas(pool, logits)
        n = len(self.cells)
        base_correct = self.baseline.argmax(1) == self.labels
        out = []
        bounds = np.searchsorted(pool.set_idx, np.arange(len(token_sets) + 1))  # entries are grouped by set
        for s in range(len(token_sets)):
            e = slice(int(bounds[s]), int(bounds[s + 1]))
            cells = pool.cell[e]
            effect = SetEffect(
                delta_logit=np.zeros(n),
                delta_prob=np.zeros(n),
                correct_after=base_correct.copy(),
                affected=np.zeros(n, dtype=bool),
                n_deleted=np.zeros(n, dtype=np.int64),
            )
            effect.delta_logit[cells] = d_logit[e]
            effect.delta_prob[cells] = d_prob[e]
            effect.correct_after[cells] = correct[e]
            effect.affected[cells] = True
            effect.n_deleted[cells] = pool.n_deleted[e]
            out.append(effect)
        return out


# ------------------------------------------------------------------------------------ reference
def naive_set_effects(
    model, cells, labels, token_sets, *, pad_id: int = 0, special_ids=(), device="cpu"
) -> list[SetEffect]:
    """The reference: one unbatched forward pass per cell (baseline) and per cell per set, no skipping."""
    import torch

    _model_parts(model)
    device = torch.device(device)
    model.eval()
    model.to(device)
    cells = _as_cells(cells)
    labels = np.asarray(cells.labels if labels is None else labels, dtype=np.int64)
    special = {int(s) for s in special_ids} | {int(pad_id)}

    def logits(seq):
        if not len(seq):
            return None
        ids = torch.as_tensor(np.asarray(seq, dtype=np.int64)[None], device=device)
        with torch.inference_mode():
            z = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        return z.to("cpu", torch.float64).numpy()

    base = [logits(x) for x in cells.ids]
    out = []
    for tokens in token_sets:
        n = len(cells)
        effect = SetEffect(
            np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        )
        for i, x in enumerate(cells.ids):
            y = int(labels[i])
            after = delete_tokens(x, tokens, special)
            z0, z1 = base[i], logits(after)
            effect.n_deleted[i] = len(x) - len(after)
            effect.affected[i] = effect.n_deleted[i] > 0
            if z1 is None:
                effect.delta_logit[i] = effect.delta_prob[i] = np.nan
                continue
            p0, p1 = _softmax64(z0[None])[0], _softmax64(z1[None])[0]
            effect.delta_logit[i] = z1[y] - z0[y]
            effect.delta_prob[i] = p1[y] - p0[y]
            effect.correct_after[i] = int(z1.argmax()) == y
        out.append(effect)
    return out


# ------------------------------------------------------------------------------------ summaries
def single_gene_effects(
    engine: DeletionEngine, tokens: np.ndarray, *, n_boot: int = 200, seed: int = 0, alpha: float = 0.05
):
    """One row per token: the effect of deleting that gene alone, over the cells that express it.

    Columns: token_id, n_cells_expressing (cells holding the token), delta_logit_mean with its bootstrap
    CI (delta_logit_ci_low, delta_logit_ci_high; `pipeline.analysis.pair.bootstrap_ci` with `n_boot`, `seed`,
    `alpha`), delta_prob_mean. The effects are NaN when no cell expresses the token, and for special tokens
    (never deleted; their n_cells_expressing is still counted). Cells the deletion would empty are left out
    of the means. All single deletions go through one pool of the engine (`effects`' pooled, length-sorted
    batches), read per pair rather than as dense per-gene arrays.
    """
    import pandas as pd

    from pipeline.analysis.pair import bootstrap_ci

    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    pool, logits = engine._run([[t] for t in tokens.tolist()])
    d_logit, d_prob, _ = engine._entry_deltas(pool, logits)
    bounds = np.searchsorted(pool.set_idx, np.arange(len(tokens) + 1))
    rows = []
    for s, t in enumerate(tokens.tolist()):
        n_expr = len(engine.cells_holding(t))
        dl, dp = d_logit[bounds[s] : bounds[s + 1]], d_prob[bounds[s] : bounds[s + 1]]
        ok = ~np.isnan(dl)
        mean = lo = hi = pmean = np.nan
        if ok.any():
            mean, lo, hi = (float(v) for v in bootstrap_ci(dl[ok], n_boot, seed, alpha))
            pmean = float(dp[ok].mean())
        rows.append(
            dict(
                token_id=int(t),
                n_cells_expressing=int(n_expr),
                delta_logit_mean=mean,
                delta_logit_ci_low=lo,
                delta_logit_ci_high=hi,
                delta_prob_mean=pmean,
            )
        )
    return pd.DataFrame(rows, columns=SINGLE_COLUMNS)


SINGLE_COLUMNS = [
    "token_id",
    "n_cells_expressing",
    "delta_logit_mean",
    "delta_logit_ci_low",
    "delta_logit_ci_high",
    "delta_prob_mean",
]
SET_COLUMNS = [
    "score",
    "k",
    "set",
    "n_genes",
    "n_cells_affected",
    "delta_prob_mean",
    "delta_prob_ci_low",
    "delta_prob_ci_high",
    "delta_logit_mean",
    "delta_logit_ci_low",
    "delta_logit_ci_high",
    "accuracy_before",
    "accuracy_after",
    "random_delta_prob_mean",
    "p_empirical",
    # resolution of p (top rows): random sets drawn, whether p sits at its floor 1 / (R + 1), z-score of the
    # set's mean against the random sets' (mean, standard deviation)
    "n_random",
    "p_at_floor",
    "z_score",
    # matching quality: tokens removed per cell (mean, 90th percentile over all cells) and the share of cells
    # whose read position (V1: the first gene) is removed; on top rows also the random sets' averages
    "tokens_per_cell",
    "tokens_per_cell_p90",
    "read_removed",
    "random_tokens_per_cell",
    "random_tokens_per_cell_p90",
    "random_read_removed",
]
MAX_RANDOM_DEFAULT = 999  # p can reach 0.001


def set_rng(seed: int, score: str, k: int) -> np.random.Generator:
    """The generator of the random sets matched to (score, k): independent of the order of the scores."""
    return np.random.default_rng([int(seed), int(k), zlib.crc32(str(score).encode("utf-8"))])


class _Matcher:
    """Draws the random sets of one (score, k) top set, continuing its generator on each call."""

    def __init__(self, top, rng, *, bins=None, features=None, pool=10, n_rank_bins=5):
        self.top, self.rng, self.bins, self.features = top, rng, bins, features
        self.pool, self.n_rank_bins = int(pool), int(n_rank_bins)

    def draw(self, n: int) -> list[np.ndarray]:
        if self.features is not None:
            return nearest_matched_sets(self.top, self.features, n, self.rng, pool=self.pool)
        return matched_random_sets(self.top, self.bins, n, self.rng, n_rank_bins=self.n_rank_bins)


def _ranked_indices(ranking, index: dict) -> list[int]:
    ranked, seen = [], set()
    for t in np.asarray(ranking, dtype=np.int64).ravel().tolist():
        if t in index and t not in seen:
            seen.add(t)
            ranked.append(index[t])
    return ranked


def deletion_sets(
    rankings: Mapping[str, np.ndarray],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    candidates: np.ndarray,
    bins: np.ndarray | None = None,
    n_random: int = 20,
    seed: int = 0,
    n_rank_bins: int = 5,
    features: np.ndarray | None = None,
    match_pool: int = 10,
    _matchers: dict | None = None,
) -> list[tuple[str, int, str, np.ndarray]]:
    """The gene sets `set_deletion` evaluates first, in its row order: (score, k, "top" or "random_<r>",
    token ids).

    Per score (in the mapping's order) and k (in `ks` order): the top-k set, then its `n_random` matched
    random sets; see `set_deletion` for how rankings are restricted to `candidates` and matched (on
    `features` gene by gene when given, else on `bins`).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if features is None:
        if bins is None:
            raise ValueError("deletion_sets needs bins or features to match random sets on")
        bins = np.asarray(bins, dtype=np.int64)
        if candidates.shape != bins.shape:
            raise ValueError(f"{len(candidates)} candidates but {len(bins)} bins")
    elif len(features) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(features)} feature rows")
    index = {int(t): i for i, t in enumerate(candidates.tolist())}
    specs = []
    for score, ranking in rankings.items():
        ranked = _ranked_indices(ranking, index)
        for k in ks:
            top = np.asarray(ranked[: int(k)], dtype=np.int64)
            specs.append((str(score), int(k), "top", candidates[top]))
            matcher = _Matcher(
                top, set_rng(seed, score, k), bins=bins, features=features, pool=match_pool, n_rank_bins=n_rank_bins
            )
            if _matchers is not None:
                _matchers[(str(score), int(k))] = matcher
            for r, random_set in enumerate(matcher.draw(n_random)):
                specs.append((str(score), int(k), f"random_{r}", candidates[random_set]))
    return specs


def _evaluate(engine: DeletionEngine, specs, *, n_boot: int, seed: int, alpha: float) -> list[dict]:
    """One row per spec: means over all cells with bootstrap CIs, accuracy after, matching quality."""
    from pipeline.analysis.pair import bootstrap_ci

    n = len(engine.cells)
    read = engine.read_tokens
    per_chunk = max(1, CHUNK_VALUES // max(n, 1))
    rows = []
    for start in range(0, len(specs), per_chunk):
        chunk = specs[start : start + per_chunk]
        effects = engine.effects([tokens for _, _, _, tokens in chunk])
        logit = np.stack([e.delta_logit for e in effects], axis=1)
        prob = np.stack([e.delta_prob for e in effects], axis=1)
        ok = ~np.isnan(logit)
        stats = {}
        for name, values in (("delta_logit", logit), ("delta_prob", prob)):
            if n:
                m, lo, hi = bootstrap_ci(np.where(ok, values, 0.0), n_boot, seed, alpha, weights=ok.astype(np.float64))
            else:
                m = lo = hi = np.full(len(chunk), np.nan)
            stats[name] = (np.atleast_1d(m), np.atleast_1d(lo), np.atleast_1d(hi))
        for j, ((score, k, name, tokens), effect) in enumerate(zip(chunk, effects)):
            removed = effect.n_deleted.astype(np.float64)
            rows.append(
                dict(
                    score=score,
                    k=k,
                    set=name,
                    n_genes=int(len(tokens)),
                    n_cells_affected=int(effect.affected.sum()),
                    delta_prob_mean=float(stats["delta_prob"][0][j]),
                    delta_prob_ci_low=float(stats["delta_prob"][1][j]),
                    delta_prob_ci_high=float(stats["delta_prob"][2][j]),
                    delta_logit_mean=float(stats["delta_logit"][0][j]),
                    delta_logit_ci_low=float(stats["delta_logit"][1][j]),
                    delta_logit_ci_high=float(stats["delta_logit"][2][j]),
                    accuracy_after=float(effect.correct_after.mean()) if n else np.nan,
                    tokens_per_cell=float(removed.mean()) if n else np.nan,
                    tokens_per_cell_p90=float(np.percentile(removed, 90)) if n else np.nan,
                    read_removed=float(np.isin(read, np.asarray(tokens, dtype=np.int64)).mean()) if n else np.nan,
                )
            )
    return rows


def empirical_p(top: float, random: np.ndarray) -> tuple[float, int]:
    """p = (1 + #{random <= top}) / (1 + R) (a set hurting at least as much counts) and #{random <= top}."""
    random = np.asarray(random, dtype=np.float64)
    hits = int(np.sum(random <= top))
    return (1 + hits) / (1 + len(random)), hits


def set_deletion(
    engine: DeletionEngine,
    rankings: Mapping[str, np.ndarray],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    candidates: np.ndarray,
    bins: np.ndarray | None = None,
    n_random: int = 20,
    max_random: int | None = None,
    features: np.ndarray | None = None,
    match_pool: int = 10,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    n_rank_bins: int = 5,
):
    """Delete each score's top-k genes and matched random sets; one row per (score, k, set).

    `rankings`: score name -> token ids ranked best first. Each ranking is first restricted to
    `candidates` (the token ids random genes are drawn from), order kept, so a top-k set can hold fewer
    than k genes (`n_genes`). The random sets "random_0".. for (score, k) come from `set_rng(seed, score,
    k)`: matched gene by gene on `features` (`nearest_matched_sets`, the `match_pool` nearest genes) when
    given, else on `bins` (`matched_random_sets`, the `frequency_rank_bins` bin of each candidate),
    excluding the top set.

    **Adaptive resolution.** `n_random` sets are drawn first. While a test's p sits at its floor
    1 / (R + 1) (no random set hurts as much) and R < `max_random` (None: `n_random`, no extension), R is
    doubled (capped at `max_random`) for the tests at their floor, continuing their generators: the first
    `n_random` sets are those of a fixed-R run, so the result is a function of the seed.

    Columns (`SET_COLUMNS`): score, k, set, n_genes, n_cells_affected, delta_prob_mean / delta_logit_mean
    over all cells (unaffected cells 0; cells left without tokens skipped) with bootstrap CIs (`_ci_low`,
    `_ci_high`; `bootstrap_ci` with `n_boot`, `seed`, `alpha`), accuracy_before / accuracy_after over all
    cells, the matching quality (tokens removed per cell, read position removed); on "top" rows
    random_delta_prob_mean (mean over the random sets), p_empirical = (1 + #{r: delta_prob_mean(random_r)
    <= delta_prob_mean(top)}) / (1 + R), n_random (R), p_at_floor, z_score = (top - mean) / sd (ddof 1) of
    the random means, and the random sets' average matching quality; NaN on random rows and without random
    sets. All sets of a round run through `engine.effects` in as few calls as memory allows
    (`CHUNK_VALUES` cell x set values at once).
    """
    import pandas as pd

    cap = int(n_random) if max_random is None else max(int(max_random), int(n_random))
    matchers: dict = {}
    specs = deletion_sets(
        rankings,
        ks,
        candidates=candidates,
        bins=bins,
        n_random=n_random,
        seed=seed,
        n_rank_bins=n_rank_bins,
        features=features,
        match_pool=match_pool,
        _matchers=matchers,
    )
    candidates = np.asarray(candidates, dtype=np.int64)
    n = len(engine.cells)
    base_correct = engine.baseline.argmax(1) == engine.labels
    accuracy_before = float(base_correct.mean()) if n else np.nan
    groups: dict[tuple[str, int], dict] = {}
    for row in _evaluate(engine, specs, n_boot=n_boot, seed=seed, alpha=alpha):
        g = groups.setdefault((row["score"], row["k"]), {"top": None, "random": []})
        if row["set"] == "top":
            g["top"] = row
        else:
            g["random"].append(row)
    R = int(n_random)
    while R and R < cap:
        floor = [
            key
            for key, g in groups.items()
            if empirical_p(g["top"]["delta_prob_mean"], [r["delta_prob_mean"] for r in g["random"]])[1] == 0
            and np.isfinite(g["top"]["delta_prob_mean"])
        ]
        if not floor:
            break
        more = min(cap, 2 * R) - R
        extra = []
        for key in floor:
            for r, random_set in enumerate(matchers[key].draw(more)):
                extra.append((key[0], key[1], f"random_{R + r}", candidates[random_set]))
        for row in _evaluate(engine, extra, n_boot=n_boot, seed=seed, alpha=alpha):
            groups[(row["score"], row["k"])]["random"].append(row)
        R += more
    rows = []
    for g in groups.values():
        top = g["top"]
        random = g["random"]
        means = np.asarray([r["delta_prob_mean"] for r in random], dtype=np.float64)
        top.update(
            random_delta_prob_mean=np.nan,
            p_empirical=np.nan,
            n_random=len(random),
            p_at_floor=np.nan,
            z_score=np.nan,
            random_tokens_per_cell=np.nan,
            random_tokens_per_cell_p90=np.nan,
            random_read_removed=np.nan,
        )
        if len(random):
            p, hits = empirical_p(top["delta_prob_mean"], means)
            sd = float(np.std(means, ddof=1)) if len(means) > 1 else np.nan
            top.update(
                random_delta_prob_mean=float(np.mean(means)),
                p_empirical=p,
                p_at_floor=bool(hits == 0),
                z_score=float((top["delta_prob_mean"] - np.mean(means)) / sd) if sd and sd > 0 else np.nan,
                random_tokens_per_cell=float(np.mean([r["tokens_per_cell"] for r in random])),
                random_tokens_per_cell_p90=float(np.mean([r["tokens_per_cell_p90"] for r in random])),
                random_read_removed=float(np.mean([r["read_removed"] for r in random])),
            )
        rows.append(top)
        rows += random
    frame = pd.DataFrame(rows)
    frame["accuracy_before"] = accuracy_before
    for col in SET_COLUMNS:
        if col not in frame.columns:
            frame[col] = np.nan
    return frame[SET_COLUMNS]
