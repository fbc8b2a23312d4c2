"""Streaming attention analysis of one or two BERT models (thesis sections 3.3, 3.4, 4.2-4.5).

Implements the quantities of docs/architecture.md, "Attention analyses", exactly and without ever holding more than
one layer's attention of a model:

1. cosine similarity between two models' attention on the same cell, per (layer, head) (thesis fig. 4);
2. the norm-based analysis of Kobayashi et al. (2020, "Attention is not only a weight"): per head
   ||alpha_ij f_h(x_j)|| = alpha_ij ||f_h(x_j)||, head-summed ||sum_h alpha^h_ij f_h(x_j)|| through the
   factorised form sqrt(alpha_ij^T G_j alpha_ij) with G_j[h, g] = <f_h(x_j), f_g(x_j)>, and attention
   received weighted by ||f_h(x_j)|| (thesis section 4.3, fig. 9);
3. attention received per rank position (thesis fig. 5/6);
4. attention received per gene, with counts and ranks (thesis table 8).

Notation per layer l and head h: A = softmax(Q K^T / sqrt(d) + key-padding mask); m_i = 1 for real query
rows. HF BERT gives padded query rows a full distribution over the real keys, so every reduction weights
rows by m_i. f_h(x_j) = (x_j W_V + b_V)_h W_O[:, h-slice]^T (no b_O).

How it streams. Both models' encoder layers are driven here (embeddings, then for each layer l:
layer_a(l), layer_b(l)); HF's own layer code runs, but its self-attention goes through an attention
function registered with transformers' `AttentionInterface` ("gfattn_streaming"). That function
computes exactly the eager attention, for a block of query rows at a time, and reduces each block into
per-batch column sums, squared norms and Kobayashi norms before the next block exists. The paired cosine
needs both models' attention on the same rows: model A's call also projects model B's queries, keys and
values for layer l (B's own modules on B's hidden state), walks both models through the same blocks and
keeps B's attention output for B's call, which only checks that B's layer produced the same values.
Peak memory is therefore one block of attention rows per model, not one layer, and certainly not the
layers `output_attentions=True` keeps (`naive_attention_reductions`: the baseline and the tests' oracle).
On CPU, large blocks are reduced by two compiled numba kernels (`_numba_kernels`), elsewhere by tensor
operations (`_reduce_block_torch`); both compute the same sums.

Accumulators are float64 tensors on the device. Every field of `AttentionResult` except its metadata is a
sum over cells (per-cell arrays hold zeros for cells a process did not see), so results of several
processes add up to the single-process result (`torch.distributed.all_reduce` when initialised).

One module: the streaming attention engine and its naive reference share the reductions they are tested
against; each reduction is a function of its own.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from pipeline.tokenize.batching import length_grouped_batches, pad_batch
from pipeline.tokenize.cells import Cells

STREAMING_ATTENTION = "gfattn_streaming"
DEFAULT_BLOCK_ELEMENTS = 1 << 22  # attention entries per query block: 16 MiB in float32
NUMBA_MIN_BLOCK = 1 << 18  # "auto" uses the compiled CPU reductions from this block size on

_ACTIVE = threading.local()


# ----------------------------------------------------------------------------------------- result
@dataclass
class AttentionResult:
    """Sums over cells of every attention quantity, plus per-cell values for statistics.

    Raw sums only: the quantities reported (per-rank means, gene totals, position control, grids) are
    derived from them by `pipeline.analysis.pair` (`rank_received`, `gene_total`, `gene_expected`, ...).

    Axes: M models (1 or 2, in `names` order), n cells (dataset order), nl layers, H heads, P rank
    positions (token index, 0-based, special tokens included), V vocabulary, G label groups.
    """

    names: tuple[str, ...]
    n_layers: int
    n_heads: int
    vocab_size: int
    max_len: int
    special_ids: tuple[int, ...]
    cell_ids: np.ndarray  # (n,) str
    lengths: np.ndarray  # (n,) real tokens per cell
    groups: np.ndarray  # (n,) group index, -1 without a group column
    group_names: tuple[str, ...]
    # per rank position (shared by the models)
    rank_count: np.ndarray  # (P,) cells that have position j
    rank_special_count: np.ndarray  # (P,) cells whose token at j is a special token
    # per rank position, per model
    rank_sum: np.ndarray  # (M, nl, H, P) sum over cells of sum_i m_i A_ij
    rank_norm_sum: np.ndarray  # (M, nl, H, P) sum over cells of ||f_h(x_j)|| sum_i m_i A_ij
    # per gene (token id), per model
    gene_sum: np.ndarray  # (M, nl, H, V) column sums scattered onto token ids
    gene_norm_sum: np.ndarray  # (M, nl, H, V) the same weighted by ||f_h(x_j)||
    gene_group_sum: np.ndarray  # (M, G, V) column sums summed over layers and heads, per label group
    # per gene, shared
    gene_cells: np.ndarray  # (V,) cells in which the token occurs
    gene_occ: np.ndarray  # (V,) occurrences
    gene_rank_sum: np.ndarray  # (V,) sum of the gene's expression rank (1-based among non-special tokens)
    gene_rank_sq: np.ndarray  # (V,) sum of squared ranks
    gene_group_rank_sum: np.ndarray  # (G, V)
    gene_group_occ: np.ndarray  # (G, V)
    gene_pos_keys: np.ndarray  # (K,) int64 token_id * max_len + position, sorted, unique
    gene_pos_counts: np.ndarray  # (K,) occurrences of each (token, position)
    # per cell
    cell_curve: np.ndarray | None  # (M, n, P) column sums summed over layers and heads
    cell_norm: np.ndarray  # (M, n, nl, H) mean over real (i, j) of alpha_ij ||f_h(x_j)||
    cell_norm_summed: np.ndarray  # (M, n, nl) mean over real (i, j) of ||sum_h alpha^h_ij f_h(x_j)||
    cell_centre: np.ndarray  # (M, n, nl, H) mean relative rank position (0 first .. 1 last) attended to
    cell_cosine: np.ndarray | None  # (n, nl, H) cosine between the two models' masked attention matrices
    meta: dict = field(default_factory=dict)

    # ----- sums across processes / shards
    _ADDITIVE = (
        "rank_count",
        "rank_special_count",
        "rank_sum",
        "rank_norm_sum",
        "gene_sum",
        "gene_norm_sum",
        "gene_group_sum",
        "gene_cells",
        "gene_occ",
        "gene_rank_sum",
        "gene_rank_sq",
        "gene_group_rank_sum",
        "gene_group_occ",
        "lengths",
        "cell_curve",
        "cell_norm",
        "cell_norm_summed",
        "cell_centre",
        "cell_cosine",
    )

    def merge(self, other: AttentionResult) -> AttentionResult:
        """The result over the union of two disjoint sets of cells of the same dataset (e.g. two shards)."""
        if (self.names, self.n_layers, self.n_heads, self.vocab_size, self.max_len) != (
            other.names,
            other.n_layers,
            other.n_heads,
            other.vocab_size,
            other.max_len,
        ):
            raise ValueError("cannot merge attention results of different models or datasets")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._ADDITIVE:
            a, b = getattr(self, name), getattr(other, name)
            values[name] = None if a is None or b is None else a + b
        values["gene_pos_keys"], values["gene_pos_counts"] = _merge_counts(
            [self.gene_pos_keys, other.gene_pos_keys], [self.gene_pos_counts, other.gene_pos_counts]
        )
        values["meta"] = dict(self.meta)
        return AttentionResult(**values)

    # ----- metadata (every derived quantity is a function of `pipeline.analysis.pair`)
    @property
    def n_models(self) -> int:
        return len(self.names)

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)


# ----------------------------------------------------------------------------------- accumulators
class _Accumulators:
    """Float64 sums on the device; per-batch reductions from either engine land here."""

    def __init__(
        self, *, n_models, n_layers, n_heads, vocab_size, max_len, n_cells, n_groups, device, special_ids, cell_curves
    ):
        f64 = dict(dtype=torch.float64, device=device)
        M, nl, H, V, P, n, G = n_models, n_layers, n_heads, vocab_size, max_len, n_cells, max(n_groups, 1)
        self.M, self.nl, self.H, self.V, self.P, self.G = M, nl, H, V, P, n_groups
        self.device = device
        self.special = torch.tensor(sorted(special_ids), dtype=torch.long, device=device)
        self.rank_count = torch.zeros(P, **f64)
        self.rank_special_count = torch.zeros(P, **f64)
        self.rank_sum = torch.zeros(M, nl, H, P, **f64)
        self.rank_norm_sum = torch.zeros(M, nl, H, P, **f64)
        self.gene_sum = torch.zeros(M, nl, V, H, **f64)  # (V, H) per layer so that index_add_ writes rows
        self.gene_norm_sum = torch.zeros(M, nl, V, H, **f64)
        self.gene_group_sum = torch.zeros(M, G * V, **f64)
        self.gene_cells = torch.zeros(V, **f64)
        self.gene_occ = torch.zeros(V, **f64)
        self.gene_rank_sum = torch.zeros(V, **f64)
        self.gene_rank_sq = torch.zeros(V, **f64)
        self.gene_group_rank_sum = torch.zeros(G * V, **f64)
        self.gene_group_occ = torch.zeros(G * V, **f64)
        self.lengths = torch.zeros(n, **f64)
        self.cell_curve = torch.zeros(M, n, P, **f64) if cell_curves else None
        self.cell_norm = torch.zeros(M, n, nl, H, **f64)
        self.cell_norm_summed = torch.zeros(M, n, nl, **f64)
        self.cell_centre = torch.zeros(M, n, nl, H, **f64)
        self.cell_cosine = torch.zeros(n, nl, H, **f64) if M == 2 else None
        self._pos_keys: list[np.ndarray] = []
        self._pos_counts: list[np.ndarray] = []
        self._pos_pending = 0

    # -- once per batch: what depends only on the tokens
    def add_tokens(self, ids: torch.Tensor, mask: torch.Tensor, cells: torch.Tensor, groups: torch.Tensor):
        B, L = ids.shape
        real = mask.bool()
        n = real.sum(1)
        self.lengths[cells] = n.to(torch.float64)
        self.rank_count[:L] += real.sum(0).to(torch.float64)
        is_special = torch.isin(ids, self.special) & real if self.special.numel() else torch.zeros_like(real)
        self.rank_special_count[:L] += is_special.sum(0).to(torch.float64)
        gene = real & ~is_special
        rank = torch.cumsum(gene.to(torch.int64), dim=1)  # 1-based expression rank among genes
        tok = ids[real]
        ones = torch.ones(tok.numel(), dtype=torch.float64, device=ids.device)
        self.gene_occ.index_add_(0, tok, ones)
        cell_of = torch.arange(B, device=ids.device).unsqueeze(1).expand(B, L)[real]
        uniq = torch.unique(cell_of * self.V + tok)
        self.gene_cells.index_add_(0, uniq % self.V, torch.ones(uniq.numel(), dtype=torch.float64, device=ids.device))
        g_tok, g_rank = ids[gene], rank[gene].to(torch.float64)
        self.gene_rank_sum.index_add_(0, g_tok, g_rank)
        self.gene_rank_sq.index_add_(0, g_tok, g_rank * g_rank)
        if self.G:
            g_cell = groups.unsqueeze(1).expand(B, L)[gene]
            self.gene_group_rank_sum.index_add_(0, g_cell * self.V + g_tok, g_rank)
            self.gene_group_occ.index_add_(0, g_cell * self.V + g_tok, torch.ones_like(g_rank))
        pos = torch.arange(L, device=ids.device).unsqueeze(0).expand(B, L)[real]
        keys = (tok * self.P + pos).cpu().numpy()
        k, c = np.unique(keys, return_counts=True)
        self._pos_keys.append(k)
        self._pos_counts.append(c.astype(np.float64))
        self._pos_pending += len(k)
        if self._pos_pending > 4_000_000:
            k, c = _merge_counts(self._pos_keys, self._pos_counts)
            self._pos_keys, self._pos_counts, self._pos_pending = [k], [c], len(k)

    # -- once per batch, layer and model
    def add_layer(self, k: int, layer: int, *, ids, mask, cells, groups, colsum, fnorm, norm_summed_num):
        """colsum, fnorm: (B, H, L) float64 (colsum already weighted by m_i); norm_summed_num: (B,)."""
        B, H, L = colsum.shape
        real = mask.bool()
        n = real.sum(1).to(torch.float64)
        weighted = colsum * fnorm
        self.rank_sum[k, layer, :, :L] += colsum.sum(0)
        self.rank_norm_sum[k, layer, :, :L] += weighted.sum(0)
        tok = ids[real]
        self.gene_sum[k, layer].index_add_(0, tok, colsum.permute(0, 2, 1)[real])
        self.gene_norm_sum[k, layer].index_add_(0, tok, weighted.permute(0, 2, 1)[real])
        per_token = colsum.sum(1)  # (B, L), summed over heads
        if self.G:
            g_cell = groups.unsqueeze(1).expand(B, L)[real]
            self.gene_group_sum[k].index_add_(0, g_cell * self.V + tok, per_token[real])
        if self.cell_curve is not None:
            self.cell_curve[k, cells, :L] += per_token
        pairs = (n * n).unsqueeze(1)
        self.cell_norm[k, cells, layer] = weighted.sum(-1) / pairs
        self.cell_norm_summed[k, cells, layer] = norm_summed_num / pairs[:, 0]
        relpos = torch.arange(L, dtype=torch.float64, device=colsum.device).unsqueeze(0) / (n - 1).clamp_min(
            1
        ).unsqueeze(1)
        self.cell_centre[k, cells, layer] = (colsum * relpos.unsqueeze(1)).sum(-1) / colsum.sum(-1)

    def set_cosine(self, layer: int, cells, cosine: torch.Tensor):
        self.cell_cosine[cells, layer] = cosine

    # -- end
    def all_reduce(self) -> None:
        import torch.distributed as dist

        for name in self._tensor_names():
            t = getattr(self, name)
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        k, c = _merge_counts(self._pos_keys, self._pos_counts)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (k, c))
        self._pos_keys = [g[0] for g in gathered]
        self._pos_counts = [g[1] for g in gathered]

    @staticmethod
    def _tensor_names():
        return AttentionResult._ADDITIVE

    def result(self, *, names, special_ids, cells: Cells, meta) -> AttentionResult:
        def np_(t):
            return None if t is None else t.detach().cpu().numpy()

        G = max(self.G, 1)
        keys, counts = _merge_counts(self._pos_keys, self._pos_counts)
        group_sum = np_(self.gene_group_sum).reshape(self.M, G, self.V)
        g_rank = np_(self.gene_group_rank_sum).reshape(G, self.V)
        g_occ = np_(self.gene_group_occ).reshape(G, self.V)
        if not self.G:
            group_sum, g_rank, g_occ = group_sum[:, :0], g_rank[:0], g_occ[:0]
        return AttentionResult(
            names=tuple(names),
            n_layers=self.nl,
            n_heads=self.H,
            vocab_size=self.V,
            max_len=self.P,
            special_ids=tuple(sorted(int(s) for s in special_ids)),
            cell_ids=cells.cell_ids,
            lengths=np_(self.lengths).astype(np.int64),
            groups=cells.groups,
            group_names=cells.group_names,
            rank_count=np_(self.rank_count),
            rank_special_count=np_(self.rank_special_count),
            rank_sum=np_(self.rank_sum),
            rank_norm_sum=np_(self.rank_norm_sum),
            gene_sum=np_(self.gene_sum).transpose(0, 1, 3, 2).copy(),
            gene_norm_sum=np_(self.gene_norm_sum).transpose(0, 1, 3, 2).copy(),
            gene_group_sum=group_sum,
            gene_cells=np_(self.gene_cells),
            gene_occ=np_(self.gene_occ),
            gene_rank_sum=np_(self.gene_rank_sum),
            gene_rank_sq=np_(self.gene_rank_sq),
            gene_group_rank_sum=g_rank,
            gene_group_occ=g_occ,
            gene_pos_keys=keys,
            gene_pos_counts=counts,
            cell_curve=np_(self.cell_curve),
            cell_norm=np_(self.cell_norm),
            cell_norm_summed=np_(self.cell_norm_summed),
            cell_centre=np_(self.cell_centre),
            cell_cosine=np_(self.cell_cosine),
            meta=meta,
        )


def _merge_counts(keys: Sequence[np.ndarray], counts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    k = np.concatenate([np.asarray(x, dtype=np.int64) for x in keys])
    c = np.concatenate([np.asarray(x, dtype=np.float64) for x in counts])
    uniq, inverse = np.unique(k, return_inverse=True)
    return uniq, np.bincount(inverse, weights=c, minlength=len(uniq))


# ----------------------------------------------------------------------------------------- models
class _Model:
    """One BERT: its encoder layers and each layer's per-head output projection W_O[:, h-slice]."""

    def __init__(self, model, device, dtype):
        model.eval()
        model.to(device=device, dtype=dtype)
        base = getattr(model, "base_model", model)
        if not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
            raise TypeError(f"{type(model).__name__} is not a BERT model (no embeddings/encoder)")
        self.model = model
        self.base = base
        self.config = base.config
        self.layers = list(base.encoder.layer)
        self.n_heads = int(self.config.num_attention_heads)
        self.head_dim = int(self.config.hidden_size) // self.n_heads
        self.vocab_size = int(self.config.vocab_size)
        self.w_out = []
        for layer in self.layers:
            w = layer.attention.output.dense.weight.detach()  # (D_out, H * d)
            self.w_out.append(w.view(w.shape[0], self.n_heads, self.head_dim).permute(1, 2, 0).contiguous())

    def embed(self, ids):
        return self.base.embeddings(input_ids=ids)


