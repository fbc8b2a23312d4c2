"""Masked-gene pretraining: Geneformer's masking rule, the checkpoint it writes, learning beyond chance."""

import json

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.models.pretrain import corrupt_selected, frequency_baselines, pretrain, select_masked_positions

from tests._helpers_model import FakeStore, corpus_cells, toy_dictionaries

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores


def test_selection_is_15_percent_of_real_non_special_tokens():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (64, 300))
    ids[:, 0] = 2  # a <cls>-like special token first
    mask = torch.ones_like(ids)
    mask[:, 200:] = 0
    ids[:, 200:] = 0
    selected = select_masked_positions(ids, mask, [0, 1, 2, 3], 0.15, gen)
    assert not selected[:, 200:].any() and not selected[:, 0].any()
    assert selected[:, 1:200].float().mean().item() == pytest.approx(0.15, abs=0.01)


def test_selected_tokens_follow_the_80_10_10_rule():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 1000, (200, 200))
    selected = select_masked_positions(ids, torch.ones_like(ids), [0, 1], 0.15, gen)
    corrupted = corrupt_selected(ids, selected, 1, 1000, gen)
    assert torch.equal(corrupted[~selected], ids[~selected])
    n = selected.sum().item()
    masked = (corrupted[selected] == 1).sum().item() / n
    kept = (corrupted[selected] == ids[selected]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / 1000, abs=0.02)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.02)


def test_frequency_baselines_count_training_genes():
    top, per_pos = frequency_baselines([np.array([5, 6, 7]), np.array([5, 7]), np.array([6, 7, 0])], [0, 1])
    assert top == 7
    assert per_pos[0] == 5 and per_pos[2] == 7


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "model"
    dicts = toy_dictionaries(120)
    rec = FakeStore()
    metrics = pretrain(
        corpus_cells(600, n_genes=120, seed=0, noise=0.5),
        dicts,
        out,
        layers=2,
        hidden=64,
        heads=4,
        intermediate=128,
        max_len=64,
        epochs=8,
        batch_size=16,
        lr=6e-3,
        seed=0,
        holdout_fraction=0.2,
        store=rec,
        run_id=3,
    )
    return out, dicts, metrics, rec


@pytest.mark.slow
def test_pretraining_learns_beyond_chance(pretrained):
    _, _, m, _ = pretrained
    assert m["heldout_accuracy"] > 2 * m["chance_accuracy"]
    assert m["heldout_accuracy"] > m["position_baseline_accuracy"]
    assert m["heldout_masked_genes"] > 600 and m["steps"] == 8 * int(np.ceil(480 / 16))


def test_pretraining_writes_a_geneformer_like_checkpoint(pretrained):
    out, dicts, m, _ = pretrained
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "token_dictionary.pkl",
        "gene_median_dictionary.pkl",
        "gfattn_pretrain.json",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    assert (config["vocab_size"], config["max_position_embeddings"], config["hidden_act"]) == (122, 64, "relu")
    summary = json.loads((out / "gfattn_pretrain.json").read_text())
    assert summary["metrics"]["heldout_accuracy"] == pytest.approx(m["heldout_accuracy"])
    assert summary["hyperparameters"]["mask_probability"] == 0.15
    from pipeline.models.load import load_classifier

    model = load_classifier(out, 2, max_len=64)  # its own dictionaries are found and checked
    assert model.config.vocab_size == len(dicts.token_dict)


def test_pretraining_records_its_metrics(pretrained):
    _, _, m, rec = pretrained
    assert rec.rows("loss", "train") and rec.rows("lr", "train")
    assert [r["epoch"] for r in rec.rows("masked_accuracy", "validation")] == list(range(1, 9))
    (final,) = rec.rows("masked_accuracy", "heldout")
    assert final["value"] == pytest.approx(m["heldout_accuracy"])
    assert rec.rows("chance_accuracy", "heldout") and "pretrain" in rec.json
    assert rec.progress and rec.progress[-1]["stage"] == "pretrain"


def test_time_budget_stops_training(tmp_path):
    m = pretrain(
        corpus_cells(200, n_genes=60, seed=1),
        toy_dictionaries(60),
        tmp_path / "m",
        layers=1,
        hidden=32,
        heads=2,
        intermediate=64,
        max_len=64,
        epochs=50,
        batch_size=8,
        lr=1e-3,
        time_budget_s=0.5,
    )
    assert m["stopped_by_time_budget"] and m["epochs"] < 50
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_a_budget_that_does_not_bind_leaves_the_model_unchanged(tmp_path, monkeypatch):
    """A slow first step (allocation, a busy machine) must not shorten the schedule when the measured pace
    fits the budget: the same seed gives the same model with or without the budget."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    import pipeline.models.pretrain as pretrain_module

    corpus, dicts = corpus_cells(120, n_genes=60, seed=2), toy_dictionaries(60)
    kw = dict(layers=1, hidden=16, heads=2, intermediate=32, max_len=64, epochs=3, batch_size=8, lr=1e-3, seed=0)
    free = pretrain(corpus, dicts, tmp_path / "free", **kw)

    clock = {"t": 0.0, "calls": 0}
    real_logits = pretrain_module._masked_logits

    def timed_logits(*args, **kwargs):  # the first step takes 10 s of the 30 s budget, the rest 10 ms each
        clock["calls"] += 1
        clock["t"] += 10.0 if clock["calls"] == 1 else 0.01
        return real_logits(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "_masked_logits", timed_logits)
    monkeypatch.setattr(pretrain_module, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    budgeted = pretrain(corpus, dicts, tmp_path / "budget", **kw, time_budget_s=30.0)
    assert not budgeted["stopped_by_time_budget"]
    assert budgeted["steps"] == free["steps"]
    a, b = load_file(tmp_path / "free" / "model.safetensors"), load_file(tmp_path / "budget" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a budget that binds at the measured pace re-aims the schedule and stops within it
    clock.update(t=0.0, calls=0)
    monkeypatch.setattr(
        pretrain_module, "_masked_logits", lambda *a, **k: (clock.update(t=clock["t"] + 1.0), real_logits(*a, **k))[1]
    )
    bound = pretrain(corpus, dicts, tmp_path / "bound", **kw, time_budget_s=20.0)
    assert bound["stopped_by_time_budget"] and 15 <= bound["steps"] <= 21 < free["steps"]


def test_corpus_problems_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="at least 10"):
        pretrain({"input_ids": [[2, 3]] * 5}, toy_dictionaries(10), tmp_path / "a")
    with pytest.raises(InputError, match="token id 500"):
        pretrain({"input_ids": [[2, 500]] * 20}, toy_dictionaries(10), tmp_path / "b")
