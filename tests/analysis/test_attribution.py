"""Attribution scores against independent computations.

- Hao et al.'s self-attention attribution (streamed, through the registered attention function, from the
  gradient wrt the attention output) equals a direct computation: a hand-written float64 BERT forward per
  cell (no padding) whose layer-l attention probabilities are the leaf alpha A, differentiated with
  `torch.autograd`, A * mean_k dF/dA reduced by hand.
- Integrated gradients (Captum) is complete within 5% at 64 steps, its F(x) - F(baseline) is the plain
  model's, and its per-token values match a hand-written 400-point trapezoid integral.
- Rollout equals the product of the dense (0.5 mean_h A + 0.5 I) matrices of `output_attentions=True`,
  cell by cell without padding, while the streamed run pads every batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.attribution import (
    AttributionResult,
    attention_rollout,
    attribution_gene_table,
    attribution_records,
    hao_attribution,
    integrated_gradients,
    run_attribution,
)
from pipeline.tokenize.cells import Cells

from tests.analysis.test_attention_engine import CLS, EOS, PAD, SPECIAL, VOCAB, tiny_bert, v2_cells

STEPS = 5


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return tiny_bert(3, layers=3, heads=4, hidden=24, init=0.2).to(torch.float64)


@pytest.fixture(scope="module")
def data():
    d = v2_cells(7, seed=5, lengths=(3, 18))
    d["label"] = [i % 2 for i in range(7)]
    return d


def _manual_forward(model, ids, scale_layer=None, alpha=1.0):
    """BERT written out (float64, one unpadded cell); layer `scale_layer`'s probabilities are the leaf alpha A."""
    bert = model.bert
    x = bert.embeddings(input_ids=ids[None])
    L = ids.shape[0]
    leaf = probs = None
    for layer_idx, layer in enumerate(bert.encoder.layer):
        sa = layer.attention.self
        H, d = sa.num_attention_heads, sa.attention_head_size

        def heads(t, H=H, d=d):
            return t.view(1, L, H, d).transpose(1, 2)

        q, k, v = heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        if layer_idx == scale_layer:
            probs = a.detach()
            leaf = (alpha * probs).requires_grad_(True)
            a = leaf
        ctx = (a @ v).transpose(1, 2).reshape(1, L, H * d)
        att = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
        inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(att))
        x = layer.output.LayerNorm(layer.output.dense(inter) + att)
    pooled = torch.tanh(bert.pooler.dense(x[:, 0]))
    return model.classifier(pooled)[0], leaf, probs


def _direct_hao(model, data, steps):
    nl = model.config.num_hidden_layers
    H = model.config.num_attention_heads
    P = max(len(s) for s in data["input_ids"])
    rank = np.zeros((nl, H, P))
    gene = np.zeros((nl, H, VOCAB))
    head_max = np.zeros((nl, H))
    for seq, y in zip(data["input_ids"], data["label"]):
        ids = torch.tensor(seq)
        for layer in range(nl):
            grads = 0
            for kk in range(1, steps + 1):
                logits, leaf, probs = _manual_forward(model, ids, layer, kk / steps)
                (g,) = torch.autograd.grad(logits[y], leaf)
                grads = grads + g
            attr = (probs * grads / steps)[0]  # (H, L, L)
            col = attr.sum(1).detach().numpy()  # received by key j
            rank[layer, :, : len(seq)] += col
            for j, t in enumerate(seq):
                gene[layer, :, t] += col[:, j]
            head_max[layer] += attr.amax(dim=(1, 2)).detach().numpy()
    return rank, gene, head_max


