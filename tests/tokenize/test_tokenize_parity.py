"""The vectorised rank-value encoding agrees with a straightforward per-cell one, and with
Geneformer's own arithmetic bit for bit."""

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.data.dictionaries import GeneDictionaries
from pipeline.paths import shared_dir
from pipeline.tokenize.encode import normalise_counts, rank_rows, tokenize_anndata

from tests._helpers_tokenize import (
    assert_same_ranking,
    load_raw_dicts,
    make_counts_adata,
    reference_for_adata,
    reference_gene_ids,
    reference_tokenize,
    tiny_counts_adata,
    tiny_vocabulary,
)


def _geneformer_dir():
    shared = shared_dir()
    if shared is None:
        pytest.skip("GFATTN_SHARED is not set: the parity tests need the real Geneformer dictionaries")
    gdir = shared / "geneformer"
    if not (gdir / "token_dictionary_gc104M.pkl").exists():
        pytest.skip(f"no Geneformer dictionaries under {gdir}")
    return gdir


@pytest.fixture(scope="module", params=["V1", "V2"])
def real(request):
    gdir = _geneformer_dir()
    version = request.param
    return version, load_raw_dicts(gdir, version), GeneDictionaries.from_geneformer_dir(gdir, version)


def _check(ds, ref, version):
    got = ds.to_dict()
    assert got["cell_id"] == [r[0] for r in ref]
    for k, (_cid, ids, full, values) in enumerate(ref):
        assert got["length"][k] == len(got["input_ids"][k])
        assert_same_ranking(got["input_ids"][k], ids, full, values, version)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "many-ties"])
def test_parity_with_per_cell_reference(real, ties):
    version, raw, dicts = real
    adata = make_counts_adata(raw, ties=ties, seed=11 if ties else 5)
    ds, report = tokenize_anndata(adata, dicts, obs_columns=["cell_type", "dose"], chunk_size=7)
    ref = reference_for_adata(adata, raw)
    _check(ds, ref, version)
    limit = 2048 if version == "V1" else 4096
    assert report.max_len == limit and report.length_max == limit  # the long cells were truncated
    assert report.truncated_cells >= (2 if version == "V2" else 3) - 1
    assert report.duplicates_summed == 25 and report.genes_total == 5175 and report.genes_mapped == 5025
    fp = adata.obs["filter_pass"].to_numpy()
    assert report.filter_pass_dropped == int((fp != 1).sum())
    assert report.cells_out == len(ref) == len(ds)
    # obs columns carried over, categorical as strings
    got = ds.select_columns(["cell_id", "cell_type", "dose"]).to_pandas().set_index("cell_id")
    obs = adata.obs.loc[got.index]
    assert list(got["cell_type"]) == [str(v) for v in obs["cell_type"]]
    assert np.array_equal(got["dose"].to_numpy(), obs["dose"].to_numpy())


def test_parity_dense_matrix_and_max_len(real):
    version, raw, dicts = real
    adata = make_counts_adata(raw, seed=2, n_cells=20, long_cells=(3000,), n_vocab_genes=3500, filter_pass=False)
    adata.X = adata.X.toarray()
    ds, report = tokenize_anndata(adata, dicts, max_len=300)
    _check(ds, reference_for_adata(adata, raw, max_len=300), version)
    assert report.length_max == 300


def test_parity_symbols_in_a_var_column(real):
    version, raw, dicts = real
    adata = make_counts_adata(raw, seed=4, n_cells=24, long_cells=(), n_dups=0, n_unmapped=10, n_versioned=0)
    id_to_symbol = {}
    for sym, gid in raw["names"].items():
        id_to_symbol.setdefault(gid, sym)
    symbols = [id_to_symbol.get(g.split(".")[0], g) for g in adata.var_names]
    adata.var["symbol"] = symbols
    adata.var_names = [f"row{i}" for i in range(adata.n_vars)]
    ds, report = tokenize_anndata(adata, dicts, gene_id_column="symbol")
    gene_ids = reference_gene_ids(symbols, raw)
    ref = reference_tokenize(
        adata.X,
        list(adata.obs_names),
        adata.obs["n_counts"].to_numpy(),
        gene_ids,
        raw,
        filter_pass=adata.obs["filter_pass"].to_numpy(),
    )
    _check(ds, ref, version)
    assert report.gene_ids.startswith("gene symbols in var['symbol']")
    # without naming the column, auto-detection finds it too
    ds2, _ = tokenize_anndata(adata, dicts)
    assert ds2["input_ids"] == ds["input_ids"]


def _geneformer_literal(adata, dicts, n_counts):
    """Geneformer's chunk expression and per-cell `argsort(-values)`, transcribed literally."""
    genes = list(adata.var_names)
    token = np.array([dicts.token_dict[g] for g in genes])
    norm_factor_vector = np.array([dicts.gene_median[g] for g in genes])
    X_norm = sp.csr_matrix(adata.X / n_counts[:, None] * 10_000 / norm_factor_vector)
    out = []
    for i in range(X_norm.shape[0]):
        v = X_norm[i].data
        order = np.argsort(-v)
        out.append((token[X_norm[i].indices][order], v[order]))
    return out


