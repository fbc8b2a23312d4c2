"""Training modes on the real V1-6L config (random weights): exactly the documented parameters change.

Documented in pipeline/models/load.py: the head is `bert.pooler` + `classifier`; `frozen` trains only the head,
`last-K` the last K encoder layers and the head, `freeze-N` (Geneformer's freeze_layers) everything but
the first N encoder layers, `unfrozen` everything.
"""

import pytest
import torch

from pipeline.config import parse_mode
from pipeline.errors import InputError
from pipeline.models.load import apply_training_mode, load_classifier
from pipeline.training.finetune import TrainConfig, finetune

from tests._helpers_model import class_coded_cells, parameters, save_random_geneformer

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores
V1_VOCAB = 25426


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    from pipeline.paths import shared_dir

    shared = shared_dir()
    if shared is None or not (shared / "geneformer" / "configs" / "V1-6L-10M").is_dir():
        pytest.skip("GFATTN_SHARED is not set to the shared folder with the real Geneformer configs")
    path = tmp_path_factory.mktemp("v1modes") / "V1-6L-random"
    save_random_geneformer(shared / "geneformer" / "configs" / "V1-6L-10M", path)
    return path


@pytest.fixture(scope="module")
def cells():
    data = class_coded_cells(24, vocab_size=V1_VOCAB, length=(8, 16), seed=3)
    return data


def _train(v1_dir, cells, mode, **overrides):
    torch.manual_seed(0)
    model = load_classifier(v1_dir, 2)
    before = parameters(model)
    config = TrainConfig(lr=1e-3, epochs=1, batch_size=8, warmup_ratio=0.0, **overrides)
    result = finetune(model, cells, None, None, label_names=["a", "b"], mode=mode, config=config)
    after = parameters(result.model)
    changed = {n for n in before if not torch.equal(before[n], after[n].to(before[n].device))}
    return changed, set(before)


def _embedding(n):
    return n.startswith("bert.embeddings.")


def _layer(n, i):
    return n.startswith(f"bert.encoder.layer.{i}.")


def _head(n):
    return n.startswith(("bert.pooler.", "classifier."))


@pytest.mark.parametrize("cache", [True, False])
def test_frozen_changes_only_the_head(v1_dir, cells, cache):
    changed, names = _train(v1_dir, cells, "frozen", cache_frozen_features=cache)
    assert changed == {n for n in names if _head(n)}
    assert {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"} <= changed


def test_last_1_changes_only_the_last_layer_and_the_head(v1_dir, cells):
    changed, names = _train(v1_dir, cells, "last-1")
    assert changed == {n for n in names if _layer(n, 5) or _head(n)}


def test_freeze_2_is_geneformers_freeze_layers(v1_dir, cells):
    changed, names = _train(v1_dir, cells, "freeze-2")
    frozen = {n for n in names if _layer(n, 0) or _layer(n, 1)}
    assert not changed & frozen
    assert changed >= {n for n in names if _head(n) or _layer(n, 5)}
    assert any(_embedding(n) for n in changed)  # Geneformer freezes encoder layers only


def test_unfrozen_changes_every_parameter(v1_dir, cells):
    changed, names = _train(v1_dir, cells, "unfrozen")
    assert changed == names


def test_mode_names_are_checked_against_the_model():
    assert parse_mode("last-1", 6) == ("last", 1)
    assert parse_mode("freeze-3", 6) == ("freeze", 3)
    with pytest.raises(InputError, match="6 encoder layers"):
        parse_mode("last-7", 6)
    for bad in ("frozn", "last-0", "last-", "freeze-x"):
        with pytest.raises(InputError, match="unknown training mode"):
            parse_mode(bad)


def test_apply_training_mode_sets_requires_grad(tmp_path):
    from tests._helpers_model import save_tiny_model

    model = load_classifier(save_tiny_model(tmp_path / "m"), 2)
    trainable = apply_training_mode(model, "last-1")
    assert all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in trainable)
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert set(apply_training_mode(model, "unfrozen")) == {n for n, _ in model.named_parameters()}
