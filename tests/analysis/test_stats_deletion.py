"""Deletion's statistics against independent computations: the empirical p and z-score by a direct loop
over the random sets, adaptive resolution as a continuation of the fixed-R draw, matching quality of the
random sets (tokens removed per cell, the read position) and Benjamini-Hochberg over a run's tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.deletion import (
    DeletionEngine,
    empirical_p,
    gene_frequency_rank,
    matched_random_sets,
    matching_features,
    nearest_matched_sets,
    set_deletion,
    set_rng,
)
from pipeline.analysis.deletion_report import deletion_q_values, p_text
from pipeline.analysis.keygenes import frequency_rank_bins

from tests.analysis.test_deletion import PAD, classifier, planted  # noqa: F401 - the same tiny classifier and its fixture


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted_engine(planted):
    """test_deletion's classifier trained to read token X as class 1, on its own cells."""
    model, data, x_token, vocab, _ = planted
    return DeletionEngine(model, data, data["label"], pad_id=PAD, batch_size=64), data, x_token, vocab


def _rows(table, score, k):
    sub = table[(table["score"] == score) & (table["k"] == k)]
    return sub[sub["set"] == "top"].iloc[0], sub[sub["set"] != "top"]


def test_empirical_p_and_z_equal_a_direct_loop(planted_engine):
    engine, data, x_token, vocab = planted_engine
    candidates = np.arange(2, vocab)
    n_cells, rank_mean = gene_frequency_rank(data["input_ids"], candidates)
    features = matching_features(n_cells, rank_mean)
    others = np.random.default_rng(2).permutation(np.setdiff1d(candidates, [x_token]))
    table = set_deletion(
        engine, {"shuffled": others}, (3,), candidates=candidates, features=features, n_random=15, n_boot=20
    )
    top, random = _rows(table, "shuffled", 3)
    means = random["delta_prob_mean"].to_list()
    hits = 0
    for m in means:  # a random set hurting at least as much as the top set counts against it
        if m <= top["delta_prob_mean"]:
            hits += 1
    assert top["p_empirical"] == pytest.approx((1 + hits) / (1 + len(means)))
    mean = sum(means) / len(means)
    sd = (sum((m - mean) ** 2 for m in means) / (len(means) - 1)) ** 0.5
    assert top["z_score"] == pytest.approx((top["delta_prob_mean"] - mean) / sd, rel=1e-9)
    assert top["n_random"] == 15 and not top["p_at_floor"]
    assert empirical_p(0.0, np.array([-1.0, 0.0, 1.0])) == (3 / 4, 2)


def test_adaptive_sets_continue_the_fixed_draw_until_p_leaves_its_floor(planted_engine):
    engine, data, x_token, vocab = planted_engine
    candidates = np.arange(2, vocab)
    n_cells, rank_mean = gene_frequency_rank(data["input_ids"], candidates)
    features = matching_features(n_cells, rank_mean)
    others = np.random.default_rng(2).permutation(np.setdiff1d(candidates, [x_token]))
    rankings = {"planted": np.r_[x_token, others], "shuffled": others}
    kw = dict(candidates=candidates, features=features, n_boot=20, seed=4)
    fixed = set_deletion(engine, rankings, (1,), n_random=9, **kw)
    adaptive = set_deletion(engine, rankings, (1,), n_random=9, max_random=50, **kw)
    top, random = _rows(adaptive, "planted", 1)
    # deleting X hurts more than any single matched gene: p stays at its floor, R doubles up to the cap
    assert top["p_at_floor"] and top["n_random"] == 50 and len(random) == 50
    assert top["p_empirical"] == pytest.approx(1 / 51)
    assert p_text(top.to_dict()).startswith(" p<=1/51")
    # the first 9 random sets are the fixed run's (same generator, continued), so are their effects
    f_top, f_random = _rows(fixed, "planted", 1)
    np.testing.assert_allclose(random["delta_prob_mean"].to_numpy()[:9], f_random["delta_prob_mean"].to_numpy())
    assert f_top["p_empirical"] == pytest.approx(1 / 10) and f_top["n_random"] == 9
    # a test off its floor is not extended
    s_top, s_random = _rows(adaptive, "shuffled", 1)
    if not _rows(fixed, "shuffled", 1)[0]["p_at_floor"]:
        assert s_top["n_random"] == 9 and len(s_random) == 9
    # the same seed gives the same table (a resumed run stores the same values)
    again = set_deletion(engine, rankings, (1,), n_random=9, max_random=50, **kw)
    assert again[["score", "k", "set", "n_genes"]].equals(adaptive[["score", "k", "set", "n_genes"]])
    np.testing.assert_allclose(again["delta_prob_mean"], adaptive["delta_prob_mean"], atol=1e-9)


