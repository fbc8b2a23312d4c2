"""Key genes a researcher can trust: a frequency- and position-controlled score, a matched null for
overlaps, and a warning when a ranking only restates how often genes are detected.

Summed attention per gene grows with the number of cells that express the gene, and attention depends
on rank position; so the most attended genes are, first of all, the most often detected ones, and the
overlap of any frequency-driven ranking with DE genes (themselves mostly frequently detected) looks
significant against a hypergeometric null that treats all genes as exchangeable.

**Key score** (`key_score_<s>`, the default ranking of "key genes" in the gene table, the summary, the
TUI and the figures). Per gene g and model: x_g = log2(observed_g / expected_g), the position-controlled
ratio of analysis 5 (attention received over the attention its rank positions receive on average, summed
over the n_g cells that express it, so a per-occurrence quantity), relative to genes detected in a
similar number of cells, shrunk by empirical Bayes. With mu_f the mean of x over the genes of g's
detection-frequency quantile bin (5 bins), r_g = x_g - mu_f is modelled as theta_g + e_g with
Var(e_g) = s^2 / n_g and theta_g ~ N(0, tau^2); (tau^2, s^2) is the non-negative least-squares fit of
r_g^2 on (1, 1 / n_g) over the genes (method of moments, as the engine keeps sums, not per-cell values),
and the score is the posterior mean B_g r_g with B_g = tau^2 / (tau^2 + s^2 / n_g): 0 is what genes of its
frequency and rank positions receive, > 0 more. A gene seen in few cells is pulled toward 0; genes in
fewer than `min_cells` cells (default 5% of the analysed cells, at least 3) get no score at all, so a
gene seen once cannot top the table. Centring within frequency bins keeps a trend of attention with
detection frequency out of the ranking, which shrinkage toward one global mean would turn into one.

**Matched null.** The genes are binned by detection frequency (cells expressing) x mean rank (quantile
bins, `frequency_rank_bins`). Permuting a score's values among the genes of each bin keeps how many of
its top k fall in each bin (c_b) and draws them uniformly within the bin; the overlap with a fixed set
D (the top k DE genes, or a reference set) is then a sum over bins of independent hypergeometric
counts, Hyp(n_b, |D within b|, c_b). Its exact distribution (the convolution of those hypergeometrics: what
infinitely many within-bin permutations estimate) gives `p_matched` = P(overlap >= observed); with
`permutations` > 0 that many permutations are drawn instead (Monte Carlo). A ranking driven by
frequency and position alone has a matched p near uniform however large its raw hypergeometric
significance.

**Frequency warning.** Any ranking whose Spearman correlation with detection frequency exceeds 0.8 is
reported as one line: its top genes are largely the most often detected genes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

KEY_SCORE = "key_score"
FREQUENCY_WARNING_RHO = 0.8
MIN_CELLS_FRACTION = 0.05
MIN_CELLS_FLOOR = 3


def key_score_column(suffix: str) -> str:
    return f"{KEY_SCORE}_{suffix}"


def min_cells_for(n_cells: int, fraction: float = MIN_CELLS_FRACTION, floor: int = MIN_CELLS_FLOOR) -> int:
    """The fewest cells a gene must be expressed in to be scored: `fraction` of the cells, at least `floor`."""
    return max(int(floor), int(float(fraction) * int(n_cells)))


def shrunk_log_ratio(observed, expected, n, *, min_cells: int, frequency_bins: int = 5) -> tuple[np.ndarray, dict]:
    """Empirical-Bayes posterior mean of each gene's log2(observed / expected) relative to genes detected in
    a similar number of cells (NaN below `min_cells`); see the module docstring.

    Returns the scores and the fit: the mean per frequency bin, tau2, s2, the genes scored and the smallest
    and median shrinkage factor B_g (1 = unchanged).
    """
    observed = np.asarray(observed, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    ok = (n >= min_cells) & (observed > 0) & (expected > 0) & np.isfinite(observed) & np.isfinite(expected)
    out = np.full(observed.shape, np.nan)
    fit = {"min_cells": int(min_cells), "n_scored": int(ok.sum()), "mu": None, "tau2": None, "s2": None}
    if not ok.any():
        return out, fit
    x = np.log2(observed[ok] / expected[ok])
    w = n[ok]
    bins = _quantile_bin(w, max(1, min(int(frequency_bins), len(w) // 3)))
    mu = np.zeros_like(x)
    for b in np.unique(bins):
        mu[bins == b] = x[bins == b].mean()
    r = x - mu
    if ok.sum() >= 3 and np.ptp(1.0 / w) > 0:
        from scipy.optimize import nnls

        design = np.column_stack([np.ones_like(w), 1.0 / w])
        (tau2, s2), _ = nnls(design, r**2)
    else:
        tau2, s2 = float(np.var(r)), 0.0
    shrink = tau2 / (tau2 + s2 / w) if tau2 + s2 > 0 else np.ones_like(w)
    out[ok] = shrink * r
    fit.update(
        mu=[float(mu[bins == b][0]) for b in np.unique(bins)],
        tau2=float(tau2),
        s2=float(s2),
        shrinkage_min=float(np.min(shrink)),
        shrinkage_median=float(np.median(shrink)),
        share_shrunk=float(np.mean(shrink < 1.0 - SHRUNK_BY)),
        note=shrinkage_note(float(tau2), float(s2)),
    )
    return out, fit


SHRUNK_BY = 0.1  # a gene counts as shrunk when B_g < 1 - SHRUNK_BY (moved 10% or more toward its bin's mean)


def shrinkage_note(tau2: float, s2: float) -> str | None:
    """What a degenerate empirical-Bayes fit means for the key score, in words (None: an ordinary fit). A
    variance below 1e-9 of the other counts as 0 (the least-squares fit leaves rounding behind)."""
    if s2 <= 1e-9 * tau2:
        return (
            "no shrinkage: the fit found no sampling noise (s^2 = 0), so each key score is the gene's raw"
            " log-ratio relative to its frequency bin"
        )
    if tau2 <= 1e-9 * s2:
        return (
            "the fit found no spread between genes beyond sampling noise (prior variance tau^2 = 0): every"
            " key score is shrunk to 0, so the key-gene ranking carries no information"
        )
    return None


def add_key_scores(
    df: pd.DataFrame, suffixes: Sequence[str], n_cells: int, *, min_cells_fraction: float = MIN_CELLS_FRACTION
) -> dict:
    """Add (in place) `key_score_<s>` for each model suffix from `attn_<s>`, `attn_expected_<s>` and
    `n_cells`; returns the fits per suffix."""
    m = min_cells_for(n_cells, min_cells_fraction)
    fits = {}
    for s in suffixes:
        score, fit = shrunk_log_ratio(df[f"attn_{s}"], df[f"attn_expected_{s}"], df["n_cells"], min_cells=m)
        df[key_score_column(s)] = score
        fits[s] = fit
    return fits


def _quantile_bin(values: np.ndarray, n_bins: int) -> np.ndarray:
    """floor(n_bins * #{values strictly smaller} / n): equal-count bins; tied values share the lower bin."""
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    smaller = np.searchsorted(np.sort(values), values, side="left")
    return np.minimum(smaller * n_bins // n, n_bins - 1).astype(np.int64)


def frequency_rank_bins(n_cells, rank_mean, n_freq_bins: int = 5, n_rank_bins: int = 5) -> np.ndarray:
    """Bin id per gene: quantile bin of detection frequency x quantile bin of mean rank within it.

    Frequency bin f in 0..n_freq_bins-1 (0: expressed in fewest cells) is
    floor(n_freq_bins * #{genes with a smaller n_cells} / n_genes); the rank bin r in 0..n_rank_bins-1
    (0: closest to the top ranks) is the same rule on `rank_mean` among the genes of frequency bin f
    (conditional quantiles: frequency and mean rank are strongly correlated, so marginal rank bins would
    leave most of the grid empty). The bin id is f * n_rank_bins + r.

    Ties: genes with equal values always share a bin (the bin of their lowest sorted position), so with
    many ties a bin can hold more than its share and another none. A NaN mean rank (a gene no cell
    expresses) counts as larger than every finite one. Deterministic: no randomness, no order dependence.
    """
    n_cells = np.asarray(n_cells, dtype=np.float64)
    rank_mean = np.asarray(rank_mean, dtype=np.float64)
    if n_cells.shape != rank_mean.shape or n_cells.ndim != 1:
        raise ValueError("n_cells and rank_mean must be 1-d arrays of the same length")
    if n_freq_bins < 1 or n_rank_bins < 1:
        raise ValueError("n_freq_bins and n_rank_bins must be at least 1")
    rank = np.where(np.isnan(rank_mean), np.inf, rank_mean)
    freq_bin = _quantile_bin(n_cells, n_freq_bins)
    rank_bin = np.zeros(len(rank), dtype=np.int64)
    for f in np.unique(freq_bin):
        members = np.flatnonzero(freq_bin == f)
        rank_bin[members] = _quantile_bin(rank[members], n_rank_bins)
    return freq_bin * n_rank_bins + rank_bin


def _hypergeom_pmf(pop: int, succ: int, draws: int) -> np.ndarray:
    from scipy.stats import hypergeom

    kmax = min(succ, draws)
    return hypergeom.pmf(np.arange(kmax + 1), pop, succ, draws) if kmax > 0 else np.ones(1)


def matched_overlap_p(
    top: Iterable[str],
    target: Iterable[str],
    bins: dict[str, int],
    *,
    permutations: int = 0,
    seed: int = 0,
) -> dict:
    """P(overlap >= observed) when `top` is replaced by as many genes per bin drawn at random in the bin.

    `bins` maps every gene of the population (the ranked genes) to its bin; genes of `top` or `target`
    outside it are ignored. Exact (convolution of per-bin hypergeometrics) with `permutations` = 0, else
    that many draws. Returns observed, expected and p.
    """
    top = [g for g in top if g in bins]
    target = {g for g in target if g in bins}
    observed = len(set(top) & target)
    by_bin: dict[int, list[int]] = {}
    for g, b in bins.items():
        rec = by_bin.setdefault(int(b), [0, 0, 0])  # genes, target genes, top genes
        rec[0] += 1
        rec[1] += g in target
    for g in top:
        by_bin[int(bins[g])][2] += 1
    parts = [(n_b, d_b, c_b) for n_b, d_b, c_b in by_bin.values() if c_b > 0 and d_b > 0]
    expected = float(sum(c_b * d_b / n_b for n_b, d_b, c_b in parts))
    if permutations and permutations > 0:
        rng = np.random.default_rng(seed)
        draws = np.zeros(int(permutations), dtype=np.int64)
        for n_b, d_b, c_b in parts:
            draws += rng.hypergeometric(d_b, n_b - d_b, c_b, size=int(permutations))
        p = float((1 + np.sum(draws >= observed)) / (1 + int(permutations)))
        return {"observed": observed, "expected": expected, "p_value": p, "method": f"{permutations} permutations"}
    dist = np.ones(1)
    for n_b, d_b, c_b in parts:
        dist = np.convolve(dist, _hypergeom_pmf(n_b, d_b, c_b))
    p = float(np.clip(dist[observed:].sum(), 0.0, 1.0)) if observed < len(dist) else 0.0
    return {"observed": observed, "expected": expected, "p_value": p, "method": "exact"}


def frequency_correlations(df: pd.DataFrame, columns: Iterable[str], frequency: str = "n_cells") -> dict[str, float]:
    """Spearman correlation of each score column with detection frequency over the genes it scores."""
    from scipy.stats import spearmanr

    out = {}
    for col in columns:
        if col not in df.columns:
            continue
        sub = df[[col, frequency]].replace([np.inf, -np.inf], np.nan).dropna()
        if len(sub) >= 3 and sub[col].nunique() > 1 and sub[frequency].nunique() > 1:
            out[col] = float(spearmanr(sub[col], sub[frequency])[0])
    return out


def frequency_warnings(
    rhos: dict[str, float], *, threshold: float = FREQUENCY_WARNING_RHO, where: str = ""
) -> list[str]:
    """One line naming every ranking correlated with detection frequency above `threshold` (none: [])."""
    high = {col: rho for col, rho in rhos.items() if rho > threshold}
    if not high:
        return []
    prefix = f"{where}: " if where else ""
    listed = ", ".join(f"{col} {rho:.2f}" for col, rho in high.items())
    advice = (
        "even the controlled score does"
        if any(col.startswith(KEY_SCORE) for col in high)
        else "their top genes are mostly the most often detected; rank key genes by the controlled score"
    )
    return [
        f"{prefix}rankings that track detection frequency (Spearman with cells expressing > {threshold}): {listed}; {advice}"
    ]


def score_columns(df: pd.DataFrame) -> list[str]:
    """The per-gene ranking columns of a gene table: weight, norm, controlled and attribution scores."""
    import re

    pats = (r"attn_[a-z]", r"attn_norm_[a-z]", r"attn_pos_ratio_[a-z]", rf"{KEY_SCORE}_[a-z]", r"attr_.+")
    return [c for c in df.columns if any(re.fullmatch(p, c) for p in pats)]
