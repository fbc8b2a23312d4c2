"""Fine-tuning: round trip through disk, a learnable task, the frozen-feature cache, the recorded metrics."""

import json

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.models.load import load_classifier
from pipeline.run.stages.finetune import FinetuneStoreRecorder
from pipeline.training.finetune import (
    TrainConfig,
    classification_metrics,
    evaluate,
    finetune,
    linear_warmup_decay,
)

from tests._helpers_model import FakeStore, class_coded_cells, save_random_geneformer, save_tiny_model, toy_dictionaries

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores


def _splits(n_train=160, n_val=40, n_test=40, **kw):
    return (
        class_coded_cells(n_train, seed=1, **kw),
        class_coded_cells(n_val, seed=2, **kw),
        class_coded_cells(n_test, seed=3, **kw),
    )


def test_v1_6l_finetune_save_load_gives_identical_predictions(shared, tmp_path):
    from pipeline.data.dictionaries import GeneDictionaries

    config_dir = shared / "geneformer" / "configs" / "V1-6L-10M"
    save_random_geneformer(config_dir, tmp_path / "v1")
    dicts = GeneDictionaries.from_geneformer_dir(shared / "geneformer", "V1")
    genes = [dicts.token_dict[g] for g in dicts.gene_tokens()[:400]]
    rng = np.random.default_rng(0)
    cells = {"input_ids": [rng.choice(genes, size=int(rng.integers(6, 14)), replace=False).tolist() for _ in range(24)]}
    cells["length"] = [len(x) for x in cells["input_ids"]]
    cells["label"] = [i % 3 for i in range(24)]
    torch.manual_seed(0)
    model = load_classifier(tmp_path / "v1", 3, dicts=dicts, max_len=max(cells["length"]))
    result = finetune(
        model,
        cells,
        cells,
        cells,
        label_names=["0", "1.25", "25"],
        mode="unfrozen",
        config=TrainConfig(epochs=1, batch_size=8),
        out_dir=tmp_path / "ft",
        dicts=dicts,
    )
    assert len(result.history) == 1 and result.test_predictions.shape == (24,)
    out = tmp_path / "ft"
    assert {
        "config.json",
        "model.safetensors",
        "token_dictionary.pkl",
        "gene_median_dictionary.pkl",
        "gfattn_finetune.json",
    } <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    assert saved["id2label"] == {"0": "0", "1": "1.25", "2": "25"}
    again = load_classifier(out, 3)  # the saved dictionaries are found and checked
    again.eval()
    ids = torch.tensor([cells["input_ids"][0][:6], cells["input_ids"][1][:6]])
    with torch.no_grad():
        a = result.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = again(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(a, b)
    _, _, preds, _ = evaluate(again, cells, ["0", "1.25", "25"], config=TrainConfig(batch_size=8))
    assert np.array_equal(preds, result.test_predictions)


def test_learnable_task_reaches_well_above_chance(tmp_path):
    train, val, test = _splits()
    torch.manual_seed(0)
    model = load_classifier(save_tiny_model(tmp_path / "m", hidden=64, intermediate=128, heads=4), 2)
    result = finetune(
        model,
        train,
        val,
        test,
        label_names=["low", "high"],
        mode="unfrozen",
        config=TrainConfig(lr=1e-3, epochs=4, batch_size=16),
    )
    assert result.test_metrics["accuracy"] >= 0.9
    assert result.test_metrics["macro_f1"] >= 0.9
    assert result.confusion.sum() == len(test["label"])


def test_frozen_feature_cache_equals_plain_training_without_dropout(tmp_path):
    train, val, test = _splits(96, 24, 24)
    src = save_tiny_model(tmp_path / "m", dropout=0.0)
    results = []
    for cache in (True, False):
        torch.manual_seed(0)
        model = load_classifier(src, 2)
        results.append(
            finetune(
                model,
                train,
                val,
                test,
                label_names=["a", "b"],
                mode="frozen",
                config=TrainConfig(lr=1e-2, epochs=2, batch_size=16, cache_frozen_features=cache),
            )
        )
    cached, plain = results
    for name in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight"):
        a = dict(cached.model.named_parameters())[name]
        b = dict(plain.model.named_parameters())[name]
        assert torch.allclose(a, b, atol=1e-5), name
    assert np.array_equal(cached.test_predictions, plain.test_predictions)
    assert cached.test_metrics["loss"] == pytest.approx(plain.test_metrics["loss"], abs=1e-5)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    train, _, test = _splits(64, 8, 16)
    src = save_tiny_model(tmp_path / "m", dropout=0.0)
    weights = []
    for batch, accum in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = load_classifier(src, 2)
        r = finetune(
            model,
            train,
            None,
            test,
            label_names=["a", "b"],
            mode="unfrozen",
            config=TrainConfig(lr=1e-3, epochs=1, batch_size=batch, grad_accum=accum, class_weights=True),
        )
        weights.append({n: p.detach().clone() for n, p in r.model.named_parameters()})
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], atol=1e-5), name


