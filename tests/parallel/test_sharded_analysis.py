"""The sharded analysis's workers (`pipeline.parallel.analyse`), in-process: what one worker computes and
hands back equals `analyse_model` in the pipeline's own process; a worker stops when the pipeline that started
it has ended; workers started once analyse each batch handed over; a failed job names the worker's error in
one line. (Two gloo processes against one: the warm
rerun of `tests/run/test_pipeline_reproducible.py`.)"""

from __future__ import annotations

import pickle
import signal
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


def _batch(unit) -> dict:
    path, cells, dicts = unit
    return {
        "units": [
            {"key": "m", "uid": 0, "model_path": str(path), "permuted_path": None, "deletion": True, "sanity": True}
        ],
        "cells": cells,
        "dicts": dicts,
        "analysis": ANALYSIS,
        "de": None,
        "seed": 5,
    }


def test_a_worker_hands_back_what_the_pipeline_would_compute(unit, tmp_path):
    """One worker (a process group of one, in this process) serves the batch the parent wrote, then stops at
    the stop file: its result equals `analyse_model` in the pipeline's own process."""
    import os

    import pandas as pd

    from pipeline.analysis.model import analyse_model
    from pipeline.parallel.analyse import STOP_FILE, serve

    path, cells, dicts = unit
    (tmp_path / "batch-0.pkl").write_bytes(pickle.dumps(_batch(unit)))
    (tmp_path / STOP_FILE).touch()
    assert serve(tmp_path, os.getpid(), "cpu", threads=1) == 0
    got = pickle.loads((tmp_path / "result-0.pkl").read_bytes())["analysis"]
    want = analyse_model(path, cells, dicts=dicts, analysis=ANALYSIS, de=None, seed=5, device="cpu")
    pd.testing.assert_frame_equal(got.genes, want.genes)
    pd.testing.assert_frame_equal(got.deletion.sets, want.deletion.sets)
    np.testing.assert_array_equal(got.attribution.gene_sum["hao"], want.attribution.gene_sum["hao"])
    assert got.sanity["scores"] == want.sanity["scores"] and got.world_size == 1
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert lines and all('"model": 0' in line for line in lines)  # progress for the parent to replay


def test_a_worker_stops_when_its_pipeline_has_ended(unit, tmp_path):
    """Waiting for work, or analysing, a worker whose pipeline has ended stops (exit status 3)."""
    from pipeline.parallel.analyse import serve

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    with pytest.raises(SystemExit) as waiting:
        serve(tmp_path, ended.pid, "cpu", threads=1)
    (tmp_path / "batch-0.pkl").write_bytes(pickle.dumps(_batch(unit)))
    with pytest.raises(SystemExit) as busy:
        serve(tmp_path, ended.pid, "cpu", threads=1)
    assert waiting.value.code == busy.value.code == 3 and not (tmp_path / "result-0.pkl").exists()


def test_workers_start_once_and_analyse_what_is_handed_over(unit, tmp_path, monkeypatch):
    """`AnalysisWorkers` starts its processes before any work exists; each `submit` is one batch, its models
    numbered in turn; `result` waits for each; `close` stops the idle processes and removes the folder."""
    import pipeline.parallel.analyse as A
    import pipeline.parallel.launch as L

    script = (
        "import os, sys; sys.path.insert(0, os.getcwd());"
        "from pipeline.parallel.analyse import serve;"
        "a = sys.argv[1:]; sys.exit(serve(a[1], int(a[3]), a[5], int(a[7])))"
    )
    monkeypatch.setattr(L, "torchrun_command", lambda argv, nproc, **k: [sys.executable, "-c", script, *argv])
    path, cells, dicts = unit
    workers = A.AnalysisWorkers(device="cpu", nproc=1, threads=1, work_dir=tmp_path / "w")
    try:
        for key in ("a", "b"):
            units = [{"key": key, "model_path": str(path), "permuted_path": None, "deletion": False, "sanity": False}]
            workers.submit(units, cells, dicts=dicts, analysis=ANALYSIS, de=None, seed=5)
        seen = []
        first = workers.result("a", lambda done, total, unit: seen.append((done, total, unit)))
        second = workers.result("b")
        assert workers.uids == {"a": 0, "b": 1} and seen and seen[-1][0] == seen[-1][1]
        assert first.genes.equals(second.genes) and first.deletion is None
        with pytest.raises(ValueError, match="handed to the analysis processes already"):
            workers.submit(units, cells, dicts=dicts, analysis=ANALYSIS, de=None, seed=5)
    finally:
        workers.close()
    assert workers.proc.returncode == 0 and not (tmp_path / "w").exists()


