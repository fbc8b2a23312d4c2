"""The reliability battery's cheap cases, in-process through `pipeline.cli.main(argv)`: every bad input is
one line on stderr naming what is wrong, exit 2, no traceback, and no run recorded.

Config values reach `gfattn pipeline` through `--config FILE.toml`; corrupt files, damaged stores and
closed pipes through the commands that read them. Nothing here trains a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline import config
from pipeline.cli import main
from pipeline.errors import InputError

FIXTURES = Path(__file__).with_name("fixtures")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def no_run_recorded(store: Path) -> bool:
    if not store.exists():
        return True
    import sqlite3

    with sqlite3.connect(store) as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


# ------------------------------------------------------------------------------- config values
BAD_VALUES = [
    ("[train]\nbatch_size = 0\n", "train.batch_size = 0; allowed: an integer >= 1"),
    ("[train]\ngrad_accum = 0\n", "train.grad_accum = 0; allowed: an integer >= 1"),
    ("[train]\nlr = nan\n", "train.lr = nan; allowed: a number > 0"),
    ("[train]\nlr = -1e-3\n", "train.lr = -0.001"),
    ("[train]\nlr = inf\n", "train.lr = inf"),
    ("[train]\nepochs = 'ten'\n", 'train.epochs = "ten"; allowed: an integer >= 1'),
    ("[train]\nepochs = 2.5\n", "train.epochs = 2.5"),
    ("[train]\nwarmup_ratio = 1.0\n", "train.warmup_ratio = 1.0; allowed: a number >= 0 and < 1"),
    ("[train]\namp = 'fp8'\n", "allowed: one of auto, bf16, fp16, off"),
    ("[train]\nmodes = [1]\n", "train.modes = [1]; allowed: a list of modes"),
    ("[train]\nmodes = 'frozen'\n", 'train.modes = "frozen"'),
    ("[train]\nmodes = ['last-x']\n[analysis]\npairs = []\n", "train.modes: unknown training mode 'last-x'"),
    ("[train]\nmodes = []\n[analysis]\npairs = []\n", "train.modes = []"),
    ("[run]\nseed = -1\n", "run.seed = -1; allowed: an integer from 0 to 4294967295"),
    ("[run]\nseed = 4294967296\n", "run.seed = 4294967296"),
    ("[run]\nseed = true\n", "run.seed = true"),
    ("[pretrain]\nseed = -2\n", "pretrain.seed = -2"),
    ("[analysis]\nbatch_size = 0\n", "analysis.batch_size = 0"),
    ("[analysis]\nn_boot = -1\n", "analysis.n_boot = -1"),
    ("[analysis]\ntop_k = [10, 0]\n", "analysis.top_k = [10, 0]; allowed: a list of integers >= 1"),
    ("[analysis]\nattribution = ['hao', 'shap']\n", "allowed: a list of values from hao, ig, rollout"),
    ("[analysis]\nnull_bins = [5]\n", "analysis.null_bins = [5]; allowed: two integers >= 1"),
    ("[analysis]\nde = 'yes'\n", 'analysis.de = "yes"; allowed: true or false'),
    ("[data]\nmax_cells = -5\n", "data.max_cells = -5"),
    ("[data]\nsynth_scale = 0\n", "data.synth_scale = 0"),
    ("[data]\nfilter = ['Nutlin']\n", "data.filter"),
    ("[data]\nfixed_length_mode = 3\n", "data.fixed_length_mode = 3; allowed: one of top, subsample"),
    ("[split]\ntest = 0\n", "split.test = 0"),
    ("[model]\nversion = 'V3'\n", "allowed: one of auto, V1, V2"),
    ("[compute]\nnproc = 0\n", "compute.nproc = 0"),
    ("[compute]\nthreads = -1\n", "compute.threads = -1"),
    ("[compute]\ndevice = 'tpu'\n", "allowed: one of auto, cpu, cuda"),
    ("[[tasks]]\nname = 'x'\ncolumn = 'c'\nscale = nan\n", "scale = nan"),
    ("[[tasks]]\nname = 'x'\ncolumn = 'c'\nclasses = ['a', {b = 1}]\n", "classes = "),
]


# values that are wrong only together (checked once every layer is merged, so no file is named)
BAD_COMBINATIONS = [
    ("[pretrain]\nhidden = 30\nheads = 4\n", "pretrain.hidden = 30 with pretrain.heads = 4"),
    ("[split]\ntest = 0.5\nvalidation = 0.45\n", "allowed: at least 10%"),
    ("[analysis]\npairs = [['frozen', 'last-2']]\n", "not among train.modes"),
]


@pytest.mark.parametrize("toml, needle", BAD_VALUES + BAD_COMBINATIONS)
def test_a_bad_config_value_is_one_line_and_records_nothing(tmp_path, capsys, toml, needle):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    store = tmp_path / "s.db"
    code, _, err = run_cli(capsys, "pipeline", "--config", path, "--store", store)
    assert_one_line(code, err, needle, *([str(path)] if (toml, needle) in BAD_VALUES else []))
    assert no_run_recorded(store)


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--seed", "-3", "command line: run.seed = -3"), ("--epochs", "0", "command line: train.epochs = 0")],
)
def test_a_bad_flag_value_is_one_line(tmp_path, capsys, flag, value, needle):
    store = tmp_path / "s.db"
    code, _, err = run_cli(capsys, "pipeline", flag, value, "--store", store)
    assert_one_line(code, err, needle)
    assert no_run_recorded(store)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[run]\nname = "Zustand µ"\n'.encode("latin-1"))
    code, _, err = run_cli(capsys, "pipeline", "--config", path, "--store", tmp_path / "s.db")
    assert_one_line(code, err, str(path), "is not UTF-8", "0xb5")


def test_every_default_passes_its_own_rules():
    cfg = config.defaults()
    for section, keys in config.KEYS.items():
        for name in keys:
            assert config.check_value(section, name, cfg[section][name]) == cfg[section][name]


def test_an_integer_for_a_number_becomes_a_float(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 1\n")
    lr = config.resolve("default", path)["train"]["lr"]
    assert lr == 1.0 and isinstance(lr, float)


def test_the_schema_and_train_config_share_their_defaults():
    from pipeline.training.finetune import TrainConfig

    tc, train = TrainConfig(), config.defaults()["train"]
    for name in ("lr", "weight_decay", "warmup_ratio", "epochs", "max_epochs", "batch_size", "grad_accum", "amp"):
        assert getattr(tc, name) == train[name], name
    # the library's loop is plain (exactly `epochs`, no early stop, unweighted loss); the pipeline's [train]
    # section turns the adaptive schedule on, and says so in its documentation
    assert (tc.min_steps, tc.patience, tc.class_weights) == (0, 0, False)
    assert train["min_steps"] > 0 and train["patience"] > 0 and train["class_weights"] is True


def test_presets_resolve_as_before_the_typed_schema():
    """Every preset resolves every key it had before the schema was typed to exactly the value (and JSON type)
    recorded in the fixture (the values of then, and the deliberate changes since: balanced class weights, the
    default preset's integrated-gradients steps); keys added since are the only other difference."""
    before = json.loads((FIXTURES / "config_presets_resolved.json").read_text())
    assert set(before) == set(config.PRESETS)
    for name in config.PRESETS:
        now = config.resolve(name)
        assert set(now) >= set(before[name]), name
        for section, keys in before[name].items():
            if not isinstance(keys, dict):
                assert json.dumps(now[section], sort_keys=True) == json.dumps(keys, sort_keys=True), (name, section)
                continue
            for key, value in keys.items():
                got = json.dumps(now[section][key], sort_keys=True)
                assert got == json.dumps(value, sort_keys=True), (name, section, key)


def test_print_config_documents_each_key_and_reads_back(tmp_path):
    cfg = config.resolve("quick")
    text = config.to_toml(cfg)
    assert "# cells per attention batch [an integer >= 1]" in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    again = config.resolve("quick", path)
    assert json.dumps(again, sort_keys=True) == json.dumps(cfg, sort_keys=True)


def test_the_writer_orders_keys_as_the_schema_does():
    text = config.dumps_toml({"train": {"lr": 1e-3, "epochs": 2}, "run": {"seed": 3}})
    assert text.index("[run]") < text.index("[train]") < text.index("epochs") < text.index("lr")


def test_check_value_names_key_value_and_what_is_allowed():
    with pytest.raises(InputError) as err:
        config.check_value("train", "lr", math.nan, "x.toml")
    assert str(err.value) == "x.toml: train.lr = nan; allowed: a number > 0"


# ------------------------------------------------------------------ names from the user's data
USER_NAMES = ["Zustand µ ü", 'say "hi"', "x" * 300, "12.5 uM", "a.b-c d"]


def test_any_task_or_class_name_is_a_column_of_the_store(tmp_path):
    import pandas as pd

    from store import Store

    store = Store(tmp_path / "s.db")
    run = store.create_run("data", "data")
    cells = pd.DataFrame({"cell_id": ["c1", "c2"], **{n: [f"{n}-1", f"{n}-2"] for n in USER_NAMES}})
    store.put_cells(run, cells)
    back = store.cells(run)
    assert list(back.columns)[-len(USER_NAMES) :] == USER_NAMES
    assert back["Zustand µ ü"].tolist() == ["Zustand µ ü-1", "Zustand µ ü-2"]
    genes = pd.DataFrame({"ensembl_id": ["E1", "E2"], **{f"rank_mean_{n}": [1.0, 2.0] for n in USER_NAMES}})
    store.put_gene_table(run, "genes", genes)
    assert store.gene_table_columns(run, "genes")[-len(USER_NAMES) :] == [f"rank_mean_{n}" for n in USER_NAMES]
    rows = store.gene_table(run, "genes", order_by="rank_mean_Zustand µ ü", where={'rank_mean_say "hi"': 2.0})
    assert [r["ensembl_id"] for r in rows] == ["E2"]
    store.close()


def test_class_names_reach_gene_columns_unchanged():
    from pipeline.analysis.pair import sql_name

    assert [sql_name(n) for n in USER_NAMES] == USER_NAMES


def test_a_task_name_becomes_a_safe_reversible_folder_name():
    from urllib.parse import unquote

    from pipeline.paths import file_name

    for name in ["lowhigh", "Zustand µ ü", "a/b", "..", ".x", "50%"]:
        assert "/" not in file_name(name) and not file_name(name).startswith(".")
        assert unquote(file_name(name)) == name
    long = file_name("y" * 400)
    assert len(long.encode()) <= 120 and long != file_name("y" * 401)


def test_a_task_name_too_long_is_one_line_not_an_sql_error(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(f"[[tasks]]\nname = '{'t' * 201}'\ncolumn = 'c'\n")
    code, _, err = run_cli(capsys, "pipeline", "--config", path, "--store", tmp_path / "s.db")
    assert_one_line(code, err, "has 201 characters; allowed: at most 200")
    long_but_fine = "Zustand µ ü " * 16  # 192 characters
    cfg = config.resolve("default", flags={"tasks": [{"name": long_but_fine, "column": "c"}]})
    assert cfg["tasks"][0]["name"] == long_but_fine


def test_a_task_named_like_a_cells_column_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "pipeline", "--label-column", "split", "--store", tmp_path / "s.db")
    assert_one_line(code, err, "task name 'split' is a column of gfattn's own cells table")


# ------------------------------------------------------------------------ checkpoints at preflight
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests._helpers_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("ckpt") / "model", layers=2)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + data[8:])


