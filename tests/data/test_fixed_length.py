"""The fixed-length experiment: exactly N genes per cell, the top N of Geneformer's encoding, drops counted."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.dictionaries import GeneDictionaries
from pipeline.data.fixed_length import fix_length
from pipeline.tokenize.encode import tokenize_anndata

from tests._helpers_tokenize import tiny_counts_adata, tiny_vocabulary

N = 8


@pytest.fixture(scope="module", params=["V1", "V2"])
def tokenized(request):
    raw = tiny_vocabulary(n_genes=40, version=request.param, seed=3)
    dicts = GeneDictionaries(raw["token"], raw["median"], raw["names"], raw["mapping"], request.param)
    adata = tiny_counts_adata(raw, n_cells=30, seed=4, detected=(3, 25))
    ds, _ = tokenize_anndata(adata, dicts, obs_columns=["label"])
    return raw, dicts, adata, ds


def _expected_order(adata, raw, cell: str) -> list[int]:
    """Token ids of a cell's genes by x / n_counts * 10,000 / median, descending (independent of the tokenizer)."""
    i = list(adata.obs_names).index(cell)
    row = adata.X[i].toarray().ravel().astype(np.float64)
    genes = list(adata.var_names)
    value = row / float(adata.obs["n_counts"].iloc[i]) * 10_000 / np.array([raw["median"][g] for g in genes])
    nz = np.flatnonzero(row)
    order = nz[np.argsort(-value[nz], kind="stable")]
    return [raw["token"][genes[j]] for j in order], value


def test_top_keeps_exactly_the_top_n_genes(tokenized):
    raw, dicts, adata, ds = tokenized
    special = dicts.special_ids
    out, report = fix_length(ds, N, mode="top", special_ids=special)
    n_genes = [sum(t not in special for t in ids) for ids in ds["input_ids"]]
    short = [c for c, k in zip(ds["cell_id"], n_genes) if k < N]
    assert short, "the fixture must have cells with fewer than N genes"
    assert report.cells_in == len(ds) and report.cells_dropped == len(short)
    assert report.cells_out == len(out) == len(ds) - len(short)
    assert set(report.dropped_cell_ids) == set(short)
    assert set(out["cell_id"]) == set(ds["cell_id"]) - set(short)
    assert out.column_names == ds.column_names
    full = dict(zip(ds["cell_id"], ds["input_ids"]))
    for cell, ids, length in zip(out["cell_id"], out["input_ids"], out["length"]):
        genes = [t for t in ids if t not in special]
        assert len(genes) == N and length == len(ids)
        # the top N of Geneformer's encoding of the same cell ...
        assert genes == [t for t in full[cell] if t not in special][:N]
        # ... which are the N largest normalised values (ties may order either way)
        order, value = _expected_order(adata, raw, cell)
        tok_value = {raw["token"][g]: value[j] for j, g in enumerate(adata.var_names)}
        assert min(tok_value[t] for t in genes) >= max((tok_value[t] for t in order if t not in genes), default=-np.inf)
        if dicts.version == "V2":
            assert ids[0] == dicts.cls_id and ids[-1] == dicts.eos_id and len(ids) == N + 2
        else:
            assert len(ids) == N


def test_subsample_keeps_rank_order_and_is_seeded(tokenized):
    _raw, dicts, _adata, ds = tokenized
    special = dicts.special_ids
    a, ra = fix_length(ds, N, mode="subsample", seed=7, special_ids=special)
    b, _ = fix_length(ds, N, mode="subsample", seed=7, special_ids=special)
    c, _ = fix_length(ds, N, mode="subsample", seed=8, special_ids=special)
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    assert ra.cells_dropped == fix_length(ds, N, mode="top", special_ids=special)[1].cells_dropped
    full = dict(zip(ds["cell_id"], ds["input_ids"]))
    for cell, ids in zip(a["cell_id"], a["input_ids"]):
        genes = [t for t in ids if t not in special]
        original = [t for t in full[cell] if t not in special]
        assert len(genes) == N and len(set(genes)) == N
        positions = [original.index(t) for t in genes]
        assert positions == sorted(positions)  # relative rank order kept
        if dicts.version == "V2":
            assert ids[0] == dicts.cls_id and ids[-1] == dicts.eos_id


def test_bad_arguments(tokenized):
    ds = tokenized[3]
    with pytest.raises(ValueError, match="at least 1"):
        fix_length(ds, 0)
    with pytest.raises(ValueError, match="top, subsample"):
        fix_length(ds, 3, mode="random")