def _value_gram(value: torch.Tensor, w_out: torch.Tensor, block_elements: int) -> torch.Tensor:
    """G[b, j, h, g] = <f_h(x_j), f_g(x_j)> with f_h(x_j) = v_jh W_O,h^T, computed in blocks of positions."""
    B, H, L, d = value.shape
    D = w_out.shape[-1]
    gram = value.new_empty(B, L, H, H)
    step = max(1, block_elements // max(1, B * H * D))
    for j0 in range(0, L, step):
        f = torch.einsum("bhld,hde->blhe", value[:, :, j0 : j0 + step], w_out)
        gram[:, j0 : j0 + step] = f @ f.transpose(-1, -2)
    return gram


def _reduce_block_torch(p, gram2, m_block, colsum, sq, summed, other=None, dot=None):
    """Reductions of one block of attention rows p (B, H, c, L), with tensor operations (any device).

    Adds sum_i m_i p_ij to colsum, sum_i m_i sum_j p_ij^2 to sq, sum_{i,j} m_i ||sum_h p^h_ij f_h(x_j)||
    to summed and, for a pair, sum_i m_i sum_j p_ij other_ij to dot. `gram2` is (B, H, H, L): G with its
    off-diagonal entries doubled, so that the quadratic form of the symmetric G is
    sum_h p_h (G_hh p_h + sum_{g<h} 2 G_hg p_g), H (H + 1) / 2 products rather than H^2.
    """
    B, H, c, L = p.shape
    pm = p * m_block[:, None, :, None]
    colsum += pm.sum(2).to(torch.float64)
    flat = pm.reshape(B * H, 1, c * L)
    sq += torch.bmm(flat, flat.transpose(1, 2)).view(B, H).to(torch.float64)
    if other is not None:
        dot += torch.bmm(other.reshape(B * H, 1, c * L), flat.transpose(1, 2)).view(B, H).to(torch.float64)
    g2 = gram2.unsqueeze(3)  # (B, H, H, 1, L): broadcast over query rows
    s = None
    for h in range(H):
        y = pm[:, h] * g2[:, h, h]
        for g in range(h):
            y = torch.addcmul(y, pm[:, g], g2[:, h, g])
        s = pm[:, h] * y if s is None else torch.addcmul(s, pm[:, h], y)
    summed += s.clamp_min_(0).sqrt_().sum((1, 2)).to(torch.float64)


_NUMBA_KERNELS = None


def _numba_kernels():
    """`_reduce_block_torch` as two CPU passes over the block (numba): (rows, columns), or None.

    The tensor version streams each block through memory about H (H + 1) / 2 + H times; `rows` reads
    each query row once for the quadratic form, the square norm and the pair's dot product (vectorised
    over keys), `columns` once more for the column sums (one fused kernel vectorises worse). Both skip
    padded query rows and keys; products are taken in the block's dtype, sums across keys or rows are
    float64. They are serial and release the GIL: the engine runs them on slices of the batch from a few
    Python threads, because numba's own OpenMP pool and torch's would compete for the same cores.
    """
    global _NUMBA_KERNELS
    if _NUMBA_KERNELS is None:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba comes with scanpy
            _NUMBA_KERNELS = False
            return None
        # reassociation lets LLVM vectorise the sums over keys; no assumption about NaN or infinities
        fast = {"reassoc", "contract", "nsz", "arcp"}

        def jit(function):
            try:
                return numba.njit(cache=True, nogil=True, fastmath=fast)(function)
            except RuntimeError:  # no writable cache location: compile per process
                return numba.njit(cache=False, nogil=True, fastmath=fast)(function)

        @jit
        def rows(p, gram2, n_rows, n_keys, other, summed, sq, dot):  # pragma: no cover - compiled
            B, H, _, _ = p.shape
            paired = other.shape[0] > 0
            for b in range(B):
                n = n_keys[b]
                s = np.empty(n, dtype=p.dtype)
                y = np.empty(n, dtype=p.dtype)
                for i in range(n_rows[b]):
                    s[:] = 0
                    for h in range(H):
                        for j in range(n):
                            y[j] = gram2[b, h, h, j] * p[b, h, i, j]
                        for g in range(h):
                            for j in range(n):
                                y[j] += gram2[b, h, g, j] * p[b, g, i, j]
                        a2 = 0.0
                        for j in range(n):
                            v = p[b, h, i, j]
                            s[j] += v * y[j]
                            a2 += v * v
                        sq[b, h] += a2
                        if paired:
                            ad = 0.0
                            for j in range(n):
                                ad += p[b, h, i, j] * other[b, h, i, j]
                            dot[b, h] += ad
                    row = 0.0
                    for j in range(n):
                        if s[j] > 0:
                            row += np.sqrt(s[j])
                    summed[b] += row

        @jit
        def columns(p, n_rows, n_keys, colsum):  # pragma: no cover - compiled
            B, H, _, _ = p.shape
            for b in range(B):
                n = n_keys[b]
                for h in range(H):
                    acc = np.zeros(n)
                    for i in range(n_rows[b]):
                        for j in range(n):
                            acc[j] += p[b, h, i, j]
                    for j in range(n):
                        colsum[b, h, j] += acc[j]

        _NUMBA_KERNELS = (rows, columns)
    return _NUMBA_KERNELS or None


def _project(self_attention, hidden: torch.Tensor):
    """Queries, keys and values of a BERT self-attention module, shaped (B, H, L, d) as HF computes them."""
    B, L, _ = hidden.shape
    shape = (B, L, -1, self_attention.attention_head_size)
    q = self_attention.query(hidden).view(shape).transpose(1, 2)
    k = self_attention.key(hidden).view(shape).transpose(1, 2)
    v = self_attention.value(hidden).view(shape).transpose(1, 2)
    return q, k, v


# ----------------------------------------------------------------------------------------- engine
class _StreamingEngine:
    """Runs the models layer by layer over one padded batch and reduces attention block by block.

    For a pair, model A's attention call also projects model B's queries, keys and values for the same
    layer (from B's hidden state, with B's own modules) and walks both models' attention through the same
    blocks of query rows, so the cosine needs neither model's full matrix. Model B's attention call then
    returns the output computed for it, after checking that B's layer produced the same value vectors.
    """

    def __init__(self, models: list[_Model], acc: _Accumulators, block_elements: int, kernel: str = "auto"):
        if kernel not in ("auto", "torch", "numba"):
            raise ValueError(f"kernel must be auto, torch or numba, not {kernel!r}")
        self.models = models
        self.acc = acc
        self.block_elements = block_elements
        self.kernel = kernel
        self.current: tuple[int, int] | None = None
        self.batch: dict | None = None
        self.hidden: list | None = None
        self.pending = None
        self.layer_out: list[dict] = []
        self._pool = None

    def run_batch(self, ids, mask, cells, groups):
        lengths = mask.sum(1)
        self.batch = dict(
            ids=ids, mask=mask, cells=cells, groups=groups, lengths=lengths.cpu().numpy().astype(np.int64)
        )
        self.acc.add_tokens(ids, mask, cells, groups)
        self.hidden = [m.embed(ids) for m in self.models]
        for layer in range(len(self.models[0].layers)):
            self.layer_out = []
            for k, model in enumerate(self.models):
                self.current = (k, layer)
                # key padding is applied inside `attend` from the batch's lengths, so no mask tensor is passed
                out = model.layers[layer](self.hidden[k], attention_mask=None)
                self.hidden[k] = out[0] if isinstance(out, tuple) else out
            if self.pending is not None:
                raise RuntimeError("model B's layer did not run its attention through the streaming function")
            self._finish_layer(layer)
        self.current = self.batch = self.hidden = None

    def _use_numba(self, device, block_size: int) -> bool:
        if self.kernel == "torch" or device.type != "cpu":
            return False
        if self.kernel == "auto" and block_size < NUMBA_MIN_BLOCK:
            return False  # small blocks: tensor operations cost less than compiling or calling the kernel
        kernel = _numba_kernels()
        if kernel is None and self.kernel == "numba":
            raise RuntimeError("numba is not available")
        return kernel is not None

    def attend(self, module, query, key, value, attention_mask, scaling):
        """The attention output of the current model's layer; `attention_mask` is None (see run_batch)."""
        k, layer = self.current
        if k == 1:
            if self.pending is None:
                raise RuntimeError("model B's attention ran before model A's for the same layer")
            out_b, value_b = self.pending
            self.pending = None
            step = max(1, value.shape[2] // 16)  # a sample of positions is enough to catch a mismatch
            if value.shape != value_b.shape or not torch.allclose(
                value[:, :, ::step], value_b[:, :, ::step], rtol=1e-3, atol=1e-5
            ):
                raise RuntimeError("model B's layer computed other value vectors than the engine projected")
            return out_b
        d = query.shape[-1]
        sides = [(k, query, key, value, d**-0.5 if scaling is None else scaling)]
        if len(self.models) == 2:
            sa_b = self.models[1].layers[layer].attention.self
            q_b, k_b, v_b = _project(sa_b, self.hidden[1])
            sides.append((1, q_b, k_b, v_b, getattr(sa_b, "scaling", d**-0.5)))
        outs = self._reduce_layer(layer, sides)
        if len(sides) == 2:
            self.pending = (outs[1], sides[1][3])
        return outs[0]

    def _reduce_layer(self, layer, sides):
        b = self.batch
        B, H, L, d = sides[0][1].shape
        device = sides[0][1].device
        # bfloat16/float16 scores are reduced in float32; float32 and float64 stay exact to eager.
        dtype = sides[0][1].dtype
        red = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        lengths = b["lengths"]
        pad_cols = [(i, int(n)) for i, n in enumerate(lengths) if n < L]
        rows = max(1, self.block_elements // max(1, B * H * L))
        use_numba = self._use_numba(device, B * H * min(rows, L) * L)
        m = b["mask"].to(red)
        off = torch.full((H, H), 2.0, dtype=red, device=device).fill_diagonal_(1.0)
        states = []
        for k, q, key, v, scaling in sides:
            gram = _value_gram(v.to(red), self.models[k].w_out[layer].to(red), self.block_elements)
            st = dict(
                k=k,
                scaling=scaling,
                # (B*H, L, d) contiguous once per layer, so that every block's GEMM reads them without a copy
                q3=q.reshape(B * H, L, d),
                k3t=key.reshape(B * H, L, d).transpose(1, 2),
                v3=v.reshape(B * H, L, d),
                fnorm=torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt().permute(0, 2, 1),
                gram2=(gram * off).permute(0, 2, 3, 1).contiguous(),
                out=torch.empty(B, L, H, d, dtype=v.dtype, device=device),  # the layout HF's layer expects
                colsum=torch.zeros(B, H, L, dtype=torch.float64, device=device),
                sq=torch.zeros(B, H, dtype=torch.float64, device=device),
                summed=torch.zeros(B, dtype=torch.float64, device=device),
                dot=torch.zeros(B, H, dtype=torch.float64, device=device),
            )
            del gram
            states.append(st)
        if use_numba:
            views = [{name: st[name].numpy() for name in ("gram2", "colsum", "sq", "summed", "dot")} for st in states]
            no_other = np.zeros((0, 0, 0, 0), dtype=np.float32 if red == torch.float32 else np.float64)
            parts = np.array_split(np.arange(B), min(B, max(1, torch.get_num_threads())))
            parts = [(int(c[0]), int(c[-1]) + 1) for c in parts if len(c)]
        for i0 in range(0, L, rows):
            i1 = min(L, i0 + rows)
            probs = []
            for st in states:
                p = _block_probs(st["q3"][:, i0:i1], st["k3t"], pad_cols, st["scaling"], red, B)
                o = torch.bmm(p.view(B * H, i1 - i0, L).to(st["v3"].dtype), st["v3"])
                st["out"][:, i0:i1] = o.view(B, H, i1 - i0, d).transpose(1, 2)
                probs.append(p)
            if use_numba:
                real_rows = np.clip(lengths - i0, 0, i1 - i0)
                arrays = [(p.numpy(), probs[0].numpy() if s == 1 else no_other, views[s]) for s, p in enumerate(probs)]
                self._run_kernels(arrays, real_rows, lengths, parts)
            else:
                m_block = m[:, i0:i1]
                for s, (st, p) in enumerate(zip(states, probs)):
                    _reduce_block_torch(
                        p,
                        st["gram2"],
                        m_block,
                        st["colsum"],
                        st["sq"],
                        st["summed"],
                        other=probs[0] if s == 1 else None,
                        dot=st["dot"],
                    )
            del probs, p
        outs = []
        for st in states:
            self.layer_out.append(
                dict(
                    colsum=st["colsum"],
                    sq=st["sq"],
                    summed=st["summed"],
                    fnorm=st["fnorm"].to(torch.float64),
                    dot=st["dot"],
                )
            )
            outs.append(st["out"])
        return outs

    def _run_kernels(self, arrays, real_rows, lengths, parts):
        """The numba reductions of one block for every model, over slices of cells in parallel threads."""
        rows_kernel, columns_kernel = _numba_kernels()

        def work(b0, b1):
            for pn, other, vw in arrays:
                o = other[b0:b1] if other.shape[0] else other
                rows_kernel(
                    pn[b0:b1],
                    vw["gram2"][b0:b1],
                    real_rows[b0:b1],
                    lengths[b0:b1],
                    o,
                    vw["summed"][b0:b1],
                    vw["sq"][b0:b1],
                    vw["dot"][b0:b1],
                )
                columns_kernel(pn[b0:b1], real_rows[b0:b1], lengths[b0:b1], vw["colsum"][b0:b1])

        if len(parts) == 1:
            work(*parts[0])
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="gfattn-reduce")
        for future in [self._pool.submit(work, b0, b1) for b0, b1 in parts]:
            future.result()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _finish_layer(self, layer):
        b = self.batch
        for k, o in enumerate(self.layer_out):
            self.acc.add_layer(
                k,
                layer,
                ids=b["ids"],
                mask=b["mask"],
                cells=b["cells"],
                groups=b["groups"],
                colsum=o["colsum"],
                fnorm=o["fnorm"],
                norm_summed_num=o["summed"],
            )
        if len(self.layer_out) == 2:
            sq_a, sq_b, dot = self.layer_out[0]["sq"], self.layer_out[1]["sq"], self.layer_out[1]["dot"]
            self.acc.set_cosine(layer, b["cells"], dot / torch.sqrt(sq_a * sq_b))
        self.layer_out = []


def _block_probs(q_block, key_t, pad_cols, scaling, red, batch):
    """Eager attention probabilities softmax(q k^T * scaling + key-padding mask) of a block of query rows.

    q_block: (B*H, c, d); key_t: (B*H, d, L); pad_cols: (cell, real length) for cells with padded keys.
    HF's eager mask adds finfo.min to padded keys, which makes their probability exactly 0; filling those
    scores with -inf gives the same probabilities without a pass over the whole block.
    Returns (B, H, c, L) in `red`.
    """
    BH, c, d = q_block.shape
    L = key_t.shape[-1]
    if q_block.dtype != red:
        q_block, key_t = q_block.to(red), key_t.to(red)
    scores = torch.baddbmm(q_block.new_empty(()).expand(BH, c, L), q_block, key_t, beta=0.0, alpha=scaling)
    scores = scores.view(batch, BH // batch, c, L)
    for cell, n in pad_cols:
        scores[cell, :, :, n:] = float("-inf")
    return torch.softmax(scores, dim=-1)


def _streaming_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    engine = getattr(_ACTIVE, "engine", None)
    if engine is None:
        # Outside an analysis the function is plain eager attention.
        from transformers.models.bert.modeling_bert import eager_attention_forward

        return eager_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return engine.attend(module, query, key, value, attention_mask, scaling), None


_REGISTERED = False


def _register_attention() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(STREAMING_ATTENTION, _streaming_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionMaskInterface.register(STREAMING_ATTENTION, eager_mask)
    except ImportError:  # pragma: no cover - older mask utilities
        pass
    _REGISTERED = True


@contextmanager
def _attention_implementation(models: Iterable[_Model], name: str):
    """Switch the models' attention function for the duration of an analysis, then restore it."""
    configs, seen = [], set()
    for m in models:
        if id(m.config) not in seen:
            seen.add(id(m.config))
            configs.append((m.config, m.config._attn_implementation))
    try:
        for config, _ in configs:
            config._attn_implementation = name
        yield
    finally:
        for config, previous in configs:
            config._attn_implementation = previous


@contextmanager
def routed_attention(models: Iterable, engine):
    """Route the self-attention of `models` (HF BERTs, or anything with `.config`) through `engine`.

    Inside the block every self-attention call returns `engine.attend(module, query, key, value,
    attention_mask, scaling)` (queries, keys, values (B, H, L, d); the output in HF's (B, L, H, d) layout).
    The hook other analyses (`pipeline.analysis.attribution`) use to run their own attention through the same
    registered function as the streaming engine; the previous engine and attention implementation come back
    afterwards.
    """
    _register_attention()
    previous = getattr(_ACTIVE, "engine", None)
    with _attention_implementation(models, STREAMING_ATTENTION):
        _ACTIVE.engine = engine
        try:
            yield
        finally:
            _ACTIVE.engine = previous


# ------------------------------------------------------------------------------------ public API
def _prepare(model_a, model_b, dataset, *, group_column, device, dtype, special_ids):
    device = torch.device(device)
    models = [_Model(model_a, device, dtype)]
    if model_b is not None:
        models.append(_Model(model_b, device, dtype))
        a, b = models
        if (len(a.layers), a.n_heads, a.head_dim, a.vocab_size) != (len(b.layers), b.n_heads, b.head_dim, b.vocab_size):
            raise ValueError(
                "the two models differ in layers/heads/hidden size/vocabulary "
                f"({len(a.layers)}/{a.n_heads}/{a.head_dim * a.n_heads}/{a.vocab_size} vs "
                f"{len(b.layers)}/{b.n_heads}/{b.head_dim * b.n_heads}/{b.vocab_size}); they must share a tokenization"
            )
    cells = Cells(dataset, group_column)
    if len(cells) == 0:
        raise ValueError("the dataset has no cells")
    max_len = int(cells.lengths.max())
    limit = int(getattr(models[0].config, "max_position_embeddings", max_len))
    if max_len > limit:
        raise ValueError(f"cells have up to {max_len} tokens but the model has {limit} positions")
    acc_kwargs = dict(
        n_models=len(models),
        n_layers=len(models[0].layers),
        n_heads=models[0].n_heads,
        vocab_size=models[0].vocab_size,
        max_len=max_len,
        n_cells=len(cells),
        n_groups=len(cells.group_names),
        device=device,
        special_ids=special_ids,
    )
    return device, models, cells, acc_kwargs


def _shard():
    from pipeline.parallel.distributed import shard

    return shard()


def sharded_batches(lengths, batch_size: int, shard: tuple[int, int] | None = None) -> list[np.ndarray]:
    """This process's share (`pipeline.parallel.distributed.share`, by padded tokens) of the cells'
    length-grouped batches: the same batches as one process, each run by one rank."""
    from pipeline.parallel.distributed import batch_cost, share

    batches = length_grouped_batches(lengths, batch_size)
    return [batches[i] for i in share([batch_cost(b, lengths) for b in batches], shard)]


def _meta(models, dtype, device, batch_size, method):
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "batch_size": int(batch_size),
        "method": method,
        "n_layers": len(models[0].layers),
        "n_heads": models[0].n_heads,
    }


def analyze_attention(
    model_a,
    model_b,
    dataset,
    *,
    pad_id: int,
    special_ids: Iterable[int] = (),
    group_column: str | None = None,
    batch_size: int = 8,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable | None = None,
    names: Sequence[str] = ("a", "b"),
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    cell_curves: bool = True,
    shard: tuple[int, int] | None = None,
    kernel: str = "auto",
    method: str = "streaming",
) -> AttentionResult:
    """Analyses 1-4 of one model (or two that share a tokenization) over every cell of `dataset`.

    `dataset`: a tokenized `datasets.Dataset` (columns `input_ids`, optional `length`, `cell_id`,
    `group_column`), a dict of such columns, or a list of token-id lists. The models are put in eval mode
    and moved to `device`/`dtype` in place (float32 or float64; bfloat16 on CUDA reduces in float32).
    `special_ids` (V2's <cls>/<eos>, pad, mask) are kept in per-rank curves and marked, and left out of
    gene tables downstream. `progress(done_cells, total_cells)` is called after each batch.
    `block_elements` bounds the attention entries alive at once per model (query rows per block follow
    from it). `kernel`: "auto" reduces large blocks on CPU with compiled numba kernels (compiled once per
    dtype, cached on disk) and everything else with tensor operations; "torch" or "numba" force one.
    `shard=(rank, world)` processes that rank's share of the batches only (`sharded_batches`); without
    it, an initialised `torch.distributed` group shards the batches and the sums are all-reduced, so every
    rank returns the full result. Results of shards add up with `AttentionResult.merge`. `method="naive"`: the reference
    computation (`naive_attention_reductions`).
    """
    special = set(int(s) for s in special_ids) | {int(pad_id)}
    device, models, cells, acc_kwargs = _prepare(
        model_a, model_b, dataset, group_column=group_column, device=device, dtype=dtype, special_ids=special
    )
    acc = _Accumulators(**acc_kwargs, cell_curves=cell_curves)
    if method == "naive":
        batches = sharded_batches(cells.lengths, batch_size, shard or (0, 1))
        _naive_pass(models, cells, acc, batches, pad_id=pad_id, device=device, progress=progress)
        meta = _meta(models, dtype, device, batch_size, "naive")
        return acc.result(names=tuple(names[: len(models)]), special_ids=special, cells=cells, meta=meta)
    if method != "streaming":
        raise ValueError(f"method must be streaming or naive, not {method!r}")
    distributed = shard is None and _shard()[1] > 1
    batches = sharded_batches(cells.lengths, batch_size, shard or _shard())
    _register_attention()
    engine = _StreamingEngine(models, acc, int(block_elements), kernel=kernel)
    total = int(sum(len(b) for b in batches))
    done = 0
    groups_t = torch.as_tensor(np.maximum(cells.groups, 0), device=device)
    with torch.inference_mode(), _attention_implementation(models, STREAMING_ATTENTION):
        _ACTIVE.engine = engine
        try:
            for idx in batches:
                ids, mask = pad_batch(cells.input_ids(idx), pad_token_id=int(pad_id))
                if int(ids.max()) >= models[0].vocab_size:
                    raise ValueError(
                        f"token id {int(ids.max())} is outside the model's vocabulary ({models[0].vocab_size})"
                    )
                cell_t = torch.as_tensor(idx, device=device)
                engine.run_batch(ids.to(device), mask.to(device), cell_t, groups_t[cell_t])
                done += len(idx)
                if progress is not None:
                    progress(done, total)
        finally:
            _ACTIVE.engine = None
            engine.close()
    if distributed:
        acc.all_reduce()
    names = tuple(names[: len(models)])
    meta = _meta(models, dtype, device, batch_size, "streaming")
    meta.update(block_elements=int(block_elements), kernel=kernel, world_size=(shard or _shard())[1])
    return acc.result(names=names, special_ids=special, cells=cells, meta=meta)


# --------------------------------------------------------------------------------- naive baseline
def naive_attention_reductions(model_a, model_b, dataset, **options) -> AttentionResult:
    """The same result from `output_attentions=True`: every layer's attention of both models at once.

    The reference the streaming engine is tested against, and the baseline its benchmark compares with;
    it takes `analyze_attention`'s arguments (`block_elements` and `kernel` do not apply; a `shard` is
    never taken from `torch.distributed`). Attention comes from HF's eager implementation, value vectors
    from the returned hidden states, and each quantity is computed the direct way (full masked
    matrices, einsum over all heads).
    """
    return analyze_attention(model_a, model_b, dataset, method="naive", **options)


def _naive_pass(models, cells, acc, batches, *, pad_id: int, device, progress) -> None:
    groups_t = torch.as_tensor(np.maximum(cells.groups, 0), device=device)
    total, done = int(sum(len(b) for b in batches)), 0
    with torch.inference_mode(), _attention_implementation(models, "eager"):
        for idx in batches:
            ids, mask = pad_batch(cells.input_ids(idx), pad_token_id=int(pad_id))
            ids, mask = ids.to(device), mask.to(device)
            cell_t = torch.as_tensor(idx, device=device)
            acc.add_tokens(ids, mask, cell_t, groups_t[cell_t])
            outputs = [
                m.base(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
                for m in models
            ]
            _naive_reduce(models, outputs, acc, ids, mask, cell_t, groups_t[cell_t])
            del outputs
            done += len(idx)
            if progress is not None:
                progress(done, total)


def _naive_reduce(models, outputs, acc, ids, mask, cells, groups):
    m = mask.to(outputs[0].attentions[0].dtype)
    real_rows = m[:, None, :, None]
    real_pairs = (m[:, :, None] * m[:, None, :]).bool()  # (B, L, L)
    for layer in range(len(models[0].layers)):
        probs = []
        for k, (model, out) in enumerate(zip(models, outputs)):
            attn = out.attentions[layer]  # (B, H, L, L)
            hidden_in = out.hidden_states[layer]
            sa = model.layers[layer].attention.self
            B, L, _ = hidden_in.shape
            value = sa.value(hidden_in).view(B, L, model.n_heads, model.head_dim)  # (B, L, H, d)
            f = torch.einsum("bjhd,hde->bjhe", value, model.w_out[layer])  # (B, L, H, D)
            gram = torch.einsum("bjhe,bjge->bjhg", f, f)
            fnorm = f.norm(dim=-1).permute(0, 2, 1)  # (B, H, L)
            am = attn * real_rows
            colsum = am.sum(2).to(torch.float64)
            s = (torch.einsum("bhij,bjhg->bgij", am, gram) * am).sum(1)  # (B, L, L)
            summed = (s.clamp_min(0).sqrt() * real_pairs).sum((1, 2)).to(torch.float64)
            acc.add_layer(
                k,
                layer,
                ids=ids,
                mask=mask,
                cells=cells,
                groups=groups,
                colsum=colsum,
                fnorm=fnorm.to(torch.float64),
                norm_summed_num=summed,
            )
            probs.append(attn)
        if len(probs) == 2:
            B, H = probs[0].shape[:2]
            cos = torch.empty(B, H, dtype=torch.float64, device=ids.device)
            for b in range(B):
                n = int(mask[b].sum())
                xa = probs[0][b, :, :n, :n].reshape(H, -1)
                xb = probs[1][b, :, :n, :n].reshape(H, -1)
                cos[b] = torch.nn.functional.cosine_similarity(xa, xb, dim=-1).to(torch.float64)
            acc.set_cosine(layer, cells, cos)
