"""`gfattn pretrain` then `gfattn finetune` on synthetic data, recorded in a real store."""

import json

import numpy as np
import pytest
import torch

from pipeline.cli import main

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores


@pytest.mark.slow
def test_pretrain_and_finetune_commands(tmp_path, capsys):
    from pipeline.data.dictionaries import GeneDictionaries
    from pipeline.data.synth import make_corpus, make_sciplex_like
    from pipeline.tokenize.encode import save_tokenized, tokenize_anndata
    from store import Store

    corpus = tmp_path / "corpus.h5ad"
    make_corpus(n_cells=120, seed=0, preset="thesis").write_h5ad(corpus)
    db = tmp_path / "gfattn.db"
    model = tmp_path / "model"
    rc = main(
        [
            "pretrain",
            "--corpus",
            str(corpus),
            "--out",
            str(model),
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--intermediate",
            "64",
            "--max-len",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--store",
            str(db),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out masked-gene accuracy" in out and f"model written to {model}" in out
    assert json.loads((model / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]

    dicts = GeneDictionaries.from_model_dir(model)
    cells = make_sciplex_like(scale=0.04, preset="thesis", seed=1)
    ds, report = tokenize_anndata(cells, dicts, max_len=64, obs_columns=["dose_value"])
    save_tokenized(ds, tmp_path / "tok", report)
    rc = main(
        [
            "finetune",
            "--data",
            str(tmp_path / "tok"),
            "--model",
            str(model),
            "--label-column",
            "dose_value",
            "--mode",
            "last-1",
            "--out",
            str(tmp_path / "ft"),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--store",
            str(db),
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "dose_value/last-1: test accuracy" in out

    st = Store(db)
    (pre,) = st.list_runs(kind="pretrain")
    assert pre["status"] == "completed"
    assert st.metrics(pre["id"], name="masked_accuracy", split="heldout")
    assert st.metrics(pre["id"], name="loss", split="train") or st.get_json(pre["id"], "pretrain")
    (ft,) = st.list_runs(kind="finetune")
    assert ft["status"] == "completed"
    labels = st.labels(ft["id"])["dose_value"]
    assert labels == sorted(labels, key=float) and len(labels) >= 2
    (conf,) = st.confusions(ft["id"])
    split = st.split(ft["id"])
    assert conf["matrix"].sum() == sum(1 for s in split.values() if s == "test")
    assert set(split.values()) == {"train", "validation", "test"}
    assert len(st.metrics(ft["id"], name="accuracy", split="test")) == 1
    assert (tmp_path / "ft" / "token_dictionary.pkl").is_file()
    assert np.isfinite(st.metrics(ft["id"], name="loss", split="validation")[0]["value"])
    st.close()


def test_finetune_command_refuses_a_missing_label_column(tmp_path, capsys):
    import datasets

    from pipeline.tokenize.encode import save_tokenized

    ds = datasets.Dataset.from_dict({"input_ids": [[2, 3, 4]] * 6, "length": [3] * 6, "cell_id": list("abcdef")})
    save_tokenized(ds, tmp_path / "tok")
    rc = main(
        [
            "finetune",
            "--data",
            str(tmp_path / "tok"),
            "--model",
            str(tmp_path),
            "--label-column",
            "dose",
            "--out",
            str(tmp_path / "ft"),
            "--store",
            str(tmp_path / "db"),
        ]
    )
    assert rc == 2
    assert "no column 'dose'" in capsys.readouterr().err
    rc = main(
        [
            "finetune",
            "--data",
            str(tmp_path / "tok"),
            "--model",
            str(tmp_path),
            "--label-column",
            "dose",
            "--mode",
            "half",
            "--out",
            str(tmp_path / "ft"),
            "--store",
            str(tmp_path / "db"),
        ]
    )
    assert rc == 2
    assert "unknown training mode" in capsys.readouterr().err


def test_pretrain_command_needs_a_corpus_or_embedded_and_a_new_out(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--corpus" in err and "--embedded" in err and "Traceback" not in err
    (tmp_path / "taken").mkdir()
    assert main(["pretrain", "--embedded", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pretrain", "--embedded", "--preset", "nope", "--out", str(tmp_path / "m")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
