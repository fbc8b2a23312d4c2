"""The controlled key-gene score, the matched null and the frequency warning (pipeline.analysis.keygenes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.keygenes import (
    frequency_correlations,
    frequency_rank_bins,
    frequency_warnings,
    matched_overlap_p,
    min_cells_for,
    shrunk_log_ratio,
)
from pipeline.analysis.pair import _hypergeom_sf, compare_de_attention


def _simulated(seed=0, genes=4000, tau=0.5, s=2.0):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 400, size=genes)
    theta = rng.normal(0.3, tau, size=genes)
    x = theta + rng.normal(0.0, s / np.sqrt(n))
    expected = rng.uniform(1.0, 5.0, size=genes) * n
    observed = expected * 2.0**x
    return n, theta, x, expected, observed


def test_empirical_bayes_recovers_the_variances_and_beats_the_raw_ratio():
    n, theta, x, expected, observed = _simulated()
    score, fit = shrunk_log_ratio(observed, expected, n, min_cells=1)
    assert fit["tau2"] == pytest.approx(0.25, rel=0.2) and fit["s2"] == pytest.approx(4.0, rel=0.2)
    assert len(fit["mu"]) == 5 and all(m == pytest.approx(0.3, abs=0.1) for m in fit["mu"])
    # the posterior mean is closer to the truth (relative to the mean, 0.3) than the raw log ratio,
    # most of all for rare genes
    truth, rare = theta - 0.3, n < 20
    assert np.mean((score - truth) ** 2) < 0.6 * np.mean((x - 0.3 - truth) ** 2)
    assert np.mean((score[rare] - truth[rare]) ** 2) < 0.3 * np.mean((x[rare] - 0.3 - truth[rare]) ** 2)
    # shrinkage of the deviation from the frequency bin's mean, by B = tau2 / (tau2 + s2 / n), computed directly
    by_rank = np.searchsorted(np.sort(n), n, side="left")
    bin_of = np.minimum(by_rank * 5 // len(n), 4)
    mu = np.array([np.log2(observed / expected)[bin_of == b].mean() for b in range(5)])[bin_of]
    b = fit["tau2"] / (fit["tau2"] + fit["s2"] / n)
    np.testing.assert_allclose(score, b * (np.log2(observed / expected) - mu), rtol=1e-10, atol=1e-12)


def test_a_frequency_trend_of_attention_does_not_rank_the_genes():
    """Attention per occurrence that falls with detection frequency: the key score is not ordered by it."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    n = rng.integers(5, 400, size=3000)
    x = -0.002 * n + rng.normal(0, 0.3, size=3000) + rng.normal(0, 1.0, size=3000) / np.sqrt(n)
    expected = np.full(3000, 10.0)
    score, _ = shrunk_log_ratio(expected * 2.0**x, expected, n, min_cells=5)
    assert spearmanr(x, n)[0] < -0.5
    assert abs(spearmanr(score, n)[0]) < 0.15


def test_a_gene_seen_in_few_cells_cannot_top_the_ranking():
    n, _, _, expected, observed = _simulated(seed=1)
    n = n.copy()
    observed = observed.copy()
    n[0], observed[0], expected[0] = 1, 1e6, 1.0  # seen once, with an enormous ratio
    n[1], observed[1], expected[1] = 30, 30 * 2.0**4, 30.0  # rare but above the threshold
    score, _ = shrunk_log_ratio(observed, expected, n, min_cells=min_cells_for(600))
    assert min_cells_for(600) == 30 and min_cells_for(20) == 3
    assert np.isnan(score[0])
    assert np.nanargmax(score) != 0 and score[1] < 4.0  # shrunk toward the mean


def test_bins_are_quantiles_of_frequency_and_rank():
    rng = np.random.default_rng(0)
    n_cells = rng.integers(1, 1000, size=500)
    rank = rng.uniform(1, 96, size=500)
    bins = frequency_rank_bins(n_cells, rank, 5, 4)
    assert set(np.unique(bins)) <= set(range(20))
    f, r = bins // 4, bins % 4
    for a in range(4):  # every gene of a higher frequency bin is at least as frequent
        assert n_cells[f == a].max() <= n_cells[f == a + 1].min()
    for a in range(5):  # within a frequency bin, rank bins are quantiles of the mean rank
        for b in range(3):
            assert rank[(f == a) & (r == b)].max() <= rank[(f == a) & (r == b + 1)].min()
        assert abs(np.sum(f == a) - 100) <= 1
    np.testing.assert_array_equal(bins, frequency_rank_bins(n_cells, rank, 5, 4))


