"""Model analyses sharded over N processes under torchrun (docs/architecture.md, "Sharded analysis").

`AnalysisWorkers` starts `python -m pipeline.parallel.analyse --work DIR ...` in N processes once per run,
as soon as the cells are tokenized (`pipeline.parallel.launch.torchrun_command`): the processes' start, a few
seconds of imports and the process group, runs beside the record and fine-tuning stages instead of before
the first model analysis. Each process joins the process group (gloo on CPUs, NCCL on GPUs), pins the run's
CPU thread count and waits for batches of work: the pipeline hands each task's models over as one batch
(`submit`, a pickle written atomically into the work folder) at its first model stage, and every process runs
`pipeline.analysis.model.analyse_model` for each model of the batch in turn, whose parts shard their batches
over the ranks and reduce. Rank 0 appends its progress to a JSON-lines file the parent replays while it
waits, and writes each model's `ModelAnalysis` (numpy arrays and tables: a pickle private to the work
folder) as soon as it is complete; the parent's recorder stores it. No process but the parent opens the
store. The processes end when the parent writes the stop file (`close`), or when the parent has ended.

The work folder is the parent's: the processes run on the parent's machine (torchrun `--standalone`).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from pipeline.errors import InputError
from pipeline.parallel.distributed import env_local_rank, env_rank, init_from_env, shutdown
from pipeline.parallel.launch import STOP_FILE, parent_gone

WORKER_MODULE = "pipeline.parallel.analyse"
POLL_S = 0.1


def _batch_path(work: Path, n: int) -> Path:
    return work / f"batch-{n}.pkl"


def _result_path(work: Path, uid: int) -> Path:
    return work / f"result-{uid}.pkl"


def worker_threads(threads: int, nproc: int) -> int:
    """CPU threads of each analysis process: the run's `compute.threads` where set (each batch then runs the
    same kernels as in one process: the same numbers), else the cores shared out."""
    return int(threads) if int(threads) > 0 else max(1, (os.cpu_count() or 1) // max(1, int(nproc)))


class AnalysisWorkers:
    """N torchrun processes that analyse the models `submit` hands them, in order; `result(key)` waits for
    one model's `ModelAnalysis`. Started once per run.

    `device` is the configured name (auto, cpu, cuda): under CUDA each process takes its own GPU. `close()`
    stops the processes (the stop file, then a signal to their process group if they have not ended) and
    removes the work folder."""

    def __init__(self, *, device, nproc: int, threads: int = 0, work_dir=None):
        import tempfile

        from pipeline.parallel.launch import EventReader, torchrun_command

        self.nproc = int(nproc)
        self.work = Path(work_dir or tempfile.mkdtemp(prefix="gfattn-analysis-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.uids: dict = {}  # key -> the unit's number in the work folder
        self._batches = 0
        argv = ["--work", str(self.work), "--parent", str(os.getpid()), "--device", str(device)]
        argv += ["--threads", str(worker_threads(threads, self.nproc))]
        cmd = torchrun_command(argv, self.nproc, module=WORKER_MODULE)
        # its own process group, so that `close` stops the launcher and every worker together; their output
        # goes to a log whose end a failure names
        self.log = open(self.work / "workers.log", "wb")
        self.proc = subprocess.Popen(
            cmd, env=dict(os.environ), start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT
        )
        self._events = EventReader(self.events)
        self._pending: list[dict] = []

    @property
    def events(self) -> Path:
        from pipeline.parallel.launch import EVENTS_FILE

        return self.work / EVENTS_FILE

    def submit(self, units: list[dict], cells, *, dicts, analysis, de, seed) -> None:
        """Hand over `units` (dicts with `key`, `model_path`, `permuted_path`, `deletion`, `sanity`), analysed
        in turn on the same `cells` with the same dictionaries, configuration, DE table and seed."""
        from pipeline.io import atomic_write_bytes

        columns = cells.to_dict() if hasattr(cells, "to_dict") else {k: list(v) for k, v in dict(cells).items()}
        numbered = []
        for unit in units:
            if unit["key"] in self.uids:
                raise ValueError(f"model {unit['key']!r} was handed to the analysis processes already")
            self.uids[unit["key"]] = len(self.uids)
            numbered.append({**unit, "uid": self.uids[unit["key"]]})
        batch = {"units": numbered, "cells": columns, "dicts": dicts, "analysis": dict(analysis), "de": de}
        batch["seed"] = int(seed)
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        atomic_write_bytes(_batch_path(self.work, self._batches), data)
        self._batches += 1

    def result(self, key, progress: Callable | None = None):
        """The `ModelAnalysis` of `key`, waiting for it while replaying its progress to `progress`."""
        uid = self.uids[key]
        path = _result_path(self.work, uid)
        while True:
            rc = self.proc.poll()
            self._replay(uid, progress)
            if path.is_file():
                break
            if rc is not None:
                raise RuntimeError(
                    f"the analysis in {self.nproc} processes failed (exit status {rc}): {self._last_error()}"
                )
            time.sleep(POLL_S)
        with open(path, "rb") as f:
            outcome = pickle.load(f)
        if "input_error" in outcome:
            raise InputError(outcome["input_error"])
        return outcome["analysis"]

    def _replay(self, uid: int, progress: Callable | None) -> None:
        """Hand unit `uid`'s progress lines to `progress`; a later unit's wait for its own stage."""
        self._pending += self._events.read()
        mine = [e for e in self._pending if e["model"] == uid]
        self._pending = [e for e in self._pending if e["model"] > uid]
        for event in mine:
            if progress is not None:
                progress(event["done"], event["total"], unit=event["unit"])

    def _last_error(self) -> str:
        """The last line a worker's traceback ends with (its exception), else the log's last line."""
        self.log.flush()
        lines = [x.strip() for x in (self.work / "workers.log").read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if not x.startswith(("File ", "[", "^", "~")) and ("Error" in x or "error" in x)]
        return (errors or lines or ["no output"])[-1][:500]

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            (self.work / STOP_FILE).touch()
            busy = any(not _result_path(self.work, uid).is_file() for uid in self.uids.values())
            try:  # idle processes see the stop file within POLL_S; busy ones (an interrupted run) are stopped
                self.proc.wait(timeout=0 if busy else 5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


class _Progress:
    """Rank 0's progress of model `model` as JSON lines, at most twice a second and always a part's last.
    Every rank stops here when the pipeline that started the job has ended."""

    def __init__(self, path: str | None, model: int, parent: int):
        self.path, self.model, self.parent, self.last = path, model, parent, 0.0

    def __call__(self, done, total, unit="cells", **_):
        if parent_gone(self.parent):
            raise SystemExit(3)
        if self.path is None:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.5:
            return
        self.last = now
        with open(self.path, "a") as f:
            f.write(json.dumps({"model": self.model, "done": int(done), "total": int(total), "unit": str(unit)}) + "\n")


def _write_result(path: Path, obj) -> None:
    from pipeline.io import atomic_write_bytes

    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _next_batch(work: Path, n: int, parent: int) -> dict | None:
    """Batch `n` once the parent has written it; None once the parent asks the processes to stop. Every
    rank polls alone (no collective waits through a long fine-tuning); it stops when the parent has ended."""
    path = _batch_path(work, n)
    while True:
        if path.is_file():
            with open(path, "rb") as f:
                return pickle.load(f)
        if (work / STOP_FILE).exists():
            return None
        if parent_gone(parent):
            raise SystemExit(3)
        time.sleep(POLL_S)


def _analyse_batch(batch: dict, work: Path, parent: int, device) -> None:
    """Every model of one batch in turn; rank 0 writes each result as soon as it is complete."""
    from pipeline.analysis.model import analyse_model
    from pipeline.parallel.launch import EVENTS_FILE

    main = env_rank() == 0
    for unit in batch["units"]:
        uid = int(unit["uid"])
        try:
            analysis = analyse_model(
                unit["model_path"],
                batch["cells"],
                dicts=batch["dicts"],
                analysis=batch["analysis"],
                de=batch["de"],
                seed=batch["seed"],
                device=device,
                deletion=unit["deletion"],
                sanity=unit["sanity"],
                permuted_path=unit["permuted_path"],
                progress=_Progress(str(work / EVENTS_FILE) if main else None, uid, parent),
            )
        except InputError as exc:
            if main:
                _write_result(_result_path(work, uid), {"input_error": str(exc)})
            raise
        if main:
            _write_result(_result_path(work, uid), {"analysis": analysis})


def _preload() -> None:
    """Import what `analyse_model` imports on first use (captum, scipy.stats, the models' classes), while the
    processes wait for their first batch rather than in the first model's analysis."""
    import captum.attr  # noqa: F401
    import safetensors.torch  # noqa: F401
    import scipy.stats  # noqa: F401
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel  # noqa: F401

    import pipeline.analysis.attribution  # noqa: F401
    import pipeline.analysis.deletion_report  # noqa: F401
    import pipeline.analysis.model  # noqa: F401
    import pipeline.analysis.pair  # noqa: F401
    import pipeline.analysis.sanity  # noqa: F401
    from pipeline.models.load import load_for_attention  # noqa: F401


def serve(work, parent: int, device: str, threads: int) -> int:
    """One torchrun process of `AnalysisWorkers`: join the group, then every batch the parent hands over."""
    work = Path(work)
    try:
        from pipeline.compute import pin_threads, resolve_device

        device = resolve_device(device, env_local_rank())
        init_from_env(device)
        pin_threads(int(threads))
        _preload()
        n = 0
        while (batch := _next_batch(work, n, parent)) is not None:
            _analyse_batch(batch, work, parent, device)
            n += 1
        return 0
    except InputError:
        return 2
    finally:
        shutdown()


def _parse(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser(
        prog=f"python -m {WORKER_MODULE}", description="started by gfattn pipeline --analysis-nproc N"
    )
    p.add_argument("--work", required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


if __name__ == "__main__":  # pragma: no cover - entry point of the torchrun workers
    args = _parse(sys.argv[1:])
    sys.exit(serve(args.work, args.parent, args.device, args.threads))