def test_nearest_matching_is_finer_than_bins_and_reproducible():
    rng = np.random.default_rng(5)
    g = 1400
    # most genes in a cell or two, a long tail up to 100 cells: quantile bins lump the tail together
    n_cells = np.minimum(rng.zipf(1.6, g), 100)
    rank_mean = rng.uniform(0, 90, g)
    top = np.argsort(-n_cells, kind="stable")[:20]
    features = matching_features(n_cells, rank_mean)
    near = nearest_matched_sets(top, features, 30, set_rng(0, "s", 20), pool=10)
    bins = frequency_rank_bins(n_cells, rank_mean, 5, 5)
    binned = matched_random_sets(top, bins, 30, np.random.default_rng(0))
    want = n_cells[top].sum()
    err_near = np.mean([abs(n_cells[s].sum() - want) for s in near]) / want
    err_bins = np.mean([abs(n_cells[s].sum() - want) for s in binned]) / want
    assert err_near < 0.25 and err_near < err_bins / 2, (err_near, err_bins)
    for s in near:
        assert len(s) == 20 and len(set(s)) == 20 and not set(s) & set(top.tolist())
    again = nearest_matched_sets(top, features, 30, set_rng(0, "s", 20), pool=10)
    assert all(np.array_equal(a, b) for a, b in zip(near, again))
    # drawing 10 then 20 more from one generator gives the 30 of one call
    gen = set_rng(0, "s", 20)
    split = nearest_matched_sets(top, features, 10, gen, pool=10) + nearest_matched_sets(
        top, features, 20, gen, pool=10
    )
    assert all(np.array_equal(a, b) for a, b in zip(near, split))


def test_random_sets_remove_the_read_position_as_often_as_the_top_set():
    """V1 cells (no <cls>): the classifier reads the first gene. A top set of genes that often sit first is
    matched by random genes that sit first about as often, and tokens removed per cell are matched too."""
    rng = np.random.default_rng(1)
    vocab = 120
    genes = np.arange(2, vocab)
    firsts = genes[:10]  # these genes sit at the first position of most cells
    ids = []
    for _ in range(300):
        rest = rng.choice(genes[10:], size=int(rng.integers(8, 20)), replace=False).tolist()
        ids.append([int(rng.choice(firsts))] + rest)
    labels = rng.integers(0, 2, len(ids))
    engine = DeletionEngine(classifier(vocab, n_classes=2, seed=3), {"input_ids": ids}, labels, pad_id=PAD)
    assert np.isin(engine.read_tokens, firsts).all()
    n_cells, rank_mean = gene_frequency_rank(ids, genes)
    read = engine.read_tokens
    n_read = np.bincount(read, minlength=vocab)[genes]
    features = matching_features(n_cells, rank_mean, n_read)
    ranking = np.r_[firsts[:3], genes[10:]]
    table = set_deletion(
        engine, {"s": ranking}, (3,), candidates=genes, features=features, n_random=20, n_boot=10, seed=0
    )
    top, random = _rows(table, "s", 3)
    # direct: the share of cells whose first token is in the set
    direct = np.mean([ids[c][0] in set(firsts[:3].tolist()) for c in range(len(ids))])
    assert top["read_removed"] == pytest.approx(direct)
    assert top["random_read_removed"] == pytest.approx(random["read_removed"].mean())
    assert abs(top["random_read_removed"] - top["read_removed"]) < 0.15
    assert abs(top["random_tokens_per_cell"] - top["tokens_per_cell"]) < 0.15 * top["tokens_per_cell"]
    # bins alone (frequency x rank) would draw mostly genes that never sit first
    bins = frequency_rank_bins(n_cells, rank_mean, 5, 5)
    binned = set_deletion(engine, {"s": ranking}, (3,), candidates=genes, bins=bins, n_random=20, n_boot=10)
    assert _rows(binned, "s", 3)[0]["random_read_removed"] < top["random_read_removed"]


