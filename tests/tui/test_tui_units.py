"""The TUI's pure parts: formatting, label order, the gene filter line, settings, the launch command."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gfattn_tui.config import ConfigError, TuiConfig
from gfattn_tui.format import as_epoch, dose_order, fmt_duration, fmt_time, run_duration
from gfattn_tui.gene_filter import FilterError, parse_gene_filter
from gfattn_tui.launcher import FALLBACK_PRESETS, RunRequest, available_presets
from gfattn_tui.results import histogram_axis, ordered_confusion
from store.results import config_differences, flatten_config, reduce_rank_vector, scores_from_confusion, task_and_mode


def test_durations_read_like_a_terminal_clock():
    assert fmt_duration(0) == "0s"
    assert fmt_duration(59.4) == "59s"
    assert fmt_duration(61) == "1m01s"
    assert fmt_duration(3 * 3600 + 120) == "3h02m"
    assert fmt_duration(3 * 86400 + 3600) == "3d01h"
    assert fmt_duration(None) == "—"


def test_running_duration_uses_the_given_clock_and_finished_runs_their_end():
    run = {"created": 1000.0, "status": "running"}
    assert run_duration(run, now=1060.0) == 60.0
    assert run_duration({**run, "status": "completed", "finished": 1030.0}, now=99999.0) == 30.0
    assert run_duration({**run, "status": "lost", "heartbeat": 1010.0}, now=99999.0) == 10.0


def test_timestamps_accept_epoch_and_iso_text():
    assert as_epoch("1970-01-01T00:01:00Z") == 60.0
    assert as_epoch("1970-01-01 00:01:00") == 60.0  # naive means UTC, as the store writes
    assert as_epoch("60") == 60.0
    assert fmt_time(1_717_243_200.0, utc=True) == "2024-06-01 12:00"


def test_labels_sort_in_dose_order():
    labels = ["12.5", "0", "25", "1.25", "2.5"]
    assert [labels[i] for i in dose_order(labels)] == ["0", "1.25", "2.5", "12.5", "25"]
    assert [["high", "low"][i] for i in dose_order(["high", "low"])] == ["low", "high"]
    units = ["25uM", "2.5 uM", "control"]
    assert [units[i] for i in dose_order(units)] == ["control", "2.5 uM", "25uM"]


def test_confusion_is_reordered_on_both_axes():
    labels, m = ordered_confusion(["high", "low"], np.array([[5, 1], [2, 7]]))
    assert labels == ["low", "high"]
    assert m.tolist() == [[7, 2], [1, 5]]


def test_scores_from_a_confusion_matrix():
    acc, f1 = scores_from_confusion(np.array([[8, 2], [0, 10]]))
    assert acc == pytest.approx(0.9)
    # class 0: precision 1, recall .8; class 1: precision 10/12, recall 1
    assert f1 == pytest.approx(np.mean([2 * 0.8 / 1.8, 2 * (10 / 12) / (10 / 12 + 1)]))


def test_task_and_mode_from_config_or_name():
    assert task_and_mode({"name": "x", "config": {"task": "dose", "mode": "frozen"}}) == ("dose", "frozen")
    assert task_and_mode({"name": "lowhigh/last-1", "config": {}}) == ("lowhigh", "last-1")


def test_config_differences_are_flat_dotted_keys():
    a = {"train": {"epochs": 5, "lr": 1e-4}, "data": {"path": ""}}
    b = {"train": {"epochs": 3, "lr": 1e-4}, "model": {"path": "m"}}
    assert flatten_config(a) == {"train.epochs": 5, "train.lr": 1e-4, "data.path": ""}
    assert config_differences(a, b) == [("data.path", "", None), ("model.path", None, "m"), ("train.epochs", 5, 3)]


def test_rank_vectors_reduce_layers_and_heads():
    v = np.ones((2, 3, 5))
    assert reduce_rank_vector(v).tolist() == [6.0] * 5


def test_histogram_axis_from_edges_start_width_or_index():
    assert histogram_axis({"edges": [0, 2, 4]}, 2) == [1.0, 3.0]
    assert histogram_axis({"start": 100, "width": 20}, 2) == [110.0, 130.0]
    assert histogram_axis({}, 3) == [0.0, 1.0, 2.0]


def test_gene_filter_line_parses_into_store_where():
    cols = ["ensembl_id", "symbol", "attn_a", "in_reference_set"]
    assert parse_gene_filter("attn_a > 0.5 and IN_REFERENCE_SET = 1", cols) == {
        "attn_a": (">", 0.5),
        "in_reference_set": ("=", 1),
    }
    assert parse_gene_filter("symbol in (MDM2, CDKN1A); attn_a is not null", cols) == {
        "symbol": ("in", ["MDM2", "CDKN1A"]),
        "attn_a": ("is not", None),
    }
    assert parse_gene_filter("symbol like 'MDM%'", cols) == {"symbol": ("like", "MDM%")}
    assert parse_gene_filter("   ", cols) == {}
    with pytest.raises(FilterError, match="no column 'atn_a'"):
        parse_gene_filter("atn_a > 1", cols)
    with pytest.raises(FilterError, match="COLUMN OP VALUE"):
        parse_gene_filter("attn_a", cols)
    with pytest.raises(FilterError, match="twice"):
        parse_gene_filter("attn_a > 1 and attn_a < 2", cols)


def test_settings_from_toml_then_environment(tmp_path):
    path = tmp_path / "tui.toml"
    path.write_text(
        textwrap.dedent("""
        theme = "textual-light"
        poll_interval = 2
        page_size = 50
        [keymap]
        "runs.delete" = "x"
    """)
    )
    cfg = TuiConfig.load(path, environ={"GFATTN_TUI_PAGE_SIZE": "200", "GFATTN_TUI_UTC": "yes"})
    assert cfg.theme == "textual-light"
    assert cfg.poll_interval == 2.0
    assert cfg.page_size == 200  # the environment wins over the file
    assert cfg.utc is True
    assert cfg.keymap == {"runs.delete": "x"}
    assert cfg.source == str(path)


def test_settings_file_from_environment_variable(tmp_path):
    path = tmp_path / "elsewhere.toml"
    path.write_text("page_size = 30\n")
    assert TuiConfig.load(environ={"GFATTN_TUI_CONFIG": str(path)}).page_size == 30
    with pytest.raises(ConfigError, match="no such settings file"):
        TuiConfig.load(environ={"GFATTN_TUI_CONFIG": str(tmp_path / "missing.toml")})


def test_settings_errors_name_the_key(tmp_path):
    path = tmp_path / "tui.toml"
    path.write_text("pol_interval = 1\n")
    with pytest.raises(ConfigError, match="did you mean 'poll_interval'"):
        TuiConfig.load(path, environ={})
    with pytest.raises(ConfigError, match="page_size"):
        TuiConfig.load(environ={"GFATTN_TUI_PAGE_SIZE": "many", "XDG_CONFIG_HOME": str(tmp_path)})


def test_pipeline_command_line_from_the_form(tmp_path):
    data = tmp_path / "cells.h5ad"
    data.write_bytes(b"")
    request = RunRequest(preset="quick", data=str(data), name="my run", device="cpu", epochs=2, nproc=1)
    assert request.validate() == []
    argv = request.argv(tmp_path / "gfattn.db")
    assert argv[:6] == [sys.executable, "-m", "pipeline", "pipeline", "--store", str(tmp_path / "gfattn.db")]
    assert argv[6:] == [
        "--preset",
        "quick",
        "--data",
        str(data),
        "--name",
        "my run",
        "--device",
        "cpu",
        "--nproc",
        "1",
        "--epochs",
        "2",
    ]
    assert "--device" not in RunRequest().argv("s.db")  # auto is the command's default


def test_form_problems_are_one_line_each(tmp_path):
    problems = RunRequest(data=str(tmp_path / "missing.h5ad"), model=str(tmp_path / "nomodel"), epochs=0).validate()
    assert any("missing.h5ad does not exist" in p for p in problems)
    assert any("model directory" in p for p in problems)
    assert any("epochs must be at least 1" in p for p in problems)


def test_presets_come_from_the_pipeline_when_it_has_them():
    presets = available_presets()
    assert {"default", "quick"} <= set(presets)
    assert all(isinstance(v, str) and v for v in presets.values())
    assert set(FALLBACK_PRESETS) >= {"default", "quick", "thesis-synthetic", "sciplex2-nutlin"}


def test_tui_start_does_not_import_torch_or_scanpy():
    probe = (
        "import sys, gfattn_tui.app, gfattn_tui.screens.run, gfattn_tui.screens.new_run, gfattn_tui.screens.compare;"
        "print(sorted(m for m in ('torch', 'transformers', 'scanpy', 'anndata', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_and_bad_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gfattn_tui", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--store" in out.stdout
    bad = tmp_path / "tui.toml"
    bad.write_text("theme = [\n")
    out = subprocess.run(
        [sys.executable, "-m", "gfattn_tui", "--config", str(bad), "--store", str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "not valid TOML" in out.stderr
