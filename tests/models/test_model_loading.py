"""Loading Geneformer checkpoints (real configs, random weights) and gfattn's small BERTs."""

import json
import warnings

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.models.load import (
    build_small_bert,
    check_model_inputs,
    load_classifier,
    load_for_attention,
    read_model_config,
)

from tests._helpers_model import save_random_geneformer, save_tiny_model, toy_dictionaries

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores


@pytest.fixture(scope="module")
def v1_checkpoint(tmp_path_factory):
    from pipeline.paths import shared_dir

    shared = shared_dir()
    if shared is None or not (shared / "geneformer" / "configs" / "V1-6L-10M").is_dir():
        pytest.skip("GFATTN_SHARED is not set to the shared folder with the real Geneformer configs")
    path = tmp_path_factory.mktemp("v1") / "V1-6L-random"
    mlm = save_random_geneformer(shared / "geneformer" / "configs" / "V1-6L-10M", path)
    return path, mlm, shared


@pytest.fixture(scope="module")
def v1_dicts(v1_checkpoint):
    from pipeline.data.dictionaries import GeneDictionaries

    return GeneDictionaries.from_geneformer_dir(v1_checkpoint[2] / "geneformer", "V1")


def test_masked_lm_checkpoint_loads_as_classifier_with_new_head(v1_checkpoint, v1_dicts):
    path, mlm, _ = v1_checkpoint
    model = load_classifier(path, 3, dicts=v1_dicts, max_len=2048)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.config._attn_implementation == "sdpa"
    assert len(model.bert.encoder.layer) == 6 and model.config.vocab_size == 25426
    # the encoder is the checkpoint's, bit for bit
    mine = dict(model.bert.named_parameters())
    for name, p in mlm.bert.named_parameters():
        assert torch.equal(mine[name], p), name
    assert model.bert.pooler is not None
    assert next(model.parameters()).dtype == torch.float32


def test_vocabulary_mismatch_names_both_sizes_and_files(v1_checkpoint, shared):
    from pipeline.data.dictionaries import GeneDictionaries

    v2 = GeneDictionaries.from_geneformer_dir(shared / "geneformer", "V2")
    with pytest.raises(InputError) as err:
        load_classifier(v1_checkpoint[0], 2, dicts=v2)
    msg = str(err.value)
    assert "25426" in msg and "20275" in msg
    assert "config.json" in msg and "token_dictionary_gc104M.pkl" in msg


def test_input_size_mismatch_names_both_numbers(v1_checkpoint):
    with pytest.raises(InputError) as err:
        load_classifier(v1_checkpoint[0], 2, max_len=4096, data_source="cells in data/tok")
    msg = str(err.value)
    assert "4096" in msg and "2048" in msg and "data/tok" in msg and "config.json" in msg


def test_v2_configs_match_v2_dictionaries_and_4096_tokens(shared):
    from transformers import BertConfig

    from pipeline.data.dictionaries import GeneDictionaries

    v2 = GeneDictionaries.from_geneformer_dir(shared / "geneformer", "V2")
    for name in ("V2-104M", "V2-316M", "V2-104M_CLcancer"):
        config = BertConfig.from_json_file(str(shared / "geneformer" / "configs" / name / "config.json"))
        check_model_inputs(config, dicts=v2, max_len=4096)
        with pytest.raises(InputError, match="4097"):
            check_model_inputs(config, dicts=v2, max_len=4097)
    v1 = toy_dictionaries(10)
    config = BertConfig.from_json_file(str(shared / "geneformer" / "configs" / "V1-12L-30M" / "config.json"))
    with pytest.raises(InputError, match="25426"):
        check_model_inputs(config, dicts=v1)


def test_model_directory_problems_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_classifier(tmp_path / "nope", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_classifier(tmp_path / "empty", 2)
    model_dir = save_tiny_model(tmp_path / "tiny")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        load_classifier(model_dir, 2)
    with pytest.raises(InputError, match="at least 2"):
        load_classifier(save_tiny_model(tmp_path / "tiny2"), 1)
    assert read_model_config(tmp_path / "tiny2").num_hidden_layers == 2


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    model = build_small_bert(50, layers=1, hidden=16, heads=2, intermediate=32, max_len=32, seed=1)
    model_dir = tmp_path / "bin"
    model.save_pretrained(str(model_dir))
    (model_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    loaded = load_classifier(model_dir, 2)
    assert torch.equal(loaded.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


def test_finetuned_classifier_keeps_its_head_or_reinitialises_for_new_labels(tmp_path):
    src = save_tiny_model(tmp_path / "mlm")
    clf = load_classifier(src, 3)
    clf.save_pretrained(str(tmp_path / "clf"))
    same = load_classifier(tmp_path / "clf", 3)
    assert torch.equal(same.classifier.weight, clf.classifier.weight)
    assert torch.equal(same.bert.pooler.dense.weight, clf.bert.pooler.dense.weight)
    with pytest.warns(UserWarning, match="re-initialised for 5 labels"):
        other = load_classifier(tmp_path / "clf", 5)
    assert other.classifier.out_features == 5 and other.config.num_labels == 5
    assert torch.equal(other.bert.pooler.dense.weight, clf.bert.pooler.dense.weight)


def test_load_for_attention_is_eager_and_in_eval_mode(tmp_path):
    src = save_tiny_model(tmp_path / "mlm")
    mlm = load_for_attention(src)
    assert type(mlm).__name__ == "BertForMaskedLM"
    clf = load_classifier(src, 2)
    clf.save_pretrained(str(tmp_path / "clf"))
    model = load_for_attention(tmp_path / "clf")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config._attn_implementation == "eager" and not model.training
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.bert(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 2, 4, 4)


def test_small_bert_is_geneformer_like(tmp_path):
    model = build_small_bert(300, layers=2, hidden=64, heads=4, intermediate=128, max_len=128)
    cfg = model.config
    assert (cfg.hidden_act, cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) == ("relu", 0.02, 0.02)
    assert (cfg.pad_token_id, cfg.max_position_embeddings, cfg.vocab_size) == (0, 128, 300)
    assert cfg.position_embedding_type == "absolute"
    model.save_pretrained(str(tmp_path / "m"))
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["architectures"] == ["BertForMaskedLM"]
    with pytest.raises(InputError, match="divisible"):
        build_small_bert(300, hidden=30, heads=4)


def test_dictionaries_carried_by_the_model_directory_are_checked(tmp_path):
    src = save_tiny_model(tmp_path / "m", vocab_size=202)
    toy_dictionaries(150).save(src)  # 152 tokens: not this model's vocabulary
    with pytest.raises(InputError, match="202"):
        load_classifier(src, 2)
    toy_dictionaries(200).save(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_classifier(src, 2)
    logits = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 2) and np.isfinite(logits.detach().numpy()).all()