@pytest.mark.parametrize("n_counts_dtype", [np.float64, np.float32, np.int64])
def test_near_ties_break_exactly_as_geneformer(n_counts_dtype):
    """Genes whose values are equal on paper but differ in the last bits keep Geneformer's order."""
    raw = tiny_vocabulary(n_genes=60, seed=3)
    genes = [g for g in raw["token"] if not g.startswith("<")]
    base = 0.37
    for j, g in enumerate(genes):  # median proportional to a small integer: x / median collide on paper
        raw["median"][g] = base * (1 + j % 7) * (1 + 1e-15 * (j % 3))
    dicts = GeneDictionaries(raw["token"], raw["median"], None, raw["mapping"], "V1")
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(
        rng.integers(0, 8, size=(40, len(genes))).astype(np.float32) * (rng.random((40, len(genes))) < 0.6)
    )
    import anndata as ad
    import pandas as pd

    n_counts = (np.asarray(X.sum(axis=1)).ravel() * 1.7 + 3).astype(n_counts_dtype)
    adata = ad.AnnData(
        X=X, obs=pd.DataFrame({"n_counts": n_counts}, index=[f"c{i}" for i in range(40)]), var=pd.DataFrame(index=genes)
    )
    ds, _ = tokenize_anndata(adata, dicts)
    literal = _geneformer_literal(adata, dicts, adata.obs["n_counts"].to_numpy())
    ties_seen = 0
    for got, (tokens, values) in zip(ds["input_ids"], literal):
        assert len(got) == len(tokens)
        # same values in the same order; only exactly equal values may be permuted
        pos = {t: k for k, t in enumerate(tokens)}
        got_values = values[[pos[t] for t in got]]
        assert np.array_equal(got_values, values)
        ties_seen += int((np.diff(values) == 0).sum())
    assert ties_seen > 0


def test_normalisation_is_bitwise_geneformers():
    rng = np.random.default_rng(1)
    med = rng.lognormal(0, 1, 200)
    for xdt in (np.float32, np.float64, np.int32):
        for ndt in (np.float32, np.float64, np.int64):
            X = sp.random(30, 200, density=0.2, format="csr", random_state=2)
            X.data = np.ceil(X.data * 30)
            X = X.astype(xdt)
            n = (np.asarray(X.sum(axis=1)).ravel() * 2 + 1).astype(ndt)
            expected = sp.csr_matrix(X / n[:, None] * 10_000 / med)
            got = normalise_counts(X.data, X.indices, X.indptr, n, med)
            assert np.array_equal(got, expected.data), (xdt, ndt)
            dense = X.toarray()
            expected_dense = (dense / n[:, None] * 10_000 / med)[dense != 0]
            got_dense = normalise_counts(X.data, X.indices, X.indptr, n, med, sparse_arithmetic=False)
            assert np.array_equal(got_dense, expected_dense), (xdt, ndt)


def test_rank_rows_exact_for_adversarial_values():
    rng = np.random.default_rng(7)
    lengths = np.array([0, 1, 2, 5, 300, 1000, 17, 4000, 3])
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.lognormal(0, 2, indptr[-1])
    # neighbours in the last representable bits, exact ties, and equal values across rows
    for k in range(0, values.size - 2, 5):
        values[k + 1] = np.nextafter(values[k], np.inf)
    values[10:20] = 3.0
    keep = np.array([5, 5, 1, 5, 250, 2000, 17, 4000, 2])
    out_indptr, pos = rank_rows(values, indptr, keep)
    for r in range(lengths.size):
        a, b = indptr[r], indptr[r + 1]
        got = pos[out_indptr[r] : out_indptr[r + 1]]
        assert got.size == min(keep[r], lengths[r])
        assert ((got >= a) & (got < b)).all() and np.unique(got).size == got.size
        expected = np.sort(values[a:b])[::-1][: got.size]
        assert np.array_equal(values[got], expected)
    with pytest.raises(ValueError):
        rank_rows(np.array([1.0, -1.0]), np.array([0, 2]), np.array([2]))
    # all values equal: kept in position order
    out_indptr, pos = rank_rows(np.full(10, 2.5), np.array([0, 4, 10]), np.array([3, 6]))
    assert pos.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_rank_rows_in_row_groups(monkeypatch):
    """Chunks too large for the index bits are ranked in row groups; a long row stays whole."""
    import pipeline.tokenize.encode as tok

    rng = np.random.default_rng(8)
    lengths = np.array([7_000, 3, 0, 500, 900, 1])
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    values = np.round(rng.lognormal(0, 1, indptr[-1]), 3)  # plenty of exact ties
    values[100:200] = np.nextafter(values[99], 0)
    keep = np.array([4094, 2, 4094, 4094, 10, 1])
    monkeypatch.setattr(tok, "_MAX_RANK_ENTRIES", 1000)
    out_indptr, pos = rank_rows(values, indptr, keep)
    for r in range(lengths.size):
        a, b = indptr[r], indptr[r + 1]
        got = pos[out_indptr[r] : out_indptr[r + 1]]
        assert ((got >= a) & (got < b)).all()
        assert np.array_equal(values[got], np.sort(values[a:b])[::-1][: got.size])


def test_tiny_vocabulary_parity_without_shared_data():
    """Runs everywhere (no real dictionaries needed), V1 and V2 layouts."""
    for version in ("V1", "V2"):
        raw = tiny_vocabulary(n_genes=50, version=version, seed=9)
        dicts = GeneDictionaries(raw["token"], raw["median"], raw["names"], raw["mapping"], version)
        adata = tiny_counts_adata(raw, n_cells=40, seed=9)
        ds, report = tokenize_anndata(adata, dicts, max_len=12, chunk_size=16)
        gene_ids = reference_gene_ids(list(adata.var_names), raw)
        ref = reference_tokenize(
            adata.X, list(adata.obs_names), adata.obs["n_counts"].to_numpy(), gene_ids, raw, max_len=12
        )
        _check(ds, ref, version)
        assert report.length_max == 12
