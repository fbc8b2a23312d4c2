"""From attention sums to findings: gene tables, position control, DE agreement, statistics, the store.

Thesis sections 4.2-4.5 on top of `pipeline.analysis.attention` (docs/architecture.md, "Attention analyses"):

- derived quantities of an `AttentionResult`'s sums over cells: `rank_received` (per-rank curves),
  `rank_pct_diff`, `rank_log_ratio`, `rank_norm_received`, `gene_total`, `gene_norm_total`,
  `gene_expected`, `gene_rank_mean`/`gene_rank_std`, `cosine_grid`, `norm_grid`, `norm_summed_grid`,
  `length_median`, `special_positions`, `result_differences`;
- `gene_table`: attention received per gene (thesis table 8) for one or two models: total, min-max scaled,
  per occurrence, norm-weighted (Kobayashi et al. 2020), position-controlled, cells expressing the gene,
  rank mean and standard deviation, mean rank per label group, differences between the models;
- `position_controlled_attention` (analysis 5): a gene's position is its expression rank and attention
  depends strongly on position, so each gene's attention is divided by what its rank positions receive
  on average (analysis 3): observed / expected > 1 means attended beyond its ranks;
- `de_wilcoxon`: scanpy's Wilcoxon `rank_genes_groups` between two label groups (thesis fig. 7);
- `compare_de_attention`: overlap of the top k DE and top k attended genes, hypergeometric p-values
  against the genes present in the tokenized cells, Spearman correlation, reference-set enrichment;
- `bootstrap_ci`, `paired_sign_flip_test`, `wilcoxon_signed_rank`, `attention_statistics`: confidence
  intervals over cells and per-(layer, head) paired tests that two models' attention differs;
- `pair_records` / `run_pair_analysis`: everything an "analysis" run stores, as `store.records.Records`.

One module: the pair's gene table, its statistics (bootstrap, sign-flip, Wilcoxon, BH) and the DE overlaps are
written together into one analysis run from `pair_records`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from pipeline.analysis.keygenes import (
    add_key_scores,
    frequency_correlations,
    frequency_rank_bins,
    frequency_warnings,
    key_score_column,
    matched_overlap_p,
    min_cells_for,
    score_columns,
)
from pipeline.errors import InputError
from store.jsonsafe import plain

SUFFIXES = ("a", "b")


# ---------------------------------------------------------------------------- derived quantities
# `pipeline.analysis.attention` produces sums over cells (`AttentionResult`); every quantity reported is derived
# from those sums here.
def _safe_div(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def rank_received(result, per_head: bool = False) -> np.ndarray:
    """Mean over the cells that have position j of the attention position j receives.

    (M, P) summed over layers and heads, or (M, nl, H, P) with `per_head`; NaN where no cell has j.
    """
    total = result.rank_sum if per_head else result.rank_sum.sum(axis=(1, 2))
    return _safe_div(total, result.rank_count)


def _pair_curves(result):
    if result.n_models != 2:
        raise ValueError("a difference between models needs two models")
    curves = rank_received(result)
    return curves[0], curves[1]


def rank_pct_diff(result) -> np.ndarray:
    """100 (b - a) / a of the per-rank curves summed over layers and heads (thesis fig. 5/6)."""
    a, b = _pair_curves(result)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(a > 0, 100.0 * (b - a) / np.where(a > 0, a, 1.0), np.nan)


def rank_log_ratio(result) -> np.ndarray:
    """ln(b / a) of the per-rank curves summed over layers and heads."""
    a, b = _pair_curves(result)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((a > 0) & (b > 0), np.log(np.where(b > 0, b, 1.0) / np.where(a > 0, a, 1.0)), np.nan)


def rank_norm_received(result, per_head: bool = False) -> np.ndarray:
    """`rank_received` with each attention weight scaled by ||f_h(x_j)|| (Kobayashi et al. 2020)."""
    total = result.rank_norm_sum if per_head else result.rank_norm_sum.sum(axis=(1, 2))
    return _safe_div(total, result.rank_count)


def gene_total(result) -> np.ndarray:
    """(M, V) attention received per token id, summed over layers, heads and cells."""
    return result.gene_sum.sum(axis=(1, 2))


def gene_norm_total(result) -> np.ndarray:
    """(M, V) norm-weighted attention received per token id, summed over layers, heads and cells."""
    return result.gene_norm_sum.sum(axis=(1, 2))


def gene_expected(result, per_head: bool = False) -> np.ndarray:
    """Attention each token would receive if it got the mean attention of the positions it occupies.

    Sum over its occurrences of `rank_received` at the occurrence's position: (M, V), or (M, nl, H, V)
    with `per_head`. The position control of analysis 5 is observed / expected.
    """
    curve = np.nan_to_num(rank_received(result, per_head=per_head))
    token = result.gene_pos_keys // result.max_len
    pos = result.gene_pos_keys % result.max_len
    weights = curve[..., pos] * result.gene_pos_counts  # (..., K)
    flat = weights.reshape(-1, weights.shape[-1])
    out = np.stack([np.bincount(token, weights=row, minlength=result.vocab_size) for row in flat])
    return out.reshape(*weights.shape[:-1], result.vocab_size)


def gene_rank_mean(result) -> np.ndarray:
    """(V,) mean expression rank of each token over its occurrences (NaN where it never occurs)."""
    return _safe_div(result.gene_rank_sum, result.gene_occ)


def gene_rank_std(result) -> np.ndarray:
    """Population standard deviation of each gene's rank over its occurrences."""
    mean = gene_rank_mean(result)
    var = _safe_div(result.gene_rank_sq, result.gene_occ) - mean**2
    return np.sqrt(np.clip(var, 0.0, None))


def cosine_grid(result) -> np.ndarray | None:
    """(nl, H) mean over cells of the cosine between the two models' attention; None for one model."""
    return None if result.cell_cosine is None else result.cell_cosine.mean(axis=0)


def norm_grid(result) -> np.ndarray:
    """(M, nl, H) mean over cells of each cell's mean alpha_ij ||f_h(x_j)||."""
    return result.cell_norm.mean(axis=1)


def norm_summed_grid(result) -> np.ndarray:
    """(M, nl) mean over cells of each cell's mean ||sum_h alpha^h_ij f_h(x_j)||."""
    return result.cell_norm_summed.mean(axis=1)


def length_median(result) -> float:
    return float(np.median(result.lengths)) if len(result.lengths) else float("nan")


def special_positions(result) -> list[int]:
    """Positions held by a special token in every cell that has them (e.g. V2's <cls> at 0)."""
    both = (result.rank_count > 0) & (result.rank_special_count == result.rank_count)
    return [int(j) for j in np.flatnonzero(both)]


