"""Bad input to `gfattn pipeline`: a one-line error, exit code 2, and no run left behind as `running`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._helpers_cli import cli


def gfattn(*args, cwd=None):
    """`gfattn ARGS` in this process: bad input is refused before any work, so no process of its own."""
    return cli(*args, cwd=cwd)


def gfattn_process(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_bad_input(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("gfattn pipeline: error:"), out.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def assert_no_running_runs(db: Path):
    """Bad input is found before a run is recorded: the store holds no run at all."""
    if not db.exists():
        return
    from store import Store

    assert Store(db).list_runs() == []


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory):
    from pipeline.data.synth import make_sciplex_like

    path = tmp_path_factory.mktemp("data") / "small.h5ad"
    make_sciplex_like(scale=0.03, preset="thesis", seed=1).write_h5ad(path)
    return path


@pytest.fixture
def tiny_model(tmp_path, geneformer_dir):
    """A directory shaped like a Geneformer V1 checkpoint: config.json and a weights file whose tensors have
    the config's shapes (preflight opens it), in int8 zeros to keep it small."""
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp_path / "model"
    d.mkdir()
    config = json.loads((geneformer_dir / "configs" / "V1-6L-10M" / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config))
    tensors = {
        "bert.embeddings.word_embeddings.weight": np.zeros((config["vocab_size"], config["hidden_size"]), np.int8)
    }
    for i in range(config["num_hidden_layers"]):
        tensors[f"bert.encoder.layer.{i}.output.dense.bias"] = np.zeros(1, np.int8)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_missing_data_file(tmp_path):
    db = tmp_path / "s.db"
    out = gfattn("pipeline", "--data", str(tmp_path / "nope.h5ad"), "--model", str(tmp_path), "--store", str(db))
    assert_bad_input(out, "nope.h5ad", "does not exist")
    assert_no_running_runs(db)


def test_missing_model_dir(tmp_path, small_h5ad):
    db = tmp_path / "s.db"
    out = gfattn("pipeline", "--data", str(small_h5ad), "--model", str(tmp_path / "nomodel"), "--store", str(db))
    assert_bad_input(out, "nomodel", "does not exist")
    assert_no_running_runs(db)


def test_model_dir_without_weights(tmp_path, small_h5ad):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    db = tmp_path / "s.db"
    out = gfattn("pipeline", "--data", str(small_h5ad), "--model", str(d), "--store", str(db))
    assert_bad_input(out, "no weights")
    assert_no_running_runs(db)


def test_vocabulary_mismatch(tmp_path, small_h5ad, tiny_model, geneformer_dir):
    # a V1 model (25,426 tokens) with the V2 dictionaries (20,275 tokens)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nversion = "V2"\n')
    db = tmp_path / "s.db"
    out = gfattn(
        "pipeline",
        "--data",
        str(small_h5ad),
        "--model",
        str(tiny_model),
        "--geneformer-dir",
        str(geneformer_dir),
        "--config",
        str(cfg),
        "--store",
        str(db),
    )
    assert_bad_input(out, "25426", "20275")
    assert_no_running_runs(db)


def test_perturbation_selecting_no_cells_lists_values(tmp_path, small_h5ad, tiny_model, geneformer_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nfilter = {perturbation = ["Imatinib*"]}\n')
    db = tmp_path / "s.db"
    out = gfattn(
        "pipeline",
        "--data",
        str(small_h5ad),
        "--model",
        str(tiny_model),
        "--geneformer-dir",
        str(geneformer_dir),
        "--config",
        str(cfg),
        "--store",
        str(db),
    )
    assert_bad_input(out, "Imatinib", "Nutlin")
    assert_no_running_runs(db)


def test_dose_selecting_no_cells_lists_doses(tmp_path, small_h5ad, tiny_model, geneformer_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[tasks]]\nname = "dose"\ncolumn = "dose_value"\nunit = "uM"\nclasses = [0.0, 7.0]\n'
        '[data]\nfilter = {perturbation = ["Nutlin*", "control"]}\n'
    )
    db = tmp_path / "s.db"
    out = gfattn(
        "pipeline",
        "--data",
        str(small_h5ad),
        "--model",
        str(tiny_model),
        "--geneformer-dir",
        str(geneformer_dir),
        "--config",
        str(cfg),
        "--store",
        str(db),
    )
    assert_bad_input(out, "class 7.0 does not occur", "0.25 uM")
    assert_no_running_runs(db)


def test_class_too_small_for_the_split(tmp_path, small_h5ad, tiny_model, geneformer_dir):
    import anndata as ad

    adata = ad.read_h5ad(small_h5ad)
    doses = adata.obs["dose_value"].to_numpy()
    keep = np.flatnonzero(doses != 25.0).tolist() + np.flatnonzero(doses == 25.0)[:2].tolist()
    path = tmp_path / "few.h5ad"
    adata[sorted(keep)].copy().write_h5ad(path)
    db = tmp_path / "s.db"
    out = gfattn(
        "pipeline",
        "--data",
        str(path),
        "--model",
        str(tiny_model),
        "--geneformer-dir",
        str(geneformer_dir),
        "--store",
        str(db),
    )
    assert_bad_input(out, "25 uM", "2 cells")
    assert_no_running_runs(db)


def test_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    db = tmp_path / "s.db"
    out = gfattn("pipeline", "--device", "cuda", "--store", str(db))
    assert_bad_input(out, "cuda")
    assert_no_running_runs(db)


def test_config_typo_names_the_nearest_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepoch = 3\n")
    out = gfattn("pipeline", "--config", str(cfg), "--store", str(tmp_path / "s.db"))
    assert_bad_input(out, "train.epoch", "train.epochs")
    assert not (tmp_path / "s.db").exists()


def test_print_config_round_trips(tmp_path):
    out = gfattn("pipeline", "--print-config", "--epochs", "7")
    assert out.returncode == 0
    path = tmp_path / "c.toml"
    path.write_text(out.stdout)
    from pipeline import config

    cfg = config.resolve("default", path)
    assert cfg["train"]["epochs"] == 7
