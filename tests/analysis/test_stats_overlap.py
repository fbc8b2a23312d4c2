"""The DE overlap's statistics against independent computations: a direct loop over both directions, the
hypergeometric tail by counting, a Monte Carlo of random top-k sets, and Benjamini-Hochberg by its
definition."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.pair import benjamini_hochberg, compare_de_attention, overlap_q_values


def _tail(o, N, K, n):
    return sum(math.comb(K, x) * math.comb(N - K, n - x) for x in range(o, min(K, n) + 1)) / math.comb(N, n)


def _bh_by_definition(p):
    """q_(i) = min over j >= i of p_(j) m / j, capped at 1 (Benjamini and Hochberg 1995), as a plain loop."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    q = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(7)
    g = 300
    ids = [f"G{i:03d}" for i in range(g)]
    score = rng.normal(0, 3, g)
    # attention follows |DE| a little, and the score ranks only 240 genes (the rest: too few cells)
    attn = np.abs(score) * 0.5 + rng.normal(0, 1, g)
    attn[rng.choice(g, 60, replace=False)] = np.nan
    de = pd.DataFrame({"ensembl_id": ids, "symbol": [i.lower() for i in ids], "score": score})
    att = pd.DataFrame(
        {
            "ensembl_id": ids,
            "symbol": [i.lower() for i in ids],
            "key_score_b": attn,
            "n_cells": rng.integers(3, 200, g),
            "rank_mean": rng.uniform(1, 90, g),
        }
    )
    return de, att


def test_both_directions_equal_a_direct_loop_over_the_ranked_genes(tables):
    de, att = tables
    out = compare_de_attention(de, att, ks=(10, 25), attention_column="key_score_b", classes=("high", "low"))
    ranked = [e for e, v in zip(att["ensembl_id"], att["key_score_b"]) if not np.isnan(v)]
    N = len(ranked)
    assert out["population"] == N == 240 and out["background"] == 300
    key = dict(zip(att["ensembl_id"], att["key_score_b"]))
    top_at_all = sorted(ranked, key=lambda e: -key[e])
    score = dict(zip(de["ensembl_id"], de["score"]))
    keys = {"up": lambda e: -score[e], "down": lambda e: score[e], "either": lambda e: -abs(score[e])}
    labels = {d["direction"]: d["label"] for d in out["directions"]}
    assert labels == {"up": "up in high", "down": "up in low", "either": "either direction"}
    for block in out["directions"]:
        de_order = sorted(ranked, key=keys[block["direction"]])  # only genes the score ranks
        for item in block["overlap"]:
            k = item["k"]
            shared = set(de_order[:k]) & set(top_at_all[:k])
            assert item["overlap"] == len(shared)
            assert item["expected"] == pytest.approx(k * k / N)
            assert item["p_value"] == pytest.approx(_tail(len(shared), N, k, k), rel=1e-9)
            assert sorted(item["genes"]) == sorted(e.lower() for e in shared)
    # the headline `overlap` is the "up" direction
    assert [i["overlap"] for i in out["overlap"]] == [i["overlap"] for i in out["directions"][0]["overlap"]]


def test_hypergeometric_p_agrees_with_random_top_sets():
    """P(overlap >= o) under the null that the top k attended genes are any k of the N ranked genes."""
    rng = np.random.default_rng(3)
    N, k = 120, 15
    ids = [f"G{i}" for i in range(N)]
    de = pd.DataFrame({"ensembl_id": ids, "score": np.arange(N, 0, -1.0)})
    attn = np.r_[np.linspace(10, 9, 5), rng.uniform(0, 8, N - 5)]  # top DE genes G0..G4 lead attention
    att = pd.DataFrame({"ensembl_id": ids, "attn_b": attn})
    item = compare_de_attention(de, att, ks=(k,), attention_column="attn_b")["overlap"][0]
    top_de = set(ids[:k])
    draws = 20000
    in_top_de = np.isin(np.arange(N), [ids.index(g) for g in top_de])
    drawn = np.argsort(rng.random((draws, N)), axis=1)[:, :k]  # k of the N genes, uniformly, per draw
    p_mc = float(np.mean(in_top_de[drawn].sum(axis=1) >= item["overlap"]))
    se = math.sqrt(max(p_mc * (1 - p_mc), 1e-4) / draws)
    assert item["overlap"] >= 5
    assert abs(item["p_value"] - p_mc) < 4 * se + 1e-4, (item["p_value"], p_mc)