def result_differences(got, reference) -> dict[str, float]:
    """Largest difference of each reported quantity, relative to the reference's largest magnitude.

    For reporting the error of a reduced-precision run (bfloat16 on CUDA) against a float32 one.
    """
    pairs = {
        "cosine": (cosine_grid(got), cosine_grid(reference)),
        "norm": (norm_grid(got), norm_grid(reference)),
        "norm_summed": (norm_summed_grid(got), norm_summed_grid(reference)),
        "rank_received": (rank_received(got), rank_received(reference)),
        "gene_total": (gene_total(got), gene_total(reference)),
    }
    out = {}
    for name, (a, b) in pairs.items():
        if a is None or b is None:
            continue
        a, b = np.nan_to_num(np.asarray(a, dtype=np.float64)), np.nan_to_num(np.asarray(b, dtype=np.float64))
        scale = float(np.abs(b).max()) if b.size else 0.0
        out[name] = float(np.abs(a - b).max() / scale) if scale > 0 else 0.0
    return out


# ------------------------------------------------------------------------------------ gene tables
def position_controlled_attention(result, *, per_head: bool = False) -> np.ndarray:
    """Observed / expected attention per token id: (M, V), or (M, nl, H, V) with `per_head`.

    Expected is the sum over the gene's occurrences of the mean attention its position receives
    (`rank_received`), so ratios compare a gene with other genes at the same ranks.
    NaN where the gene never occurs.
    """
    observed = result.gene_sum if per_head else gene_total(result)
    expected = gene_expected(result, per_head=per_head)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected > 0, observed / np.where(expected > 0, expected, 1.0), np.nan)


def _minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.zeros_like(x) if not hi > lo else (x - lo) / (hi - lo)


def sql_name(text: str) -> str:
    """A label as part of a result column's name: the label itself, so `rank_mean_<class>` names the user's
    class exactly and reads back to it (the store takes any text as a column name)."""
    return str(text).strip() or "group"


