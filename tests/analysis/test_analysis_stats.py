"""Bootstrap confidence intervals and paired tests behave as statistics should."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.pair import (
    attention_statistics,
    benjamini_hochberg,
    bootstrap_ci,
    paired_sign_flip_test,
    wilcoxon_signed_rank,
)


def test_bootstrap_ci_covers_the_mean_with_the_expected_width():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 1.0, size=(400, 3, 2))
    mean, lo, hi = bootstrap_ci(x, n_boot=500, seed=1)
    np.testing.assert_allclose(mean, x.mean(0))
    assert np.all(lo < mean) and np.all(mean < hi)
    # normal theory: 2 * 1.96 * sd / sqrt(n)
    np.testing.assert_allclose(hi - lo, 2 * 1.96 / np.sqrt(400), atol=0.05)
    again = bootstrap_ci(x, n_boot=500, seed=1)
    np.testing.assert_array_equal(again[1], lo)
    constant = bootstrap_ci(np.full((30, 4), 3.0), n_boot=100)
    for arr in constant:
        np.testing.assert_allclose(arr, 3.0)


def test_bootstrap_weights_ignore_cells_without_the_position():
    values = np.array([[1.0, 10.0], [3.0, 0.0], [5.0, 0.0]])
    has = np.array([[1, 1], [1, 0], [1, 0]])
    mean, lo, hi = bootstrap_ci(values, n_boot=200, seed=0, weights=has)
    np.testing.assert_allclose(mean, [3.0, 10.0])
    assert lo[0] >= 1.0 and hi[0] <= 5.0
    # position 1 exists in one cell only: resamples without it are NaN and left out
    assert lo[1] == pytest.approx(10.0) and hi[1] == pytest.approx(10.0)


def test_paired_tests_identical_shifted_and_null():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2, 3))
    np.testing.assert_array_equal(paired_sign_flip_test(x, x, n_perm=300), 1.0)
    np.testing.assert_array_equal(wilcoxon_signed_rank(x, x), 1.0)
    shifted = x + 0.8 + rng.normal(0, 0.3, size=x.shape)
    assert np.all(paired_sign_flip_test(shifted, x, n_perm=500) <= 2 / 501)
    assert np.all(wilcoxon_signed_rank(shifted, x) < 1e-6)
    null = x + rng.normal(0, 1.0, size=x.shape)
    p = paired_sign_flip_test(null, x, n_perm=2000, seed=3)
    assert p.shape == (2, 3) and np.median(p) > 0.1
    np.testing.assert_array_equal(p, paired_sign_flip_test(null, x, n_perm=2000, seed=3))


def test_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    np.testing.assert_allclose(benjamini_hochberg(np.ones((2, 2))), 1.0)


def test_benjamini_hochberg_matches_the_step_up_definition_over_the_whole_grid():
    rng = np.random.default_rng(4)
    p = rng.uniform(size=(3, 5)) ** 3
    flat = p.ravel()
    n = flat.size
    ranked = np.sort(flat) * n / np.arange(1, n + 1)
    want = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)[np.argsort(np.argsort(flat))]
    np.testing.assert_allclose(benjamini_hochberg(p), want.reshape(p.shape), rtol=1e-12)


@pytest.mark.parametrize("n", [5, 12, 20, 80])
def test_wilcoxon_signed_rank_equals_scipy_feature_by_feature(n):
    """Zeros, ties and clean features side by side: each p-value is the one the feature alone gets."""
    import warnings

    from scipy.stats import wilcoxon

    rng = np.random.default_rng(n)
    d = rng.normal(size=(n, 6))
    d[:, 0] = 0.0  # no difference at all
    d[: n // 2, 1] = 0.0  # zeros
    d[:, 2] = np.round(d[:, 2] * 2) / 2  # ties (and zeros)
    d[1:, 3] = 0.0  # a single nonzero difference
    x = rng.normal(size=d.shape)
    got = wilcoxon_signed_rank(x + d, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diff = (x + d) - x
        want = [1.0 if not np.any(diff[:, f]) else wilcoxon(diff[:, f], zero_method="wilcox").pvalue for f in range(6)]
    np.testing.assert_array_equal(got, want)


def test_statistics_of_identical_and_different_models():
    import torch

    from pipeline.analysis.attention import analyze_attention

    from tests.analysis.test_attention_engine import PAD, SPECIAL, tiny_bert, v2_cells

    model = tiny_bert(11, layers=2, heads=2, hidden=16)
    data = v2_cells(12, seed=5)
    same = analyze_attention(model, model, data, pad_id=PAD, special_ids=SPECIAL, batch_size=4, dtype=torch.float64)
    stats = attention_statistics(same, n_boot=100, n_perm=200)
    for key in ("cosine", "cosine_lower", "cosine_upper"):
        np.testing.assert_allclose(stats[key], 1.0, rtol=1e-12)
    np.testing.assert_allclose(stats["cosine_std"], 0.0, atol=1e-12)
    np.testing.assert_array_equal(stats["p_value"], 1.0)
    np.testing.assert_array_equal(stats["p_value_norm"], 1.0)
    np.testing.assert_allclose(stats["norm_a"], stats["norm_b"])
    np.testing.assert_allclose(stats["rank_pct_diff"][~np.isnan(stats["rank_pct_diff"])], 0.0, atol=1e-9)

    other = tiny_bert(12, layers=2, heads=2, hidden=16)
    diff = analyze_attention(model, other, data, pad_id=PAD, special_ids=SPECIAL, batch_size=4)
    stats = attention_statistics(diff, n_boot=100, n_perm=200, seed=1)
    assert stats["cosine"].shape == (2, 2) and np.all(stats["cosine"] < 0.999)
    assert np.all(stats["cosine_lower"] <= stats["cosine"]) and np.all(stats["cosine"] <= stats["cosine_upper"])
    assert stats["norm_summed_a"].shape == (2,)
    assert stats["rank_received_a"].shape == (diff.max_len,)
    assert np.all((0 < stats["p_value"]) & (stats["p_value"] <= 1))
    assert np.all(stats["p_value_adj"] >= stats["p_value"])
