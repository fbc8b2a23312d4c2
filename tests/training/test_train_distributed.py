"""Data-parallel fine-tuning: 2 CPU processes (torchrun, gloo) against 1 process on the same global batch."""

import numpy as np
import pytest
import torch

from pipeline.compute import seed_everything
from pipeline.models.load import load_classifier
from pipeline.parallel.launch import WORKER_MODULE, finetune_distributed, finetune_workers, torchrun_command
from pipeline.run.stages.finetune import FinetuneStoreRecorder
from pipeline.training.finetune import TrainConfig, finetune

from tests._helpers_model import class_coded_cells, save_tiny_model

torch.set_num_threads(1)  # 2 threads crawl when other processes share the 2 cores


def test_torchrun_command_reexecutes_gfattn():
    cmd = torchrun_command(["finetune", "--data", "d"], 2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "pipeline", "finetune", "--data", "d"]


def test_workers_run_the_launcher_module_and_primitives_stay_below_training():
    import json
    import subprocess
    import sys

    assert WORKER_MODULE == "pipeline.parallel.launch"
    probe = "import json, sys, pipeline.parallel.distributed; print(json.dumps(sorted(m for m in sys.modules if m.startswith('pipeline.'))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "pipeline.training.finetune" not in loaded and "pipeline.parallel.launch" not in loaded
    out = subprocess.run([sys.executable, "-m", WORKER_MODULE, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--serve" in out.stdout


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    from store import Store

    src = save_tiny_model(tmp_path / "m", dropout=0.0)
    parts = {
        "train": class_coded_cells(64, seed=1),
        "validation": class_coded_cells(16, seed=2),
        "test": class_coded_cells(24, seed=3),
    }
    names = ["low", "high"]
    common = dict(lr=2e-3, epochs=2, seed=5, device="cpu", log_every=2)

    seed_everything(5)  # the workers seed with config.seed before drawing the new head
    single = finetune(
        load_classifier(src, 2),
        parts["train"],
        parts["validation"],
        parts["test"],
        label_names=names,
        mode="unfrozen",
        config=TrainConfig(batch_size=8, **common),
    )

    st = Store(tmp_path / "gfattn.db")
    run = st.create_run("lowhigh/unfrozen", "finetune", {"mode": "unfrozen"})
    with finetune_workers(2) as workers:  # one launch for both models, as a pipeline run fine-tunes

        def in_two_processes(out_dir, recorder=None):
            config = TrainConfig(batch_size=4, **common)
            return finetune_distributed(
                src,
                parts,
                label_names=names,
                mode="unfrozen",
                config=config,
                nproc=2,
                recorder=recorder,
                out_dir=out_dir,
                workers=workers,
            )

        double = in_two_processes(tmp_path / "ddp", FinetuneStoreRecorder(st, run))
        # the same processes' second model: the same numbers as their first (nothing carried over)
        again = in_two_processes(tmp_path / "ddp-again")
    b = dict(again.model.named_parameters())
    for name, p in double.model.named_parameters():
        assert torch.equal(p, b[name]), name

    assert np.array_equal(double.confusion, single.confusion)
    assert np.array_equal(double.test_predictions, single.test_predictions)
    assert double.best_epoch == single.best_epoch
    a = dict(single.model.named_parameters())
    for name, p in double.model.named_parameters():
        assert torch.allclose(p, a[name], atol=1e-4), name
    for h1, h2 in zip(single.history, double.history):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5)
    # only rank 0 wrote: one row per logged step, one confusion matrix
    steps = [m["step"] for m in st.metrics(run, name="loss", split="train")]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * 8
    assert len(st.confusions(run)) == 1
    # rank 0's reports reached the parent's recorder over the job channel
    assert st.progress(run)["done"] == st.progress(run)["total"] == 2 * 8
    assert [m["epoch"] for m in st.metrics(run, name="accuracy", split="validation")] == [1, 2]
    assert any(e["message"].startswith("test accuracy") for e in st.events(run))
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
    st.close()