def test_progress_metrics_and_confusion_are_recorded(tmp_path):
    train, val, test = _splits(64, 16, 16)
    rec = FakeStore()
    calls = []
    torch.manual_seed(0)
    model = load_classifier(save_tiny_model(tmp_path / "m"), 2)
    result = finetune(
        model,
        train,
        val,
        test,
        label_names=["low", "high"],
        mode="last-1",
        config=TrainConfig(lr=1e-3, epochs=2, batch_size=8, log_every=3),
        recorder=FinetuneStoreRecorder(rec, 7, on_progress=lambda done, total, **kw: calls.append((done, total, kw))),
    )
    steps = 2 * 8
    assert rec.progress[-1]["done"] == steps and rec.progress[-1]["total"] == steps
    assert rec.progress[-1]["stage"] == "finetune" and rec.progress[-1]["unit"] == "steps"
    assert rec.progress[-1]["throughput"] > 0
    loss_rows = rec.rows("loss", "train")
    assert [r["step"] for r in loss_rows] == [3, 6, 9, 12, 15, 16]
    assert all(r["epoch"] in (1, 2) for r in loss_rows) and rec.rows("lr", "train")
    for name in ("accuracy", "macro_f1", "loss"):
        assert [r["epoch"] for r in rec.rows(name, "validation")] == [1, 2]
    test_names = {r["name"] for r in rec.metrics if r["split"] == "test"}
    assert {"accuracy", "macro_f1", "precision/low", "recall/low", "precision/high", "recall/high"} <= test_names
    (conf,) = rec.confusions
    assert conf["labels"] == ["low", "high"] and conf["split"] == "test"
    assert np.array_equal(conf["matrix"], result.confusion)
    assert calls and calls[-1][0] == steps and set(calls[-1][2]) == {"unit", "throughput", "eta_s", "message"}
    assert calls[-1][2]["unit"] == "steps" and calls[-1][2]["message"].startswith("epoch 2, loss ")


def test_best_epoch_weights_are_restored(tmp_path):
    train, val, test = _splits(64, 24, 16)
    torch.manual_seed(0)
    model = load_classifier(save_tiny_model(tmp_path / "m"), 2)
    result = finetune(
        model,
        train,
        val,
        test,
        label_names=["a", "b"],
        mode="unfrozen",
        config=TrainConfig(lr=3e-3, epochs=3, batch_size=16, best_metric="loss"),
    )
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    metrics, _, _, _ = evaluate(result.model, val, ["a", "b"])
    assert metrics["loss"] == pytest.approx(min(losses), abs=1e-5)
    assert result.val_metrics["loss"] == pytest.approx(min(losses), abs=1e-5)


def test_real_store_receives_the_run(tmp_path):
    store = pytest.importorskip("store")
    train, val, test = _splits(48, 16, 16)
    st = store.Store(tmp_path / "gfattn.db")
    run = st.create_run("lowhigh/frozen", "finetune", {"task": "lowhigh", "mode": "frozen"})
    torch.manual_seed(0)
    model = load_classifier(save_tiny_model(tmp_path / "m"), 2)
    finetune(
        model,
        train,
        val,
        test,
        label_names=["low", "high"],
        mode="frozen",
        recorder=FinetuneStoreRecorder(st, run),
        config=TrainConfig(lr=1e-2, epochs=2, batch_size=8),
    )
    assert st.progress(run)["done"] == st.progress(run)["total"] == 12
    assert {m["epoch"] for m in st.metrics(run, name="accuracy", split="validation")} == {1, 2}
    assert len(st.metrics(run, name="recall/high", split="test")) == 1
    (conf,) = st.confusions(run)
    assert conf["labels"] == ["low", "high"] and conf["matrix"].sum() == 16
    st.close()


def test_inputs_are_checked(tmp_path):
    train, _, _ = _splits(16, 4, 4)
    model = load_classifier(save_tiny_model(tmp_path / "m", max_len=32), 2)
    short = TrainConfig(epochs=1, max_len=32)
    with pytest.raises(InputError, match="label_names has 3"):
        finetune(model, train, None, None, label_names=["a", "b", "c"], mode="frozen", config=short)
    with pytest.raises(InputError, match="outside 0..1"):
        finetune(model, dict(train, label=[5] * 16), None, None, label_names=["a", "b"], mode="frozen", config=short)
    with pytest.raises(InputError, match="no column 'label'"):
        finetune(
            model, {"input_ids": train["input_ids"]}, None, None, label_names=["a", "b"], mode="frozen", config=short
        )
    with pytest.raises(InputError, match=r"up to \d+ tokens but the model takes at most 32"):
        finetune(model, train, None, None, label_names=["a", "b"], mode="frozen")
    with pytest.raises(InputError, match="6 encoder layers|2 encoder layers"):
        finetune(model, train, None, None, label_names=["a", "b"], mode="last-3", config=short)
    r = finetune(model, train, None, None, label_names=["a", "b"], mode="frozen", config=short)
    assert r.test_predictions is None and r.best_epoch == 1 and r.test_metrics == {}
    with pytest.raises(InputError, match="device"):
        TrainConfig(device="tpu").validate()


def test_metrics_follow_their_definitions():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 0, 2])
    m, conf = classification_metrics(y, p, ["a", "b", "c"])
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision/b"] == pytest.approx(2 / 3) and m["recall/c"] == pytest.approx(0.5)
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    sk = pytest.importorskip("sklearn.metrics")
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, p, average="macro"))


def test_schedule_warms_up_then_decays_to_zero():
    f = linear_warmup_decay(2, 10)
    values = [f(s) for s in range(10)]
    assert values[0] > 0 and values[0] < values[1] < values[2] == 1.0
    assert all(a > b for a, b in zip(values[2:], values[3:])) and f(10) == 0.0


def test_toy_dictionaries_fit_the_toy_model(tmp_path):
    dicts = toy_dictionaries(200)
    model = load_classifier(save_tiny_model(tmp_path / "m"), 2, dicts=dicts, max_len=64)
    assert model.config.vocab_size == len(dicts.token_dict)
