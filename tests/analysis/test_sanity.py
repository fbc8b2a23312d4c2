"""Sanity checks of key-gene scores (pipeline.analysis.sanity): the randomisation cascade and the score comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from pipeline.analysis.sanity import cascade_steps, compare_scores, randomisation_cascade, reinitialise

from tests._helpers_model import class_coded_cells, toy_dictionaries


def _classifier(layers=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=202,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


def test_steps_go_from_the_head_down_and_reinitialise_only_their_modules():
    model = _classifier(layers=3)
    assert [label for label, _ in cascade_steps(model)] == ["head", "layer 2", "layer 1", "layer 0", "embeddings"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialise(cascade_steps(model)[1][1], std=0.02, seed=7)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("bert.encoder.layer.2.") for k in changed)
    assert all(torch.all(after[k] == 1) for k in changed if k.endswith("LayerNorm.weight"))
    # the same seed draws the same weights
    other = _classifier(layers=3, seed=1)
    reinitialise(cascade_steps(other)[1][1], std=0.02, seed=7)
    a = model.bert.encoder.layer[2].attention.self.query.weight
    b = other.bert.encoder.layer[2].attention.self.query.weight
    assert torch.equal(a, b) and a.std().item() == pytest.approx(0.02, rel=0.2)


def test_compare_scores_is_spearman_and_top_n_jaccard():
    rng = np.random.default_rng(0)
    idx = [f"g{i}" for i in range(120)]
    trained = pd.DataFrame({"n_cells": rng.integers(1, 50, 120), "s": rng.normal(size=120)}, index=idx)
    other = pd.DataFrame({"s": trained["s"] + rng.normal(0, 1, 120)}, index=idx)
    got = compare_scores(trained, other, min_cells=10, top_n=20)["s"]
    keep = trained["n_cells"] >= 10
    rho = spearmanr(trained.loc[keep, "s"], other.loc[keep, "s"])[0]
    top_t = set(trained.loc[keep, "s"].nlargest(20).index)
    top_o = set(other.loc[keep, "s"].nlargest(20).index)
    assert got["spearman"] == pytest.approx(rho) and got["n"] == int(keep.sum())
    assert got["jaccard"] == pytest.approx(len(top_t & top_o) / len(top_t | top_o))


def test_cascade_leaves_attention_untouched_by_the_head_and_is_reproducible():
    dicts = toy_dictionaries(200)
    cells = class_coded_cells(40, seed=1, length=(10, 30))
    labels = np.asarray(cells["label"])
    runs = [
        randomisation_cascade(
            _classifier(), cells, labels, dicts=dicts, methods=("rollout",), min_cells=3, batch_size=16, seed=3
        )
        for _ in range(2)
    ]
    out = runs[0]
    assert out["steps"] == ["head", "layer 1", "layer 0", "embeddings"]
    for col in ("key_score", "attn", "attn_norm", "attn_pos_ratio", "rollout_mean"):
        assert len(out["scores"][col]["spearman"]) == 4
        # attention does not read the classifier head: re-initialising it changes no attention score
        assert out["scores"][col]["spearman"][0] == pytest.approx(1.0)
        assert out["scores"][col]["jaccard"][0] == pytest.approx(1.0)
    # once the encoder is random, the position-controlled scores no longer agree with the trained model's
    assert out["scores"]["attn_pos_ratio"]["spearman"][-1] < 0.8
    assert out == runs[1]


def test_permuted_labels_keep_cells_classes_and_sizes_and_leave_test_cells_alone():
    from datasets import Dataset

    from pipeline.run.stages.finetune import permuted_parts

    rng = np.random.default_rng(0)
    parts = {
        split: Dataset.from_dict(
            {"cell_id": [f"{split}{i}" for i in range(n)], "label": rng.integers(0, 3, n).tolist()}
        )
        for split, n in (("train", 200), ("validation", 50), ("test", 40))
    }
    out = permuted_parts(parts, seed=5)
    for split in ("train", "validation"):
        before, after = np.asarray(parts[split]["label"]), np.asarray(out[split]["label"])
        assert np.array_equal(np.bincount(before, minlength=3), np.bincount(after, minlength=3))
        assert out[split]["cell_id"] == parts[split]["cell_id"]
        assert np.mean(before == after) < 0.6  # really shuffled
    assert out["test"]["label"] == parts["test"]["label"]
    assert out["train"]["label"] == permuted_parts(parts, seed=5)["train"]["label"]
    assert out["train"]["label"] != permuted_parts(parts, seed=6)["train"]["label"]