def test_a_failed_job_names_the_workers_error(unit, tmp_path, monkeypatch):
    """The processes end without a result: one line with the exception the worker's traceback ends in."""
    import pipeline.parallel.analyse as A

    script = "import sys; print('Traceback (most recent call last):'); print('  File \"x.py\", line 1');"
    script += "print('ValueError: cells have up to 99 tokens but the model has 64 positions'); sys.exit(1)"
    import pipeline.parallel.launch as L

    monkeypatch.setattr(L, "torchrun_command", lambda *a, **k: [sys.executable, "-c", script])
    path, cells, dicts = unit
    units = [{"key": "m", "model_path": str(path), "permuted_path": None, "deletion": False, "sanity": False}]
    job = A.AnalysisWorkers(device="cpu", nproc=2, work_dir=tmp_path / "w")
    job.submit(units, cells, dicts=dicts, analysis=ANALYSIS, de=None, seed=5)
    try:
        with pytest.raises(RuntimeError) as err:
            job.result("m")
    finally:
        job.close()
    message = str(err.value)
    assert "in 2 processes failed (exit status 1)" in message
    assert message.endswith("ValueError: cells have up to 99 tokens but the model has 64 positions")
    assert "\n" not in message and not (tmp_path / "w").exists()


def test_worker_threads_follow_the_runs_count():
    from pipeline.parallel.analyse import worker_threads

    assert worker_threads(3, 2) == 3  # compute.threads set: every process runs the one process's kernels
    assert worker_threads(0, 1) >= 1 and worker_threads(0, 10_000) == 1


def test_closing_stops_processes_busy_with_a_model(unit, tmp_path, monkeypatch):
    """An interrupted run closes its workers while a model it handed over has no result yet: they are
    stopped at once (a signal to their process group), not waited for."""
    import pipeline.parallel.analyse as A
    import pipeline.parallel.launch as L

    monkeypatch.setattr(L, "torchrun_command", lambda *a, **k: [sys.executable, "-c", "import time; time.sleep(600)"])
    path, cells, dicts = unit
    workers = A.AnalysisWorkers(device="cpu", nproc=2, work_dir=tmp_path / "w")
    units = [{"key": "m", "model_path": str(path), "permuted_path": None, "deletion": False, "sanity": False}]
    workers.submit(units, cells, dicts=dicts, analysis=ANALYSIS, de=None, seed=5)
    workers.close()
    assert workers.proc.returncode == -signal.SIGTERM and not (tmp_path / "w").exists()


def test_batches_are_shared_out_by_padded_tokens_each_run_once():
    """`share`: every batch on exactly one rank, the same assignment on every rank, all of them in one
    process, and the ranks' padded tokens closer than every world-th batch gives them (rank 0 would take the
    longer batch of each pair and the odd one)."""
    import numpy as np

    from pipeline.parallel.distributed import batch_cost, share
    from pipeline.tokenize.batching import length_grouped_batches

    lengths = np.random.default_rng(0).integers(20, 97, 229)
    batches = length_grouped_batches(lengths, 8)
    costs = [batch_cost(b, lengths) for b in batches]
    assert costs == sorted(costs, reverse=True) and costs[0] == 8 * 96
    assert share(costs, (0, 1)) == list(range(len(batches)))
    for world in (2, 3):
        owned = [share(costs, (r, world)) for r in range(world)]
        assert sorted(i for mine in owned for i in mine) == list(range(len(batches)))
        loads = [sum(costs[i] for i in mine) for mine in owned]
        strided = [sum(costs[r::world]) for r in range(world)]
        assert max(loads) - min(loads) <= max(costs)
        assert max(loads) - min(loads) < max(strided) - min(strided)
