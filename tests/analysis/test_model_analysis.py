"""One unit of work per model: a model's analysis (attribution, deletion, cascade) is computed once per
pipeline run and read by every pair comparing it (`pipeline.run.driver.stage_model_analysis`).

That is only right if what the per-model analysis starts from is a function of the model and the cells
alone: here a model's columns of the gene table (attention received, norm attention, position control,
the empirical-Bayes key score) are the same, bit for bit, from its own one-model pass, as model a of one
pair and as model b of another. The end-to-end proof (two pairs, killed between them, resumed, identical
to a clean run) is in tests/run/test_pipeline_reproducible.py.
"""

from __future__ import annotations

import numpy as np
import torch

PAD, CLS, EOS = 0, 1, 2
VOCAB = 60
PER_MODEL = ("attn", "attn_scaled", "attn_per_cell", "attn_norm", "attn_expected", "attn_pos_ratio", "key_score")


def _bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.4,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def _cells(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = []
    for _ in range(n):
        k = int(rng.integers(5, 30))
        ids.append([CLS] + rng.choice(np.arange(3, VOCAB), k, replace=False).tolist() + [EOS])
    return {
        "input_ids": ids,
        "cell_id": [f"c{i}" for i in range(n)],
        "dose": ["high" if i % 3 else "low" for i in range(n)],
    }


def _genes(model_a, model_b, cells):
    from pipeline.analysis.attention import analyze_attention
    from pipeline.analysis.pair import gene_table

    result = analyze_attention(
        model_a, model_b, cells, pad_id=PAD, special_ids={CLS, EOS}, group_column="dose", batch_size=7
    )
    id_to_gene = {t: f"ENSG{t:011d}" for t in range(VOCAB)}
    return gene_table(result, id_to_gene).set_index("token_id").sort_index()  # the pair's rows: b's key order


def test_a_models_gene_columns_do_not_depend_on_the_pair():
    x, y, z = _bert(1), _bert(2), _bert(3)
    cells = _cells()
    own = _genes(x, None, cells)
    as_a = _genes(x, y, cells)  # x is model a of (x, y)
    as_b = _genes(z, x, cells)  # x is model b of (z, x)
    assert list(own.index) == list(as_a.index) == list(as_b.index)
    for stem in PER_MODEL:
        want = own[f"{stem}_a"].to_numpy(float)
        assert np.isfinite(want).any(), stem
        np.testing.assert_array_equal(as_a[f"{stem}_a"].to_numpy(float), want, err_msg=stem)
        np.testing.assert_array_equal(as_b[f"{stem}_b"].to_numpy(float), want, err_msg=stem)
    for shared in ("n_cells", "rank_mean", "rank_std"):
        np.testing.assert_array_equal(as_b[shared].to_numpy(float), own[shared].to_numpy(float), err_msg=shared)


def test_analysed_models_names_each_model_once_with_its_pairs():
    from pipeline.config import analysed_models, model_analysis_on

    cfg = {
        "analysis": {
            "pairs": [["frozen", "unfrozen"], ["frozen", "last-1"], ["unfrozen", "last-1"]],
            "attribution": [],
            "deletion": False,
            "sanity": True,
        }
    }
    assert analysed_models(cfg) == {
        "frozen": ["frozen vs unfrozen", "frozen vs last-1"],
        "unfrozen": ["frozen vs unfrozen", "unfrozen vs last-1"],
        "last-1": ["frozen vs last-1", "unfrozen vs last-1"],
    }
    assert model_analysis_on(cfg)
    cfg["analysis"]["sanity"] = False
    assert not model_analysis_on(cfg)