def _as_torch_bin(model: Path, damage) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    damage(model / "pytorch_model.bin")


def _not_weights_only(path: Path) -> None:
    import argparse

    import torch

    torch.save({"bert.embeddings.word_embeddings.weight": argparse.Namespace(x=1)}, path)


def _manifest_of_other_weights(model: Path) -> None:
    (model / "gfattn_manifest.json").write_text(
        json.dumps({"files": {"model.safetensors": {"sha256": "0" * 64, "bytes": 1}}})
    )


def _three_layers_in_config(model: Path) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (model / "config.json").write_text(json.dumps(cfg))


CHECKPOINT_DAMAGE = {
    "truncated safetensors": (lambda m: _truncate(m / "model.safetensors"), "model.safetensors cannot be read"),
    "header too large": (lambda m: _huge_header(m / "model.safetensors"), "header too large"),
    "truncated torch bin": (
        lambda m: _as_torch_bin(m, _truncate),
        "pytorch_model.bin cannot be loaded with weights_only=True",
    ),
    "not weights only": (
        lambda m: _as_torch_bin(m, _not_weights_only),
        "pytorch_model.bin cannot be loaded with weights_only=True",
    ),
    "manifest names other weights": (_manifest_of_other_weights, "does not match its manifest"),
    "weights of another model": (_three_layers_in_config, "num_hidden_layers = 3"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_one_line_before_a_run(tmp_path, capsys, tiny_checkpoint, case):
    damage, needle = CHECKPOINT_DAMAGE[case]
    model = _copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    damage(model)
    store = tmp_path / "s.db"
    code, _, err = run_cli(capsys, "pipeline", "--model", model, "--store", store)
    assert_one_line(code, err, needle, str(model))
    assert no_run_recorded(store)


def test_an_intact_checkpoint_passes_the_check(tmp_path, tiny_checkpoint):
    from pipeline.io import write_manifest
    from pipeline.models.load import check_checkpoint

    model = _copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    write_manifest(model)
    check_checkpoint(model)
    _as_torch_bin(model, lambda p: None)
    (model / "gfattn_manifest.json").unlink()
    check_checkpoint(model)


# ------------------------------------------------------------------------- the synthetic data cache
def _synth_ctx(cache: Path):
    from types import SimpleNamespace

    cfg = config.resolve("quick")
    cfg["data"]["synth_scale"] = 0.02
    return SimpleNamespace(cfg=cfg, cache=cache, seed=0, rep=SimpleNamespace(line=lambda *_: None))


def test_the_cached_synthetic_data_carry_a_manifest_checked_on_reuse(tmp_path):
    import anndata as ad
    import numpy as np

    from pipeline.io import MANIFEST, sha256_file
    from pipeline.run.stages.data import synthetic_data_path

    ctx = _synth_ctx(tmp_path)
    path = synthetic_data_path(ctx)
    assert (path.parent / MANIFEST).is_file()
    first = sha256_file(path)
    assert synthetic_data_path(ctx) == path and sha256_file(path) == first  # reused as it is
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(path)  # another valid .h5ad in its place
    with pytest.raises(InputError, match="cached synthetic data .* does not match its manifest"):
        synthetic_data_path(ctx)
    (path.parent / MANIFEST).unlink()
    with pytest.raises(InputError, match=f"has no {MANIFEST}"):
        synthetic_data_path(ctx)


def test_a_synthetic_data_set_that_does_not_fit_is_refused_up_front(tmp_path, monkeypatch):
    """h5py may crash the process when the disk fills mid-write: the estimate (every matrix, obs, var)
    must refuse first, naming the cache entry, with no temporaries left."""
    from pipeline import io
    from pipeline.run.stages.data import synthetic_data_path

    ctx = _synth_ctx(tmp_path)
    monkeypatch.setattr(io, "_free_bytes", lambda path: 5 << 20)
    with pytest.raises(io.DiskFullError) as err:
        synthetic_data_path(ctx)
    assert "sciplex-like-" in str(err.value) and ".tmp" not in str(err.value) and "resume" in str(err.value)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_the_h5ad_estimate_covers_obs_and_var():
    import anndata as ad
    import numpy as np
    import pandas as pd

    from pipeline.io import _h5ad_size_estimate

    n, g = 50, 4000
    a = ad.AnnData(
        np.zeros((n, g), dtype=np.float32),
        var=pd.DataFrame({"symbol": [f"GENE-{i:08d}-long-name" for i in range(g)]}, index=[f"g{i}" for i in range(g)]),
    )
    assert _h5ad_size_estimate(a) > n * g * 4 + a.var.memory_usage(deep=True).sum()


# ------------------------------------------------------------------------------ closed pipes
class _ClosedPipe:
    """stdout whose reader has gone: every write and flush is a BrokenPipeError."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise OSError("no file descriptor")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["runs", "--help"], ["pipeline", "--help"]])
def test_help_into_a_closed_pipe_exits_quietly(monkeypatch, capsys, argv):
    import sys

    from pipeline import cli

    monkeypatch.setattr(cli, "_stdout_closed", lambda: True)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    try:
        code = main(argv)
    except SystemExit as exc:  # pragma: no cover - what the old code did
        code = exc.code
    assert code == cli.BROKEN_PIPE_EXIT
    assert capsys.readouterr().err == ""


def test_top_level_help_piped_to_head(tmp_path):
    """`gfattn --help | head -1` as a shell runs it: the first line, exit 141 quietly, no traceback."""
    import subprocess
    import sys

    out = subprocess.run(
        f"{sys.executable} -m pipeline --help | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.stdout.strip() in ("0", "141")  # 0: help fit in the pipe buffer before head closed it


# --------------------------------------------------------------------------------- damaged stores
@pytest.fixture(scope="module")
def damaged_store(tmp_path_factory):
    """A store whose gene-table pages are overwritten: `runs` still lists, reading the table fails."""
    import sqlite3

    import numpy as np
    import pandas as pd

    from store import Store

    path = tmp_path_factory.mktemp("damaged") / "s.db"
    st = Store(path)
    run = st.create_run("p", "pipeline")
    child = st.create_run("a", "analysis", parent_id=run)
    n = 3000
    genes = pd.DataFrame({"ensembl_id": [f"E{i}" for i in range(n)], "score": np.arange(n, dtype=float)})
    genes["note"] = "x" * 50
    st.put_gene_table(child, "genes", genes)
    st.finish_run(child, "completed")
    st.finish_run(run, "completed")
    st.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as fh:
        for page in range(60, 150):
            fh.seek(page * 4096)
            fh.write(b"\xde\xad" * 2048)
    return path


@pytest.mark.parametrize(
    "argv", [["export", "1", "--out", "{tmp}/out"], ["rm", "1", "--yes"], ["rm", "2", "--yes"], ["show", "1"]]
)
def test_a_damaged_store_is_one_line(tmp_path, capsys, damaged_store, argv):
    import shutil

    store = tmp_path / "s.db"
    shutil.copy(damaged_store, store)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(capsys, *argv, "--store", store)
    assert_one_line(code, err, f"store {store} is damaged", "malformed")
    code, out, _ = run_cli(capsys, "runs", "--store", store)
    assert code == 0 and "pipeline" in out


def test_a_full_disk_during_a_store_write_says_so_as_the_other_paths_do(tmp_path, monkeypatch):
    import sqlite3

    from store import Store, StoreFullError

    st = Store(tmp_path / "s.db")
    run = st.create_run("p", "pipeline")
    real = st._conn

    class Full:
        in_transaction = False

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(st, "_conn", Full())
    with pytest.raises(StoreFullError) as err:
        st.log_event(run, "hello")
    assert str(err.value).startswith(f"out of disk space writing {st.path} (database or disk is full)")
    assert "resume the run" in str(err.value)
    monkeypatch.undo()
    assert st.get_run(run)["status"] == "running"  # rolled back, the store still usable
    st.close()


# --------------------------------------------------------------------------------------- gfattn rm
def _pipeline_with_checkpoint(store_path: Path):
    from pipeline.paths import CHECKPOINT_JSON, cache_dir_for_store
    from store import Store

    st = Store(store_path)
    run = st.create_run("p", "pipeline")
    child = st.create_run("lowhigh/frozen", "finetune", parent_id=run)
    folder = cache_dir_for_store(store_path) / "runs" / st.uid / str(run) / "lowhigh__frozen"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    st.put_json(child, CHECKPOINT_JSON, {"path": str(folder), "weights_sha256": "0"})
    return st, run, child, folder


def test_rm_removes_the_checkpoints_the_run_owns(tmp_path, capsys):
    st, run, child, folder = _pipeline_with_checkpoint(tmp_path / "s.db")
    st.finish_run(child, "completed")
    st.finish_run(run, "completed")
    other = folder.parents[1] / "999"  # another run's folder stays
    other.mkdir()
    st.close()
    code, out, err = run_cli(capsys, "rm", str(run), "--yes", "--store", tmp_path / "s.db")
    assert code == 0, err
    assert "removed 1 checkpoint folder" in out
    assert not folder.parent.exists() and other.is_dir()


def test_rm_of_a_child_removes_its_own_checkpoint_only(tmp_path, capsys):
    st, run, child, folder = _pipeline_with_checkpoint(tmp_path / "s.db")
    st.finish_run(child, "completed")
    st.finish_run(run, "completed")
    (folder.parent / "lowhigh__unfrozen").mkdir()
    st.close()
    code, out, err = run_cli(capsys, "rm", str(child), "--yes", "--store", tmp_path / "s.db")
    assert code == 0, err
    assert not folder.exists() and (folder.parent / "lowhigh__unfrozen").is_dir()


def test_rm_refuses_a_running_run(tmp_path, capsys):
    st, run, child, folder = _pipeline_with_checkpoint(tmp_path / "s.db")  # running in this (live) process
    st.close()
    code, _, err = run_cli(capsys, "rm", str(run), "--yes", "--store", tmp_path / "s.db")
    assert_one_line(code, err, f"run {run} ('p') is still running", "stop it first")
    assert folder.is_dir()


def test_a_pipeline_whose_run_is_deleted_under_it_ends_with_one_line(tmp_path, capsys, monkeypatch):
    from pipeline.run import driver as experiment

    def stages(ctx):
        (ctx.cache / "runs" / ctx.store.uid / str(ctx.run_id)).mkdir(parents=True)
        ctx.store.delete_run(ctx.run_id)  # what `gfattn rm` or the TUI did from another process
        ctx.store.log_event(ctx.run_id, "the next write")

    monkeypatch.setattr(experiment, "_stages", stages)
    store = tmp_path / "s.db"
    code, _, err = run_cli(capsys, "pipeline", "--quick", "--store", store)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "was deleted from the store while it ran" in last and "--resume" not in err, err
    assert not list((tmp_path / ".gfattn-cache" / "runs").rglob("1"))  # its checkpoint folder went with it


# --------------------------------------------------------------------------------- duplicated cells
def test_duplicated_cell_ids_are_one_line_without_anndata_warnings(tmp_path, capsys):
    import warnings

    import anndata as ad
    import numpy as np
    import pandas as pd

    path = tmp_path / "dup.h5ad"
    obs = pd.DataFrame({"state": ["a", "b"] * 10}, index=[f"c{i % 15}" for i in range(20)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(np.ones((20, 5), dtype=np.float32), obs=obs).write_h5ad(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _, err = run_cli(
            capsys, "pipeline", "--data", path, "--label-column", "state", "--store", tmp_path / "s.db"
        )
    assert_one_line(code, err, "5 duplicated cell IDs", "obs_names_make_unique")
    assert not [w for w in seen if "not unique" in str(w.message)], [str(w.message) for w in seen]
    assert no_run_recorded(tmp_path / "s.db")


def test_a_store_write_past_the_file_size_limit_is_the_disk_full_line(tmp_path):
    """SQLite reports a write past RLIMIT_FSIZE as a plain I/O error: still the disk-full words, the
    transaction rolled back and the store usable once there is room."""
    import subprocess
    import sys

    code = """
import resource, sys
from store import Store, StoreFullError
st = Store(sys.argv[1])
run = st.create_run("p", "pipeline")
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
try:
    for i in range(100_000):
        st.log_event(run, "x" * 500)
except StoreFullError as exc:
    print(exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
st.log_event(run, "after")
print(st.get_run(run)["status"])
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s.db")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    first, status = out.stdout.strip().splitlines()
    assert first.startswith(f"out of disk space writing {tmp_path / 's.db'}") and "resume the run" in first
    assert status == "running"


def test_a_full_disk_during_an_export_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import pandas as pd

    from store import Store

    st = Store(tmp_path / "s.db")
    run = st.create_run("p", "pipeline")
    st.put_cells(run, pd.DataFrame({"cell_id": ["c1"], "state": ["a"]}))
    st.finish_run(run, "completed")
    st.close()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    code, _, err = run_cli(capsys, "export", "1", "--out", tmp_path / "out", "--store", tmp_path / "s.db")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "out of disk space" in err, err


def test_a_full_disk_while_drawing_figures_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from pipeline.io import DiskFullError
    from pipeline.report import plot

    plt = plot._plt()
    fig = plt.figure()
    real = type(fig).savefig

    def savefig(self, fname, **kwargs):
        real(self, fname, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(fig), "savefig", savefig)
    with pytest.raises(DiskFullError, match="fig1_umap.png"):
        plot._save(fig, tmp_path, "fig1_umap", [])
    assert list(tmp_path.iterdir()) == []
