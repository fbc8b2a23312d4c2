"""One seed governs pretraining: the weights do not depend on RNG state left by earlier code, on what a
progress callback draws, and pretraining leaves the caller's RNG state as it found it."""

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.models.pretrain import plan_pretraining, pretrain

from tests._helpers_model import corpus_cells, toy_dictionaries

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores

KW = dict(
    layers=1, hidden=16, heads=2, intermediate=32, max_len=48, epochs=2, batch_size=8, lr=2e-3, seed=4, dropout=0.1
)


def _weights(path):
    return load_file(path / "model.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_twice_in_one_process_gives_the_same_weights(tmp_path):
    corpus, dicts = corpus_cells(80, n_genes=50, seed=5), toy_dictionaries(50)
    first = pretrain(corpus, dicts, tmp_path / "a", **KW)
    torch.rand(1000)  # unrelated draws from every global generator in between
    torch.manual_seed(12345)
    torch.randn(17, 3)
    np.random.seed(99)
    np.random.rand(50)
    import random

    random.random()
    second = pretrain(corpus, dicts, tmp_path / "b", **KW)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    timeless = {k for k in first if "seconds" not in k}
    assert {k: first[k] for k in timeless} == {k: second[k] for k in timeless}

    noisy = lambda *a, **k: torch.rand(100)  # a progress callback that draws from torch's global generator
    pretrain(corpus, dicts, tmp_path / "c", **KW, progress=noisy)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))

    other = pretrain(corpus, dicts, tmp_path / "d", **{**KW, "seed": 5})
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "d"))
    assert other["steps"] == first["steps"]


def test_pretraining_leaves_the_callers_rng_state_alone(tmp_path):
    torch.manual_seed(2024)
    expected = torch.rand(5)
    torch.manual_seed(2024)
    pretrain(corpus_cells(40, n_genes=30, seed=6), toy_dictionaries(30), tmp_path / "m", **{**KW, "epochs": 1})
    assert torch.equal(torch.rand(5), expected)


def test_the_plan_draws_its_split_and_batches_from_the_seed():
    corpus, dicts = corpus_cells(60, n_genes=30, seed=7), toy_dictionaries(30)
    a = plan_pretraining(corpus, dicts, seed=3, batch_size=8, holdout_fraction=0.2)
    np.random.rand(10)
    b = plan_pretraining(corpus, dicts, seed=3, batch_size=8, holdout_fraction=0.2)
    assert all(np.array_equal(x, y) for x, y in zip(a.held + a.train, b.held + b.train))
    assert all(np.array_equal(x, y) for x, y in zip(a.batches(2), b.batches(2)))
    assert len(a.held) == 12 and len(a.train) == 48 and a.planned_steps == 3 * 6
    assert (a.masking_seed, a.eval_seed, a.batch_seed(2)) == (4, 10, 3002)
    assert not all(np.array_equal(x, y) for x, y in zip(a.batches(1), a.batches(2)))
