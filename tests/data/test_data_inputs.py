"""Reading raw counts: gene identifiers, n_counts, raw-count checks, filter_pass, on-disk layouts."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.data.counts import (
    check_raw_counts,
    filter_pass_mask,
    map_genes,
    open_counts,
    resolve_n_counts,
    strip_version,
)
from pipeline.data.dictionaries import GeneDictionaries
from pipeline.errors import InputError
from pipeline.tokenize.encode import tokenize_anndata

from tests._helpers_tokenize import tiny_counts_adata, tiny_vocabulary


@pytest.fixture(scope="module")
def vocab():
    raw = tiny_vocabulary(n_genes=40, seed=0)
    return raw, GeneDictionaries(raw["token"], raw["median"], raw["names"], raw["mapping"], "V1")


def test_strip_version():
    assert strip_version("ENSG00000141510.16") == "ENSG00000141510"
    assert strip_version("ENSMUSG00000059552.3") == "ENSMUSG00000059552"
    assert strip_version("TP53") == "TP53"


def test_map_genes_ensembl_index_with_versions_and_duplicates(vocab):
    raw, dicts = vocab
    genes = [g for g in raw["token"] if not g.startswith("<")]
    ids = [f"{g}.{i % 4 + 1}" for i, g in enumerate(genes)] + [genes[0], genes[1].lower(), "ENSG99999999999"]
    gm = map_genes(pd.DataFrame(index=ids), dicts)
    assert gm.column is None and gm.kind == "Ensembl IDs"
    assert gm.n_total == 43 and gm.n_mapped == 42 and gm.n_unique == 40 and gm.n_duplicates == 2
    assert gm.slots[40] == gm.slots[0] and gm.slots[41] == gm.slots[1] and gm.slots[42] == -1
    assert gm.unmapped_examples == ["ENSG99999999999"]


def test_map_genes_finds_symbol_column_when_index_is_numbers(vocab):
    _, dicts = vocab
    var = pd.DataFrame(
        {"gene_symbols": [f"GENE{i}" for i in range(40)], "n_cells": np.arange(40)}, index=[str(i) for i in range(40)]
    )
    gm = map_genes(var, dicts)
    assert gm.column == "gene_symbols" and gm.kind == "gene symbols" and gm.n_mapped == 40
    gm2 = map_genes(var, dicts, gene_id_column="gene_symbols")
    assert np.array_equal(gm.slots, gm2.slots)


def test_map_genes_errors(vocab):
    raw, dicts = vocab
    with pytest.raises(InputError, match="no var column 'nope'"):
        map_genes(pd.DataFrame(index=["a"]), dicts, gene_id_column="nope")
    numbers = pd.DataFrame({"n_cells": np.arange(30)}, index=[str(i) for i in range(30)])
    with pytest.raises(InputError, match="no gene-ID column") as exc:
        map_genes(numbers, dicts, source="x.h5ad")
    assert "--gene-id-column" in str(exc.value) and "\n" not in str(exc.value)
    genes = [g for g in raw["token"] if not g.startswith("<")]
    mouse = pd.DataFrame(index=genes[:10] + [f"Gm{i}" for i in range(30)])
    with pytest.raises(InputError) as exc:
        map_genes(mouse, dicts, source="m.h5ad")
    msg = str(exc.value)
    assert "only 10 of 40 genes (25.0%)" in msg and "'Gm0'" in msg and "wrong species or ID type" in msg


def test_resolve_n_counts():
    obs = pd.DataFrame({"total_counts": [5, 6], "ncounts": [7.0, 8.0], "x": ["a", "b"]})
    nc = resolve_n_counts(obs)
    assert nc.source == "obs['ncounts']" and nc.values.tolist() == [7.0, 8.0] and not nc.computed
    assert resolve_n_counts(obs, "total_counts").values.dtype.kind == "i"
    nc = resolve_n_counts(obs[["x"]])
    assert nc.computed and "computed from X" in nc.source
    with pytest.raises(InputError, match="no obs column 'umis'"):
        resolve_n_counts(obs, "umis")
    with pytest.raises(InputError, match="not numeric"):
        resolve_n_counts(obs, "x")
    with pytest.raises(InputError, match="missing values"):
        resolve_n_counts(pd.DataFrame({"n_counts": [1.0, np.nan]}))
    with pytest.raises(InputError, match="negative"):
        resolve_n_counts(pd.DataFrame({"n.umi": [1, -1]}))


def test_check_raw_counts():
    check_raw_counts(np.array([0, 1, 5], dtype=np.float32), source="f", where="X")
    check_raw_counts(np.array([0, 1, 5], dtype=np.int64), source="f", where="X")
    indptr = np.array([0, 2, 4])
    with pytest.raises(InputError, match=r"non-integer values \(e\.g\. .*0\.69.* in cell 1\).*log-normalised"):
        check_raw_counts(np.array([1, 2, 3, 0.693], dtype=np.float32), source="f", where="X", indptr=indptr)
    with pytest.raises(InputError, match="negative values .* in cell 7"):
        check_raw_counts(np.array([1, -2.0]), source="f", where="layer 'counts'", first_row=7, indptr=np.array([0, 2]))
    with pytest.raises(InputError, match="non-integer"):
        check_raw_counts(np.array([1.0, np.nan]), source="f", where="X")


def test_filter_pass_semantics():
    obs = pd.DataFrame({"filter_pass": [1, 0, 1.0, 2, np.nan]})
    assert filter_pass_mask(obs).tolist() == [True, False, True, False, False]
    assert filter_pass_mask(pd.DataFrame({"filter_pass": [True, False]})).tolist() == [True, False]
    assert filter_pass_mask(pd.DataFrame({"filter_pass": pd.Categorical([1, 0])})).tolist() == [True, False]
    assert filter_pass_mask(pd.DataFrame({"x": [1]})) is None


def test_on_disk_layouts_read_the_same_rows(tmp_path, vocab):
    raw, dicts = vocab
    adata = tiny_counts_adata(raw, n_cells=25, seed=1)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    p = tmp_path / "a.h5ad"
    adata.write_h5ad(p)
    dense = ad.AnnData(X=adata.layers["counts"].toarray(), obs=adata.obs, var=adata.var)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    csc = ad.AnnData(X=sp.csc_matrix(adata.layers["counts"]), obs=adata.obs, var=adata.var)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    expected = adata.layers["counts"].toarray()
    for src, layer in (
        (p, "counts"),
        (tmp_path / "dense.h5ad", None),
        (tmp_path / "csc.h5ad", None),
        (adata, "counts"),
        (dense, None),
    ):
        with open_counts(src, layer) as cm:
            assert cm.shape == (25, 40)
            got = np.vstack([cm.rows(a, min(25, a + 10)).toarray() for a in range(0, 25, 10)])
            assert np.array_equal(got, expected)
            assert list(cm.obs.index) == list(adata.obs_names)
            assert list(cm.obs["label"]) == list(adata.obs["label"])
    with pytest.raises(InputError, match="no layer 'raw'.*layers: counts"):
        open_counts(p, "raw")
    with pytest.raises(InputError, match="non-integer"):
        tokenize_anndata(p, dicts)  # X is log-normalised
    ds, _ = tokenize_anndata(p, dicts, layer="counts")
    ds2, _ = tokenize_anndata(tmp_path / "dense.h5ad", dicts)
    assert ds["input_ids"] == ds2["input_ids"]


def test_backed_anndata_is_read_in_chunks(tmp_path, vocab):
    raw, dicts = vocab
    adata = tiny_counts_adata(raw, n_cells=30, seed=2)
    adata.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    try:
        ds, _ = tokenize_anndata(backed, dicts, chunk_size=8)
    finally:
        backed.file.close()
    ds2, _ = tokenize_anndata(adata, dicts)
    assert ds["input_ids"] == ds2["input_ids"]


def test_zero_count_cells_and_cells_without_vocabulary_genes(vocab):
    raw, dicts = vocab
    adata = tiny_counts_adata(raw, n_cells=12, seed=3)
    X = adata.X.tolil()
    X[2, :] = 0
    X[5, :] = 0
    adata.X = X.tocsr()
    adata.X.eliminate_zeros()
    adata.obs.loc["c2", "n_counts"] = 0
    # cell 5 has counts elsewhere in the transcriptome (n_counts > 0) but none in the vocabulary
    ds, report = tokenize_anndata(adata, dicts)
    assert report.skipped_zero_count == 1 and report.skipped_no_genes == 1 and report.cells_out == 10
    assert "c2" not in ds["cell_id"] and "c5" not in ds["cell_id"]
    assert "1 zero-count cells skipped" in report.lines()[0]


def test_n_counts_computed_from_x_when_absent(vocab):
    raw, dicts = vocab
    adata = tiny_counts_adata(raw, n_cells=15, seed=4, n_counts=False)
    ds, report = tokenize_anndata(adata, dicts)
    assert report.n_counts_computed and "computed from X" in report.lines()[2]
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(np.int64)
    ds2, report2 = tokenize_anndata(adata, dicts)
    assert not report2.n_counts_computed and ds2["input_ids"] == ds["input_ids"]


def test_requested_obs_column_must_exist(vocab):
    raw, dicts = vocab
    adata = tiny_counts_adata(raw, n_cells=5)
    with pytest.raises(InputError, match="no obs column 'dose_uM'"):
        tokenize_anndata(adata, dicts, obs_columns=["label", "dose_uM"])
    with pytest.raises(InputError, match="clash"):
        tokenize_anndata(adata, dicts, obs_columns=["length"])


def test_chunks_bound_rows_and_entries(vocab):
    raw, _ = vocab
    adata = tiny_counts_adata(raw, n_cells=50, seed=5)
    with open_counts(adata) as cm:
        bounds = list(cm.chunks(max_rows=16, max_entries=100))
        assert bounds[0][0] == 0 and bounds[-1][1] == 50
        assert all(a < b and b - a <= 16 for a, b in bounds)
        assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds, bounds[1:]))
        indptr = adata.X.indptr
        assert all(indptr[b] - indptr[a] <= 100 or b - a == 1 for a, b in bounds)
    dense = ad.AnnData(X=adata.X.toarray(), obs=adata.obs, var=adata.var)
    with open_counts(dense) as cm:
        assert all(b - a <= 2 for a, b in cm.chunks(max_rows=16, max_entries=100))  # 40 genes a row


def test_a_loom_file_reads_as_the_same_counts(tmp_path):
    """`.loom` input: converted once into the cache, then read exactly as an .h5ad (anndata + loompy)."""
    pytest.importorskip("loompy")
    import anndata as ad
    import scipy.sparse as sp

    from pipeline.data.counts import loom_as_h5ad
    from pipeline.data.synth import make_sciplex_like

    adata = make_sciplex_like(scale=0.02, preset="thesis", seed=5)
    adata.uns.clear()
    loom = tmp_path / "cells.loom"
    adata.write_loom(loom)
    out = loom_as_h5ad(loom, tmp_path / "cache")
    assert out == loom_as_h5ad(loom, tmp_path / "cache")  # cached by content
    back = ad.read_h5ad(out)
    assert list(back.obs_names) == list(adata.obs_names) and list(back.var_names) == list(adata.var_names)
    assert (sp.csr_matrix(back.X) != sp.csr_matrix(adata.X)).nnz == 0
    assert list(back.obs["dose_value"]) == list(adata.obs["dose_value"])