def test_hao_equals_autograd_on_materialised_attention(model, data):
    got = hao_attribution(
        model,
        Cells(data),
        np.array(data["label"]),
        steps=STEPS,
        batch_size=3,
        alpha_batch=2,
        pad_id=PAD,
        special_ids=SPECIAL,
        dtype=torch.float64,
        block_elements=3 * 4 * 20 * 4,  # a few query rows per block: every layer is reduced in several blocks
    )
    rank, gene, head_max = _direct_hao(model, data, STEPS)
    scale = np.abs(rank).max()
    np.testing.assert_allclose(got.rank_sum["hao"], rank, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(got.gene_sum["hao"], gene, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(got.head_max_sum, head_max, rtol=1e-6, atol=1e-6 * np.abs(head_max).max())
    assert got.rank_count[: len(rank[0, 0])].sum() == sum(len(s) for s in data["input_ids"])
    # the true-class logit of the unscaled model
    logits = [_manual_forward(model, torch.tensor(s))[0][y].item() for s, y in zip(data["input_ids"], data["label"])]
    np.testing.assert_allclose(got.logit, logits, rtol=1e-9)


def _trapezoid_ig(model, seq, y, n=400):
    """IG by hand on the word embeddings: straight line from <pad>'s embedding, trapezoid rule, n intervals
    (all n + 1 points as one batch)."""
    ids = torch.tensor([seq])
    emb = model.bert.embeddings.word_embeddings
    x, b = emb(ids).detach(), emb(torch.full_like(ids, PAD)).detach()
    alphas = torch.linspace(0, 1, n + 1, dtype=torch.float64).view(-1, 1, 1)
    weights = torch.full((n + 1,), 1.0 / n, dtype=torch.float64)
    weights[[0, -1]] /= 2
    points = (b + alphas * (x - b)).requires_grad_(True)
    handle = emb.register_forward_hook(lambda m, i, o: points)
    try:
        logits = model(input_ids=ids.expand(n + 1, -1)).logits[:, y]
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.sum(), points)
    return ((x - b)[0] * (weights.view(-1, 1, 1) * g).sum(0)).sum(-1).numpy()


def test_integrated_gradients_complete_and_match_a_hand_integral(model, data):
    got = integrated_gradients(
        model, Cells(data), np.array(data["label"]), steps=64, internal_batch_size=50, batch_size=4,
        pad_id=PAD, special_ids=SPECIAL, dtype=torch.float64,
    )  # fmt: skip
    comp = got.completeness()
    assert comp["relative_gap_total"] < 0.05 and comp["relative_gap_max"] < 0.05
    # F(x) - F(baseline) from the plain model: baseline = <pad> at every position
    with torch.no_grad():
        for c, (seq, y) in enumerate(zip(data["input_ids"], data["label"])):
            ids = torch.tensor([seq])
            fx = model(input_ids=ids).logits[0, y].item()
            fb = model(input_ids=torch.full_like(ids, PAD)).logits[0, y].item()
            assert got.ig_delta[c] == pytest.approx(fx - fb, rel=1e-9, abs=1e-12)
    # per-token attributions against a hand-written trapezoid integral, cell by cell
    expected_rank = np.zeros(got.max_len)
    expected_gene = np.zeros(VOCAB)
    for seq, y in zip(data["input_ids"], data["label"]):
        per_token = _trapezoid_ig(model, seq, y)
        expected_rank[: len(seq)] += per_token
        np.add.at(expected_gene, seq, per_token)
    scale = np.abs(expected_rank).max()
    np.testing.assert_allclose(got.rank_sum["ig"], expected_rank, atol=2e-3 * scale)
    np.testing.assert_allclose(got.gene_sum["ig"], expected_gene, atol=2e-3 * scale)


def test_rollout_equals_dense_products(model, data):
    got = attention_rollout(
        model, Cells(data), None, cls_id=CLS, batch_size=4, pad_id=PAD, special_ids=SPECIAL, dtype=torch.float64,
        block_elements=4 * 4 * 20 * 3,
    )  # fmt: skip
    assert max(len(s) for s in data["input_ids"]) > min(len(s) for s in data["input_ids"])  # padded batches
    rank = np.zeros(got.max_len)
    gene = np.zeros(VOCAB)
    with torch.no_grad():
        for seq in data["input_ids"]:
            out = model.bert(input_ids=torch.tensor([seq]), output_attentions=True)
            L = len(seq)
            R = np.eye(L)
            for a in out.attentions:
                R = (0.5 * a[0].mean(0).numpy() + 0.5 * np.eye(L)) @ R
            rank[:L] += R[0]
            np.add.at(gene, seq, R[0])
    np.testing.assert_allclose(got.rank_sum["rollout"], rank, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.gene_sum["rollout"], gene, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.cell_total["rollout"], 1.0, rtol=1e-10)
    assert got.meta["rollout"]["has_cls"] and "<cls>" in got.meta["rollout"]["reads"]
    # V1 style: no <cls>; position 0 is the top-ranked gene, and the output says so
    v1 = {"input_ids": [s[1:-1] for s in data["input_ids"]]}
    r1 = attention_rollout(model, Cells(v1), None, cls_id=None, pad_id=PAD, dtype=torch.float64)
    assert not r1.meta["rollout"]["has_cls"] and "top-ranked gene" in r1.meta["rollout"]["reads"]


def test_run_attribution_writes_and_reads_back(model, data, tmp_path):
    from pipeline.data.dictionaries import GeneDictionaries
    from store import Store
    from store import results as R

    tokens = {"<pad>": PAD, "<cls>": CLS, "<eos>": EOS, "<mask>": VOCAB - 1}
    tokens.update({f"ENSG{t:011d}": t for t in range(3, VOCAB - 1)})
    dicts = GeneDictionaries(
        tokens, {g: 1.0 for g in tokens if not g.startswith("<")}, {f"G{t}": f"ENSG{t:011d}" for t in range(3, 40)}
    )
    data = {**data, "input_ids": [[t if t != VOCAB - 1 else 3 for t in s] for s in data["input_ids"]]}
    seen = []
    result = run_attribution(
        model,
        Cells(data, label_column="label"),
        dicts=dicts,
        hao_steps=2,
        ig_steps=8,
        batch_size=4,
        dtype=torch.float64,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert isinstance(result, AttributionResult) and result.methods == ("hao", "ig", "rollout")
    assert seen[-1] == (3 * 7, 3 * 7)
    table = attribution_gene_table(result, dicts.id_to_gene, dicts.id_to_symbol)
    assert not set(table["token_id"]) & {PAD, CLS, EOS}
    occ = result.gene_occ[table["token_id"]]
    np.testing.assert_allclose(table["ig_mean"], result.gene_sum["ig"][table["token_id"]] / occ)
    st = Store(tmp_path / "s.db")
    run = st.create_run("attribution test", kind=R.KIND_ANALYSIS)
    de = table[["ensembl_id", "symbol"]].assign(score=np.arange(len(table))[::-1].astype(float))
    records = attribution_records(result, dicts=dicts, model_name="last-1", de=de, min_cells=1)
    records.write(st, run)
    doc = records.json(R.json_attribution("last_1"))
    assert R.attribution_models(st, run) == ["last_1"]
    back = R.read_attribution(st, run, "last-1", genes=True)
    assert back.methods == ["hao", "ig", "rollout"]
    assert set(back.rank) == {"hao", "ig", "rollout"} and back.head_importance.shape == (3, 4)
    np.testing.assert_allclose(back.rank["rollout"], result.rank_mean("rollout"), rtol=1e-6)
    assert back.rank_lh_hao.shape == (3, 4, result.max_len)
    assert {"hao_mean", "ig_total", "rollout_pos_excess", "n_cells"} <= set(back.genes.columns)
    assert len(back.genes) == len(table)
    info = back.info
    assert info["completeness"]["n_cells"] == 7 and info["rollout"]["has_cls"]
    assert [(p["a"], p["b"]) for p in info["agreement"]["pairs"]] == [
        ("hao_mean", "ig_mean"),
        ("hao_mean", "rollout_mean"),
        ("ig_mean", "rollout_mean"),
    ]
    assert set(info["de"]) == {"hao", "ig", "rollout"} and doc["parameters"]["hao"]["steps"] == 2
