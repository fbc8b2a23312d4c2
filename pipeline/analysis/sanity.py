"""Sanity checks for key-gene scores (Adebayo et al. 2018, "Sanity checks for saliency maps", NeurIPS).

A key-gene score should depend on what the model learned. Two controls:

- **Cascading model randomisation.** Starting from the fine-tuned classifier, re-initialise the
  classification head (classifier and pooler), then the encoder layers from the top down, then the
  embeddings, one step at a time and cumulatively. After every step every key-gene score is recomputed
  on the same cells (attention: weight `attn`, norm `attn_norm`, position ratio `attn_pos_ratio`, the
  controlled `key_score`; each attribution method's per-occurrence score) and compared with the trained
  model's: Spearman's rho over the genes in at least `min_cells` cells, and the Jaccard index of the two
  top-50 sets. A score that keeps rho >= 0.8 once the whole model is random is flagged as not
  model-dependent (it mostly restates the input: detection frequency, rank position). Attention does not
  read the head, so attention scores are unchanged by the first step by construction.
- **Label permutation** (optional, `analysis.label_permutation`): the same comparison against a model
  fine-tuned with the training labels permuted (same data, budget and seed), run by the pipeline.

Re-initialisation follows BERT's scheme (`initializer_range`): linear and embedding weights ~ N(0, r),
biases 0, LayerNorm weight 1 and bias 0, the padding row of embeddings 0. It is written here rather than
taken from `PreTrainedModel._init_weights`, whose behaviour (and its skip flags for already-initialised
modules) changes between transformers versions; each step draws from a generator seeded by
(seed, step), so the cascade is a function of the seed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

TOP_N = 50
FLAG_RHO = 0.8
ATTENTION_SCORES = ("key_score", "attn", "attn_norm", "attn_pos_ratio")


def cascade_steps(model) -> list[tuple[str, list]]:
    """The randomisation steps, top down: (label, modules re-initialised at that step)."""
    base = model.bert
    steps = [("head", [m for m in (model.classifier, base.pooler) if m is not None])]
    layers = list(base.encoder.layer)
    for i in reversed(range(len(layers))):
        steps.append((f"layer {i}", [layers[i]]))
    steps.append(("embeddings", [base.embeddings]))
    return steps


def reinitialise(modules: Sequence, *, std: float, seed: int) -> None:
    """Re-draw the parameters of `modules` in place (BERT's initialisation) from a generator seeded by `seed`."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def normal_(t):
        t.data.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * std)

    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, torch.nn.Linear):
                    normal_(sub.weight)
                    if sub.bias is not None:
                        sub.bias.data.zero_()
                elif isinstance(sub, torch.nn.Embedding):
                    normal_(sub.weight)
                    if sub.padding_idx is not None:
                        sub.weight.data[sub.padding_idx].zero_()
                elif isinstance(sub, torch.nn.LayerNorm):
                    sub.weight.data.fill_(1.0)
                    sub.bias.data.zero_()


def key_gene_scores(
    model,
    cells,
    labels,
    *,
    dicts,
    methods: Sequence[str] = (),
    hao_steps: int = 5,
    ig_steps: int = 16,
    batch_size: int = 8,
    device="cpu",
    seed: int = 0,
) -> pd.DataFrame:
    """Every key-gene score of one model on `cells`: a table indexed by Ensembl ID with `n_cells` and the
    attention scores (`ATTENTION_SCORES`) and `<method>_mean` per attribution method."""
    from pipeline.analysis.attribution import attribution_gene_table, run_attribution
    from pipeline.analysis.pair import model_gene_table

    genes = model_gene_table(model, cells, dicts=dicts, batch_size=batch_size, device=device, cell_curves=False)
    out = genes.set_index("ensembl_id")[["symbol", "n_cells", *[f"{c}_a" for c in ATTENTION_SCORES]]]
    out = out.rename(columns={f"{c}_a": c for c in ATTENTION_SCORES})
    if methods:
        attr = run_attribution(
            model,
            cells,
            labels,
            methods=tuple(methods),
            dicts=dicts,
            hao_steps=hao_steps,
            ig_steps=ig_steps,
            batch_size=batch_size,
            device=device,
            seed=seed,
        )
        table = attribution_gene_table(attr, dicts.id_to_gene, dicts.id_to_symbol).set_index("ensembl_id")
        out = out.join(table[[f"{m}_mean" for m in methods]], how="left")
    return out


