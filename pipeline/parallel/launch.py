"""Starting data-parallel fine-tuning in several processes under torchrun (docs/architecture.md,
"Data-parallel processes").

gfattn starts the processes itself: asked for `--nproc N > 1` outside a torchrun launch, a command
re-executes itself under `python -m torch.distributed.run --standalone --nproc-per-node N`
(`launch_torchrun`). `finetune_distributed` writes the splits and a job file to a work folder and runs
`python -m pipeline.parallel.launch --job JOB` in N processes; each joins the process group (`pipeline.parallel.distributed`),
trains on its share of each global batch (`pipeline.training.finetune.finetune`), and only rank 0 writes to the store
and to disk. Layering: this module sits above `pipeline.training.finetune`, which sits above `pipeline.parallel.distributed`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

from pipeline.errors import InputError
from pipeline.parallel.distributed import env_local_rank, env_rank, init_from_env, shutdown
from store.jsonsafe import json_default

WORKER_MODULE = "pipeline.parallel.launch"


def torchrun_command(
    argv: Sequence[str],
    nproc: int,
    *,
    module: str | None = "pipeline",
    script: str | None = None,
) -> list[str]:
    """The command line that runs `python -m MODULE ARGV` (or `python SCRIPT ARGV`) in `nproc` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}"]
    if script is not None:
        cmd += [str(script)]
    elif module is not None:
        cmd += ["-m", module]
    else:
        raise ValueError("give a module or a script to launch")
    return cmd + [str(a) for a in argv]


def launch_torchrun(
    argv: Sequence[str],
    nproc: int,
    *,
    module: str | None = "pipeline",
    script: str | None = None,
    env: dict | None = None,
) -> int:
    """Re-execute gfattn (`python -m pipeline ARGV`) under torch.distributed.run with `nproc` processes.

    Blocks until every process has finished and returns the launcher's exit status. torchrun sets
    OMP_NUM_THREADS=1 per process unless it is already set.
    """
    if int(nproc) < 1:
        raise InputError(f"--nproc must be at least 1, got {nproc}")
    run_env = dict(os.environ)
    run_env.update(env or {})
    cmd = torchrun_command(argv, nproc, module=module, script=script)
    return subprocess.call(cmd, env=run_env)


# ------------------------------------------------------------------------- fine-tuning in N processes
def _save_split(ds, path) -> None:
    import datasets

    if ds is None:
        return
    if not hasattr(ds, "save_to_disk"):
        ds = datasets.Dataset.from_dict({k: list(v) for k, v in dict(ds).items()})
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        ds.save_to_disk(str(path))
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _dump(obj) -> str:
    # A private hand-off between processes: NaN stays NaN (Python's json reads it back), so the parent
    # sees exactly the worker's values; numpy and paths go through the shared `json_default`.
    return json.dumps(obj, default=json_default)


def finetune_distributed(
    model_dir,
    parts: dict,
    *,
    label_names,
    mode: str,
    config,
    nproc: int,
    store_path=None,
    run_id: int | None = None,
    out_dir=None,
    dicts=None,
    work_dir=None,
):
    """Fine-tune `model_dir` in `nproc` processes launched with torchrun; returns a `FinetuneResult`.

    `parts` maps "train", "validation", "test" to datasets (Hugging Face `Dataset`s or dicts of columns).
    They are written to a work folder that every process reads; rank 0 records to the store at
    `store_path` under `run_id` and saves the model to `out_dir`, whose fine-tuned model is returned.
    """
    import shutil
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    import numpy as np

    from pipeline.training.finetune import FinetuneResult

    own_work = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="gfattn-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        splits = {}
        for key in ("train", "validation", "test"):
            if parts.get(key) is not None:
                _save_split(parts[key], work / key)
                splits[key] = str(work / key)
        dicts_dir = None
        if dicts is not None:
            dicts_dir = work / "dictionaries"
            dicts.save(dicts_dir)
        model_out = Path(out_dir) if out_dir is not None else work / "model"
        job = {
            "model_dir": str(model_dir),
            "splits": splits,
            "label_names": [str(x) for x in label_names],
            "mode": mode,
            "config": asdict(config),
            "store_path": None if store_path is None else str(store_path),
            "run_id": run_id,
            "out_dir": str(model_out),
            "dicts_dir": None if dicts_dir is None else str(dicts_dir),
            "result": str(work / "result.json"),
        }
        (work / "job.json").write_text(_dump(job))
        rc = launch_torchrun(["--job", str(work / "job.json")], nproc, module=WORKER_MODULE)
        result_path = work / "result.json"
        outcome = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if outcome.get("input_error"):
            raise InputError(outcome["input_error"])
        if rc != 0 or "test_metrics" not in outcome:
            raise RuntimeError(
                f"distributed fine-tuning in {nproc} processes failed (exit status {rc}); "
                "the workers' errors are printed above"
            )
        from pipeline.models.load import load_classifier

        model = load_classifier(model_out, len(label_names))
        model.eval()

        def arr(key, dtype):
            return None if outcome.get(key) is None else np.asarray(outcome[key], dtype=dtype)

        return FinetuneResult(
            model=model,
            best_epoch=outcome["best_epoch"],
            val_metrics=outcome["val_metrics"],
            test_metrics=outcome["test_metrics"],
            confusion=arr("confusion", np.int64),
            test_predictions=arr("test_predictions", np.int64),
            history=outcome["history"],
            test_probabilities=arr("test_probabilities", np.float32),
            label_names=list(job["label_names"]),
            mode=mode,
            out_dir=None if out_dir is None else str(out_dir),
        )
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run_job(job_path: str) -> int:
    """One torchrun process of `finetune_distributed`."""
    from pathlib import Path

    job = json.loads(Path(job_path).read_text())
    main = env_rank() == 0

    def write(obj) -> None:
        if main:
            Path(job["result"]).write_text(_dump(obj))

    try:
        import datasets

        from pipeline.compute import resolve_device
        from pipeline.models.load import load_classifier
        from pipeline.training.finetune import TrainConfig, finetune

        config = TrainConfig(**job["config"])
        device = resolve_device(config.device, env_local_rank())
        init_from_env(device)
        dicts = None
        if job["dicts_dir"]:
            from pipeline.data.dictionaries import GeneDictionaries

            dicts = GeneDictionaries.from_model_dir(job["dicts_dir"])
        model = load_classifier(job["model_dir"], len(job["label_names"]), dicts=dicts, seed=config.seed)
        splits = {k: datasets.load_from_disk(v) for k, v in job["splits"].items()}
        store = None
        if main and job["store_path"] and job["run_id"] is not None:
            from store import Store

            store = Store(job["store_path"])
        result = finetune(
            model,
            splits["train"],
            splits.get("validation"),
            splits.get("test"),
            label_names=job["label_names"],
            mode=job["mode"],
            config=config,
            store=store,
            run_id=job["run_id"],
            out_dir=job["out_dir"],
            dicts=dicts,
        )
        write(
            {
                "best_epoch": result.best_epoch,
                "val_metrics": result.val_metrics,
                "test_metrics": result.test_metrics,
                "confusion": result.confusion,
                "test_predictions": result.test_predictions,
                "test_probabilities": result.test_probabilities,
                "history": result.history,
            }
        )
        if store is not None:
            store.close()
        return 0
    except InputError as exc:
        write({"input_error": str(exc)})
        return 2
    finally:
        shutdown()


if __name__ == "__main__":  # pragma: no cover - entry point of the torchrun workers
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}")
    parser.add_argument("--job", required=True)
    sys.exit(_run_job(parser.parse_args().job))