def test_special_tokens_are_never_deleted_nor_read():
    cls, eos = 2, 3
    ids = [[cls, 5, 6, 7, eos], [cls, 6, 8, eos], [cls, 9, eos]]
    engine = DeletionEngine(
        classifier(20, n_classes=2), {"input_ids": ids}, [0, 1, 0], pad_id=PAD, special_ids=(cls, eos)
    )
    assert (engine.read_tokens == -1).all()
    (effect,) = engine.effects([np.array([cls, eos, 6])])
    np.testing.assert_array_equal(effect.n_deleted, [1, 1, 0])


def test_deletion_q_values_over_both_models_equal_bh(tmp_path):
    from pipeline.analysis.deletion_report import adjust_deletion_family
    from pipeline.analysis.pair import benjamini_hochberg
    from store import Store
    from store import results as R

    p = [0.001, 0.04, 0.3, 0.02, 0.9, 0.01]
    rows = [{"score": "s", "k": k, "p_empirical": v} for k, v in enumerate(p)]
    assert deletion_q_values(rows) == 6
    np.testing.assert_allclose([r["q_value"] for r in rows], benjamini_hochberg(np.array(p)))
    st = Store(tmp_path / "s.db")
    rid = st.create_run("a", "analysis", {})
    st.put_json(rid, R.json_deletion("frozen"), {"model": "frozen", "sets": [dict(r) for r in rows[:3]]})
    st.put_json(rid, R.json_deletion("unfrozen"), {"model": "unfrozen", "sets": [dict(r) for r in rows[3:]]})
    family = adjust_deletion_family(st, rid)
    assert family["n_tests"] == 6
    got = [r["q_value"] for m in ("frozen", "unfrozen") for r in st.get_json(rid, R.json_deletion(m))["sets"]]
    np.testing.assert_allclose(got, benjamini_hochberg(np.array(p)))
    assert st.get_json(rid, R.json_deletion("frozen"))[R.FIELD_MULTIPLICITY]["n_tests"] == 6


def test_keep_read_position_never_deletes_the_first_gene():
    """Without <cls> the classifier reads the first gene; with `keep_read_position` no set removes it, and
    every other occurrence is deleted as usual: a direct loop builds the same sequences."""
    from tests.analysis.test_deletion import unbatched_logits

    rng = np.random.default_rng(4)
    ids = [rng.choice(np.arange(2, 30), size=int(rng.integers(3, 10)), replace=False).tolist() for _ in range(25)]
    labels = rng.integers(0, 2, len(ids))
    model = classifier(30, n_classes=2, seed=5)
    engine = DeletionEngine(model, {"input_ids": ids}, labels, pad_id=PAD, keep_read_position=True)
    assert (engine.read_tokens == -1).all()
    gene_set = np.array([ids[0][0], ids[1][0], ids[2][-1], 5, 6])
    (effect,) = engine.effects([gene_set])
    for c, seq in enumerate(ids):
        kept = [seq[0]] + [t for t in seq[1:] if t not in set(gene_set.tolist())]
        assert effect.n_deleted[c] == len(seq) - len(kept)
        if len(kept) < len(seq):
            y = int(labels[c])
            want = unbatched_logits(model, kept)[y] - unbatched_logits(model, seq)[y]
            assert effect.delta_logit[c] == pytest.approx(want, abs=1e-5)
        else:
            assert effect.delta_logit[c] == 0.0