def test_matched_p_equals_within_bin_permutations():
    """The exact matched p against a literal Monte Carlo: shuffle the score within bins, take the top k."""
    rng = np.random.default_rng(3)
    genes = np.array([f"g{i}" for i in range(300)])
    freq = rng.integers(1, 500, size=300)
    rank = rng.uniform(1, 96, size=300)
    bins = frequency_rank_bins(freq, rank, 4, 3)
    score = freq + rng.normal(0, 60, size=300)
    target = set(genes[np.argsort(-(freq + rng.normal(0, 80, size=300)))[:20]])
    k = 20
    top = genes[np.argsort(-score, kind="stable")[:k]]
    got = matched_overlap_p(top, target, dict(zip(genes, bins.tolist())))
    observed = len(set(top) & target)
    hits, draws = 0, 4000
    for _ in range(draws):
        permuted = score.copy()
        for b in np.unique(bins):
            idx = np.flatnonzero(bins == b)
            permuted[idx] = rng.permutation(score[idx])
        hits += len(set(genes[np.argsort(-permuted, kind="stable")[:k]]) & target) >= observed
    assert got["observed"] == observed
    assert got["p_value"] == pytest.approx(hits / draws, abs=0.03)
    sampled = matched_overlap_p(top, target, dict(zip(genes, bins.tolist())), permutations=4000, seed=1)
    assert sampled["p_value"] == pytest.approx(got["p_value"], abs=0.03)


def test_a_frequency_driven_overlap_is_significant_raw_but_not_matched():
    rng = np.random.default_rng(5)
    g = 2000
    freq = np.sort(rng.integers(1, 2000, size=g))[::-1]
    rank = 96 - 90 * freq / freq.max() + rng.normal(0, 3, size=g)
    ids = [f"ENSG{i:011d}" for i in range(g)]
    attention = pd.DataFrame(
        {"ensembl_id": ids, "symbol": "", "n_cells": freq, "rank_mean": rank, "attn_b": freq * rng.uniform(0.8, 1.2, g)}
    )
    de = pd.DataFrame({"ensembl_id": ids, "score": freq * rng.uniform(0.5, 1.5, g)})
    out = compare_de_attention(de, attention, ks=(20, 50), attention_column="attn_b", null_bins=(10, 5))
    for item in out["overlap"]:
        assert item["p_value"] < 1e-3  # frequency alone makes the raw overlap "significant"
        assert item["p_matched"] > 0.05
        assert item["expected_matched"] > item["expected"]
    assert out["overlap"][0]["p_value"] == pytest.approx(
        _hypergeom_sf(out["overlap"][0]["overlap"], g, 20, 20), rel=1e-9
    )


def test_frequency_warning_names_the_ranking():
    rng = np.random.default_rng(0)
    freq = rng.integers(1, 1000, size=400)
    df = pd.DataFrame(
        {"n_cells": freq, "attn_b": freq * 2.0, "key_score_b": rng.normal(size=400), "attn_norm_b": -freq}
    )
    rhos = frequency_correlations(df, ["attn_b", "key_score_b", "attn_norm_b"])
    assert rhos["attn_b"] == pytest.approx(1.0) and rhos["attn_norm_b"] == pytest.approx(-1.0)
    lines = frequency_warnings(rhos, where="unfrozen")
    assert len(lines) == 1 and lines[0].startswith("unfrozen: rankings that track detection frequency")
    assert "attn_b 1.00" in lines[0] and "key_score" not in lines[0] and "attn_norm" not in lines[0]
    assert frequency_warnings({"key_score_b": 0.1}) == []
    assert "even the controlled score" in frequency_warnings({"key_score_b": 0.9})[0]
