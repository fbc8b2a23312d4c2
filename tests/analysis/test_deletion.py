"""In-silico deletion (`pipeline.analysis.deletion`) against independent computations.

- A deletion equals the model run on a sequence built by hand without the deleted genes (V1: no special
  tokens; V2: `<cls>`/`<eos>` kept even when listed).
- The pooled, length-batched engine equals the unbatched reference loop, and cells without any of a set's
  genes are exactly unchanged.
- Matched random sets match the set bin by bin, never overlap it, stay inside the bins' frequency and rank
  ranges, fall back to the nearest bin as documented, and are reproducible.
- Single-gene effects count and average over the cells expressing the gene.
- Set deletion finds a planted gene: a classifier trained so that one token decides the class loses
  true-class probability when that token is deleted, more than for every matched random set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.deletion import (
    SET_COLUMNS,
    SINGLE_COLUMNS,
    DeletionEngine,
    delete_tokens,
    gene_frequency_rank,
    matched_random_sets,
    naive_set_effects,
    set_deletion,
    single_gene_effects,
)
from pipeline.analysis.keygenes import frequency_rank_bins
from pipeline.models.load import build_small_bert

PAD, CLS, EOS = 0, 1, 2
VOCAB = 60
GENES = np.arange(3, VOCAB)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def classifier(vocab: int = VOCAB, *, n_classes: int = 3, seed: int = 0, init: float = 0.3, hidden: int = 32):
    """A tiny Geneformer-style `BertForSequenceClassification` (build_small_bert's config), weights wide
    enough that deleting one gene moves the logits visibly."""
    from transformers import BertForSequenceClassification

    config = build_small_bert(vocab, layers=2, hidden=hidden, heads=2, intermediate=2 * hidden, max_len=64).config
    config.num_labels = n_classes
    config.initializer_range = init
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def make_cells(n: int, *, v2: bool, seed: int = 0, lengths=(4, 24), n_classes: int = 3):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(GENES) + 1) ** 0.7  # skewed: low gene ids are frequent
    p /= p.sum()
    ids = []
    for _ in range(n):
        k = int(rng.integers(*lengths))
        genes = rng.choice(GENES, size=k, replace=False, p=p).tolist()
        ids.append([CLS, *genes, EOS] if v2 else genes)
    labels = rng.integers(0, n_classes, n)
    return {"input_ids": ids, "label": labels.tolist()}


def unbatched_logits(model, seq) -> np.ndarray:
    ids = torch.tensor([list(seq)], dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double().numpy()


SETS = [
    np.array([3]),
    np.array([4, 9]),
    np.array([5, 6, 7, 8, 20, 33]),
    np.array([59]),
    np.array([], dtype=np.int64),
    np.array([CLS, EOS, 10]),
    np.array([3, 4, 5, 11, 12, 13, 14, 40, 41]),
]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_deletion_equals_model_on_hand_built_sequence(v2):
    model = classifier(seed=1)
    data = make_cells(12, v2=v2, seed=2)
    special = (CLS, EOS) if v2 else ()
    engine = DeletionEngine(model, data, data["label"], pad_id=PAD, special_ids=special, batch_size=5)
    for i, seq in enumerate(data["input_ids"]):
        np.testing.assert_allclose(engine.baseline[i], unbatched_logits(model, seq), atol=1e-5)
    deletions = [np.array([CLS, EOS, 3, 4]), np.array([5, 6, 7, 8, 9, 10])]
    effects = engine.effects(deletions)
    checked = 0
    for gone, effect in zip(deletions, effects):
        for i, seq in enumerate(data["input_ids"]):
            y = data["label"][i]
            by_hand = [t for t in seq if t not in set(gone.tolist()) or t in (CLS, EOS)]
            assert delete_tokens(np.array(seq), gone, special).tolist() == (
                by_hand if v2 else [t for t in seq if t not in set(gone.tolist())]
            )
            if v2:
                assert by_hand[0] == CLS and by_hand[-1] == EOS
            want = unbatched_logits(model, by_hand)[y] - unbatched_logits(model, seq)[y]
            assert effect.n_deleted[i] == len(seq) - len(by_hand)
            assert effect.affected[i] == (len(by_hand) < len(seq))
            np.testing.assert_allclose(effect.delta_logit[i], want, atol=1e-5)
            checked += int(effect.affected[i])
    assert checked >= 6


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_engine_equals_naive_loop(v2):
    model = classifier(seed=3)
    data = make_cells(15, v2=v2, seed=4)
    special = (CLS, EOS) if v2 else ()
    engine = DeletionEngine(model, data, None, pad_id=PAD, special_ids=special, batch_size=4)
    got = engine.effects(SETS)
    want = naive_set_effects(model, data, np.array(data["label"]), SETS, pad_id=PAD, special_ids=special)
    assert len(got) == len(want) == len(SETS)
    for g, w, s in zip(got, want, SETS):
        np.testing.assert_array_equal(g.affected, w.affected)
        np.testing.assert_array_equal(g.n_deleted, w.n_deleted)
        np.testing.assert_array_equal(g.correct_after, w.correct_after)
        np.testing.assert_allclose(g.delta_logit, w.delta_logit, atol=1e-5)
        np.testing.assert_allclose(g.delta_prob, w.delta_prob, atol=1e-5)
        assert g.delta_logit.dtype == np.float64 and g.delta_prob.dtype == np.float64
        assert np.all(g.delta_logit[~g.affected] == 0.0) and np.all(g.delta_prob[~g.affected] == 0.0)
        holds = np.array([bool(set(x) & (set(s.tolist()) - {CLS, EOS})) for x in data["input_ids"]])
        np.testing.assert_array_equal(g.affected, holds)
    assert got[4].affected.sum() == 0  # the empty set
    assert np.abs(got[2].delta_logit[got[2].affected]).max() > 1e-3  # the model is sensitive


def test_pool_runs_only_affected_pairs_longest_first():
    model = classifier(seed=5)
    data = make_cells(10, v2=True, seed=6)
    engine = DeletionEngine(model, data, data["label"], pad_id=PAD, special_ids=(CLS, EOS), batch_size=3)
    batches = list(engine.deleted_batches(SETS))
    effects = engine.effects(SETS)
    pairs = {(int(s), int(c)) for b in batches for s, c in zip(b[0], b[1])}
    affected = {(s, int(c)) for s, e in enumerate(effects) for c in np.flatnonzero(e.affected)}

    def removed(s, c):
        return set(SETS[s].tolist()) & set(data["input_ids"][c]) - {CLS, EOS}

    assert pairs <= affected and sum(len(b[0]) for b in batches) == len(pairs)
    for s, c in affected:  # each affected pair's sequence runs once, under the first set producing it
        first = min(t for t, d in affected if d == c and removed(t, c) == removed(s, c))
        assert (first, c) in pairs
    widths = [b[2].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True) and all(len(b[0]) <= 3 for b in batches)
    assert len({int(s) for b in batches[:2] for s in b[0]}) > 1  # sets share batches


def test_emptied_cell_is_nan_and_skipped():
    model = classifier(seed=7)
    data = {"input_ids": [[3, 4], [5, 6, 7]], "label": [0, 1]}
    engine = DeletionEngine(model, data, None, pad_id=PAD)
    (effect,) = engine.effects([np.array([3, 4, 5])])
    assert np.isnan(effect.delta_logit[0]) and not effect.correct_after[0] and effect.n_deleted[0] == 2
    assert np.isfinite(effect.delta_logit[1]) and effect.n_deleted[1] == 1


# ---------------------------------------------------------------------------- matched random sets
def _stats(n_genes=400, seed=0):
    rng = np.random.default_rng(seed)
    n_cells = rng.zipf(1.6, n_genes).clip(max=500).astype(np.int64)
    rank_mean = 200.0 / np.sqrt(n_cells) + rng.normal(0, 5, n_genes)
    rank_mean[rng.choice(n_genes, 5, replace=False)] = np.nan
    return n_cells, rank_mean


def test_frequency_rank_bins_quantiles_and_ties():
    n_cells, rank_mean = _stats()
    bins = frequency_rank_bins(n_cells, rank_mean, 4, 3)
    freq, rank = bins // 3, bins % 3
    assert set(np.unique(bins)) <= set(range(12))
    for f in range(3):  # frequency bins are ordered intervals and ties never split
        assert n_cells[freq == f].max() < n_cells[freq > f].min()
    for f in np.unique(freq):
        r = np.where(np.isnan(rank_mean), np.inf, rank_mean)
        for b in range(2):
            inside, above = r[(freq == f) & (rank == b)], r[(freq == f) & (rank > b)]
            if inside.size and above.size:
                assert inside.max() < above.min()
    for g in np.flatnonzero(np.isnan(rank_mean)):  # NaN mean rank: after every finite one
        assert rank[g] == rank[freq == freq[g]].max()
    np.testing.assert_array_equal(frequency_rank_bins(n_cells, rank_mean, 4, 3), bins)
    # equal-count bins without ties
    even = frequency_rank_bins(np.arange(100), np.zeros(100), 5, 1)
    np.testing.assert_array_equal(np.bincount(even), [20] * 5)


def test_matched_random_sets_match_bins():
    n_cells, rank_mean = _stats()
    bins = frequency_rank_bins(n_cells, rank_mean)
    rng = np.random.default_rng(1)
    gene_set = rng.choice(len(bins), 25, replace=False)
    exclude = np.setdiff1d(rng.choice(len(bins), 30, replace=False), gene_set)
    sets = matched_random_sets(gene_set, bins, 20, np.random.default_rng(7), exclude=exclude)
    assert len(sets) == 20
    want = np.bincount(bins[gene_set], minlength=25)
    for s in sets:
        assert len(np.unique(s)) == len(s) == len(gene_set)
        np.testing.assert_array_equal(np.bincount(bins[s], minlength=25), want)
        assert not set(s.tolist()) & set(gene_set.tolist()) and not set(s.tolist()) & set(exclude.tolist())
        for g in s:  # inside its bin's frequency and rank range
            members = np.flatnonzero(bins == bins[g])
            assert n_cells[members].min() <= n_cells[g] <= n_cells[members].max()
            r = np.where(np.isnan(rank_mean), np.inf, rank_mean)
            assert r[members].min() <= r[g] <= r[members].max()
    again = matched_random_sets(gene_set, bins, 20, np.random.default_rng(7), exclude=exclude)
    assert all(np.array_equal(a, b) for a, b in zip(sets, again))
    other = matched_random_sets(gene_set, bins, 20, np.random.default_rng(8), exclude=exclude)
    assert any(not np.array_equal(a, b) for a, b in zip(sets, other))
    assert len({tuple(s) for s in sets}) > 1


def test_matched_random_sets_fall_back_to_nearest_bin():
    # bins (f, r) with 2 rank bins: genes 0-2 in bin 4 = (2, 0); bin 5 = (2, 1) has one gene, bin 2 = (1, 0)
    # and bin 8 = (4, 0) plenty. A set of 3 genes of bin 4 leaves no gene of bin 4: all 3 come from bin 5
    # (same frequency bin) first, then from bin 2 (frequency distance 1 beats 2).
    bins = np.array([4, 4, 4, 5, 2, 2, 2, 2, 8, 8, 8, 8])
    for seed in range(5):
        (s,) = matched_random_sets(np.array([0, 1, 2]), bins, 1, seed, n_rank_bins=2)
        assert 3 in s.tolist() and sorted(bins[s].tolist()) == [2, 2, 5]
    with pytest.raises(ValueError):
        matched_random_sets(np.arange(7), bins, 1, 0, exclude=np.arange(7, 12), n_rank_bins=2)


def test_gene_frequency_rank():
    ids = [[CLS, 5, 7, 9, EOS], [CLS, 9, 5, EOS], [CLS, 11, EOS]]
    n_cells, rank_mean = gene_frequency_rank(ids, np.array([5, 7, 9, 11, 13]), special_ids=(CLS, EOS))
    np.testing.assert_array_equal(n_cells, [2, 1, 2, 1, 0])
    np.testing.assert_allclose(rank_mean[:4], [0.5, 1.0, 1.0, 0.0])
    assert np.isnan(rank_mean[4])


# ----------------------------------------------------------------------------------- summaries
def test_single_gene_effects_match_naive():
    model = classifier(seed=9)
    data = make_cells(14, v2=True, seed=10)
    engine = DeletionEngine(model, data, data["label"], pad_id=PAD, special_ids=(CLS, EOS), batch_size=8)
    tokens = np.array([3, 4, 17, 58, 59, CLS])
    table = single_gene_effects(engine, tokens, n_boot=50, seed=0)
    assert list(table.columns) == SINGLE_COLUMNS and table["token_id"].tolist() == tokens.tolist()
    naive = naive_set_effects(model, data, None, [[t] for t in tokens], pad_id=PAD, special_ids=(CLS, EOS))
    for row, t, ref in zip(table.itertuples(), tokens, naive):
        expressing = np.array([t in x for x in data["input_ids"]])
        assert row.n_cells_expressing == expressing.sum()
        if t == CLS or not expressing.any():
            assert np.isnan(row.delta_logit_mean) and np.isnan(row.delta_prob_mean)
            continue
        np.testing.assert_allclose(row.delta_logit_mean, ref.delta_logit[expressing].mean(), atol=1e-5)
        np.testing.assert_allclose(row.delta_prob_mean, ref.delta_prob[expressing].mean(), atol=1e-5)
        assert row.delta_logit_ci_low <= row.delta_logit_mean + 1e-12 <= row.delta_logit_ci_high + 2e-12
    assert table["n_cells_expressing"].iloc[0] > 0 and table["n_cells_expressing"].iloc[4] >= 0


@pytest.fixture(scope="module")
def planted():
    """A classifier trained on cells whose label is whether token X is among their genes."""
    x_token, vocab = 7, 40
    rng = np.random.default_rng(0)
    background = np.setdiff1d(np.arange(2, vocab), [x_token])
    ids, labels = [], []
    for i in range(96):
        genes = rng.choice(background, size=int(rng.integers(6, 14)), replace=False).tolist()
        y = i % 2
        if y:
            genes.insert(int(rng.integers(0, 3)), x_token)
        ids.append(genes)
        labels.append(y)
    torch.manual_seed(0)
    model = classifier(vocab, n_classes=2, seed=0, init=0.02, hidden=32)
    model.train()
    from pipeline.tokenize.batching import pad_batch

    batch, mask = pad_batch(ids, pad_token_id=PAD)
    y = torch.tensor(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(input_ids=batch, attention_mask=mask).logits, y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(input_ids=batch, attention_mask=mask).logits.argmax(1) == y).float().mean().item()
    return model, {"input_ids": ids, "label": labels}, x_token, vocab, accuracy


def test_set_deletion_finds_planted_gene(planted):
    model, data, x_token, vocab, accuracy = planted
    assert accuracy > 0.95
    engine = DeletionEngine(model, data, data["label"], pad_id=PAD, batch_size=32)
    candidates = np.arange(2, vocab)
    n_cells, rank_mean = gene_frequency_rank(data["input_ids"], candidates)
    bins = frequency_rank_bins(n_cells, rank_mean, 3, 2)
    rng = np.random.default_rng(3)
    others = rng.permutation(np.setdiff1d(candidates, [x_token]))
    rankings = {"planted": np.concatenate([[x_token], others]), "shuffled": others}
    ks, n_random = (1, 3), 9
    table = set_deletion(
        engine, rankings, ks, candidates=candidates, bins=bins, n_random=n_random, n_boot=50, seed=0, n_rank_bins=2
    )
    assert list(table.columns) == SET_COLUMNS
    assert len(table) == len(rankings) * len(ks) * (1 + n_random)
    top = table[table["set"] == "top"].set_index(["score", "k"])
    assert len(top) == 4 and (table["set"] != "top").sum() == 4 * n_random
    hit = top.loc[("planted", 1)]
    assert hit["n_genes"] == 1 and hit["n_cells_affected"] == sum(data["label"])
    assert hit["delta_prob_mean"] < -0.2 and hit["delta_logit_mean"] < 0
    assert hit["delta_prob_ci_low"] <= hit["delta_prob_mean"] <= hit["delta_prob_ci_high"]
    assert hit["p_empirical"] == pytest.approx(1 / (1 + n_random))
    assert hit["accuracy_after"] < hit["accuracy_before"] - 0.3
    assert hit["random_delta_prob_mean"] > hit["delta_prob_mean"]
    random = table[table["set"] != "top"]
    assert random["p_empirical"].isna().all() and random["random_delta_prob_mean"].isna().all()
    assert top["p_empirical"].between(1 / (1 + n_random), 1).all()
    # the random sets of (planted, 1) are matched to X's bin; the accuracy before is the model's
    assert (table[(table["score"] == "planted") & (table["k"] == 1)]["n_genes"] == 1).all()
    assert table["accuracy_before"].iloc[0] == pytest.approx(accuracy)
    # independent of the order of the scores (the same sets; values up to batch-composition rounding)
    flipped = set_deletion(
        engine,
        dict(reversed(list(rankings.items()))),
        ks,
        candidates=candidates,
        bins=bins,
        n_random=n_random,
        n_boot=50,
        seed=0,
        n_rank_bins=2,
    )
    key = ["score", "k", "set"]
    a = table.sort_values(key).reset_index(drop=True)
    b = flipped.sort_values(key).reset_index(drop=True)
    assert a[key + ["n_genes", "n_cells_affected"]].equals(b[key + ["n_genes", "n_cells_affected"]])
    numeric = [c for c in SET_COLUMNS if c not in key and c != "z_score"]
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), atol=1e-6)
    # the z-score divides by the random sets' spread, which rounding of the means can be large against
    np.testing.assert_allclose(a["z_score"].to_numpy(float), b["z_score"].to_numpy(float), rtol=1e-3)


def test_set_deletion_uses_matched_sets(planted):
    model, data, x_token, vocab, _ = planted
    engine = DeletionEngine(model, data, data["label"], pad_id=PAD, batch_size=32)
    candidates = np.arange(2, vocab)
    bins = frequency_rank_bins(*gene_frequency_rank(data["input_ids"], candidates), 3, 2)
    ranking = np.array([x_token, 12, 20])
    table = set_deletion(engine, {"s": ranking}, (3,), candidates=candidates, bins=bins, n_random=4, n_boot=20)
    from pipeline.analysis.deletion import set_rng

    sets = matched_random_sets(ranking - 2, bins, 4, set_rng(0, "s", 3), n_rank_bins=5)
    engine_rows = table[table["set"] != "top"]
    want = engine.effects([candidates[s] for s in sets])
    for row, effect in zip(engine_rows.itertuples(), want):
        assert row.n_cells_affected == effect.affected.sum()
        np.testing.assert_allclose(row.delta_prob_mean, effect.delta_prob.mean(), atol=1e-6)


def test_same_deleted_sequence_runs_once():
    model = classifier(seed=11)
    data = {"input_ids": [[3, 4, 5, 6], [7, 8, 9], [3, 9, 10]], "label": [0, 1, 2]}
    engine = DeletionEngine(model, data, None, pad_id=PAD, batch_size=2)
    sets = [np.array([3]), np.array([3, 50]), np.array([3, 7]), np.array([3, 4])]
    pairs = [(int(s), int(c)) for b in engine.deleted_batches(sets) for s, c in zip(b[0], b[1])]
    # cell 0: sets 0, 1, 2 remove just 3; cell 2: sets 0-3 remove just 3; cell 1: set 2 removes 7
    assert sorted(pairs) == [(0, 0), (0, 2), (2, 1), (3, 0)]
    got = engine.effects(sets)
    want = naive_set_effects(model, data, None, sets, pad_id=PAD)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.affected, w.affected)
        np.testing.assert_allclose(g.delta_logit, w.delta_logit, atol=1e-5)
    np.testing.assert_array_equal(got[0].delta_logit[[0, 2]], got[1].delta_logit[[0, 2]])
