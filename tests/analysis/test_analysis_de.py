"""Differential expression with scanpy's Wilcoxon, and its agreement with attention."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.pair import compare_de_attention, de_wilcoxon, load_reference_set, mark_reference_set
from pipeline.errors import InputError

PLANTED = [3, 17, 42, 77, 120]


def planted_adata(n_per_group: int = 60, n_genes: int = 200, seed: int = 0):
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, n_genes)
    n = 2 * n_per_group
    mu = np.tile(base, (n, 1))
    mu[:n_per_group, PLANTED] *= 6.0  # up in "high"
    counts = rng.poisson(mu * rng.uniform(0.5, 1.5, (n, 1)))
    obs = pd.DataFrame({"dose": ["high"] * n_per_group + ["low"] * n_per_group}, index=[f"cell{i}" for i in range(n)])
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    var = pd.DataFrame({"gene_symbol": [f"GENE{i}" for i in range(n_genes)]}, index=ids)
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def test_de_wilcoxon_finds_the_planted_genes():
    adata = planted_adata()
    de = de_wilcoxon(adata, "dose", "high", "low")
    assert list(de.columns) == ["ensembl_id", "symbol", "score", "logfoldchange", "pval", "pval_adj"]
    assert set(de["ensembl_id"].head(5)) == {f"ENSG{i:011d}" for i in PLANTED}
    assert (de["pval_adj"].head(5) < 1e-6).all() and (de["logfoldchange"].head(5) > 1.5).all()
    assert de["symbol"].iloc[0].startswith("GENE")
    assert adata.X.max() > 20  # the input keeps its raw counts


def test_de_maps_symbols_through_the_dictionaries():
    from pipeline.data.dictionaries import GeneDictionaries

    adata = planted_adata()
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    del adata.var["gene_symbol"]
    tokens = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i + 2 for i in range(adata.n_vars)}}
    dicts = GeneDictionaries(
        tokens,
        {k: 1.0 for k in tokens if not k.startswith("<")},
        name_to_id={f"GENE{i}": f"ENSG{i:011d}" for i in range(adata.n_vars)},
        version="V1",
    )
    de = de_wilcoxon(adata, "dose", "high", "low", dicts=dicts)
    assert set(de["ensembl_id"].head(5)) == {f"ENSG{i:011d}" for i in PLANTED}
    assert set(de["symbol"].head(5)) == {f"GENE{i}" for i in PLANTED}


def test_de_wilcoxon_rejects_bad_groups():
    adata = planted_adata(10, 130)
    with pytest.raises(InputError, match="no column 'nope'"):
        de_wilcoxon(adata, "nope", "high", "low")
    with pytest.raises(InputError, match="no cells labelled 'mid'"):
        de_wilcoxon(adata, "dose", "mid", "low")


def test_de_on_synthetic_sciplex_finds_p53_targets():
    from pipeline.data.synth import ground_truth, make_sciplex_like

    adata = make_sciplex_like(scale=0.05, preset="thesis", seed=0)
    dose = adata.obs["dose_value"].astype(float)
    adata = adata[(dose <= 2.5) | (dose >= 12.5)].copy()
    adata.obs["group"] = np.where(adata.obs["dose_value"].astype(float) >= 12.5, "high", "low")
    de = de_wilcoxon(adata, "group", "high", "low")
    truth = ground_truth(adata)["responding"]
    up = {g for g, d in zip(truth["ensembl_id"], truth["direction"]) if d == "up"}
    top = set(de["ensembl_id"].head(20))
    assert len(top & up) >= 8, sorted(top & up)


def _hypergeom_tail(o, N, K, n):
    return sum(math.comb(K, x) * math.comb(N - K, n - x) for x in range(o, min(K, n) + 1)) / math.comb(N, n)


def test_compare_de_attention_on_a_hand_made_case():
    genes = [f"G{i:02d}" for i in range(100)]
    de = pd.DataFrame({"ensembl_id": genes, "score": np.arange(100, 0, -1.0)})  # G00 most up
    # attention: G00, G01, G02 on top, then from the bottom of the DE ranking upwards
    order = ["G00", "G01", "G02"] + genes[:2:-1]
    att = pd.DataFrame(
        {
            "ensembl_id": order,
            "symbol": [g.lower() for g in order],
            "attn_b": np.linspace(10, 1, 100),
            "attn_a": np.ones(100),
        }
    )
    ref = {"G00", "G01", "g98", "G07"}
    out = compare_de_attention(de, att, background=genes, ks=(5, 10), reference_set=ref)
    assert out["attention_column"] == "attn_b" and out["background"] == 100
    k5, k10 = out["overlap"]
    assert (k5["k"], k5["overlap"]) == (5, 3) and k10["overlap"] == 3
    assert k5["genes"] == ["g00", "g01", "g02"]
    assert k5["p_value"] == pytest.approx(_hypergeom_tail(3, 100, 5, 5), rel=1e-9)
    assert k10["p_value"] == pytest.approx(_hypergeom_tail(3, 100, 10, 10), rel=1e-9)
    assert k5["expected"] == pytest.approx(0.25)
    # reference genes: G00, G01 (IDs), G98 (by symbol); G07 is in the set but not in the top attended
    assert k5["reference_in_top_attention"] == 3
    assert k5["reference_p_value"] == pytest.approx(_hypergeom_tail(3, 100, 4, 5), rel=1e-9)
    assert out["reference_set"]["in_background"] == 4
    assert att.set_index("ensembl_id").loc[["G00", "G98", "G07", "G50"], "in_reference_set"].tolist() == [1, 1, 1, 0]
    # Spearman over the shared genes: the attention order is mostly the reverse of DE
    assert out["spearman"]["n"] == 100 and out["spearman"]["rho"] < -0.8
    same = compare_de_attention(de, de.rename(columns={"score": "attn_a"}), ks=(10,))
    assert same["overlap"][0]["overlap"] == 10 and same["spearman"]["rho"] == pytest.approx(1.0)
    # the background restricts both rankings
    small = compare_de_attention(de, att, background=genes[50:], ks=(5,))
    assert small["background"] == 50 and small["overlap"][0]["overlap"] == 0


def test_load_reference_set_formats(tmp_path, shared):
    tsv = tmp_path / "ref.tsv"
    tsv.write_text("ensembl_id\tsymbol\nENSG1\tA\nENSG2\tB\n")
    assert load_reference_set(tsv) == {"ENSG1", "ENSG2"}
    plain = tmp_path / "ref.txt"
    plain.write_text("# p53 targets\nMDM2\nENSG9\ncdkn1a\n")
    assert load_reference_set(plain, symbol_to_id={"MDM2": "ENSG5"}) == {"ENSG5", "ENSG9", "cdkn1a"}
    df = pd.DataFrame({"ensembl_id": ["ENSG5", "ENSG7", "X"], "symbol": ["MDM2", "CDKN1A", ""]})
    assert mark_reference_set(df, load_reference_set(plain))["in_reference_set"].tolist() == [1, 1, 0]
    with pytest.raises(InputError):
        load_reference_set(tmp_path / "missing.tsv")
    fischer = load_reference_set(shared / "data/genesets/fischer2017_p53_targets_343.tsv")
    assert len(fischer) == 343 and "ENSG00000135679" in fischer  # MDM2
