"""The sharded analysis's job (`pipeline.parallel.analyse`), in-process: what one worker computes and hands
back equals `analyse_model` in the pipeline's own process; a worker stops when the pipeline that started it
has ended; a failed job names the worker's error in one line. (Two gloo processes against one: the warm
rerun of `tests/run/test_pipeline_reproducible.py`.)"""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from tests._helpers_model import class_coded_cells, save_tiny_classifier, toy_dictionaries

ANALYSIS = {
    "batch_size": 4,
    "attribution": ["hao", "rollout"],
    "hao_steps": 2,
    "ig_steps": 2,
    "ig_max_steps": 2,
    "ig_gap_p95": 1.0,
    "deletion": True,
    "deletion_k": [2, 4],
    "deletion_random_sets": 3,
    "deletion_max_random_sets": 3,
    "deletion_match_pool": 5,
    "deletion_top_genes": 3,
    "null_bins": [3, 3],
    "n_boot": 20,
    "sanity": True,
    "sanity_attribution": False,
}


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    dicts = toy_dictionaries(60)
    path = save_tiny_classifier(tmp_path_factory.mktemp("sharded") / "model", dicts, seed=3)
    cells = class_coded_cells(24, vocab_size=dicts.vocab_size, length=(8, 20), seed=4)
    cells["group_name"] = ["low" if y == 0 else "high" for y in cells["label"]]
    return path, cells, dicts


def _job(tmp_path, unit, parent: int) -> dict:
    path, cells, dicts = unit
    return {
        "units": [{"key": "m", "model_path": str(path), "permuted_path": None, "deletion": True, "sanity": True}],
        "cells": cells,
        "dicts": dicts,
        "analysis": ANALYSIS,
        "de": None,
        "seed": 5,
        "device": "cpu",
        "events": str(tmp_path / "events.jsonl"),
        "results": str(tmp_path),
        "parent": parent,
    }


def test_a_worker_hands_back_what_the_pipeline_would_compute(unit, tmp_path):
    import os

    import pandas as pd

    from pipeline.analysis.model import analyse_model
    from pipeline.parallel.analyse import _run_job

    path, cells, dicts = unit
    job = _job(tmp_path, unit, os.getpid())
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    assert _run_job(str(tmp_path / "job.pkl")) == 0
    got = pickle.loads((tmp_path / "result-0.pkl").read_bytes())["analysis"]
    want = analyse_model(path, cells, dicts=dicts, analysis=ANALYSIS, de=None, seed=5, device="cpu")
    pd.testing.assert_frame_equal(got.genes, want.genes)
    pd.testing.assert_frame_equal(got.deletion.sets, want.deletion.sets)
    np.testing.assert_array_equal(got.attribution.gene_sum["hao"], want.attribution.gene_sum["hao"])
    assert got.sanity["scores"] == want.sanity["scores"] and got.world_size == 1
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert lines and all('"model": 0' in line for line in lines)  # progress for the parent to replay


def test_a_worker_stops_when_its_pipeline_has_ended(unit, tmp_path):
    from pipeline.parallel.analyse import _run_job

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(_job(tmp_path, unit, ended.pid)))
    with pytest.raises(SystemExit) as stop:
        _run_job(str(tmp_path / "job.pkl"))
    assert stop.value.code == 3 and not (tmp_path / "result-0.pkl").exists()


def test_a_failed_job_names_the_workers_error(unit, tmp_path, monkeypatch):
    """The processes end without a result: one line with the exception the worker's traceback ends in."""
    import pipeline.parallel.analyse as A

    script = "import sys; print('Traceback (most recent call last):'); print('  File \"x.py\", line 1');"
    script += "print('ValueError: cells have up to 99 tokens but the model has 64 positions'); sys.exit(1)"
    import pipeline.parallel.launch as L

    monkeypatch.setattr(L, "torchrun_command", lambda *a, **k: [sys.executable, "-c", script])
    path, cells, dicts = unit
    units = [{"key": "m", "model_path": str(path), "permuted_path": None, "deletion": False, "sanity": False}]
    job = A.ShardedAnalysis(
        units, cells, dicts=dicts, analysis=ANALYSIS, de=None, seed=5, device="cpu", nproc=2, work_dir=tmp_path / "w"
    )
    try:
        with pytest.raises(RuntimeError) as err:
            job.result("m")
    finally:
        job.close()
    message = str(err.value)
    assert "in 2 processes failed (exit status 1)" in message
    assert message.endswith("ValueError: cells have up to 99 tokens but the model has 64 positions")
    assert "\n" not in message and not (tmp_path / "w").exists()