def compare_scores(trained: pd.DataFrame, other: pd.DataFrame, *, min_cells: int, top_n: int = TOP_N) -> dict:
    """Per score column: Spearman's rho and top-`top_n` Jaccard between two score tables (genes in at
    least `min_cells` cells of the trained table, present in both)."""
    from scipy.stats import spearmanr

    keep = trained.index[trained["n_cells"] >= int(min_cells)]
    out = {}
    for col in trained.columns:
        if col in ("symbol", "n_cells") or col not in other.columns:
            continue
        both = pd.DataFrame({"t": trained.loc[keep, col], "o": other.reindex(keep)[col]}).dropna()
        if len(both) < 3:
            out[col] = {"spearman": None, "jaccard": None, "n": int(len(both))}
            continue
        rho = spearmanr(both["t"], both["o"])[0]
        n = min(int(top_n), len(both))
        top_t = set(both["t"].sort_values(ascending=False, kind="stable").index[:n])
        top_o = set(both["o"].sort_values(ascending=False, kind="stable").index[:n])
        out[col] = {
            "spearman": None if not np.isfinite(rho) else float(rho),
            "jaccard": len(top_t & top_o) / len(top_t | top_o),
            "n": int(len(both)),
        }
    return out


def randomisation_cascade(
    model,
    cells,
    labels,
    *,
    dicts,
    methods: Sequence[str] = (),
    min_cells: int,
    trained_scores: pd.DataFrame | None = None,
    hao_steps: int = 5,
    ig_steps: int = 16,
    batch_size: int = 8,
    device="cpu",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Cascading randomisation of `model` (modified in place: pass a copy you no longer need).

    Returns {"steps": [...], "scores": {column: {"spearman": [...], "jaccard": [...]}}, "flagged": [...],
    "min_cells", "top_n", "seed"}; list entries follow the steps ("head", "layer L-1", ..., "layer 0",
    "embeddings"), each cumulative.
    """
    kw = dict(
        dicts=dicts,
        methods=methods,
        hao_steps=hao_steps,
        ig_steps=ig_steps,
        batch_size=batch_size,
        device=device,
        seed=seed,
    )
    if trained_scores is None:
        trained_scores = key_gene_scores(model, cells, labels, **kw)
    std = float(getattr(model.config, "initializer_range", 0.02))
    steps = cascade_steps(model)
    columns = [c for c in trained_scores.columns if c not in ("symbol", "n_cells")]
    scores = {c: {"spearman": [], "jaccard": []} for c in columns}
    for i, (_label, modules) in enumerate(steps):
        reinitialise(modules, std=std, seed=int(seed) * 1000 + i)
        cmp = compare_scores(trained_scores, key_gene_scores(model, cells, labels, **kw), min_cells=min_cells)
        for c in columns:
            scores[c]["spearman"].append(cmp.get(c, {}).get("spearman"))
            scores[c]["jaccard"].append(cmp.get(c, {}).get("jaccard"))
        if progress is not None:
            progress(i + 1, len(steps))
    flagged = [c for c in columns if (scores[c]["spearman"][-1] or 0.0) >= FLAG_RHO]
    return {
        "steps": [label for label, _ in steps],
        "scores": scores,
        "flagged": flagged,
        "flag_rule": f"Spearman >= {FLAG_RHO} with the trained model's score once every part is re-initialised",
        "min_cells": int(min_cells),
        "top_n": TOP_N,
        "seed": int(seed),
    }
