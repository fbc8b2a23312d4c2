"""Model analyses sharded over N processes under torchrun (docs/architecture.md, "Sharded analysis").

`ShardedAnalysis` starts `python -m pipeline.parallel.analyse --job JOB` in N processes once for a task's
models (`pipeline.parallel.launch.torchrun_command`; the processes' start-up, a few seconds of imports,
is paid once, not per model). Each process joins the process group (gloo on CPUs, NCCL on GPUs) and runs
`pipeline.analysis.model.analyse_model` for every model in turn, whose parts shard their batches over
the ranks and reduce. Rank 0 appends its progress to a JSON-lines file the parent replays while it waits,
and writes each model's `ModelAnalysis` (numpy arrays and tables: a pickle private to the job's work
folder) as soon as it is complete; the parent's recorder stores it. No process but the parent opens the
store.
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

WORKER_MODULE = "pipeline.parallel.analyse"


class ShardedAnalysis:
    """One torchrun launch analysing `units` (dicts with `key`, `model_path`, `permuted_path`, `deletion`,
    `sanity`) in turn on the same `cells`; `result(key)` waits for one model's `ModelAnalysis`.

    `device` is the configured name (auto, cpu, cuda): under CUDA each process takes its own GPU. `close()`
    stops the processes if they still run (an interrupted pipeline) and removes the work folder."""

    def __init__(self, units: list[dict], cells, *, dicts, analysis, de, seed, device, nproc: int, work_dir=None):
        import tempfile

        from pipeline.parallel.launch import EventReader, torchrun_command

        self.nproc = int(nproc)
        self.keys = [u["key"] for u in units]
        self.work = Path(work_dir or tempfile.mkdtemp(prefix="gfattn-analysis-"))
        self.work.mkdir(parents=True, exist_ok=True)
        columns = cells.to_dict() if hasattr(cells, "to_dict") else {k: list(v) for k, v in dict(cells).items()}
        job = {
            "units": [dict(u) for u in units],
            "cells": columns,
            "dicts": dicts,
            "analysis": dict(analysis),
            "de": de,
            "seed": int(seed),
            "device": str(device),
            "events": str(self.events),
            "results": str(self.work),
            "parent": os.getpid(),
        }
        with open(self.work / "job.pkl", "wb") as f:
            pickle.dump(job, f)
        cmd = torchrun_command(["--job", str(self.work / "job.pkl")], self.nproc, module=WORKER_MODULE)
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

    def _result_path(self, i: int) -> Path:
        return self.work / f"result-{i}.pkl"

    def result(self, key: str, progress: Callable | None = None):
        """The `ModelAnalysis` of `key`, waiting for it while replaying its progress to `progress`."""
        i = self.keys.index(key)
        path = self._result_path(i)
        while True:
            rc = self.proc.poll()
            self._replay(i, progress)
            if path.is_file():
                break
            if rc is not None:
                raise RuntimeError(
                    f"the analysis in {self.nproc} processes failed (exit status {rc}): {self._last_error()}"
                )
            time.sleep(0.2)
        with open(path, "rb") as f:
            outcome = pickle.load(f)
        if "input_error" in outcome:
            raise InputError(outcome["input_error"])
        return outcome["analysis"]

    def _replay(self, i: int, progress: Callable | None) -> None:
        """Hand model `i`'s progress lines to `progress`; a later model's wait for its own stage."""
        self._pending += self._events.read()
        mine = [e for e in self._pending if e["model"] == i]
        self._pending = [e for e in self._pending if e["model"] > i]
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
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def _parent_gone(pid: int) -> bool:
    """Whether the pipeline that started the job has ended (killed without stopping its processes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Progress:
    """Rank 0's progress of model `model` as JSON lines, at most twice a second and always a part's last.
    Every rank stops here when the pipeline that started the job has ended."""

    def __init__(self, path: str | None, model: int, parent: int):
        self.path, self.model, self.parent, self.last = path, model, parent, 0.0

    def __call__(self, done, total, unit="cells", **_):
        if _parent_gone(self.parent):
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


def _run_job(job_path: str) -> int:
    """One torchrun process of `ShardedAnalysis`: every model in turn."""
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    main = env_rank() == 0
    results = Path(job["results"])
    i = 0
    try:
        from pipeline.analysis.model import analyse_model
        from pipeline.compute import resolve_device

        device = resolve_device(job["device"], env_local_rank())
        init_from_env(device)
        for i, unit in enumerate(job["units"]):
            analysis = analyse_model(
                unit["model_path"],
                job["cells"],
                dicts=job["dicts"],
                analysis=job["analysis"],
                de=job["de"],
                seed=job["seed"],
                device=device,
                deletion=unit["deletion"],
                sanity=unit["sanity"],
                permuted_path=unit["permuted_path"],
                progress=_Progress(job["events"] if main else None, i, job["parent"]),
            )
            if main:
                _write_result(results / f"result-{i}.pkl", {"analysis": analysis})
        return 0
    except InputError as exc:
        if main:
            _write_result(results / f"result-{i}.pkl", {"input_error": str(exc)})
        return 2
    finally:
        shutdown()


if __name__ == "__main__":  # pragma: no cover - entry point of the torchrun workers
    if len(sys.argv) != 3 or sys.argv[1] != "--job":
        sys.exit(f"usage: python -m {WORKER_MODULE} --job JOB (started by gfattn pipeline --analysis-nproc N)")
    sys.exit(_run_job(sys.argv[2]))