def test_markers_of_the_other_class_are_found_by_the_two_sided_overlap():
    """Key genes that are markers of the reference class: the one-sided overlap sees none of them, the
    overlap with genes up in the reference (named by its class) and with either direction finds them."""
    g = 400
    ids = [f"G{i:03d}" for i in range(g)]
    score = np.linspace(10, -10, g)  # G000.. up in "T cells", ..G399 up in "monocytes"
    de = pd.DataFrame({"ensembl_id": ids, "score": score})
    attn = np.zeros(g)
    attn[-25:] = np.arange(25, 0, -1)  # the key genes: the 25 genes most up in monocytes
    att = pd.DataFrame({"ensembl_id": ids, "key_score_b": attn})
    out = compare_de_attention(de, att, ks=(25,), attention_column="key_score_b", classes=("T cells", "monocytes"))
    by = {d["label"]: d["overlap"][0] for d in out["directions"]}
    assert by["up in T cells"]["overlap"] == 0 and by["up in T cells"]["p_value"] == pytest.approx(1.0)
    assert by["up in monocytes"]["overlap"] == 25 and by["up in monocytes"]["p_value"] < 1e-30
    assert by["either direction"]["overlap"] >= 12


def test_rest_reads_as_the_other_classes():
    de = pd.DataFrame({"ensembl_id": ["A", "B", "C", "D"], "score": [2.0, 1.0, -1.0, -2.0]})
    att = pd.DataFrame({"ensembl_id": ["A", "B", "C", "D"], "attn_b": [1.0, 2.0, 3.0, 4.0]})
    de.attrs["classes"] = ("B cells", "rest")
    de.attrs["cells"] = "training and validation cells"
    out = compare_de_attention(de, att, ks=(2,))
    assert [d["label"] for d in out["directions"]] == ["up in B cells", "up in the other classes", "either direction"]
    assert out["de_cells"] == "training and validation cells"


def test_benjamini_hochberg_equals_its_definition():
    rng = np.random.default_rng(11)
    p = np.r_[rng.uniform(0, 0.01, 5), rng.uniform(0, 1, 40)]
    np.testing.assert_allclose(benjamini_hochberg(p), _bh_by_definition(p.tolist()), rtol=1e-12)


def test_overlap_q_values_over_a_run_count_each_test_once(tables):
    de, att = tables
    doc = compare_de_attention(de, att, ks=(10, 25), attention_column="key_score_b", classes=("high", "low"))
    doc["by_column"] = {
        "key_score_b": compare_de_attention(de, att, ks=(10, 25), attention_column="key_score_b"),
        "attn_b": compare_de_attention(de, att.assign(attn_b=att["n_cells"]), ks=(10, 25), attention_column="attn_b"),
    }
    attribution = {
        "de": {
            "ig": compare_de_attention(de, att.assign(ig_mean=att["rank_mean"]), ks=(10,), attention_column="ig_mean")
        }
    }
    family = overlap_q_values({"de_overlap": doc, "attribution_x": attribution})
    # 2 columns x 3 directions x 2 k + ig's 3 directions x 1 k; the headline repeats key_score_b's tests
    assert family["n_tests"]["p_value"] == 2 * 3 * 2 + 3
    tests = {}
    for col, sub in doc["by_column"].items():
        for block in sub["directions"]:
            for item in block["overlap"]:
                tests[(col, block["direction"], item["k"])] = item
    for block in attribution["de"]["ig"]["directions"]:
        for item in block["overlap"]:
            tests[("ig", block["direction"], item["k"])] = item
    keys = list(tests)
    want = _bh_by_definition([tests[k]["p_value"] for k in keys])
    for key, q in zip(keys, want):
        assert tests[key]["q_value"] == pytest.approx(q, rel=1e-12)
        assert tests[key]["q_matched"] >= tests[key]["p_matched"] - 1e-15
    # the headline items carry the same q as the by_column copy of the same test
    for a, b in zip(doc["overlap"], doc["by_column"]["key_score_b"]["overlap"]):
        assert a["q_value"] == b["q_value"]


def test_a_k_that_takes_every_ranked_gene_is_not_tested(tables):
    """A top k at or above the number of genes the score ranks holds all of them (overlap p = 1 whatever the
    model): it is left out and named, never reported as a result."""
    de, att = tables
    out = compare_de_attention(de, att, ks=(10, 240, 500), attention_column="key_score_b", classes=("high", "low"))
    assert out["population"] == 240 and out["ks_not_tested"] == [240, 500]
    assert all([item["k"] for item in block["overlap"]] == [10] for block in out["directions"])