def gene_rows(result, id_to_gene: dict, symbols: dict | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """The genes seen in the analysed cells (special tokens left out): their token ids, and a table of
    ensembl_id, symbol, token_id and n_cells that per-gene scores are added to."""
    V = result.vocab_size
    present = result.gene_occ > 0
    present[[s for s in result.special_ids if 0 <= s < V]] = False
    tokens = np.flatnonzero(present)
    symbols = symbols or {}
    ens = [str(id_to_gene.get(int(t), f"token_{int(t)}")) for t in tokens]
    df = pd.DataFrame({"ensembl_id": ens, "symbol": [symbols.get(e, "") or "" for e in ens], "token_id": tokens})
    df["n_cells"] = result.gene_cells[tokens].astype(np.int64)
    return tokens, df


def gene_table(
    result,
    id_to_gene: dict,
    symbols: dict | None = None,
    *,
    reference_set: Iterable[str] | None = None,
    suffixes: Sequence[str] = SUFFIXES,
) -> pd.DataFrame:
    """One row per gene that occurs in the analysed cells; special tokens (pad, <cls>, <eos>, ...) left out.

    Per model (column suffix `_a`, `_b`): `attn` (attention received, summed over layers, heads, query
    rows and cells), `attn_scaled` (min-max over the table, thesis table 8), `attn_per_cell` (per
    occurrence), `attn_norm` (weighted by ||f_h(x_j)||), `attn_expected` and `attn_pos_ratio` (analysis 5),
    `key_score` (the controlled key-gene score of `pipeline.analysis.keygenes`: empirical-Bayes shrunk log2 position
    ratio; NaN for genes in fewer than 5% of the cells). Shared: `token_id`, `n_cells`, `rank_mean`, `rank_std` (population, over occurrences; rank 1 = most
    expressed gene of the cell), `rank_mean_<group>` per label group. For two models: `attn_diff`
    (b - a), `attn_log2_ratio`, `attn_scaled_diff`, `pos_ratio_diff`. `in_reference_set` (0/1) when a
    reference set is given. Rows are sorted by the last model's key score (the default key-gene ranking),
    descending; genes without one follow, by attention.
    """
    tokens, df = gene_rows(result, id_to_gene, symbols)
    df["rank_mean"] = gene_rank_mean(result)[tokens]
    df["rank_std"] = gene_rank_std(result)[tokens]
    for g, name in enumerate(result.group_names):
        with np.errstate(invalid="ignore", divide="ignore"):
            occ = result.gene_group_occ[g, tokens]
            df[f"rank_mean_{sql_name(name)}"] = np.where(
                occ > 0, result.gene_group_rank_sum[g, tokens] / np.maximum(occ, 1), np.nan
            )
    total = gene_total(result)[:, tokens]
    norm = gene_norm_total(result)[:, tokens]
    expected = gene_expected(result)[:, tokens]
    occ = result.gene_occ[tokens]
    for m in range(result.n_models):
        s = suffixes[m]
        df[f"attn_{s}"] = total[m]
        df[f"attn_scaled_{s}"] = _minmax(total[m])
        df[f"attn_per_cell_{s}"] = total[m] / occ
        df[f"attn_norm_{s}"] = norm[m]
        df[f"attn_norm_scaled_{s}"] = _minmax(norm[m])
        df[f"attn_expected_{s}"] = expected[m]
        with np.errstate(invalid="ignore", divide="ignore"):
            df[f"attn_pos_ratio_{s}"] = np.where(
                expected[m] > 0, total[m] / np.where(expected[m] > 0, expected[m], 1), np.nan
            )
    if result.n_models == 2:
        a, b = suffixes[0], suffixes[1]
        df["attn_diff"] = df[f"attn_{b}"] - df[f"attn_{a}"]
        with np.errstate(invalid="ignore", divide="ignore"):
            df["attn_log2_ratio"] = np.log2(df[f"attn_{b}"] / df[f"attn_{a}"])
        df["attn_scaled_diff"] = df[f"attn_scaled_{b}"] - df[f"attn_scaled_{a}"]
        df["pos_ratio_diff"] = df[f"attn_pos_ratio_{b}"] - df[f"attn_pos_ratio_{a}"]
    if reference_set is not None:
        mark_reference_set(df, reference_set)
    fits = add_key_scores(df, suffixes[: result.n_models], result.n_cells)
    last = suffixes[result.n_models - 1]
    order = [key_score_column(last), f"attn_{last}"]
    df = df.sort_values(order, ascending=False, kind="stable", na_position="last").reset_index(drop=True)
    df.attrs["key_score_fits"] = fits  # the empirical-Bayes fit behind each key_score column (key_gene_report)
    return df


def model_gene_table(
    model,
    cells,
    *,
    dicts,
    batch_size: int,
    device,
    group_column: str | None = None,
    cell_curves: bool = True,
    progress: Callable | None = None,
) -> pd.DataFrame:
    """One model's gene table (columns `_a`) from a one-model attention pass over `cells` (float32), with the
    dictionaries' pad and special tokens."""
    import torch

    from pipeline.analysis.attention import analyze_attention

    result = analyze_attention(
        model,
        None,
        cells,
        pad_id=dicts.pad_id,
        special_ids=dicts.special_ids,
        group_column=group_column,
        batch_size=int(batch_size),
        device=device,
        dtype=torch.float32,
        cell_curves=cell_curves,
        progress=progress,
    )
    return gene_table(result, dicts.id_to_gene, dicts.id_to_symbol, suffixes=SUFFIXES[:1])


def mark_reference_set(df: pd.DataFrame, reference_set: Iterable[str]) -> pd.DataFrame:
    """Add (in place) `in_reference_set` (0/1): the row's Ensembl ID or symbol is in the set."""
    ref = {str(x) for x in reference_set}
    ref_upper = {x.upper() for x in ref}
    sym = df["symbol"].astype(str).str.upper() if "symbol" in df else pd.Series("", index=df.index)
    df["in_reference_set"] = (df["ensembl_id"].astype(str).isin(ref) | (sym.isin(ref_upper) & (sym != ""))).astype(
        np.int64
    )
    return df


def load_reference_set(path, *, symbol_to_id: dict | None = None) -> set[str]:
    """A reference gene set: a TSV/CSV with an `ensembl_id` column, or one Ensembl ID or symbol per line.

    Symbols are translated to Ensembl IDs with `symbol_to_id` when given (case-insensitive); otherwise,
    and when a symbol is unknown, the symbol itself is kept (`mark_reference_set` matches symbols too).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(
            f"reference gene set {path} does not exist; give a TSV with an ensembl_id column or one gene per line"
        )
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise InputError(f"reference gene set {path} is empty")
    header = re.split(r"[\t,]", lines[0])
    header_l = [h.strip().lower() for h in header]
    if "ensembl_id" in header_l:
        col = header_l.index("ensembl_id")
        entries = [re.split(r"[\t,]", ln)[col].strip() for ln in lines[1:] if len(re.split(r"[\t,]", ln)) > col]
    elif any(h in ("symbol", "gene_symbol", "gene") for h in header_l):
        col = next(i for i, h in enumerate(header_l) if h in ("symbol", "gene_symbol", "gene"))
        entries = [re.split(r"[\t,]", ln)[col].strip() for ln in lines[1:] if len(re.split(r"[\t,]", ln)) > col]
    else:
        entries = [re.split(r"[\t,]", ln)[0].strip() for ln in lines]
    lookup = {k.upper(): v for k, v in (symbol_to_id or {}).items()}
    out = set()
    for e in entries:
        if not e:
            continue
        if e.upper().startswith("ENS"):
            out.add(e)
        else:
            out.add(lookup.get(e.upper(), e))
    if not out:
        raise InputError(f"reference gene set {path} holds no gene IDs or symbols")
    return out


# ------------------------------------------------------------------------------------------- DE
def _de_gene_ids(adata, dicts=None, gene_id_column: str | None = None) -> tuple[list[str], list[str]]:
    var = adata.var
    if gene_id_column:
        if gene_id_column not in var.columns:
            raise InputError(
                f"var has no column {gene_id_column!r} (gene IDs); columns: {', '.join(map(str, var.columns))}"
            )
        ids = var[gene_id_column].astype(str).tolist()
    elif "ensembl_id" in var.columns:
        ids = var["ensembl_id"].astype(str).tolist()
    else:
        ids = [str(x) for x in var.index]
    if dicts is not None:
        token_dict = dicts.token_dict
        mapping = dicts.ensembl_mapping or {}
        names = {k.upper(): v for k, v in (dicts.name_to_id or {}).items()}
        mapped = []
        for g in ids:
            if g in token_dict:
                mapped.append(g)
            elif g in mapping:
                mapped.append(mapping[g])
            elif g.upper() in names:
                mapped.append(names[g.upper()])
            else:
                mapped.append(g)
        ids = mapped
    if "gene_symbol" in var.columns:
        symbols = var["gene_symbol"].astype(str).tolist()
    elif dicts is not None:
        symbols = [dicts.id_to_symbol.get(g, "") for g in ids]
    else:
        symbols = [str(x) if not str(x).upper().startswith("ENS") else "" for x in var.index]
    return ids, symbols


def de_wilcoxon(
    adata, groupby: str, group, reference, *, dicts=None, gene_id_column: str | None = None, layer: str | None = None
) -> pd.DataFrame:
    """Differential expression of `group` against `reference` (a label, or `rest`: every other cell) with
    scanpy's Wilcoxon rank-sum test.

    Raw counts (X, or `layer`) are normalised to 10,000 per cell and log1p-transformed on a copy of the
    two groups' cells; then `scanpy.tl.rank_genes_groups(method="wilcoxon")`. Returns one row per gene,
    sorted by score (up in `group` first): ensembl_id, symbol, score, logfoldchange, pval, pval_adj.
    Gene IDs come from `gene_id_column`, var's `ensembl_id` or the var index, mapped to Ensembl through
    `dicts` (the same mapping the tokenizer applies) when given.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    if groupby not in adata.obs.columns:
        raise InputError(
            f"obs has no column {groupby!r} to group cells for DE; columns: {', '.join(map(str, adata.obs.columns))}"
        )
    labels = adata.obs[groupby].astype(str)
    group, reference = str(group), str(reference)
    if reference == "rest":  # one-vs-rest, as scanpy's reference="rest": every other cell is the reference
        labels = labels.where(labels == group, "rest")
    for g in (group, reference):
        if not (labels == g).any():
            raise InputError(
                f"obs[{groupby!r}] has no cells labelled {g!r}; labels: {', '.join(sorted(labels.unique())[:10])}"
            )
    keep = (labels == group) | (labels == reference)
    X = adata.layers[layer] if layer else adata.X
    X = X[np.flatnonzero(keep.to_numpy())]
    X = X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    ids, symbols = _de_gene_ids(adata, dicts, gene_id_column)
    sub = ad.AnnData(
        X=X,
        obs=pd.DataFrame({"_group": pd.Categorical(labels[keep].to_numpy())}, index=adata.obs_names[keep.to_numpy()]),
    )
    sub.var_names = [f"g{i}" for i in range(adata.n_vars)]
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    sc.tl.rank_genes_groups(sub, "_group", groups=[group], reference=reference, method="wilcoxon", use_raw=False)
    res = sc.get.rank_genes_groups_df(sub, group=group)
    idx = res["names"].str.slice(1).astype(int).to_numpy()
    df = pd.DataFrame(
        {
            "ensembl_id": [ids[i] for i in idx],
            "symbol": [symbols[i] for i in idx],
            "score": res["scores"].to_numpy(dtype=np.float64),
            "logfoldchange": res["logfoldchanges"].to_numpy(dtype=np.float64),
            "pval": res["pvals"].to_numpy(dtype=np.float64),
            "pval_adj": res["pvals_adj"].to_numpy(dtype=np.float64),
        }
    )
    df = df.sort_values("score", ascending=False, kind="stable")
    return df.drop_duplicates("ensembl_id", keep="first").reset_index(drop=True)


def _hypergeom_sf(overlap: int, population: int, successes: int, draws: int) -> float:
    """P(X >= overlap) for X ~ Hypergeometric(population, successes, draws)."""
    from scipy.stats import hypergeom

    if population <= 0 or draws <= 0 or successes <= 0:
        return 1.0
    return float(hypergeom.sf(overlap - 1, population, successes, draws))


DIRECTIONS = ("up", "down", "either")
# what a DE table says about itself (`DataFrame.attrs`, set by the pipeline's DE stage): the compared classes
# (group, reference) and which cells it was computed on; `compare_de_attention` reads them when not given
DE_ATTR_CLASSES = "classes"
DE_ATTR_CELLS = "cells"


def direction_label(direction: str, classes: Sequence[str] | None) -> str:
    """How an overlap direction reads in the user's words: "up in high", "up in low", "either direction"."""
    group, reference = (list(classes) + ["", ""])[:2] if classes else ("", "")
    if direction == "either":
        return "either direction"
    name = group if direction == "up" else reference
    if name == "rest":
        name = "the other classes"
    return f"up in {name}" if name else ("up in the tested group" if direction == "up" else "down in the tested group")


def _de_order(de: pd.DataFrame, de_column: str, direction: str) -> list[str]:
    """DE genes ranked for one direction: up (score descending), down (ascending), either (|score|)."""
    score = de[de_column].to_numpy(dtype=np.float64)
    key = {"up": -score, "down": score, "either": -np.abs(score)}[direction]
    order = np.argsort(key, kind="stable")
    return de["ensembl_id"].astype(str).to_numpy()[order].tolist()


def compare_de_attention(
    de_df: pd.DataFrame,
    attention_df: pd.DataFrame,
    background: Iterable[str] | None = None,
    ks: Sequence[int] = (10, 20, 50, 100),
    reference_set: Iterable[str] | None = None,
    *,
    attention_column: str | None = None,
    de_column: str = "score",
    null_bins: Sequence[int] = (5, 5),
    null_permutations: int = 0,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    de_cells: str | None = None,
) -> dict:
    """Agreement between the top DE genes and the top attended genes (thesis fig. 7), in both directions.

    The population is the genes of `background` (default: the genes of `attention_df`, i.e. the genes
    present in the tokenized cells) that `attention_column` ranks (non-missing; the key score ranks only
    genes in enough cells): N = `population`. Both rankings are restricted to it. Attended genes are ranked
    by `attention_column` descending (default: the last model's `attn_*`). DE genes are ranked three ways
    (`directions`): up in the tested group (`de_column` descending; also the top-level `overlap`), up in
    the reference (ascending) and either direction (|score| descending); `classes` = (group, reference)
    names them ("up in high"). For each direction and k: the overlap of the two top-k lists, its
    expectation k_DE k_attn / N and the hypergeometric P(overlap >= observed); Spearman correlation of DE
    score and attention over the shared genes; with a reference set, its members among the top k attended
    (and top k up-DE) genes and their hypergeometric enrichment p-values. Also marks `in_reference_set`
    on `attention_df`. `de_cells` says which cells the DE table was computed on (stored as given).

    Beside each raw hypergeometric p, `p_matched` (and `reference_p_matched`): the same overlap against
    the matched null of `pipeline.analysis.keygenes` (the attended genes' top k redrawn within bins of detection
    frequency x mean rank, `null_bins`; exact, or `null_permutations` draws), with `expected_matched`.
    Needs `n_cells` and `rank_mean` in `attention_df`. q-values over a run's overlap tests:
    `overlap_q_values`.
    """
    from scipy.stats import spearmanr

    classes = classes if classes is not None else de_df.attrs.get(DE_ATTR_CLASSES)
    de_cells = de_cells if de_cells is not None else de_df.attrs.get(DE_ATTR_CELLS)
    if attention_column is None:
        cands = [c for c in attention_df.columns if re.fullmatch(r"attn_[a-z]", c)]
        if not cands:
            raise ValueError("attention_df has no attn_<model> column; pass attention_column")
        attention_column = sorted(cands)[-1]
    for col, df, what in ((de_column, de_df, "DE table"), (attention_column, attention_df, "attention table")):
        if col not in df.columns or "ensembl_id" not in df.columns:
            raise ValueError(f"{what} needs columns ensembl_id and {col}")
    bg = set(attention_df["ensembl_id"].astype(str)) if background is None else {str(g) for g in background}
    at = attention_df[attention_df["ensembl_id"].astype(str).isin(bg)].dropna(subset=[attention_column])
    at = at.sort_values(attention_column, ascending=False, kind="stable").drop_duplicates("ensembl_id")
    at_ids = at["ensembl_id"].astype(str).tolist()
    population = set(at_ids)  # the genes the score ranks: the only ones that can be among its top k
    de = de_df[de_df["ensembl_id"].astype(str).isin(population)].dropna(subset=[de_column])
    de = de.sort_values(de_column, ascending=False, kind="stable").drop_duplicates("ensembl_id")
    N = len(population)
    de_ids = de["ensembl_id"].astype(str).tolist()
    symbol = {}
    for df in (attention_df, de_df):
        if "symbol" in df.columns:
            for e, s in zip(df["ensembl_id"].astype(str), df["symbol"].astype(str)):
                if s and s != "nan":
                    symbol.setdefault(e, s)
    bins = None
    if {"n_cells", "rank_mean"} <= set(at.columns) and len(at):
        codes = frequency_rank_bins(at["n_cells"], at["rank_mean"], *null_bins)
        bins = dict(zip(at_ids, codes.tolist()))
    ref = None
    if reference_set is not None:
        ref_raw = {str(x) for x in reference_set}
        ref_upper = {x.upper() for x in ref_raw}
        ref = {g for g in population if g in ref_raw or symbol.get(g, "").upper() in ref_upper}
        mark_reference_set(attention_df, ref_raw)
    out: dict = {
        "attention_column": attention_column,
        "de_column": de_column,
        "background": len(bg),
        "population": N,
        "population_definition": f"genes present in the analysed cells that {attention_column} ranks",
        "n_de": len(de_ids),
        "n_attention": len(at_ids),
        "classes": list(classes) if classes else None,
        "de_cells": de_cells,
        "overlap": [],
        "directions": [],
    }

    def overlap_item(k: int, top_de: list[str], top_at: list[str]) -> dict:
        shared = sorted(set(top_de) & set(top_at), key=top_at.index)
        item = {
            "k": k,
            "overlap": len(shared),
            "expected": (len(top_de) * len(top_at) / N) if N else 0.0,
            "p_value": _hypergeom_sf(len(shared), N, len(top_de), len(top_at)),
            "genes": [symbol.get(g) or g for g in shared],
        }
        if bins is not None:
            null = matched_overlap_p(top_at, top_de, bins, permutations=null_permutations, seed=seed + k)
            item["expected_matched"], item["p_matched"] = null["expected"], null["p_value"]
        return item

    # a k at or above the number of genes the score ranks takes them all: its overlap says nothing (p = 1)
    usable = [int(k) for k in ks if int(k) < len(population)]
    if len(usable) < len(ks):
        out["ks_not_tested"] = [int(k) for k in ks if int(k) >= len(population)]
    for direction in DIRECTIONS:
        ranked = de_ids if direction == "up" else _de_order(de, de_column, direction)
        items = []
        for k in usable:
            top_de, top_at = ranked[:k], at_ids[:k]
            item = overlap_item(k, top_de, top_at)
            if direction == "up" and ref is not None:
                hits_at = [g for g in top_at if g in ref]
                hits_de = [g for g in top_de if g in ref]
                item["reference_in_top_attention"] = len(hits_at)
                item["reference_p_value"] = _hypergeom_sf(len(hits_at), N, len(ref), len(top_at))
                item["reference_in_top_de"] = len(hits_de)
                item["reference_de_p_value"] = _hypergeom_sf(len(hits_de), N, len(ref), len(top_de))
                item["reference_genes"] = [symbol.get(g) or g for g in hits_at]
                if bins is not None:
                    null = matched_overlap_p(top_at, ref, bins, permutations=null_permutations, seed=seed + k)
                    item["reference_expected_matched"], item["reference_p_matched"] = null["expected"], null["p_value"]
            items.append(item)
        if direction == "up":
            out["overlap"] = items
        out["directions"].append(
            {
                "direction": direction,
                "label": direction_label(direction, classes),
                "overlap": [{key: v for key, v in it.items() if not key.startswith("reference")} for it in items]
                if direction == "up"
                else items,
                "top_de": [symbol.get(g) or g for g in ranked[: max(ks, default=0)]],
            }
        )
    merged = de[["ensembl_id", de_column]].merge(at[["ensembl_id", attention_column]], on="ensembl_id")
    if len(merged) >= 3:
        rho, p = spearmanr(merged[de_column], merged[attention_column])
        out["spearman"] = {"rho": float(rho), "p_value": float(p), "n": int(len(merged))}
    else:
        out["spearman"] = {"rho": None, "p_value": None, "n": int(len(merged))}
    if ref is not None:
        out["reference_set"] = {"size": len(ref_raw), "in_background": len(ref)}
    if bins is not None:
        out["matched_null"] = {
            "bins": [int(b) for b in null_bins],
            "method": "exact" if not null_permutations else f"{int(null_permutations)} permutations",
            "population": len(bins),
        }
    out["top_de"] = [symbol.get(g) or g for g in de_ids[: max(ks, default=0)]]
    out["top_attention"] = [symbol.get(g) or g for g in at_ids[: max(ks, default=0)]]
    return out


# p-value fields of an overlap item and the q-value field written beside each
OVERLAP_P_FIELDS = {
    "p_value": "q_value",
    "p_matched": "q_matched",
    "reference_p_value": "reference_q_value",
    "reference_p_matched": "reference_q_matched",
    "reference_de_p_value": "reference_de_q_value",
}


def _overlap_tests(doc: dict, prefix: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every overlap item of a `compare_de_attention` document (and of its `by_column`, `by_group`,
    `directions`), each with a key naming the test: the same test stored twice gets the same key."""
    if not isinstance(doc, dict):
        return []
    if doc.get("group"):
        prefix = (*prefix, str(doc["group"]))
    out = []
    column = doc.get("attention_column")
    for item in doc.get("overlap") or []:
        if isinstance(item, dict) and "k" in item:
            out.append(((*prefix, column, "up", item["k"]), item))
    for block in doc.get("directions") or []:
        for item in block.get("overlap") or []:
            if isinstance(item, dict) and "k" in item:
                out.append(((*prefix, column, block.get("direction"), item["k"]), item))
    for sub in (doc.get("by_column") or {}).values():
        out += _overlap_tests(sub, prefix)
    for group, sub in (doc.get("by_group") or {}).items():
        out += _overlap_tests(sub, (*prefix, str(group)))
    return out


def overlap_q_values(docs: dict[str, dict]) -> dict:
    """Benjamini-Hochberg q-values over one family: every overlap test of `docs` (name -> a
    `compare_de_attention` document, or an attribution document whose `de` maps methods to such documents),
    separately for each kind of p (`OVERLAP_P_FIELDS`: raw hypergeometric, matched null, reference set).
    A test stored twice (the headline overlap is also in `by_column`) counts once and gets the same q.
    Writes the q fields into the items in place; returns the family's description."""
    tests: list[tuple[tuple, dict]] = []
    for name, doc in docs.items():
        if not isinstance(doc, dict):
            continue
        if isinstance(doc.get("de"), dict) and "overlap" not in doc:  # an attribution document
            for method, sub in doc["de"].items():
                tests += _overlap_tests(sub, (name, method))
        else:
            tests += _overlap_tests(doc, (name,))
    counts = {}
    for p_field, q_field in OVERLAP_P_FIELDS.items():
        unique: dict[tuple, float] = {}
        for key, item in tests:
            p = item.get(p_field)
            if isinstance(p, (int, float)) and np.isfinite(p):
                unique.setdefault(key, float(p))
        if not unique:
            continue
        q = dict(zip(unique, benjamini_hochberg(np.asarray(list(unique.values())))))
        for key, item in tests:
            if key in q and isinstance(item.get(p_field), (int, float)):
                item[q_field] = float(q[key])
        counts[p_field] = len(unique)
    return {
        "method": "Benjamini-Hochberg (scipy.stats.false_discovery_control)",
        "family": "every DE and reference-set overlap test of this analysis run (each score column, direction,"
        " comparison and k; attribution methods included), per kind of p-value",
        "n_tests": counts,
    }


def adjust_overlap_family(store, run_id: int) -> dict | None:
    """q-values over all overlap tests of an analysis run (`de_overlap` and every attribution's DE
    comparison), written back into those documents; the family's description goes into `de_overlap`."""
    from store import results as R

    names = [n for n in store.json_names(run_id) if n == R.JSON_DE_OVERLAP or n.startswith("attribution_")]
    docs = {n: store.get_json(run_id, n) for n in names}
    if not any(docs.values()):
        return None
    family = overlap_q_values(docs)
    if isinstance(docs.get(R.JSON_DE_OVERLAP), dict):
        docs[R.JSON_DE_OVERLAP][R.FIELD_MULTIPLICITY] = family
    for n, doc in docs.items():
        if doc:
            store.put_json(run_id, n, plain(doc))
    return family


# ------------------------------------------------------------------------------------- statistics
def _resample_counts(n: int, n_boot: int, rng) -> np.ndarray:
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def bootstrap_ci(
    per_cell_values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, *, weights=None, chunk: int = 256
):
    """Percentile bootstrap over cells (axis 0) of the mean: returns (mean, lower, upper).

    With `weights` (same shape), the statistic is the weighted mean sum(w x) / sum(w) (e.g. per-rank
    curves where w marks the cells that have the position). Resampling draws cells with replacement,
    the same draw for every feature, so paired features stay paired.
    """
    x = np.asarray(per_cell_values, dtype=np.float64)
    n = x.shape[0]
    shape = x.shape[1:]
    flat = x.reshape(n, -1)
    w = None if weights is None else np.broadcast_to(np.asarray(weights, dtype=np.float64), x.shape).reshape(n, -1)
    if w is None:
        mean = flat.mean(axis=0)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (w * flat).sum(0) / w.sum(0)
    if n < 2 or n_boot < 1:
        return mean.reshape(shape), mean.reshape(shape).copy(), mean.reshape(shape).copy()
    rng = np.random.default_rng(seed)
    stats = np.empty((n_boot, flat.shape[1]))
    for start in range(0, n_boot, chunk):
        counts = _resample_counts(n, min(chunk, n_boot - start), rng)
        if w is None:
            stats[start : start + len(counts)] = counts @ flat / n
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                stats[start : start + len(counts)] = (counts @ (w * flat)) / (counts @ w)
    with np.errstate(invalid="ignore"):
        lower = (
            np.nanquantile(stats, alpha / 2, axis=0) if np.isnan(stats).any() else np.quantile(stats, alpha / 2, axis=0)
        )
        upper = (
            np.nanquantile(stats, 1 - alpha / 2, axis=0)
            if np.isnan(stats).any()
            else np.quantile(stats, 1 - alpha / 2, axis=0)
        )
    return mean.reshape(shape), lower.reshape(shape), upper.reshape(shape)


def paired_sign_flip_test(x, y, n_perm: int = 10000, seed: int = 0, *, chunk: int = 1000) -> np.ndarray:
    """Two-sided paired permutation test of mean(x - y) = 0 per feature (axis 0 = cells).

    Under the null each cell's difference is equally likely to have either sign; the statistic is
    |mean d| and p = (1 + #{|mean of flipped d| >= observed}) / (1 + n_perm). Identical inputs give 1.
    """
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    n = d.shape[0]
    shape = d.shape[1:]
    d = d.reshape(n, -1)
    observed = np.abs(d.mean(axis=0))
    tol = 1e-12 * np.maximum(observed, np.abs(d).max(axis=0, initial=0.0))
    rng = np.random.default_rng(seed)
    hits = np.zeros(d.shape[1])
    for start in range(0, n_perm, chunk):
        m = min(chunk, n_perm - start)
        signs = rng.integers(0, 2, size=(m, n)) * 2.0 - 1.0
        hits += (np.abs(signs @ d / n) >= observed - tol).sum(axis=0)
    return ((1.0 + hits) / (1.0 + n_perm)).reshape(shape)


def wilcoxon_signed_rank(x, y) -> np.ndarray:
    """Wilcoxon signed-rank p-value of x - y per feature (axis 0 = cells); 1 where all differences are 0.

    `scipy.stats.wilcoxon(..., zero_method="wilcox", axis=0)`. Its default `method="auto"` picks the exact,
    permutation or normal-approximation p-value from the whole array's zeros and ties; here it is picked
    per feature, as for a single feature, so each p-value is the one that feature alone would get.
    """
    from scipy.stats import PermutationMethod, wilcoxon

    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    n = d.shape[0]
    shape = d.shape[1:]
    d = d.reshape(n, -1)
    out = np.ones(d.shape[1])
    live = np.any(d != 0, axis=0)
    if n > 50:
        methods = [("asymptotic", live)]
    else:
        a = np.sort(np.abs(d), axis=0)
        clean = ~np.any(d == 0, axis=0) & ~np.any(a[1:] == a[:-1], axis=0)  # no zeros, no ties
        other = PermutationMethod() if n <= 13 else "asymptotic"
        methods = [("exact", live & clean), (other, live & ~clean)]
    for method, cols in methods:
        if cols.any():
            out[cols] = wilcoxon(d[:, cols], zero_method="wilcox", method=method, axis=0).pvalue
    return out.reshape(shape)


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over all entries of `p` (any shape), capped at 1."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=np.float64)
    return false_discovery_control(p.ravel(), method="bh").reshape(p.shape)


def attention_statistics(
    result, *, n_boot: int = 200, n_perm: int = 2000, seed: int = 0, alpha: float = 0.05, test: str = "sign-flip"
) -> dict:
    """Confidence intervals over cells for analyses 1-3 and paired per-(layer, head) tests.

    Returns numpy arrays: `cosine` / `cosine_lower` / `cosine_upper` / `cosine_std` (nl, H); per model
    `norm_<s>` (+ lower/upper, (nl, H)), `norm_summed_<s>` (+ lower/upper, (nl,)), `centre_<s>` (nl, H),
    `rank_received_<s>` (+ lower/upper, (P,)); for a pair `rank_pct_diff` (+ lower/upper) and the tests:
    `p_value` (whether the mean attended rank position, the centre of attention, differs), `p_value_norm`
    (whether the Kobayashi norm differs), `p_value_adj` (Benjamini-Hochberg over the grid).
    `test`: "sign-flip" (paired permutation) or "wilcoxon" (signed-rank).
    """
    out: dict = {
        "n_cells": int(result.n_cells),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
        "test": test,
        "n_perm": int(n_perm) if test == "sign-flip" else None,
    }
    names = SUFFIXES[: result.n_models]
    for m, s in enumerate(names):
        mean, lo, hi = bootstrap_ci(result.cell_norm[m], n_boot, seed, alpha)
        out[f"norm_{s}"], out[f"norm_{s}_lower"], out[f"norm_{s}_upper"] = mean, lo, hi
        mean, lo, hi = bootstrap_ci(result.cell_norm_summed[m], n_boot, seed, alpha)
        out[f"norm_summed_{s}"], out[f"norm_summed_{s}_lower"], out[f"norm_summed_{s}_upper"] = mean, lo, hi
        out[f"centre_{s}"] = result.cell_centre[m].mean(axis=0)
    if result.cell_curve is not None:
        has = (np.arange(result.max_len)[None, :] < result.lengths[:, None]).astype(np.float64)
        for m, s in enumerate(names):
            mean, lo, hi = bootstrap_ci(result.cell_curve[m], n_boot, seed, alpha, weights=has)
            out[f"rank_received_{s}"], out[f"rank_received_{s}_lower"], out[f"rank_received_{s}_upper"] = mean, lo, hi
        if result.n_models == 2:
            out["rank_pct_diff"], out["rank_pct_diff_lower"], out["rank_pct_diff_upper"] = _pct_diff_ci(
                result.cell_curve[0], result.cell_curve[1], has, n_boot, seed, alpha
            )
    if result.n_models == 2 and result.cell_cosine is not None:
        mean, lo, hi = bootstrap_ci(result.cell_cosine, n_boot, seed, alpha)
        out["cosine"], out["cosine_lower"], out["cosine_upper"] = mean, lo, hi
        out["cosine_std"] = result.cell_cosine.std(axis=0, ddof=1) if result.n_cells > 1 else np.zeros_like(mean)
        if test == "wilcoxon":
            p = wilcoxon_signed_rank(result.cell_centre[0], result.cell_centre[1])
            p_norm = wilcoxon_signed_rank(result.cell_norm[0], result.cell_norm[1])
        else:
            p = paired_sign_flip_test(result.cell_centre[0], result.cell_centre[1], n_perm, seed)
            p_norm = paired_sign_flip_test(result.cell_norm[0], result.cell_norm[1], n_perm, seed + 1)
        out["p_value"], out["p_value_norm"] = p, p_norm
        out["p_value_adj"] = benjamini_hochberg(p)
        out["p_value_norm_adj"] = benjamini_hochberg(p_norm)
    return out


def _pct_diff_ci(curve_a, curve_b, has, n_boot, seed, alpha, chunk: int = 128):
    """Bootstrap CI of 100 (b - a) / a per rank position, the cells resampled jointly for both models."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sa, sb = curve_a.sum(0), curve_b.sum(0)
        point = np.where(sa > 0, 100.0 * (sb - sa) / np.where(sa > 0, sa, 1), np.nan)
    n = curve_a.shape[0]
    if n < 2 or n_boot < 1:
        return point, point.copy(), point.copy()
    rng = np.random.default_rng(seed)
    stats = np.empty((n_boot, curve_a.shape[1]))
    for start in range(0, n_boot, chunk):
        counts = _resample_counts(n, min(chunk, n_boot - start), rng)
        ra, rb = counts @ (curve_a * has), counts @ (curve_b * has)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[start : start + len(counts)] = np.where(ra > 0, 100.0 * (rb - ra) / np.where(ra > 0, ra, 1), np.nan)
    with np.errstate(invalid="ignore"):
        lo = np.nanquantile(stats, alpha / 2, axis=0)
        hi = np.nanquantile(stats, 1 - alpha / 2, axis=0)
    return point, lo, hi


# ------------------------------------------------------------------------------------------- store
def length_histogram(lengths, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return np.zeros(0), np.zeros(1)
    lo, hi = int(lengths.min()), int(lengths.max())
    n_bins = max(1, min(bins, hi - lo + 1))
    counts, edges = np.histogram(lengths, bins=n_bins, range=(lo, hi + 1))
    return counts.astype(np.float64), edges


def pair_records(
    result,
    gene_df: pd.DataFrame | None,
    de_summary: dict | None,
    stats: dict | None,
    *,
    model_names: Sequence[str] | None = None,
    key_genes: dict | None = None,
) -> dict:
    """An analysis run's results (grids, per-rank vectors, the gene table, JSON) as `store.records.Records`.

    Grids (layer x head): `cosine` (bootstrap CI as lower/upper), `cosine_std`, `norm_<s>` (CI),
    `norm_summed_<s>` (layer x 1, CI), `centre_<s>`, `p_value` (lower/upper unused), `p_value_adj`,
    `p_value_norm`. Vectors: `rank_received_<s>` (summed over layers and heads; meta carries the CI
    arrays' names), `rank_received_lh_<s>` (layer, head, rank), `rank_norm_received_<s>`, `rank_pct_diff`
    (+ `_lower`/`_upper`), `rank_log_ratio`, `rank_count`, `rank_special_count`, `length_hist`. Every
    per-rank vector's meta: median length, special-token positions, cells, model name. Gene table
    `genes`; JSON `de_overlap`, `stats`, `summary` (names: `store.results`).
    """
    from store import results as R
    from store.records import Records

    rec = Records()
    names = SUFFIXES[: result.n_models]
    model_names = tuple(model_names or result.names)
    stats = stats if stats is not None else attention_statistics(result)
    median = length_median(result)
    specials = special_positions(result)
    base_meta = {
        "median_length": median,
        "special_positions": specials,
        "n_cells": int(result.n_cells),
        "x": "rank position (0-based token index; special tokens kept)",
        "models": dict(zip(names, model_names)),
    }

    def meta(**extra):
        return plain({**base_meta, **extra})

    if result.n_models == 2 and "cosine" in stats:
        rec.put_grid(R.GRID_COSINE, stats["cosine"], lower=stats["cosine_lower"], upper=stats["cosine_upper"])
        rec.put_grid(R.GRID_COSINE_STD, stats["cosine_std"])
        rec.put_grid(R.GRID_P_VALUE, stats["p_value"])
        rec.put_grid(R.GRID_P_VALUE_ADJ, stats["p_value_adj"])
        rec.put_grid(R.GRID_P_VALUE_NORM, stats["p_value_norm"])
    for s in names:
        rec.put_grid(R.grid_norm(s), stats[f"norm_{s}"], lower=stats[f"norm_{s}_lower"], upper=stats[f"norm_{s}_upper"])
        col = lambda v: np.asarray(v).reshape(-1, 1)  # noqa: E731 - one column: the heads are summed
        rec.put_grid(
            R.grid_norm_summed(s),
            col(stats[f"norm_summed_{s}"]),
            lower=col(stats[f"norm_summed_{s}_lower"]),
            upper=col(stats[f"norm_summed_{s}_upper"]),
        )
        rec.put_grid(R.grid_centre(s), stats[f"centre_{s}"])
    received = rank_received(result)
    received_lh = rank_received(result, per_head=True)
    norm_received = rank_norm_received(result)
    for m, s in enumerate(names):
        extra = {}
        if f"rank_received_{s}_lower" in stats:
            rec.put_vector(
                R.vec_rank_received_lower(s), stats[f"rank_received_{s}_lower"], meta=meta(model=model_names[m])
            )
            rec.put_vector(
                R.vec_rank_received_upper(s), stats[f"rank_received_{s}_upper"], meta=meta(model=model_names[m])
            )
            extra = {R.META_LOWER: R.vec_rank_received_lower(s), R.META_UPPER: R.vec_rank_received_upper(s)}
        rec.put_vector(R.vec_rank_received(s), received[m], meta=meta(model=model_names[m], **extra))
        rec.put_vector(
            R.vec_rank_received_lh(s),
            received_lh[m],
            meta=meta(model=model_names[m], axes=["layer", "head", "rank"]),
        )
        rec.put_vector(R.vec_rank_norm_received(s), norm_received[m], meta=meta(model=model_names[m]))
    if result.n_models == 2:
        pct, log_ratio = rank_pct_diff(result), rank_log_ratio(result)
        extra = {}
        if "rank_pct_diff_lower" in stats:
            rec.put_vector(R.VEC_RANK_PCT_DIFF_LOWER, stats["rank_pct_diff_lower"], meta=meta())
            rec.put_vector(R.VEC_RANK_PCT_DIFF_UPPER, stats["rank_pct_diff_upper"], meta=meta())
            extra = {R.META_LOWER: R.VEC_RANK_PCT_DIFF_LOWER, R.META_UPPER: R.VEC_RANK_PCT_DIFF_UPPER}
        rec.put_vector(R.VEC_RANK_PCT_DIFF, pct, meta=meta(definition="100 (b - a) / a", **extra))
        rec.put_vector(R.VEC_RANK_LOG_RATIO, log_ratio, meta=meta(definition="ln(b / a)"))
    rec.put_vector(R.VEC_RANK_COUNT, result.rank_count, meta=meta())
    rec.put_vector(R.VEC_RANK_SPECIAL_COUNT, result.rank_special_count, meta=meta())
    counts, edges = length_histogram(result.lengths)
    rec.put_vector(
        R.VEC_LENGTH_HIST,
        counts,
        meta=plain({"edges": edges, "median": median, "n_cells": int(result.n_cells)}),
    )
    if gene_df is not None:
        rec.put_gene_table(R.TABLE_GENES, gene_df)
    if de_summary is not None:
        rec.put_json(R.JSON_DE_OVERLAP, plain(de_summary))
    if key_genes is not None:
        rec.put_json(R.JSON_KEY_GENES, plain(key_genes))
    stats_json = {k: v for k, v in stats.items() if not k.startswith("rank_")}
    rec.put_json(R.JSON_STATS, plain(stats_json))
    summary = pair_summary(result, gene_df, stats, model_names=model_names, key_genes=key_genes)
    rec.put_json(R.JSON_SUMMARY, summary)
    return rec


def pair_summary(result, gene_df, stats, *, model_names, top_n: int = 10, key_genes: dict | None = None) -> dict:
    names = SUFFIXES[: result.n_models]
    out = {
        "models": dict(zip(names, model_names)),
        "n_cells": int(result.n_cells),
        "median_length": length_median(result),
        "max_length": int(result.lengths.max()) if result.n_cells else 0,
        "n_layers": result.n_layers,
        "n_heads": result.n_heads,
        "special_positions": special_positions(result),
        "groups": list(result.group_names),
        "meta": result.meta,
    }
    if "cosine" in stats:
        out["cosine_mean"] = float(np.mean(stats["cosine"]))
        out["cosine_per_layer"] = np.mean(stats["cosine"], axis=1)
        out["cosine_min"] = {
            "value": float(np.min(stats["cosine"])),
            "layer_head": [int(i) for i in np.unravel_index(np.argmin(stats["cosine"]), stats["cosine"].shape)],
        }
        out["heads_differing"] = int((stats["p_value_adj"] < stats.get("alpha", 0.05)).sum())
    for s in names:
        out[f"norm_summed_{s}"] = stats[f"norm_summed_{s}"]
    if gene_df is not None and len(gene_df):
        for s in names:
            top = gene_df.sort_values(f"attn_{s}", ascending=False).head(top_n)
            out[f"top_genes_{s}"] = [r.symbol or r.ensembl_id for r in top.itertuples()]
            top = gene_df[gene_df["n_cells"] >= min_cells_for(result.n_cells)]
            top = top.sort_values(f"attn_pos_ratio_{s}", ascending=False).head(top_n)
            out[f"top_position_controlled_{s}"] = [r.symbol or r.ensembl_id for r in top.itertuples()]
            if key_score_column(s) in gene_df.columns:
                top = gene_df.dropna(subset=[key_score_column(s)]).nlargest(top_n, key_score_column(s))
                out[f"top_key_genes_{s}"] = [r.symbol or r.ensembl_id for r in top.itertuples()]
    if key_genes is not None:
        out["key_score"] = key_genes.get("default_score")
        out["frequency_warnings"] = list(key_genes.get("warnings", []))
    return plain(out)


# --------------------------------------------------------------------------------- orchestration
def run_pair_analysis(
    model_a,
    model_b,
    dataset,
    *,
    dicts,
    names: Sequence[str] = ("a", "b"),
    group_column: str | None = None,
    de: pd.DataFrame | None = None,
    reference_set=None,
    top_k: Sequence[int] = (10, 20, 50, 100),
    n_boot: int = 200,
    n_perm: int = 2000,
    null_bins: Sequence[int] = (5, 5),
    null_permutations: int = 0,
    batch_size: int = 8,
    device="cpu",
    dtype=None,
    seed: int = 0,
    progress: Callable | None = None,
) -> dict:
    """The attention stage of an analysis run: analyses 1-7 of two models on `dataset`.

    `dicts`: the `GeneDictionaries` of the shared tokenization (pad and special tokens, Ensembl IDs,
    symbols). `de`: a `de_wilcoxon` table to compare with (optional). `reference_set`: a path or a set
    of IDs/symbols, marked in the gene table and tested among the top attended genes. Returns a dict:
    `result` (the `AttentionResult`), `genes`, `stats`, `de_overlap`, `key_genes` and `records` (what the
    run stores, `pair_records`; its `summary` document is `records.json(store.results.JSON_SUMMARY)`).
    """
    import torch

    from pipeline.analysis.attention import analyze_attention

    if group_column is not None and hasattr(dataset, "column_names") and group_column not in dataset.column_names:
        group_column = None
    if isinstance(reference_set, (str, Path)):
        reference_set = load_reference_set(reference_set, symbol_to_id=getattr(dicts, "name_to_id", None))
    result = analyze_attention(
        model_a,
        model_b,
        dataset,
        pad_id=dicts.pad_id,
        special_ids=dicts.special_ids,
        group_column=group_column,
        batch_size=batch_size,
        device=device,
        dtype=dtype or torch.float32,
        progress=progress,
    )
    genes = gene_table(result, dicts.id_to_gene, dicts.id_to_symbol, reference_set=reference_set)
    stats = attention_statistics(result, n_boot=n_boot, n_perm=n_perm, seed=seed)
    key_genes = key_gene_report(genes, result.n_cells, names=names)
    de_summary = None
    if de is not None and len(de):
        background = genes["ensembl_id"].tolist()
        null = {"null_bins": tuple(null_bins), "null_permutations": int(null_permutations), "seed": seed}
        de_summary = compare_de_attention(
            de,
            genes,
            background,
            ks=top_k,
            reference_set=reference_set,
            attention_column=key_score_column(SUFFIXES[result.n_models - 1]),
            **null,
        )
        de_summary["by_column"] = {}
        for m in range(result.n_models):
            s = SUFFIXES[m]
            for col in (key_score_column(s), f"attn_{s}", f"attn_pos_ratio_{s}", f"attn_norm_{s}"):
                de_summary["by_column"][col] = compare_de_attention(
                    de, genes, background, ks=top_k, reference_set=reference_set, attention_column=col, **null
                )
        de_summary["models"] = dict(zip(SUFFIXES, names))
        from store.results import FIELD_MULTIPLICITY, JSON_DE_OVERLAP

        de_summary[FIELD_MULTIPLICITY] = overlap_q_values({JSON_DE_OVERLAP: de_summary})
    elif reference_set is not None:
        mark_reference_set(genes, reference_set)
    records = pair_records(result, genes, de_summary, stats, model_names=tuple(names), key_genes=key_genes)
    return {
        "result": result,
        "genes": genes,
        "stats": stats,
        "de_overlap": de_summary,
        "key_genes": key_genes,
        "records": records,
    }


def key_gene_report(genes: pd.DataFrame, n_cells: int, *, names: Sequence[str]) -> dict:
    """The key-gene ranking's definition, its empirical-Bayes fit per model, and every score column's
    Spearman correlation with detection frequency, with a warning line for each above 0.8."""
    n_models = sum(1 for s in SUFFIXES if key_score_column(s) in genes.columns)
    suffixes = SUFFIXES[:n_models]
    min_cells = min_cells_for(n_cells)
    fits = {s: genes.attrs.get("key_score_fits", {}).get(s) for s in suffixes}
    rhos = frequency_correlations(genes, score_columns(genes))
    models = dict(zip(SUFFIXES, names))
    warnings = []
    for s in suffixes:
        own = {c: r for c, r in rhos.items() if c.endswith(f"_{s}")}
        warnings += frequency_warnings(own, where=str(models.get(s, s)))
    return plain(
        {
            "default_score": key_score_column(suffixes[-1]) if suffixes else None,
            "definition": "empirical-Bayes shrunk log2(attention received / attention its rank positions receive),"
            f" genes in at least {min_cells} cells (5% of {int(n_cells)})",
            "min_cells": min_cells,
            "models": models,
            "fit": fits,
            "frequency_spearman": rhos,
            "warnings": warnings,
        }
    )
