"""Data-parallel fine-tuning across processes (torch.distributed; DESIGN.md "Only the pipeline's rank-0
process writes").

gfattn starts the processes itself: asked for `--nproc N > 1` outside a torchrun launch, a command
re-executes itself under `python -m torch.distributed.run --standalone --nproc-per-node N`. Inside, each
process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, joins a process group (NCCL on GPUs,
gloo on CPUs), trains on its share of each global batch, and only rank 0 writes to the store and to disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from pipeline.errors import InputError


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return env_world_size() > 1


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return env_rank() if under_launcher() else 0


def world_size() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return env_world_size()


def is_main_process() -> bool:
    return rank() == 0


def backend_for(device) -> str:
    return "nccl" if getattr(device, "type", str(device)).startswith("cuda") else "gloo"


def init_from_env(device=None) -> bool:
    """Join the process group described by the environment (no-op for a single process or when joined).

    Returns True when running with more than one process.
    """
    if env_world_size() <= 1:
        return is_initialized() and world_size() > 1
    if not is_initialized():
        import datetime

        import torch
        import torch.distributed as dist

        if device is None:
            device = torch.device("cpu")
        kwargs = {}
        if backend_for(device) == "nccl":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend_for(device), timeout=datetime.timedelta(minutes=30), **kwargs)
    return True


def shutdown() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (identity for one process); returns it."""
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_parameters(parameters, src: int = 0) -> None:
    """Make every rank hold rank `src`'s values (e.g. a randomly initialised head)."""
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        for p in parameters:
            dist.broadcast(p.data, src=src)


def broadcast_object(obj, src: int = 0):
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


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
    import json
    import shutil
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    import numpy as np

    from pipeline.train import FinetuneResult

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
            "model_dir": str(model_dir), "splits": splits, "label_names": [str(x) for x in label_names],
            "mode": mode, "config": asdict(config), "store_path": None if store_path is None else str(store_path),
            "run_id": run_id, "out_dir": str(model_out), "dicts_dir": None if dicts_dir is None else str(dicts_dir),
            "result": str(work / "result.json"),
        }
        (work / "job.json").write_text(json.dumps(job))
        rc = launch_torchrun(["--job", str(work / "job.json")], nproc, module="pipeline.distributed")
        result_path = work / "result.json"
        outcome = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if outcome.get("input_error"):
            raise InputError(outcome["input_error"])
        if rc != 0 or "test_metrics" not in outcome:
            raise RuntimeError(f"distributed fine-tuning in {nproc} processes failed (exit status {rc}); "
                               "the workers' errors are printed above")
        from pipeline.model import load_classifier

        model = load_classifier(model_out, len(label_names))
        model.eval()

        def arr(key, dtype):
            return None if outcome.get(key) is None else np.asarray(outcome[key], dtype=dtype)

        return FinetuneResult(
            model=model, best_epoch=outcome["best_epoch"], val_metrics=outcome["val_metrics"],
            test_metrics=outcome["test_metrics"], confusion=arr("confusion", np.int64),
            test_predictions=arr("test_predictions", np.int64), history=outcome["history"],
            test_probabilities=arr("test_probabilities", np.float32), label_names=list(job["label_names"]),
            mode=mode, out_dir=None if out_dir is None else str(out_dir),
        )
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run_job(job_path: str) -> int:
    """One torchrun process of `finetune_distributed`."""
    import json
    from pathlib import Path

    job = json.loads(Path(job_path).read_text())
    main = env_rank() == 0

    def write(obj) -> None:
        if main:
            Path(job["result"]).write_text(json.dumps(obj, default=_json_plain))

    try:
        import datasets

        from pipeline.model import load_classifier
        from pipeline.train import TrainConfig, finetune, resolve_device, seed_everything

        config = TrainConfig(**job["config"])
        device = resolve_device(config.device, env_local_rank())
        init_from_env(device)
        dicts = None
        if job["dicts_dir"]:
            from pipeline.dictionaries import GeneDictionaries

            dicts = GeneDictionaries.from_model_dir(job["dicts_dir"])
        seed_everything(config.seed)
        model = load_classifier(job["model_dir"], len(job["label_names"]), dicts=dicts)
        splits = {k: datasets.load_from_disk(v) for k, v in job["splits"].items()}
        store = None
        if main and job["store_path"] and job["run_id"] is not None:
            from store import Store

            store = Store(job["store_path"])
        result = finetune(
            model, splits["train"], splits.get("validation"), splits.get("test"), label_names=job["label_names"],
            mode=job["mode"], config=config, store=store, run_id=job["run_id"], out_dir=job["out_dir"], dicts=dicts,
        )
        write({
            "best_epoch": result.best_epoch, "val_metrics": result.val_metrics, "test_metrics": result.test_metrics,
            "confusion": result.confusion, "test_predictions": result.test_predictions,
            "test_probabilities": result.test_probabilities, "history": result.history,
        })
        if store is not None:
            store.close()
        return 0
    except InputError as exc:
        write({"input_error": str(exc)})
        return 2
    finally:
        shutdown()


def _json_plain(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


if __name__ == "__main__":  # pragma: no cover - entry point of the torchrun workers
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.distributed")
    parser.add_argument("--job", required=True)
    sys.exit(_run_job(parser.parse_args().job))
