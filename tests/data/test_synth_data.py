"""The synthetic sci-Plex-like generator: preset targets, planted biology, length confound, ground truth."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from pipeline.data import synth, synth_genes
from pipeline.errors import InputError

THESIS_SCALE = 0.3  # the embedded demo's size (~1,800 cells)
RAW_SCALE = 0.15


@pytest.fixture(scope="module")
def thesis():
    return synth.make_sciplex_like(scale=THESIS_SCALE, preset="thesis", seed=0)


@pytest.fixture(scope="module")
def thesis_no_confound():
    return synth.make_sciplex_like(scale=THESIS_SCALE, preset="thesis", length_effect=0.0, seed=0)


@pytest.fixture(scope="module")
def raw():
    return synth.make_sciplex_like(scale=RAW_SCALE, preset="raw", seed=0)


def _within(value, target, rel=0.10):
    return abs(value - target) <= rel * target


def test_layout_matches_scperturb_columns(thesis):
    a = thesis
    assert list(a.obs.columns) == [
        "perturbation",
        "dose_value",
        "dose_unit",
        "cell_line",
        "n_counts",
        "ngenes",
        "percent_mito",
        "percent_ribo",
    ]
    assert list(a.var.columns) == ["ensembl_id", "gene_symbol"]
    assert (a.var.index == a.var["ensembl_id"]).all() and a.var.index.is_unique
    assert all(len(g) == 15 and g.startswith("ENSG") for g in a.var.index)
    assert a.X.format == "csr" and a.X.dtype == np.int32 and a.X.has_canonical_format
    assert set(a.obs["perturbation"]) == {"control", "Nutlin"}
    assert (a.obs.loc[a.obs["perturbation"] == "control", "dose_value"] == 0).all()
    assert (a.obs.loc[a.obs["perturbation"] == "Nutlin", "dose_value"] > 0).all()
    assert a.obs["dose_value"].dtype == np.float64
    assert set(a.obs["dose_unit"]) == {"uM"} and set(a.obs["cell_line"]) == {"A549"}
    x = a.X
    np.testing.assert_array_equal(a.obs["n_counts"].to_numpy(), np.asarray(x.sum(axis=1)).ravel())
    np.testing.assert_array_equal(a.obs["ngenes"].to_numpy(), np.diff(x.indptr))
    mito = a.var["gene_symbol"].str.startswith("MT-").to_numpy()
    pm = 100 * np.asarray(x[:, mito].sum(axis=1)).ravel() / a.obs["n_counts"].to_numpy()
    np.testing.assert_allclose(a.obs["percent_mito"].to_numpy(), pm)
    assert 3 < a.obs["percent_mito"].median() < 10 and 7 < a.obs["percent_ribo"].median() < 16
    # every named gene is in the universe under its real ID
    for sym, eid in synth_genes.GENE_IDS.items():
        assert a.var.loc[eid, "gene_symbol"] == sym


@pytest.mark.parametrize("which,scale", [("thesis", THESIS_SCALE), ("raw", RAW_SCALE)])
def test_cells_per_dose_scale(which, scale, request):
    a = request.getfixturevalue(which)
    counts = a.obs["dose_value"].value_counts().sort_index()
    assert list(counts.index) == list(synth.DOSES_UM)
    assert list(counts) == [round(n * scale) for n in synth.CELLS_PER_DOSE]


def test_thesis_preset_targets(thesis):
    obs = thesis.obs
    assert thesis.n_vars == 5000
    assert _within(np.median(obs["ngenes"]), 680)
    assert _within(obs["ngenes"].max(), 1400)
    assert _within(np.median(obs["n_counts"]), synth.PRESETS["thesis"].median_umis)


def test_raw_preset_targets(raw):
    obs = raw.obs
    assert raw.n_vars == synth.PRESETS["raw"].n_genes
    assert _within(np.median(obs["ngenes"]), 2300)
    assert _within(np.median(obs["n_counts"]), 4200)


def test_deterministic_for_a_seed():
    a = synth.make_sciplex_like(scale=0.04, preset="thesis", seed=3)
    b = synth.make_sciplex_like(scale=0.04, preset="thesis", seed=3)
    c = synth.make_sciplex_like(scale=0.04, preset="thesis", seed=4)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert json.dumps(synth.ground_truth(a)) == json.dumps(synth.ground_truth(b))
    assert a.var.equals(c.var)  # the gene universe does not depend on the seed
    assert a.X.shape == c.X.shape and (a.X != c.X).nnz > 0


@pytest.mark.slow  # scanpy's import and numba compilation on a cold cache
def test_wilcoxon_recovers_planted_p53_targets(thesis):
    import scanpy as sc

    truth = synth.ground_truth(thesis)
    resp = truth["responding"]
    up = {e for e, d in zip(resp["ensembl_id"], resp["direction"]) if d == "up"}
    down = {e for e, d in zip(resp["ensembl_id"], resp["direction"]) if d == "down"}
    a = thesis[thesis.obs["dose_value"].isin([0.0, 0.25, 1.25, 2.5, 12.5, 25.0])].copy()
    a.obs["group"] = np.where(a.obs["dose_value"] >= 12.5, "high", "low")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sc.tl.rank_genes_groups(a, "group", groups=["high"], reference="low", method="wilcoxon")
    names = list(a.uns["rank_genes_groups"]["names"]["high"])
    assert sum(g in up for g in names[:10]) >= 9
    assert sum(g in down for g in names[-10:]) >= 8


def test_planted_fold_changes_are_in_the_data(thesis):
    """Pseudo-bulk log2 fold change at 25 uM vs vehicle tracks the planted saturation log2FC."""
    from scipy.stats import spearmanr

    truth = synth.ground_truth(thesis)
    resp = truth["responding"]
    x = thesis.X
    libs = np.asarray(x.sum(axis=1)).ravel()
    cols = thesis.var.index.get_indexer(resp["ensembl_id"])
    dose = thesis.obs["dose_value"].to_numpy()

    def cp10k(mask):
        return 1e4 * np.asarray(x[mask][:, cols].sum(axis=0)).ravel() / libs[mask].sum()

    observed = np.log2((cp10k(dose == 25.0) + 0.05) / (cp10k(dose == 0.0) + 0.05))
    planted = np.array(resp["log2fc"])
    assert spearmanr(observed, planted).statistic > 0.8
    assert np.all(np.sign(observed) == np.sign(planted))
    for sym, (lo, hi, _) in synth_genes.P53_TARGETS_UP.items():
        assert lo <= planted[resp["gene_symbol"].index(sym)] <= hi


def test_hill_response_saturates_between_12_5_and_25_um():
    r = synth.hill_response([0.0, 0.25, 2.0, 12.5, 25.0])
    assert r[0] == 0 and r[1] < 0.1 and math.isclose(r[2], 0.5) and r[3] > 0.9 and r[4] > 0.95


def test_length_confound_on(thesis):
    from scipy.stats import spearmanr

    obs = thesis.obs
    res = spearmanr(obs["dose_value"], obs["ngenes"])
    assert res.statistic < -0.3 and res.pvalue < 1e-6
    med = obs.groupby("dose_value")["ngenes"].median()
    # detected genes follow the viability factors (about 0.67 of vehicle at 25 uM)
    assert 0.6 < med[25.0] / med[0.0] < 0.74
    assert 0.78 < med[1.25] / med[0.0] < 0.92


def test_length_confound_off(thesis_no_confound):
    from scipy.stats import spearmanr

    obs = thesis_no_confound.obs
    res = spearmanr(obs["dose_value"], obs["ngenes"])
    assert res.pvalue > 0.05
    med = obs.groupby("dose_value")["ngenes"].median()
    overall = np.median(obs["ngenes"])
    for dose, n in obs["dose_value"].value_counts().items():
        if n >= 100:
            assert _within(med[dose], overall, 0.05)
    # the confound changes depth, not the preset's overall targets
    assert _within(overall, 680)


def test_ground_truth_survives_h5ad(tmp_path, thesis):
    import anndata as ad

    path = tmp_path / "s.h5ad"
    thesis.write_h5ad(path)
    back = ad.read_h5ad(path)
    before, after = synth.ground_truth(thesis), synth.ground_truth(back)
    assert json.dumps(before, sort_keys=True) == json.dumps(after, sort_keys=True)
    json.dumps(after, allow_nan=False)  # strict JSON: the store can keep it as is
    assert after["seed"] == 0 and after["preset"] == "thesis" and after["length_effect"] == 1.0
    assert after["hill"] == {
        "ec50_um": synth.EC50_UM,
        "hill_coefficient": synth.HILL_COEFFICIENT,
        "ec50_log_sd": synth.EC50_LOG_SD,
    }
    resp = after["responding"]
    assert len(resp["ensembl_id"]) == len(resp["log2fc"]) == len(resp["direction"]) == 39
    assert resp["gene_symbol"][:3] == ["CDKN1A", "TP53I3", "SPATA18"]
    assert after["cells"]["cell_id"] == list(thesis.obs_names)
    assert len(after["cells"]["response"]) == len(after["cells"]["phase"]) == thesis.n_obs
    assert (back.X != thesis.X).nnz == 0 and back.X.dtype == np.int32


def test_nb_sampler_matches_its_distribution():
    """Counts follow NB(mu, r): mean, variance mu + mu^2/r and P(0) = (1 + mu/r)^-r."""
    rng = np.random.default_rng(1)
    n = 40_000
    mu = np.array([0.02, 0.3, 1.5, 3.9, 4.1, 25.0])
    r = np.array([4.0, 0.6, 2.0, 1.0, 8.0, 3.0])
    w = mu / mu.sum()
    lib = np.full(n, mu.sum())
    f = np.ones((n, 1))
    x = synth._sample_counts(lib, np.zeros(n, dtype=np.int64), w, r, np.array([0]), f, rng).toarray()
    mean, var, p0 = x.mean(axis=0), x.var(axis=0), (x == 0).mean(axis=0)
    np.testing.assert_allclose(mean, mu, rtol=0.05, atol=0.003)
    np.testing.assert_allclose(var, mu + mu**2 / r, rtol=0.12, atol=0.003)
    np.testing.assert_allclose(p0, (1 + mu / r) ** -r, atol=0.01)


def test_expected_detected_genes_hit_targets():
    """The library solve puts each cell's expected detected genes on its target."""
    rng = np.random.default_rng(0)
    g = 2000
    w = rng.lognormal(0, 1.5, g)
    w /= w.sum()
    r = synth._dispersions(rng, g)
    target = np.array([100.0, 300.0, 600.0])
    v_idx = np.arange(10)
    f = np.array([[1.0] * 10, [4.0] * 10, [0.25] * 10])
    lib = synth._solve_library(target, np.zeros(3, dtype=np.int64), w, r, v_idx, f)
    mu = lib[:, None] * w[None, :]
    mu[:, v_idx] *= f
    np.testing.assert_allclose(synth._p_detected(mu, r[None, :]).sum(axis=1), target, rtol=2e-3)


def test_bad_arguments():
    with pytest.raises(InputError, match="preset"):
        synth.make_sciplex_like(scale=0.01, preset="nope")
    with pytest.raises(InputError, match="scale"):
        synth.make_sciplex_like(scale=0)
    with pytest.raises(InputError, match="length_effect"):
        synth.make_sciplex_like(scale=0.01, length_effect=-1)
    with pytest.raises(InputError, match="n_genes"):
        synth.make_sciplex_like(scale=0.01, n_genes=100)
    with pytest.raises(InputError, match="too small for preset 'thesis'"):
        synth.make_sciplex_like(scale=0.01, preset="thesis", n_genes=1000)
    with pytest.raises(InputError, match="not a directory"):
        synth.make_sciplex_like(scale=0.01, geneformer_dir="/nonexistent/geneformer")


def test_ground_truth_requires_truth():
    import anndata as ad

    with pytest.raises(InputError, match="gfattn_truth"):
        synth.ground_truth(ad.AnnData(np.zeros((2, 2))))
