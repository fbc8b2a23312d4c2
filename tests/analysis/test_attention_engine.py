"""The streaming attention engine equals the `output_attentions=True` computation, quantity by quantity.

Small random BERTs (3 layers, 4 heads, hidden 24, vocabulary 50) with V2-style <cls>/<eos> tokens, cells
of different lengths so that every batch is padded, and blocks of a few query rows so that every layer
is reduced over several blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.attention import AttentionResult, analyze_attention, naive_attention_reductions
from pipeline.analysis.pair import (
    cosine_grid,
    gene_expected,
    gene_total,
    rank_log_ratio,
    rank_pct_diff,
    rank_received,
    special_positions,
)

PAD, CLS, EOS = 0, 1, 2
VOCAB = 50
SPECIAL = {CLS, EOS}
ADDITIVE = AttentionResult._ADDITIVE + ("gene_pos_keys", "gene_pos_counts")


def tiny_bert(seed: int, *, cls="classifier", layers=3, heads=4, hidden=24, init=0.4, attn="eager"):
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        initializer_range=init,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = {"classifier": BertForSequenceClassification, "mlm": BertForMaskedLM, "base": BertModel}[cls](cfg)
    return model.eval()


def v2_cells(n: int = 11, seed: int = 0, lengths=(2, 30)):
    rng = np.random.default_rng(seed)
    ids, groups = [], []
    for i in range(n):
        k = int(rng.integers(*lengths))
        ids.append([CLS] + rng.choice(np.arange(3, VOCAB), k, replace=False).tolist() + [EOS])
        groups.append("high" if i % 3 else "low")
    return {"input_ids": ids, "cell_id": [f"c{i}" for i in range(n)], "dose": groups}


def assert_results_close(got: AttentionResult, want: AttentionResult, rtol: float):
    assert got.names == want.names and got.group_names == want.group_names
    for name in ADDITIVE:
        a, b = getattr(got, name), getattr(want, name)
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert a.shape == b.shape, name
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale + 1e-300, err_msg=name)


@pytest.fixture(scope="module")
def pair():
    return tiny_bert(1), tiny_bert(2)


def test_streaming_equals_output_attentions_float64(pair):
    torch.set_num_threads(2)
    data = v2_cells()
    kw = dict(pad_id=PAD, special_ids=SPECIAL, group_column="dose", batch_size=4, dtype=torch.float64)
    got = analyze_attention(*pair, data, block_elements=4 * 4 * 32 * 5, **kw)
    want = naive_attention_reductions(*pair, data, **kw)
    assert_results_close(got, want, rtol=1e-10)
    # attention differs between the two random models, and the cosine is a real comparison
    assert 0.0 < cosine_grid(got).min() and cosine_grid(got).max() < 0.99


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_streaming_equals_output_attentions_float32(pair, kernel):
    """float32, as analyses run; "numba" is the compiled CPU reduction that large blocks use."""
    data = v2_cells(seed=3)
    kw = dict(pad_id=PAD, special_ids=SPECIAL, group_column="dose", batch_size=3, dtype=torch.float32)
    got = analyze_attention(*pair, data, block_elements=700, kernel=kernel, **kw)
    want = naive_attention_reductions(*pair, data, **kw)
    assert_results_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("cls", ["base", "mlm"])
def test_one_model_and_other_heads(cls):
    model = tiny_bert(5, cls=cls, layers=2, heads=2, hidden=16)
    data = v2_cells(7, seed=4)
    kw = dict(pad_id=PAD, special_ids=SPECIAL, batch_size=4, dtype=torch.float64)
    got = analyze_attention(model, None, data, block_elements=64, **kw)
    want = naive_attention_reductions(model, None, data, **kw)
    assert got.n_models == 1 and got.cell_cosine is None
    assert_results_close(got, want, rtol=1e-10)


def test_norms_equal_kobayashi_materialised():
    """Kobayashi et al.'s ||alpha_ij f_h(x_j)|| and ||sum_h alpha^h_ij f_h(x_j)||, built as (B, H, L, L, D)."""
    model = tiny_bert(7, layers=2, heads=2, hidden=8).double()
    data = {"input_ids": [[5, 9, 3, 7, 11], [4, 8, 6]]}
    got = analyze_attention(model, None, data, pad_id=PAD, batch_size=2, dtype=torch.float64, block_elements=16)
    ids = torch.tensor([[5, 9, 3, 7, 11], [4, 8, 6, 0, 0]])
    mask = (ids != 0).long()
    torch.set_grad_enabled(False)
    out = model.bert(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    H, d = 2, 4
    for layer in range(2):
        alpha = out.attentions[layer]  # (B, H, L, L)
        x = out.hidden_states[layer]
        sa, so = model.bert.encoder.layer[layer].attention.self, model.bert.encoder.layer[layer].attention.output
        v = x @ sa.value.weight.T + sa.value.bias  # (B, L, H*d)
        f = torch.stack([v[..., h * d : (h + 1) * d] @ so.dense.weight[:, h * d : (h + 1) * d].T for h in range(H)], 1)
        vectors = alpha[..., None] * f[:, :, None, :, :]  # (B, H, L_i, L_j, D): alpha_ij f_h(x_j)
        per_head = vectors.norm(dim=-1)
        summed = vectors.sum(1).norm(dim=-1)
        for b, n in enumerate([5, 3]):
            np.testing.assert_allclose(
                got.cell_norm[0, b, layer], per_head[b, :, :n, :n].mean((1, 2)).detach().numpy(), rtol=1e-10
            )
            np.testing.assert_allclose(got.cell_norm_summed[0, b, layer], summed[b, :n, :n].mean().item(), rtol=1e-10)
        # attention received by position j weighted by ||f_h(x_j)||, summed over cells
        recv = (per_head * mask[:, None, :, None]).sum(2).sum(0)  # (H, L)
        np.testing.assert_allclose(got.rank_norm_sum[0, layer, :, :5], recv.detach().numpy(), rtol=1e-10, atol=1e-15)
    torch.set_grad_enabled(True)


def test_rank_and_gene_sums_by_hand(pair):
    """Per-rank and per-gene quantities recomputed cell by cell from `output_attentions=True`."""
    model_a, model_b = pair
    data = v2_cells(6, seed=8)
    got = analyze_attention(
        model_a,
        model_b,
        data,
        pad_id=PAD,
        special_ids=SPECIAL,
        group_column="dose",
        batch_size=4,
        dtype=torch.float64,
        block_elements=100,
    )
    P, V = got.max_len, VOCAB
    rank_sum = np.zeros((2, 3, 4, P))
    count = np.zeros(P)
    gene = np.zeros((2, V))
    cells, ranks, ranks2 = np.zeros(V), np.zeros(V), np.zeros(V)
    group_rank = {g: np.zeros(V) for g in ("high", "low")}
    group_n = {g: np.zeros(V) for g in ("high", "low")}
    cos = np.zeros((len(data["input_ids"]), 3, 4))
    for c, seq in enumerate(data["input_ids"]):
        ids = torch.tensor([seq])
        with torch.no_grad():
            att = [m.bert(input_ids=ids, output_attentions=True).attentions for m in (model_a, model_b)]
        n = len(seq)
        count[:n] += 1
        for m in range(2):
            for layer in range(3):
                col = att[m][layer][0].sum(1).numpy()  # (H, n): sum over query rows
                rank_sum[m, layer, :, :n] += col
                for j, tok in enumerate(seq):
                    gene[m, tok] += col[:, j].sum()
        for layer in range(3):
            a, b = att[0][layer][0].reshape(4, -1), att[1][layer][0].reshape(4, -1)
            cos[c, layer] = (torch.nn.functional.cosine_similarity(a, b, dim=-1)).numpy()
        for r, tok in enumerate(seq[1:-1], start=1):
            cells[tok] += 1
            ranks[tok] += r
            ranks2[tok] += r * r
            group_rank[data["dose"][c]][tok] += r
            group_n[data["dose"][c]][tok] += 1
    np.testing.assert_allclose(got.rank_sum, rank_sum, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.rank_count, count)
    curve_a, curve_b = rank_sum[0].sum((0, 1)) / count, rank_sum[1].sum((0, 1)) / count
    np.testing.assert_allclose(rank_received(got), [curve_a, curve_b], rtol=1e-10)
    np.testing.assert_allclose(rank_pct_diff(got), 100 * (curve_b - curve_a) / curve_a, rtol=1e-9)
    np.testing.assert_allclose(rank_log_ratio(got), np.log(curve_b / curve_a), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gene_total(got), gene, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.cell_cosine, cos, rtol=1e-10)
    gene_ids = [t for t in range(V) if t not in SPECIAL]
    np.testing.assert_allclose(got.gene_cells[gene_ids], cells[gene_ids])
    np.testing.assert_allclose(got.gene_rank_sum, ranks)
    np.testing.assert_allclose(got.gene_rank_sq, ranks2)
    assert got.group_names == ("high", "low")
    for g, name in enumerate(got.group_names):
        np.testing.assert_allclose(got.gene_group_rank_sum[g], group_rank[name])
        np.testing.assert_allclose(got.gene_group_occ[g], group_n[name])
    # <cls> sits at position 0 of every cell: marked as a special position and counted as special there
    assert special_positions(got)[0] == 0 and got.rank_special_count[0] == len(data["input_ids"])
    # the position-expected attention of a gene: sum over its occurrences of the mean at that position
    mean_curve = rank_sum.sum((1, 2)) / np.where(count > 0, count, 1)
    expected = np.zeros((2, V))
    for seq in data["input_ids"]:
        for j, tok in enumerate(seq):
            expected[:, tok] += mean_curve[:, j]
    np.testing.assert_allclose(gene_expected(got), expected, rtol=1e-10)


def test_blocks_bound_the_attention_alive(pair, monkeypatch):
    """No tensor of attention ever exceeds one block of query rows; `output_attentions` is never used."""
    import pipeline.analysis.attention as attention

    seen = []
    original = attention._block_probs

    def spy(q_block, key_t, *args):
        p = original(q_block, key_t, *args)
        seen.append(p.numel())
        return p

    monkeypatch.setattr(attention, "_block_probs", spy)
    data = v2_cells(8, seed=2, lengths=(20, 30))
    budget = 4 * 4 * 32 * 3  # B * H * L * 3 rows
    analyze_attention(*pair, data, pad_id=PAD, special_ids=SPECIAL, batch_size=4, block_elements=budget)
    L = 32
    assert seen and max(seen) <= budget and max(seen) < 4 * 4 * L * L


def test_shards_add_up_to_the_whole(pair):
    data = v2_cells(9, seed=6)
    kw = dict(pad_id=PAD, special_ids=SPECIAL, group_column="dose", batch_size=2, dtype=torch.float64)
    whole = analyze_attention(*pair, data, **kw)
    parts = [analyze_attention(*pair, data, shard=(r, 3), **kw) for r in range(3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert_results_close(merged, whole, rtol=1e-12)


def test_identical_models_give_cosine_one_and_leave_models_usable():
    model = tiny_bert(3, attn="sdpa")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    data = v2_cells(5, seed=1)
    got = analyze_attention(model, model, data, pad_id=PAD, special_ids=SPECIAL, batch_size=2)
    np.testing.assert_allclose(got.cell_cosine, 1.0, rtol=1e-6)
    np.testing.assert_allclose(got.cell_centre[0], got.cell_centre[1])
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(before, after)


def test_datasets_input_and_errors(pair, tmp_path):
    import datasets

    data = v2_cells(5, seed=9)
    ds = datasets.Dataset.from_dict({**data, "length": [len(s) for s in data["input_ids"]]})
    got = analyze_attention(*pair, ds, pad_id=PAD, special_ids=SPECIAL, group_column="dose", batch_size=2)
    assert list(got.cell_ids) == data["cell_id"]
    np.testing.assert_array_equal(got.lengths, [len(s) for s in data["input_ids"]])
    with pytest.raises(KeyError):
        analyze_attention(*pair, ds, pad_id=PAD, group_column="nope")
    other = tiny_bert(4, layers=2)
    with pytest.raises(ValueError, match="share a tokenization"):
        analyze_attention(pair[0], other, ds, pad_id=PAD)


def test_the_engine_never_imports_the_analysis():
    """attention.py produces sums; pipeline.analysis.pair derives from them (the arrow points one way)."""
    import json
    import subprocess
    import sys

    probe = "import json, sys, pipeline.analysis.attention; print(json.dumps('pipeline.analysis.pair' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False
    import pipeline.analysis.attention as attention

    assert not hasattr(attention.AttentionResult, "to_store") and not hasattr(
        attention.AttentionResult, "rank_received"
    )
