"""The job channel of `pipeline.parallel.launch` and fine-tuning's recorder: processes started once run job
after job, rank 0's records reach the parent while the workers run, results come back as JSON or pickles,
a worker's InputError is one line and ends the processes, and a recorder forwarded over the channel writes
what the stage's recorder writes in-process."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.models.load import load_classifier
from pipeline.parallel.launch import (
    EVENTS_FILE,
    FINETUNE_RECORDER_METHODS,
    CallForwarder,
    JobChannel,
    JobWorkers,
    replay_call,
    run_job,
    write_job,
)
from pipeline.run.stages.finetune import FinetuneStoreRecorder, stored_metric
from pipeline.training.finetune import TrainConfig, finetune

from tests import REPO
from tests._helpers_model import FakeStore, class_coded_cells, save_tiny_model

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores

# A worker module: both ranks join the process group; rank 0 reports, waits until the parent has seen its
# first record (so the parent read it while the workers still ran), reports again and returns arrays.
PROBE = textwrap.dedent("""
    import os
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from pipeline.errors import InputError
    from pipeline.parallel import distributed
    from pipeline.parallel.launch import worker_main


    def work(channel):
        job = channel.job
        distributed.init_from_env()
        world = distributed.all_reduce_sum(torch.ones(1))
        if job.get("refuse"):
            raise InputError(job["refuse"])
        channel.emit({"step": 1, "world": int(world.item()), "rank": distributed.rank()})
        ack, deadline = Path(job["ack"]), time.monotonic() + 60
        while not ack.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        channel.emit({"step": 2, "heard_live": ack.exists(), "value": np.float32(0.5)})
        values = np.arange(4.0) * (distributed.rank() + 1) * job.get("scale", 1.0)
        return {"values": values, "rank": distributed.rank(), "pid": os.getpid()}


    if __name__ == "__main__":
        sys.exit(worker_main(work))
""")


@pytest.fixture
def probe_env(tmp_path):
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "channel_probe.py").write_text(PROBE)
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_processes_started_once_run_job_after_job_and_the_parent_hears_rank_0_while_they_run(tmp_path, probe_env):
    """Two jobs in the same two processes (rank 0's process id is the same), each heard live and answered
    (a pickle, then JSON); a third job's InputError is one line in the parent and ends the processes."""
    results = []
    with JobWorkers(2, module="channel_probe", env=probe_env, what="the probe") as workers:
        for n, result in enumerate(("pickle", "json")):
            ack, heard = tmp_path / f"ack-{n}", []

            def on_event(record, ack=ack, heard=heard):
                heard.append(record)
                if record["step"] == 1:
                    ack.touch()

            job = {"ack": str(ack), "scale": n + 1.0}
            results.append(workers.run(job, on_event=on_event, result=result))
            assert heard == [{"step": 1, "world": 2, "rank": 0}, {"step": 2, "heard_live": True, "value": 0.5}]
        with pytest.raises(InputError, match=r"^the probe's cells are too few$"):
            workers.run({"refuse": "the probe's cells are too few"})
        assert workers.proc.poll() is not None  # ended
        work = workers.work
    assert not work.exists()  # the work folder the workers made is removed
    first, second = results
    assert first["rank"] == 0 and np.array_equal(first["values"], np.arange(4.0))
    assert second["values"] == [0.0, 2.0, 4.0, 6.0]  # JSON
    assert first["pid"] == second["pid"]  # one launch


def test_a_worker_that_fails_is_named_with_its_exit_status(tmp_path, probe_env):
    with pytest.raises(RuntimeError, match=r"the probe in 1 processes failed \(exit status 1\)"):
        run_job({}, 1, module="channel_probe", work_dir=tmp_path / "again", env=probe_env, what="the probe")


def test_stored_names_of_fine_tunings_metrics():
    assert stored_metric("loss") == "loss" and stored_metric("cells_per_s") == "cells_per_s"
    assert stored_metric("precision/12.5 uM") == "precision/12.5 uM" and stored_metric("f1/a/b") == "f1/a/b"
    with pytest.raises(ValueError, match="no stored name"):
        stored_metric("perplexity")


def _finetune(src, parts, recorder):
    return finetune(
        load_classifier(src, 2, seed=3),
        parts["train"],
        parts["validation"],
        parts["test"],
        label_names=["low", "high"],
        mode="unfrozen",
        config=TrainConfig(lr=2e-3, epochs=2, batch_size=8, seed=3, device="cpu", log_every=2),
        recorder=recorder,
    )


def test_a_forwarded_recorder_writes_what_the_stages_recorder_writes(tmp_path):
    """The worker's side in this process: fine-tuning reports through `CallForwarder` into the events file,
    which is replayed into the stage's recorder as the parent does; the store hears the same rows as when
    fine-tuning reports to the stage's recorder directly."""
    src = save_tiny_model(tmp_path / "m", dropout=0.0)
    parts = {
        "train": class_coded_cells(32, seed=1),
        "validation": class_coded_cells(8, seed=2),
        "test": class_coded_cells(8, seed=3),
    }
    direct = FakeStore()
    _finetune(src, parts, FinetuneStoreRecorder(direct, 5))

    channel = JobChannel(write_job({}, tmp_path / "work"))
    assert channel.main  # no RANK in the environment: one process, rank 0
    result = _finetune(src, parts, CallForwarder(channel, FINETUNE_RECORDER_METHODS))
    channel.close()
    lines = (tmp_path / "work" / EVENTS_FILE).read_text().splitlines()
    forwarded = FakeStore()
    for line in lines:
        replay_call(FinetuneStoreRecorder(forwarded, 5), json.loads(line), FINETUNE_RECORDER_METHODS)

    def timeless(rows):  # throughput is measured, so it differs between two runs
        return [r for r in rows if r["name"] != "cells_per_s"]

    assert timeless(forwarded.metrics) == timeless(direct.metrics) and len(timeless(direct.metrics)) > 10
    assert [r["step"] for r in forwarded.metrics if r["name"] == "cells_per_s"] == [4, 8]
    assert forwarded.events == direct.events
    (conf,) = forwarded.confusions
    assert conf["labels"] == ["low", "high"] and np.array_equal(conf["matrix"], result.confusion)
    assert forwarded.progress[-1]["done"] == forwarded.progress[-1]["total"] == direct.progress[-1]["done"]
    with pytest.raises(ValueError, match="not a recorder method"):
        replay_call(FinetuneStoreRecorder(forwarded, 5), {"call": "close", "args": []}, FINETUNE_RECORDER_METHODS)
