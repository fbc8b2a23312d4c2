"""Attribution scores per gene and per rank: Hao et al.'s self-attention attribution, integrated gradients,
attention rollout (docs/architecture.md, "Attribution").

Attention weights say where a head looks, not what the prediction depends on. Three scores of how much
each token matters for the model's true-class logit F (the classifier's logit of the cell's label, read
by the pooler from position 0; V1 has no `<cls>`, so position 0 is the cell's top-ranked gene):

- **Self-attention attribution** (Hao et al. 2021, "Self-Attention Attribution", AAAI):
  Attr_h(A) = A_h * int_0^1 dF(alpha A)/dA_h d alpha ~= A_h / m * sum_{k=1..m} dF(k/m A)/dA_h, for one
  layer at a time with the other layers' attention left as the model computes it. Reduced like attention:
  the attribution key position j receives, sum_i m_i Attr_h(A)_ij, per rank position and per token id, per
  (layer, head); and Hao et al.'s head importance I_h = E_cells[max_{i,j} Attr_h(A)_ij] (max over real
  query rows and keys), which they use to prune heads.
- **Integrated gradients** (Sundararajan et al. 2017) on the word embeddings, through Captum's
  `LayerIntegratedGradients` on `model.bert.embeddings.word_embeddings`: baseline the `<pad>` token's
  embedding at every position (position and token-type embeddings unchanged, the attention mask that of
  the cell), Captum's default Gauss-Legendre rule with `steps` points, batched internally
  (`internal_batch_size`); per token, the attribution summed over the embedding dimension. Completeness:
  per cell sum_j attr_j against F(x) - F(baseline), both reported.
- **Attention rollout** (Abnar and Zuidema 2020): per layer A^_l = 0.5 mean_h A_l + 0.5 I (rows still sum
  to 1), rollout R = A^_L ... A^_1, the score of key j the entry R[r, j] of the row r the classifier reads
  (position 0: `<cls>` for V2; for V1 the top-ranked gene, which the output says).

Why Hao attribution is written here and not taken from a library: neither Captum nor the published code
(github.com/YRdddream/attattr) streams. The published code keeps every layer's attention and gradient and
replicates each example m times; here one layer's attribution exists at a time, and not even that as a
whole. Because the attention output of the scaled layer is O = (alpha A) V, and V does not depend on alpha
(layers before l are untouched), dF/dA_ij = <dF/dO_i, v_j> exactly (chain rule), and layer l's output at
alpha is alpha O. So per layer: compute O once; for each alpha feed the leaf alpha O (B, L, H, d) through
the rest of the model and accumulate S = sum_k dF/dO at alpha_k; then Attr = A * (S V^T) / m, computed
block by block of query rows with A recomputed from the layer's queries and keys (`pipeline.analysis.attention`'s
`_block_probs`, the same eager probabilities) and reduced into column sums and head maxima before the next
block exists. The scaled layer's output goes through the registered attention function
(`pipeline.analysis.attention.routed_attention`), so transformers' layer code runs unchanged; the other layers run
SDPA (flash or memory-efficient kernels: no L x L tensor saved for the backward pass). Peak memory is
therefore one block of attention rows (`block_elements`, 3 tensors of it: A, S V^T, Attr) plus the
activations of one forward/backward of the layers after l, O(B L D) each, never an (L x L) tensor per
layer. Time: per layer l, m forward+backward passes through layers l..L-1 and the head, so about
(L + 1) / 2 times the cost of m full forward+backward passes (the published code: L times).

Integrated gradients uses Captum because it is the field's reference integrator. Rollout is a few matrix
products; it runs through the same registered attention function, keeping one running product
(B, L, L) rather than every layer's attention.

Per-rank and per-gene sums, counts and ranks are accumulated by `pipeline.analysis.attention._Accumulators`, the
engine that produces `AttentionResult`, so the derived quantities (means per rank position, per
occurrence, position control) use the same code as the attention analyses (`as_attention_result`).
Nothing is random: `seed` is recorded only. In a process group each rank runs its share of the batches
(`sharded_batches`) and the sums are all-reduced (`_Setup.reduce`).

One module: Hao attribution, integrated gradients (Captum) and rollout share one engine set-up (hooks, memory,
batching) and one result type.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from pipeline.analysis.attention import AttentionResult, _Accumulators, _block_probs, routed_attention, sharded_batches
from pipeline.parallel.distributed import all_reduce_max, all_reduce_sum, shard
from pipeline.tokenize.batching import pad_batch
from pipeline.tokenize.cells import Cells

METHODS = ("hao", "ig", "rollout")
DEFAULT_HAO_STEPS = 20  # Hao et al.'s m
DEFAULT_IG_STEPS = 50  # Captum's default n_steps
DEFAULT_BLOCK_ELEMENTS = 1 << 22  # attention entries per query block (as pipeline.analysis.attention)
IG_METHOD = "gausslegendre"  # Captum's default integration rule


# ------------------------------------------------------------------------------------------- result
@dataclass
class AttributionResult:
    """Sums over cells of each method's attribution, per rank position and per token id, and counts.

    Raw sums only (as `AttentionResult`): per-rank means divide by `rank_count`, per-occurrence means by
    `gene_occ`. Axes: P rank positions (token index, 0-based, special tokens included), V vocabulary,
    nl layers, H heads, n cells (in `cells` order).

    `rank_sum[m]` / `gene_sum[m]`: "hao" (nl, H, P) / (nl, H, V), the attribution each key position /
    token receives, sum_i m_i Attr_ij; "ig" and "rollout" (P,) / (V,). `cell_total[m]` (n,): each cell's
    summed score (IG: sum of attributions, compared with `ig_delta` = F(x) - F(baseline); rollout: 1).
    `head_max_sum` (nl, H): sum over cells of max_{i,j} Attr_h(A)_ij (Hao's head importance times n).
    """

    methods: tuple[str, ...]
    n_layers: int
    n_heads: int
    vocab_size: int
    max_len: int
    special_ids: tuple[int, ...]
    cell_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    rank_count: np.ndarray
    rank_special_count: np.ndarray
    gene_cells: np.ndarray
    gene_occ: np.ndarray
    gene_rank_sum: np.ndarray
    gene_rank_sq: np.ndarray
    gene_pos_keys: np.ndarray
    gene_pos_counts: np.ndarray
    rank_sum: dict[str, np.ndarray] = field(default_factory=dict)
    gene_sum: dict[str, np.ndarray] = field(default_factory=dict)
    cell_total: dict[str, np.ndarray] = field(default_factory=dict)
    head_max_sum: np.ndarray | None = None
    head_total_sum: np.ndarray | None = None
    logit: np.ndarray | None = None  # (n,) F(x), the true-class logit
    ig_delta: np.ndarray | None = None  # (n,) F(x) - F(baseline)
    meta: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)

    # ----- derived per-rank / per-gene quantities
    def rank_mean(self, method: str) -> np.ndarray:
        """(P,) mean over the cells that have position j of the score position j receives (layers, heads summed)."""
        s = self.rank_sum[method]
        s = s.sum(axis=(0, 1)) if s.ndim == 3 else s
        return _safe_div(s, self.rank_count)

    def gene_total(self, method: str) -> np.ndarray:
        """(V,) score each token receives, summed over cells (and layers, heads)."""
        s = self.gene_sum[method]
        return s.sum(axis=(0, 1)) if s.ndim == 3 else s

    def gene_mean(self, method: str) -> np.ndarray:
        """(V,) per-occurrence mean score of each token (NaN where it never occurs)."""
        return _safe_div(self.gene_total(method), self.gene_occ)

    def head_importance(self) -> np.ndarray | None:
        """(nl, H) Hao et al.'s head importance E_cells[max_{i,j} Attr_h(A)_ij]."""
        return None if self.head_max_sum is None else self.head_max_sum / max(self.n_cells, 1)

    def completeness(self) -> dict | None:
        """Integrated gradients' completeness: sum of attributions against F(x) - F(baseline), per run."""
        if self.ig_delta is None or "ig" not in self.cell_total:
            return None
        total, delta = self.cell_total["ig"], self.ig_delta
        gap = total - delta
        rel = np.abs(gap) / np.maximum(np.abs(delta), 1e-12)
        return {
            "definition": "gap = sum_j attr_j - (F(x) - F(baseline)); relative to |F(x) - F(baseline)|",
            "sum_attributions": float(total.sum()),
            "sum_delta": float(delta.sum()),
            "relative_gap_total": float(np.abs(gap).sum() / max(float(np.abs(delta).sum()), 1e-12)),
            "relative_gap_mean": float(rel.mean()) if rel.size else None,
            "relative_gap_median": float(np.median(rel)) if rel.size else None,
            "relative_gap_p95": float(np.percentile(rel, 95)) if rel.size else None,
            "relative_gap_max": float(rel.max()) if rel.size else None,
            "abs_gap_max": float(np.abs(gap).max()) if gap.size else None,
            "n_cells": int(gap.size),
        }

    def as_attention_result(self, method: str) -> AttentionResult:
        """One method's sums as a one-model `AttentionResult`, for `pipeline.analysis.pair`'s tables and curves.

        `rank_sum` / `gene_sum` hold the method's attribution (Hao per layer and head, the others as one
        layer with one head); per-cell and norm fields are zeros. `pipeline.analysis.pair.rank_received`,
        `gene_total`, `gene_expected`, `position_controlled_attention` and `gene_table` then apply as they
        do to attention.
        """
        rs, gs = self.rank_sum[method], self.gene_sum[method]
        if rs.ndim == 1:
            rs, gs = rs[None, None], gs[None, None]
        nl, H = rs.shape[:2]
        n = self.n_cells
        return AttentionResult(
            names=(method,),
            n_layers=nl,
            n_heads=H,
            vocab_size=self.vocab_size,
            max_len=self.max_len,
            special_ids=self.special_ids,
            cell_ids=self.cell_ids,
            lengths=self.lengths,
            groups=np.full(n, -1, dtype=np.int64),
            group_names=(),
            rank_count=self.rank_count,
            rank_special_count=self.rank_special_count,
            rank_sum=rs[None],
            rank_norm_sum=np.zeros((1,) + rs.shape),
            gene_sum=gs[None],
            gene_norm_sum=np.zeros((1,) + gs.shape),
            gene_group_sum=np.zeros((1, 0, self.vocab_size)),
            gene_cells=self.gene_cells,
            gene_occ=self.gene_occ,
            gene_rank_sum=self.gene_rank_sum,
            gene_rank_sq=self.gene_rank_sq,
            gene_group_rank_sum=np.zeros((0, self.vocab_size)),
            gene_group_occ=np.zeros((0, self.vocab_size)),
            gene_pos_keys=self.gene_pos_keys,
            gene_pos_counts=self.gene_pos_counts,
            cell_curve=None,
            cell_norm=np.zeros((1, n, nl, H)),
            cell_norm_summed=np.zeros((1, n, nl)),
            cell_centre=np.zeros((1, n, nl, H)),
            cell_cosine=None,
            meta=dict(self.meta.get(method, {})),
        )

    def combine(self, other: AttributionResult) -> AttributionResult:
        """The methods of two results computed on the same cells, in one result."""
        if (self.n_cells, self.vocab_size, self.max_len) != (other.n_cells, other.vocab_size, other.max_len) or not (
            np.array_equal(self.cell_ids, other.cell_ids)
        ):
            raise ValueError("attribution results of different cells cannot be combined")
        out = AttributionResult(**{f: getattr(self, f) for f in self.__dataclass_fields__})
        out.methods = tuple(dict.fromkeys(self.methods + other.methods))
        out.rank_sum = {**self.rank_sum, **other.rank_sum}
        out.gene_sum = {**self.gene_sum, **other.gene_sum}
        out.cell_total = {**self.cell_total, **other.cell_total}
        for name in ("head_max_sum", "head_total_sum", "logit", "ig_delta"):
            if getattr(out, name) is None:
                setattr(out, name, getattr(other, name))
        out.meta = {**self.meta, **other.meta}
        return out


def _safe_div(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# ------------------------------------------------------------------------------------------ set-up
class _Setup:
    """The model's parts, the cells' batches and the token statistics shared by every method."""

    def __init__(self, model, cells, labels, *, pad_id, special_ids, batch_size, device, dtype):
        self.device = torch.device(device)
        model.eval()
        model.to(device=self.device, dtype=dtype)
        self.model = model
        self.base = getattr(model, "bert", None)
        if self.base is None:
            self.base = getattr(model, "base_model", None)
        if self.base is None or not hasattr(model, "classifier"):
            raise TypeError(f"{type(model).__name__} is not a BertForSequenceClassification (no bert/classifier)")
        self.config = self.base.config
        self.layers = list(self.base.encoder.layer)
        self.n_heads = int(self.config.num_attention_heads)
        self.head_dim = int(self.config.hidden_size) // self.n_heads
        self.vocab_size = int(self.config.vocab_size)
        self.dtype = dtype
        self.cells = cells if isinstance(cells, Cells) else Cells(cells)
        if len(self.cells) == 0:
            raise ValueError("no cells to attribute")
        if labels is None:
            labels = self.cells.labels
        if labels is None:
            raise ValueError("labels (the true class of each cell) are needed")
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (len(self.cells),):
            raise ValueError(f"{len(self.labels)} labels for {len(self.cells)} cells")
        n_labels = int(getattr(self.config, "num_labels", 0) or self.model.classifier.out_features)
        if self.labels.min() < 0 or self.labels.max() >= n_labels:
            raise ValueError(f"labels must be class indices 0..{n_labels - 1}")
        self.pad_id = int(pad_id)
        self.special = set(int(s) for s in special_ids) | {self.pad_id}
        self.max_len = int(self.cells.lengths.max())
        limit = int(getattr(self.config, "max_position_embeddings", self.max_len))
        if self.max_len > limit:
            raise ValueError(f"cells have up to {self.max_len} tokens but the model has {limit} positions")
        # in a process group (`pipeline.parallel.distributed`), this rank's share of the same list of batches;
        # the sums are all-reduced by `reduce` and the per-cell values, each written by one rank, add up exactly
        self.world = shard()[1]
        self.batches = sharded_batches(self.cells.lengths, int(batch_size))
        self.n_local = int(sum(len(b) for b in self.batches))
        self.batch_size = int(batch_size)
        self.labels_t = torch.as_tensor(self.labels, device=self.device)

    def accumulators(self, n_models: int, n_layers: int, n_heads: int) -> _Accumulators:
        return _Accumulators(
            n_models=n_models,
            n_layers=n_layers,
            n_heads=n_heads,
            vocab_size=self.vocab_size,
            max_len=self.max_len,
            n_cells=len(self.cells),
            n_groups=0,
            device=self.device,
            special_ids=self.special,
            cell_curves=False,
        )

    def reduce(self, accumulators: Sequence[_Accumulators] = (), tensors: Sequence[torch.Tensor] = ()) -> None:
        """Sum every rank's accumulators and tensors in place (nothing for one process)."""
        if self.world == 1:
            return
        for acc in accumulators:
            acc.all_reduce()
        for t in tensors:
            all_reduce_sum(t)

    def batch(self, idx):
        ids, mask = pad_batch(self.cells.input_ids(idx), pad_token_id=self.pad_id)
        if int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary ({self.vocab_size})")
        cell_t = torch.as_tensor(idx, device=self.device)
        return ids.to(self.device), mask.to(self.device), cell_t

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier's logits from the encoder output, as `BertForSequenceClassification` computes them."""
        pooled = self.base.pooler(hidden) if self.base.pooler is not None else hidden[:, 0]
        return self.model.classifier(self.model.dropout(pooled))

    def result(self, tokens: _Accumulators, methods, meta) -> AttributionResult:
        r = tokens.result(names=(), special_ids=self.special, cells=self.cells, meta={})
        return AttributionResult(
            methods=tuple(methods),
            n_layers=len(self.layers),
            n_heads=self.n_heads,
            vocab_size=self.vocab_size,
            max_len=self.max_len,
            special_ids=r.special_ids,
            cell_ids=r.cell_ids,
            lengths=r.lengths,
            labels=self.labels,
            rank_count=r.rank_count,
            rank_special_count=r.rank_special_count,
            gene_cells=r.gene_cells,
            gene_occ=r.gene_occ,
            gene_rank_sum=r.gene_rank_sum,
            gene_rank_sq=r.gene_rank_sq,
            gene_pos_keys=r.gene_pos_keys,
            gene_pos_counts=r.gene_pos_counts,
            meta=meta,
        )


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _groups(cell_t):
    return torch.zeros_like(cell_t)


def _add_scores(acc, ids, mask, cells, groups, colsum) -> None:
    """One per-token score per cell (integrated gradients, rollout) into the accumulators as layer 0,
    head 0, with the norm sums the accumulators expect left at zero."""
    fn, ns = _zeros_fnorm(colsum)
    acc.add_layer(0, 0, ids=ids, mask=mask, cells=cells, groups=groups, colsum=colsum, fnorm=fn, norm_summed_num=ns)


def _zeros_fnorm(colsum):
    return torch.zeros_like(colsum), torch.zeros(colsum.shape[0], dtype=torch.float64, device=colsum.device)


class _frozen_parameters:
    """Parameters need no gradient for attribution (only activations do): less autograd bookkeeping."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


class _Memory:
    """Peak memory of a method: CUDA's allocator peak above the start, else the process's resident peak."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        self.t0 = time.perf_counter()

    def report(self) -> dict:
        out = {"seconds": time.perf_counter() - self.t0}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device) - self.start)
            out["peak_memory_source"] = "torch.cuda.max_memory_allocated above the start"
        else:
            out["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            out["peak_memory_source"] = "process resident-set high-water mark (ru_maxrss), whole process"
        return out


def _progress_over(progress, offset, total):
    if progress is None:
        return None
    return lambda done, _n: progress(offset + done, total)


def _sdpa(query, key, value, mask, scaling):
    """Scaled dot-product attention (B, H, L, d) with a boolean or additive key mask."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


# ------------------------------------------------------------------------------------- Hao et al.
class _HaoEngine:
    """Attention function of the Hao pass: SDPA for every layer, except that the target layer returns the
    leaf alpha O (whose gradient is wanted) and that the capture layer keeps its queries, keys and values."""

    def __init__(self, layers):
        self.layer_of = {id(layer.attention.self): i for i, layer in enumerate(layers)}
        self.key_mask = None  # (B, 1, 1, L) bool, True = real key
        self.capture = None
        self.captured = None
        self.leaf = None
        self.leaf_layer = None

    def attend(self, module, query, key, value, attention_mask, scaling):
        layer = self.layer_of.get(id(module))
        if layer is not None and layer == self.leaf_layer:
            return self.leaf
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = _sdpa(query, key, value, self.key_mask, scaling)
        if layer is not None and layer == self.capture:
            self.captured = (query.detach(), key.detach(), value.detach(), out.detach(), scaling)
        return out.transpose(1, 2)


def hao_attribution(
    model,
    cells,
    labels=None,
    *,
    steps: int = DEFAULT_HAO_STEPS,
    batch_size: int = 8,
    alpha_batch: int = 1,
    pad_id: int = 0,
    special_ids: Iterable[int] = (),
    device="cpu",
    dtype: torch.dtype = torch.float32,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress: Callable | None = None,
) -> AttributionResult:
    """Hao et al.'s self-attention attribution of every layer and head, streamed (see the module docstring).

    `model`: a `BertForSequenceClassification` (eval mode, moved to `device`/`dtype` in place); `cells`: a
    `pipeline.tokenize.cells.Cells` (or a dataset it wraps); `labels`: each cell's true class index (default
    `cells.labels`). `steps` = m, right Riemann points alpha = k/m, k = 1..m (Hao et al.'s eq. 3).
    `alpha_batch`: alpha steps run together as one larger batch (faster on GPUs, memory x alpha_batch).
    `progress(done_cells, total_cells)` after each batch.
    """
    setup = _Setup(
        model, cells, labels, pad_id=pad_id, special_ids=special_ids, batch_size=batch_size, device=device, dtype=dtype
    )
    steps, alpha_batch = int(steps), max(1, int(alpha_batch))
    if steps < 1:
        raise ValueError("steps must be at least 1")
    nl, H, d = len(setup.layers), setup.n_heads, setup.head_dim
    tokens = setup.accumulators(0, 1, 1)
    acc = setup.accumulators(1, nl, H)
    head_max = torch.zeros(nl, H, dtype=torch.float64, device=setup.device)
    head_total = torch.zeros(nl, H, dtype=torch.float64, device=setup.device)
    cell_total = torch.zeros(len(setup.cells), dtype=torch.float64, device=setup.device)
    logit = torch.zeros(len(setup.cells), dtype=torch.float64, device=setup.device)
    red = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    engine = _HaoEngine(setup.layers)
    memory = _Memory(setup.device)
    total, done = setup.n_local, 0
    with routed_attention([model], engine), _frozen_parameters(model):
        for idx in setup.batches:
            ids, mask, cell_t = setup.batch(idx)
            B, L = ids.shape
            tokens.add_tokens(ids, mask, cell_t, _groups(cell_t))
            y = setup.labels_t[cell_t]
            real = mask.bool()
            lengths = real.sum(1)
            pad_cols = [(i, int(n)) for i, n in enumerate(lengths.tolist()) if n < L]
            key_mask = real[:, None, None, :]
            rows = max(1, int(block_elements) // max(1, B * H * L))
            with torch.no_grad():
                hidden = setup.base.embeddings(input_ids=ids)
            for layer_idx, layer in enumerate(setup.layers):
                engine.key_mask, engine.capture = key_mask, layer_idx
                with torch.no_grad():
                    hidden_next = _layer_out(layer(hidden, attention_mask=None))
                q, k, v, out, scaling = engine.captured
                engine.captured = engine.capture = None
                grad_sum = torch.zeros(B, L, H, d, dtype=torch.float64, device=setup.device)
                out_bl = out.transpose(1, 2)  # (B, L, H, d): the layout the layer expects back
                for k0 in range(0, steps, alpha_batch):
                    alphas = torch.arange(k0 + 1, min(steps, k0 + alpha_batch) + 1, dtype=out.dtype, device=out.device)
                    r = len(alphas)
                    scaled = alphas.repeat_interleave(B).view(r * B, 1, 1, 1) * out_bl.repeat(r, 1, 1, 1) / steps
                    leaf = scaled.detach().requires_grad_(True)
                    engine.leaf, engine.leaf_layer = leaf, layer_idx
                    engine.key_mask = key_mask.repeat(r, 1, 1, 1)
                    with torch.enable_grad():
                        x = hidden.repeat(r, 1, 1)
                        for j in range(layer_idx, nl):
                            x = _layer_out(setup.layers[j](x, attention_mask=None))
                        logits = setup.head(x)
                        f = logits.gather(1, y.repeat(r).unsqueeze(1)).sum()
                        (grad,) = torch.autograd.grad(f, leaf)
                    grad_sum += grad.view(r, B, L, H, d).sum(0).to(torch.float64)
                    if layer_idx == 0 and k0 + r == steps:
                        logit[cell_t] = logits[-B:].gather(1, y.unsqueeze(1)).squeeze(1).detach().to(torch.float64)
                    del x, logits, f, grad, leaf, scaled
                engine.leaf = engine.leaf_layer = None
                engine.key_mask = key_mask
                with torch.no_grad():
                    colsum, hmax = _hao_reduce(q, k, v, grad_sum, mask, pad_cols, scaling, red, steps, rows)
                del grad_sum, q, k, v, out, out_bl
                acc.add_layer(
                    0,
                    layer_idx,
                    ids=ids,
                    mask=mask,
                    cells=cell_t,
                    groups=_groups(cell_t),
                    colsum=colsum,
                    fnorm=_zeros_fnorm(colsum)[0],
                    norm_summed_num=_zeros_fnorm(colsum)[1],
                )
                head_max[layer_idx] += hmax.sum(0)
                per_head = colsum.sum(-1)  # (B, H)
                head_total[layer_idx] += per_head.sum(0)
                cell_total[cell_t] += per_head.sum(1)
                hidden = hidden_next
            done += len(idx)
            if progress is not None:
                progress(done, total)
    setup.reduce((tokens, acc), (head_max, head_total, cell_total, logit))
    meta = {
        "hao": {
            "steps": steps,
            "rule": "right Riemann sum, alpha = k/m, k = 1..m (Hao et al. 2021, eq. 3)",
            "target": "true-class logit",
            "alpha_batch": alpha_batch,
            "batch_size": setup.batch_size,
            "block_elements": int(block_elements),
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(setup.device),
            "head_importance": "E_cells[max over real (i, j) of Attr_h(A)_ij] (Hao et al. 2021, sec. 4)",
            **memory.report(),
        }
    }
    result = setup.result(tokens, ("hao",), meta)
    a = acc.result(names=("hao",), special_ids=setup.special, cells=setup.cells, meta={})
    result.rank_sum["hao"] = a.rank_sum[0]
    result.gene_sum["hao"] = a.gene_sum[0]
    result.cell_total["hao"] = cell_total.cpu().numpy()
    result.head_max_sum = head_max.cpu().numpy()
    result.head_total_sum = head_total.cpu().numpy()
    result.logit = logit.cpu().numpy()
    return result


def _hao_reduce(q, k, v, grad_sum, mask, pad_cols, scaling, red, steps, rows):
    """Column sums sum_i m_i Attr_ij (B, H, L) and head maxima max_{real i, j} Attr_ij (B, H), by query blocks.

    Attr = A * (S V^T) / m with S the summed gradient wrt the attention output (B, L, H, d).
    """
    B, H, L, d = q.shape
    q3 = q.to(red).reshape(B * H, L, d)
    k3t = k.to(red).reshape(B * H, L, d).transpose(1, 2)
    v3t = v.to(red).reshape(B * H, L, d).transpose(1, 2)
    s3 = grad_sum.transpose(1, 2).to(red).reshape(B * H, L, d)
    m = mask.to(red)
    real_keys = mask.bool()[:, None, None, :]
    colsum = torch.zeros(B, H, L, dtype=torch.float64, device=q.device)
    hmax = torch.full((B, H), -math.inf, dtype=torch.float64, device=q.device)
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        p = _block_probs(q3[:, i0:i1], k3t, pad_cols, scaling, red, B)  # (B, H, c, L)
        attr = torch.bmm(s3[:, i0:i1], v3t).view(B, H, i1 - i0, L)
        attr.mul_(p).div_(steps)
        del p
        m_rows = m[:, i0:i1][:, None, :, None]
        colsum += (attr * m_rows).sum(2).to(torch.float64)
        real = m_rows.bool() & real_keys
        block_max = attr.masked_fill_(~real, -math.inf).amax(dim=(2, 3)).to(torch.float64)
        hmax = torch.maximum(hmax, block_max)
        del attr
    return colsum, hmax


# --------------------------------------------------------------------------- integrated gradients
class _PlainEngine:
    """SDPA with the mask transformers builds for the registered function (eager layout: 0 / -inf-like)."""

    def attend(self, module, query, key, value, attention_mask, scaling):
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
        return _sdpa(query, key, value, attention_mask, scaling).transpose(1, 2)


def integrated_gradients(
    model,
    cells,
    labels=None,
    *,
    steps: int = DEFAULT_IG_STEPS,
    internal_batch_size: int | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    special_ids: Iterable[int] = (),
    device="cpu",
    dtype: torch.dtype = torch.float32,
    method: str = IG_METHOD,
    progress: Callable | None = None,
) -> AttributionResult:
    """Integrated gradients of the true-class logit wrt the word embeddings (Captum `LayerIntegratedGradients`).

    Baseline: `<pad>`'s embedding at every position (`pad_id` everywhere as input ids; the attention mask
    stays the cell's, so padding is the same). Per token the attribution is summed over the embedding
    dimension; `cell_total["ig"]` holds each cell's sum, `ig_delta` F(x) - F(baseline) computed by plain
    forward passes, and `completeness()` their gap. `internal_batch_size`: rows (cells x steps) per Captum
    forward/backward (default `batch_size * steps`, everything at once).
    """
    from captum.attr import LayerIntegratedGradients

    setup = _Setup(
        model, cells, labels, pad_id=pad_id, special_ids=special_ids, batch_size=batch_size, device=device, dtype=dtype
    )
    tokens = setup.accumulators(0, 1, 1)
    acc = setup.accumulators(1, 1, 1)
    n = len(setup.cells)
    cell_total = torch.zeros(n, dtype=torch.float64, device=setup.device)
    delta = torch.zeros(n, dtype=torch.float64, device=setup.device)
    logit = torch.zeros(n, dtype=torch.float64, device=setup.device)
    captum_delta = torch.zeros(n, dtype=torch.float64, device=setup.device)

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    lig = LayerIntegratedGradients(forward, setup.base.embeddings.word_embeddings)
    memory = _Memory(setup.device)
    done = 0
    with routed_attention([model], _PlainEngine()), _frozen_parameters(model):
        for idx in setup.batches:
            ids, mask, cell_t = setup.batch(idx)
            tokens.add_tokens(ids, mask, cell_t, _groups(cell_t))
            y = setup.labels_t[cell_t]
            baseline = torch.full_like(ids, setup.pad_id)
            attr, conv = lig.attribute(
                ids,
                baselines=baseline,
                target=y,
                additional_forward_args=(mask,),
                n_steps=int(steps),
                method=method,
                internal_batch_size=internal_batch_size or len(idx) * int(steps),
                return_convergence_delta=True,
            )
            per_token = attr.sum(-1).to(torch.float64) * mask.to(torch.float64)  # (B, L)
            with torch.no_grad():
                fx = forward(ids, mask).gather(1, y.unsqueeze(1)).squeeze(1).to(torch.float64)
                fb = forward(baseline, mask).gather(1, y.unsqueeze(1)).squeeze(1).to(torch.float64)
            colsum = per_token.unsqueeze(1)  # (B, 1, L): one "head"
            _add_scores(acc, ids, mask, cell_t, _groups(cell_t), colsum)
            cell_total[cell_t] = attr.sum(dim=(1, 2)).to(torch.float64)
            delta[cell_t] = fx - fb
            logit[cell_t] = fx
            captum_delta[cell_t] = conv.detach().to(torch.float64)
            done += len(idx)
            if progress is not None:
                progress(done, setup.n_local)
    setup.reduce((tokens, acc), (cell_total, delta, logit, captum_delta))
    meta = {
        "ig": {
            "library": "captum.attr.LayerIntegratedGradients on bert.embeddings.word_embeddings",
            "steps": int(steps),
            "method": method,
            "internal_batch_size": int(internal_batch_size) if internal_batch_size else None,
            "baseline": "the <pad> token's embedding at every position (position/token-type embeddings and mask kept)",
            "target": "true-class logit",
            "per_token": "attribution summed over the embedding dimension",
            "batch_size": setup.batch_size,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(setup.device),
            "captum_max_abs_delta": float(captum_delta.abs().max()) if n else None,
            **memory.report(),
        }
    }
    result = setup.result(tokens, ("ig",), meta)
    a = acc.result(names=("ig",), special_ids=setup.special, cells=setup.cells, meta={})
    result.rank_sum["ig"] = a.rank_sum[0, 0, 0]
    result.gene_sum["ig"] = a.gene_sum[0, 0, 0]
    result.cell_total["ig"] = cell_total.cpu().numpy()
    result.ig_delta = delta.cpu().numpy()
    result.logit = logit.cpu().numpy()
    result.meta["ig"]["completeness"] = result.completeness()
    return result


# -------------------------------------------------------------------------------- attention rollout
class _RolloutEngine:
    """Eager attention by blocks of query rows; each block also advances the running rollout product
    R <- (0.5 mean_h A + 0.5 I) R, so no layer's full attention is kept."""

    def __init__(self, block_elements: int):
        self.block_elements = block_elements
        self.rollout = None  # (B, L, L)
        self.pad_cols = []

    def attend(self, module, query, key, value, attention_mask, scaling):
        B, H, L, d = query.shape
        scaling = d**-0.5 if scaling is None else scaling
        red = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
        q3 = query.reshape(B * H, L, d)
        k3t = key.reshape(B * H, L, d).transpose(1, 2)
        v3 = value.reshape(B * H, L, d)
        out = torch.empty(B, L, H, d, dtype=value.dtype, device=value.device)
        new = torch.empty_like(self.rollout)
        rows = max(1, self.block_elements // max(1, B * H * L))
        for i0 in range(0, L, rows):
            i1 = min(L, i0 + rows)
            p = _block_probs(q3[:, i0:i1], k3t, self.pad_cols, scaling, red, B)  # (B, H, c, L)
            o = torch.bmm(p.view(B * H, i1 - i0, L).to(v3.dtype), v3)
            out[:, i0:i1] = o.view(B, H, i1 - i0, d).transpose(1, 2)
            a_hat = p.mean(1).to(self.rollout.dtype)  # (B, c, L)
            new[:, i0:i1] = 0.5 * torch.bmm(a_hat, self.rollout) + 0.5 * self.rollout[:, i0:i1]
            del p, o, a_hat
        self.rollout = new
        return out


def attention_rollout(
    model,
    cells,
    labels=None,
    *,
    read_position: int = 0,
    cls_id: int | None = None,
    pad_id: int = 0,
    special_ids: Iterable[int] = (),
    batch_size: int = 8,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress: Callable | None = None,
) -> AttributionResult:
    """Attention rollout (Abnar and Zuidema 2020) from the row the classifier reads, with the residual identity.

    Score of key j in a cell: R[read_position, j] with R = A^_L ... A^_1, A^_l = 0.5 mean_h A_l + 0.5 I.
    Each cell's scores sum to 1. `cls_id`: V2's `<cls>`; the meta says whether position `read_position`
    holds it in every cell, else (V1) that it is the top-ranked gene. `labels` are not used (rollout does
    not depend on the class) and may be None.
    """
    if labels is None:
        c = cells if isinstance(cells, Cells) else Cells(cells)
        labels = c.labels if c.labels is not None else np.zeros(len(c), dtype=np.int64)
        cells = c
    setup = _Setup(
        model, cells, labels, pad_id=pad_id, special_ids=special_ids, batch_size=batch_size, device=device, dtype=dtype
    )
    tokens = setup.accumulators(0, 1, 1)
    acc = setup.accumulators(1, 1, 1)
    engine = _RolloutEngine(int(block_elements))
    n = len(setup.cells)
    cell_total = torch.zeros(n, dtype=torch.float64, device=setup.device)
    first_is_cls = cls_id is not None
    memory = _Memory(setup.device)
    done = 0
    with torch.inference_mode(), routed_attention([model], engine):
        for idx in setup.batches:
            ids, mask, cell_t = setup.batch(idx)
            B, L = ids.shape
            if read_position >= int(mask.sum(1).min()):
                raise ValueError(f"read position {read_position} is beyond a cell's length")
            if cls_id is not None:
                first_is_cls &= bool((ids[:, read_position] == int(cls_id)).all())
            tokens.add_tokens(ids, mask, cell_t, _groups(cell_t))
            lengths = mask.sum(1).tolist()
            engine.pad_cols = [(i, int(k)) for i, k in enumerate(lengths) if k < L]
            red = dtype if dtype in (torch.float32, torch.float64) else torch.float32
            engine.rollout = torch.eye(L, dtype=red, device=setup.device).expand(B, L, L).contiguous()
            hidden = setup.base.embeddings(input_ids=ids)
            for layer in setup.layers:
                hidden = _layer_out(layer(hidden, attention_mask=None))
            score = engine.rollout[:, read_position, :].to(torch.float64) * mask.to(torch.float64)  # (B, L)
            engine.rollout = None
            colsum = score.unsqueeze(1)
            _add_scores(acc, ids, mask, cell_t, _groups(cell_t), colsum)
            cell_total[cell_t] = score.sum(1)
            done += len(idx)
            if progress is not None:
                progress(done, setup.n_local)
    setup.reduce((tokens, acc), (cell_total,))
    if cls_id is not None and setup.world > 1:  # <cls> at the read position in every rank's cells
        first_is_cls = bool(-all_reduce_max(torch.tensor([-int(first_is_cls)]))[0])
    reads = (
        f"position {read_position}: <cls>"
        if first_is_cls
        else f"position {read_position}: the cell's top-ranked gene (no <cls>, as in V1; the classifier's pooler "
        "reads this position)"
    )
    meta = {
        "rollout": {
            "read_position": int(read_position),
            "has_cls": bool(first_is_cls),
            "reads": reads,
            "residual": "A^ = 0.5 mean_h A + 0.5 I (Abnar and Zuidema 2020)",
            "batch_size": setup.batch_size,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(setup.device),
            **memory.report(),
        }
    }
    result = setup.result(tokens, ("rollout",), meta)
    a = acc.result(names=("rollout",), special_ids=setup.special, cells=setup.cells, meta={})
    result.rank_sum["rollout"] = a.rank_sum[0, 0, 0]
    result.gene_sum["rollout"] = a.gene_sum[0, 0, 0]
    result.cell_total["rollout"] = cell_total.cpu().numpy()
    return result


# ------------------------------------------------------------------------------------------ driver
def run_attribution(
    model,
    cells,
    labels=None,
    *,
    methods: Sequence[str] = METHODS,
    dicts=None,
    pad_id: int | None = None,
    special_ids: Iterable[int] | None = None,
    hao_steps: int = DEFAULT_HAO_STEPS,
    ig_steps: int = DEFAULT_IG_STEPS,
    ig_internal_batch_size: int | None = None,
    ig_max_steps: int | None = None,
    ig_gap_p95: float | None = None,
    batch_size: int = 8,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: Callable | None = None,
) -> AttributionResult:
    """The chosen methods ("hao", "ig", "rollout") of one model on the same cells, in one result.

    `dicts` (`GeneDictionaries`) supplies pad id, special ids and `<cls>` (else `pad_id`, `special_ids`).
    `progress(done, total)` counts cells over all methods. `seed` is recorded: nothing is drawn.

    Integrated gradients' steps are raised while the 95th percentile over cells of the relative completeness
    gap exceeds `ig_gap_p95` (doubling, up to `ig_max_steps`; None: `ig_steps` only). Its parameters record
    each try (`steps_tried`, `gap_p95_tried`), the threshold and `gap_converged` (False: still above it at
    the cap; the caller warns).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"attribution methods must be among {', '.join(METHODS)}, got {list(methods)}")
    if dicts is not None:
        pad_id = dicts.pad_id if pad_id is None else pad_id
        special_ids = dicts.special_ids if special_ids is None else special_ids
    pad_id = 0 if pad_id is None else int(pad_id)
    special_ids = tuple(special_ids or ())
    cls_id = getattr(dicts, "cls_id", None) if dicts is not None else None
    cells = cells if isinstance(cells, Cells) else Cells(cells)
    per_method = int(sum(len(b) for b in sharded_batches(cells.lengths, int(batch_size))))  # this process's cells
    total = per_method * len(methods)
    common = dict(batch_size=batch_size, pad_id=pad_id, special_ids=special_ids, device=device, dtype=dtype)
    result = None
    for i, method in enumerate(dict.fromkeys(methods)):
        prog = _progress_over(progress, i * per_method, total)
        if method == "hao":
            r = hao_attribution(model, cells, labels, steps=hao_steps, progress=prog, **common)
        elif method == "ig":
            steps, cap = int(ig_steps), max(int(ig_max_steps or ig_steps), int(ig_steps))
            tried, gaps = [], []
            while True:
                r = integrated_gradients(
                    model,
                    cells,
                    labels,
                    steps=steps,
                    internal_batch_size=ig_internal_batch_size,
                    progress=prog,
                    **common,
                )
                gap = (r.completeness() or {}).get("relative_gap_p95")
                tried.append(steps)
                gaps.append(gap)
                if ig_gap_p95 is None or gap is None or gap <= float(ig_gap_p95) or steps >= cap:
                    break
                steps = min(cap, 2 * steps)
            r.meta["ig"].update(
                steps_tried=tried,
                gap_p95_tried=gaps,
                gap_p95_threshold=None if ig_gap_p95 is None else float(ig_gap_p95),
                max_steps=cap,
                gap_converged=None if ig_gap_p95 is None or gaps[-1] is None else bool(gaps[-1] <= float(ig_gap_p95)),
            )
        else:
            r = attention_rollout(model, cells, labels, cls_id=cls_id, progress=prog, **common)
        result = r if result is None else result.combine(r)
    result.meta["seed"] = int(seed)
    result.meta["world_size"] = int(shard()[1])
    return result


# ----------------------------------------------------------------------------------------- writing
def attribution_gene_table(result: AttributionResult, id_to_gene: dict, symbols: dict | None = None):
    """One row per gene present in the attributed cells (special tokens left out).

    Shared columns: `ensembl_id`, `symbol`, `token_id`, `n_cells` (cells expressing the gene; every method
    sees the same cells), `n_occurrences`, `rank_mean`. Per method m: `<m>_total` (summed over cells, and
    over layers and heads for Hao), `<m>_mean` (per occurrence), `<m>_expected` (what the gene would
    receive at the mean score of the rank positions it occupies, analysis 5 of the attention analyses),
    `<m>_pos_ratio` (total / expected, where expected > 0; for the signed scores, hao and ig, read
    `<m>_pos_excess`), `<m>_pos_excess` ((total - expected) per occurrence). Sorted by the first method's
    mean, descending.
    """

    from pipeline.analysis.pair import gene_expected, gene_rank_mean, gene_rows

    tokens, df = gene_rows(result, id_to_gene, symbols)
    occ = result.gene_occ[tokens]
    df["n_occurrences"] = occ.astype(np.int64)
    df["rank_mean"] = gene_rank_mean(result.as_attention_result(result.methods[0]))[tokens]
    for m in result.methods:
        total = result.gene_total(m)[tokens]
        expected = gene_expected(result.as_attention_result(m))[0, tokens]
        df[f"{m}_total"] = total
        df[f"{m}_mean"] = total / occ
        df[f"{m}_expected"] = expected
        with np.errstate(invalid="ignore", divide="ignore"):
            df[f"{m}_pos_ratio"] = np.where(expected > 0, total / np.where(expected > 0, expected, 1.0), np.nan)
        df[f"{m}_pos_excess"] = (total - expected) / occ
    return df.sort_values(f"{result.methods[0]}_mean", ascending=False, kind="stable").reset_index(drop=True)


def score_agreement(
    df,
    columns: Sequence[str],
    *,
    ks: Sequence[int] = (10, 20, 50, 100),
    min_cells: int = 1,
    other=None,
    other_columns=(),
) -> dict:
    """Spearman's rho and top-k overlap between every pair of per-gene score columns.

    Genes with at least `min_cells` cells. `other` (a table with `ensembl_id`, e.g. the attention gene
    table) adds its `other_columns` to the comparison, joined on the Ensembl ID.
    """
    from scipy.stats import spearmanr

    table = df[df["n_cells"] >= int(min_cells)][["ensembl_id", *columns]]
    cols = list(columns)
    if other is not None and len(other_columns):
        extra = other[["ensembl_id", *other_columns]].drop_duplicates("ensembl_id")
        table = table.merge(extra, on="ensembl_id", how="inner")
        cols += list(other_columns)
    pairs = []
    for i, a in enumerate(cols):
        for b in cols[i + 1 :]:
            both = table[["ensembl_id", a, b]].dropna()
            item: dict = {"a": a, "b": b, "n": int(len(both))}
            if len(both) >= 3:
                rho, p = spearmanr(both[a], both[b])
                item["spearman"], item["p_value"] = float(rho), float(p)
            else:
                item["spearman"] = item["p_value"] = None
            top_a = both.sort_values(a, ascending=False, kind="stable")["ensembl_id"].tolist()
            top_b = both.sort_values(b, ascending=False, kind="stable")["ensembl_id"].tolist()
            item["top_k"] = [
                {"k": int(k), "overlap": len(set(top_a[: int(k)]) & set(top_b[: int(k)]))} for k in ks if int(k) > 0
            ]
            pairs.append(item)
    return {"min_cells": int(min_cells), "n_genes": int(len(table)), "pairs": pairs}


def attribution_records(
    result: AttributionResult,
    *,
    dicts,
    model_name: str,
    de=None,
    attention_genes=None,
    attention_columns: Sequence[str] = (),
    ks: Sequence[int] = (10, 20, 50, 100),
    min_cells: int | None = None,
) -> dict:
    """One model's attribution as `store.records.Records` (the JSON document under `json_attribution`).

    Names (`store.results`): gene table `attribution_<model>` (`attribution_gene_table`); vectors
    `attr_rank_<method>_<model>` (per-rank mean score, layers and heads summed) and
    `attr_rank_lh_hao_<model>` (layer, head, rank); grid `attr_head_importance_<model>` (Hao); JSON
    `attribution_<model>`: each method's parameters, time and peak memory, IG's completeness, rollout's
    read position and whether the model has `<cls>`, and the agreement between the methods' per-gene
    means (Spearman, top-k overlap; genes in at least `min_cells` cells, default max(3, 5% of cells)),
    with `attention_genes[attention_columns]` when given, and with DE (`de`: a `de_wilcoxon` table,
    `pipeline.analysis.pair.compare_de_attention` per method). `<model>` is `store.results.attr_model_key`.
    """
    from pipeline.analysis.pair import compare_de_attention, length_median, special_positions
    from store import results as R
    from store.jsonsafe import plain
    from store.records import Records

    rec = Records()
    key = R.attr_model_key(model_name)
    table = attribution_gene_table(result, dicts.id_to_gene, dicts.id_to_symbol)
    rec.put_gene_table(R.table_attribution(key), table)
    view = result.as_attention_result(result.methods[0])
    base_meta = {
        R.META_MEDIAN_LENGTH: length_median(view),
        "special_positions": special_positions(view),
        "n_cells": int(result.n_cells),
        "x": "rank position (0-based token index; special tokens kept)",
        "model": model_name,
    }
    for m in result.methods:
        rec.put_vector(
            R.vec_attr_rank(m, key),
            result.rank_mean(m),
            meta=plain(
                {**base_meta, "method": m, "definition": "mean over cells having position j of the score j receives"}
            ),
        )
    if "hao" in result.methods:
        lh = _safe_div(result.rank_sum["hao"], result.rank_count)
        rec.put_vector(
            R.vec_attr_rank_lh_hao(key),
            lh,
            meta=plain({**base_meta, "method": "hao", "axes": ["layer", "head", "rank"]}),
        )
        rec.put_grid(R.grid_attr_head_importance(key), result.head_importance())
    from pipeline.analysis.keygenes import frequency_correlations, frequency_warnings, min_cells_for

    min_cells = min_cells_for(result.n_cells) if min_cells is None else int(min_cells)
    doc: dict = {
        "model": model_name,
        "methods": list(result.methods),
        "n_cells": int(result.n_cells),
        "seed": result.meta.get("seed"),
        "parameters": {m: result.meta.get(m, {}) for m in result.methods},
        "completeness": result.completeness(),
        "agreement": score_agreement(
            table,
            [f"{m}_mean" for m in result.methods],
            ks=ks,
            min_cells=min_cells,
            other=attention_genes,
            other_columns=attention_columns,
        ),
    }
    rhos = frequency_correlations(table[table["n_cells"] >= min_cells], [f"{m}_mean" for m in result.methods])
    doc["frequency_spearman"] = rhos
    doc["warnings"] = frequency_warnings(rhos, where=f"{model_name} attribution")
    if "rollout" in result.methods:
        ro = result.meta.get("rollout", {})
        doc["rollout"] = {k: ro.get(k) for k in ("read_position", "has_cls", "reads")}
    if "hao" in result.methods:
        imp = result.head_importance()
        top = np.unravel_index(np.argmax(imp), imp.shape)
        doc["head_importance_max"] = {"value": float(imp.max()), "layer_head": [int(top[0]), int(top[1])]}
    if de is not None and len(de):
        background = table["ensembl_id"].tolist()
        doc["de"] = {
            m: compare_de_attention(de, table, background, ks=ks, attention_column=f"{m}_mean") for m in result.methods
        }
    doc["top_genes"] = {
        m: [
            r.symbol or r.ensembl_id
            for r in table[table["n_cells"] >= min_cells].nlargest(10, f"{m}_mean").itertuples()
        ]
        for m in result.methods
    }
    rec.put_json(R.json_attribution(key), plain(doc))
    return rec
