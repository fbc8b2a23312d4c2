"""The key score's empirical-Bayes fit and integrated gradients' completeness, against direct
computations: the share of genes shrunk by its definition, the degenerate fits said in words, the per-cell
gap percentiles by numpy, and the steps raised until the 95th percentile gap is below the threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.keygenes import SHRUNK_BY, shrunk_log_ratio


def test_share_shrunk_and_prior_variance_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    g = 600
    n = rng.integers(5, 400, g).astype(float)
    theta = rng.normal(0, 0.5, g)
    x = theta + rng.normal(0, 1.0, g) / np.sqrt(n)
    expected = np.ones(g)
    scores, fit = shrunk_log_ratio(2.0**x, expected, n, min_cells=5)
    tau2, s2 = fit["tau2"], fit["s2"]
    assert tau2 > 0 and s2 > 0
    shrunk = 0
    for w in n:  # B_g = tau^2 / (tau^2 + s^2 / n_g), a gene is shrunk when B_g < 0.9
        if tau2 / (tau2 + s2 / w) < 1 - SHRUNK_BY:
            shrunk += 1
    assert fit["share_shrunk"] == pytest.approx(shrunk / g)
    assert fit["note"] is None


def test_a_fit_without_noise_says_nothing_was_shrunk():
    g = 60
    n = np.repeat([10.0, 20.0, 40.0], g // 3)
    x = np.tile(np.linspace(-1, 1, g // 3), 3)  # the same spread at every n: no 1/n noise term
    scores, fit = shrunk_log_ratio(2.0**x, np.ones(g), n, min_cells=5, frequency_bins=1)
    assert fit["s2"] == pytest.approx(0.0, abs=1e-12)
    assert fit["share_shrunk"] == 0.0 and "no shrinkage" in fit["note"]
    np.testing.assert_allclose(scores, x - x.mean(), atol=1e-12)


def test_a_fit_without_spread_between_genes_says_the_ranking_is_empty():
    rng = np.random.default_rng(1)
    g = 400
    n = rng.integers(5, 50, g).astype(float)
    x = rng.normal(0, 1, g) / np.sqrt(n) * 3  # pure sampling noise, no gene differs
    _, fit = shrunk_log_ratio(2.0**x, np.ones(g), n, min_cells=5, frequency_bins=1)
    if fit["tau2"] == 0:
        assert fit["share_shrunk"] == 1.0 and "carries no information" in fit["note"]
    else:  # a small positive fit: most genes are shrunk hard
        assert fit["tau2"] < 0.01 and fit["share_shrunk"] > 0.9


@pytest.fixture(scope="module")
def ig_model():
    from tests.analysis.test_attention_engine import tiny_bert, v2_cells

    data = v2_cells(6, seed=5, lengths=(3, 14))
    data["label"] = [i % 2 for i in range(6)]
    return tiny_bert(3, layers=2, heads=2, hidden=16, init=0.2).to(torch.float64), data


def test_ig_gap_percentiles_and_steps_raised_until_below_the_threshold(ig_model):
    from pipeline.analysis.attribution import integrated_gradients, run_attribution
    from pipeline.tokenize.cells import Cells

    from tests.analysis.test_attention_engine import PAD, SPECIAL

    model, data = ig_model
    labels = np.asarray(data["label"])
    common = dict(pad_id=PAD, special_ids=SPECIAL, batch_size=4, dtype=torch.float64)
    once = integrated_gradients(model, Cells(data), labels, steps=2, **common)
    comp = once.completeness()
    gap = np.abs(once.cell_total["ig"] - once.ig_delta) / np.maximum(np.abs(once.ig_delta), 1e-12)
    assert comp["relative_gap_p95"] == pytest.approx(np.percentile(gap, 95))
    assert comp["relative_gap_median"] == pytest.approx(np.median(gap))
    # an unreachable threshold: steps double up to the cap, and the result says it did not converge
    r = run_attribution(
        model, Cells(data), labels, methods=("ig",), ig_steps=2, ig_max_steps=8, ig_gap_p95=0.0, **common
    )
    ig = r.meta["ig"]
    assert ig["steps_tried"] == [2, 4, 8] and ig["steps"] == 8 and ig["gap_converged"] is False
    assert ig["gap_p95_tried"][0] == pytest.approx(comp["relative_gap_p95"])
    # a threshold met at once: one try
    r = run_attribution(
        model, Cells(data), labels, methods=("ig",), ig_steps=2, ig_max_steps=8, ig_gap_p95=10.0, **common
    )
    assert r.meta["ig"]["steps_tried"] == [2] and r.meta["ig"]["gap_converged"] is True
