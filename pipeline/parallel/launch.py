"""Work in several processes under torchrun, and the channel between such a job and the process that
started it (docs/architecture.md, "Data-parallel processes").

Two ways in. A command asked for `--nproc N > 1` outside a torchrun launch may re-execute itself under
`python -m torch.distributed.run --standalone --nproc-per-node N` (`launch_torchrun`). A stage that runs
pieces of work in N processes and goes on in its own process uses the **job channel**:

- the parent starts `JobWorkers(nproc, module=M)`: `python -m M --serve DIR --parent PID` in N processes
  under torchrun, once, however many jobs follow (their start, seconds of imports and the process group,
  and on GPUs each device's context, is paid once per run, not once per model). `workers.run(job,
  on_event=callback)` writes the job (a JSON document) atomically to `DIR/job-K/job.json` and, while the
  processes work on it, polls `DIR/job-K/events.jsonl` (JSON lines), handing each record, in order and as
  it arrives, to `callback` in the parent; the parent's recorder writes the records to the store there,
  so progress shows live and no worker ever opens the store. Once rank 0 has written the job's result it
  returns it, or raises the worker's `InputError` as one line, or a `RuntimeError` naming the exit status
  when the processes end without one (the workers' tracebacks are on stderr above it). `close()` writes
  the stop file `DIR/stop`; the processes end there, or once the parent has ended (killed). `run_job` is
  one job in processes started for it alone.
- the worker module ends in `sys.exit(worker_main(work))`; each process waits for the jobs in turn, and
  for each `work(channel)` gets a `JobChannel` (`channel.job`: the job; `channel.main`: rank 0) and
  returns the result. Only rank 0 writes: `channel.emit(record)` appends one JSON line to the events file
  (a no-op on other ranks), and its return value is written atomically as the result
  (`channel.set_result`), JSON (`result="json"`) or, for results holding numpy arrays or DataFrames, a
  pickle (`result="pickle"`). An `InputError` raised by `work` is passed to the parent and ends the
  processes; every process leaves the process group at the end.

`DIR` is the parent's own temporary work folder (`tempfile.mkdtemp`, readable by its user only); the
pickled result is read back from there only, written by the workers the parent started.

A recorder crosses the channel as calls: in the worker `CallForwarder(channel, METHODS)` stands in for
the recorder and turns each call of one of `METHODS` into a record, and the parent's `on_event` is
`lambda record: replay_call(recorder, record, METHODS)`. Fine-tuning in N processes
(`finetune_distributed`, worker `_finetune_worker` in this module) works this way with the methods of
`pipeline.training.finetune.FinetuneRecorder`; the pipeline starts its `JobWorkers` once the cells are
tokenized (beside the record stage) and ends them after the last fine-tuning, so that every model of the run is fine-tuned by the same
processes.

Layering: this module sits above `pipeline.training.finetune`, which sits above `pipeline.parallel.distributed`.
It is one module of about 600 lines because `python -m pipeline.parallel.launch` is the fine-tuning workers'
entry point: the launcher, the job channel and the fine-tuning job it serves live where that entry point is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.errors import InputError
from pipeline.parallel.distributed import env_local_rank, env_rank, init_from_env, shutdown
from store.jsonsafe import json_default

WORKER_MODULE = "pipeline.parallel.launch"
JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
RESULT_FORMATS = {"json": "result.json", "pickle": "result.pkl"}
STOP_FILE = "stop"
POLL_S = 0.05  # how often the parent reads new events while the workers run, and the workers look for a job


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


def _check_nproc(nproc: int) -> None:
    if int(nproc) < 1:
        raise InputError(f"--nproc must be at least 1, got {nproc}")


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
    _check_nproc(nproc)
    cmd = torchrun_command(argv, nproc, module=module, script=script)
    return subprocess.call(cmd, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------- the job channel
def _dump(obj) -> str:
    # A private hand-off between processes: NaN stays NaN (Python's json reads it back), so the parent
    # sees exactly the worker's values; numpy and paths go through the shared `json_default`.
    return json.dumps(obj, default=json_default)


class EventReader:
    """The complete lines appended to the events file since the last read (a line being written waits)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending = path, 0, b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def _stop(proc: subprocess.Popen) -> None:
    """End the launcher (torchrun stops its workers on SIGTERM); kill it when it does not end in 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_job(job: dict, work_dir, *, result: str = "json") -> Path:
    """Write `WORK_DIR/job.json` (the job and where its events and result go), empty the events file and
    remove an old result; returns the job file's path, which `JobChannel` opens."""
    if result not in RESULT_FORMATS:
        raise ValueError(f"result must be one of {', '.join(RESULT_FORMATS)}, got {result!r}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    events, outcome = work / EVENTS_FILE, work / RESULT_FORMATS[result]
    events.write_bytes(b"")
    outcome.unlink(missing_ok=True)
    channel = {"events": str(events), "result": str(outcome), "format": result}
    from pipeline.io import atomic_write_bytes

    atomic_write_bytes(work / JOB_FILE, _dump({"channel": channel, "job": job}).encode("utf-8"))  # read whole
    return work / JOB_FILE


def parent_gone(pid: int) -> bool:
    """Whether the process that started a job's workers has ended (killed without stopping them)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobWorkers:
    """`nproc` processes of `python -m MODULE` under torchrun, started once, that run the jobs `run` hands
    them in turn (see the module docstring). `what` names the work in the error raised when they fail; the
    work folder is removed on `close` when the workers made it."""

    def __init__(self, nproc: int, *, module: str, work_dir=None, env: dict | None = None, what: str = "the job"):
        import shutil
        import tempfile

        _check_nproc(nproc)
        self.nproc, self.what = int(nproc), what
        self._own = work_dir is None
        self.work = Path(work_dir or tempfile.mkdtemp(prefix="gfattn-jobs-"))
        self.work.mkdir(parents=True, exist_ok=True)
        for stale in self.work.glob("job-*"):  # a folder used before: its jobs are not this run's
            shutil.rmtree(stale, ignore_errors=True)
        (self.work / STOP_FILE).unlink(missing_ok=True)
        self.jobs = 0
        argv = ["--serve", str(self.work), "--parent", str(os.getpid())]
        self.proc = subprocess.Popen(torchrun_command(argv, nproc, module=module), env={**os.environ, **(env or {})})

    def __enter__(self) -> JobWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(
        self,
        job: dict,
        *,
        on_event: Callable[[dict], None] | None = None,
        result: str = "json",
        poll_s: float = POLL_S,
    ) -> Any:
        """Run `job` in the processes and return the result its rank 0 set. `on_event` receives each record
        rank 0 emits, in order, while they work; if it raises, or the wait is interrupted, the processes are
        stopped and the error propagates. `result` is "json" or "pickle"."""
        import pickle

        job_path = write_job(job, self.work / f"job-{self.jobs}", result=result)
        self.jobs += 1
        reader = EventReader(job_path.parent / EVENTS_FILE)
        outcome_path = job_path.parent / RESULT_FORMATS[result]
        try:
            while True:
                rc = self.proc.poll()
                done = outcome_path.is_file()
                for record in reader.read():  # once the result is there, this read drains what is left
                    if on_event is not None:
                        on_event(record)
                if done:
                    break
                if rc is not None:
                    raise RuntimeError(
                        f"{self.what} in {self.nproc} processes failed (exit status {rc});"
                        " the workers' errors are printed above"
                    )
                time.sleep(poll_s)
        except BaseException:
            _stop(self.proc)
            raise
        data = outcome_path.read_bytes()
        outcome = pickle.loads(data) if result == "pickle" else json.loads(data)
        if outcome.get("input_error"):
            self.close()  # the processes end after an input error
            raise InputError(outcome["input_error"])
        return outcome["result"]

    def close(self) -> None:
        """Stop the processes (the stop file; a signal when they do not end within seconds) and remove the
        work folder the workers made."""
        import shutil

        if self.proc.poll() is None:
            (self.work / STOP_FILE).touch()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _stop(self.proc)
        if self._own:
            shutil.rmtree(self.work, ignore_errors=True)


def run_job(
    job: dict,
    nproc: int,
    *,
    module: str,
    work_dir,
    on_event: Callable[[dict], None] | None = None,
    result: str = "json",
    what: str = "the job",
    env: dict | None = None,
    poll_s: float = POLL_S,
) -> Any:
    """One job in `nproc` processes started for it alone (`JobWorkers`, closed when it is done)."""
    with JobWorkers(nproc, module=module, work_dir=work_dir, env=env, what=what) as workers:
        return workers.run(job, on_event=on_event, result=result, poll_s=poll_s)


class JobChannel:
    """The worker's end of `run_job`: the job, and (rank 0 only) the events and the result."""

    def __init__(self, job_path):
        doc = json.loads(Path(job_path).read_text())
        self.job: dict = doc["job"]
        self._channel: dict = doc["channel"]
        self.main = env_rank() == 0
        self._events = open(self._channel["events"], "ab") if self.main else None

    def emit(self, record: dict) -> None:
        """Append `record` (JSON-able: numpy values and paths are converted) to the events the parent reads."""
        if self._events is not None:
            self._events.write((_dump(record) + "\n").encode("utf-8"))
            self._events.flush()

    def _write_outcome(self, outcome: dict) -> None:
        if not self.main:
            return
        import pickle

        from pipeline.io import atomic_write_bytes

        if self._channel["format"] == "pickle":
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            data = _dump(outcome).encode("utf-8")
        atomic_write_bytes(self._channel["result"], data)

    def set_result(self, obj) -> None:
        """The job's result, which `run_job` returns in the parent (JSON-able, or any picklable object)."""
        self._write_outcome({"result": obj})

    def fail(self, message: str) -> None:
        """An error the user can fix: `run_job` raises it in the parent as `InputError(message)`."""
        self._write_outcome({"input_error": message})

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _next_job(work: Path, n: int, parent: int) -> Path | None:
    """Job `n`'s file once the parent has written it; None once the parent asks the processes to stop. Every
    rank waits alone (no collective while the parent does other work); it ends when the parent has ended."""
    path = work / f"job-{n}" / JOB_FILE
    while True:
        if path.is_file():
            return path
        if (work / STOP_FILE).exists():
            return None
        if parent_gone(parent):
            raise SystemExit(3)
        time.sleep(POLL_S)


def serve_jobs(work_dir, parent: int, work: Callable[[JobChannel], Any]) -> int:
    """One torchrun process of `JobWorkers`: each job in turn, `work(channel)`'s return value its result
    (rank 0's). An `InputError` goes to the parent as its message and ends the process (exit status 2). The
    process group is left at the end."""
    n = 0
    try:
        while (job_path := _next_job(Path(work_dir), n, parent)) is not None:
            channel = JobChannel(job_path)
            try:
                channel.set_result(work(channel))
            except InputError as exc:
                channel.fail(str(exc))
                return 2
            finally:
                channel.close()
            n += 1
        return 0
    finally:
        shutdown()


def worker_main(
    work: Callable[[JobChannel], Any], argv: Sequence[str] | None = None, *, prog: str | None = None
) -> int:
    """The entry point of a worker module: `--serve DIR --parent PID` from the command line, then
    `serve_jobs`."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--serve", required=True, help="the work folder `JobWorkers` hands its jobs into")
    parser.add_argument("--parent", type=int, required=True, help="the process that started the workers")
    args = parser.parse_args(argv)
    return serve_jobs(args.serve, args.parent, work)


class CallForwarder:
    """Stands in for a recorder in a worker: each call of one of `methods` becomes the record
    {"call": name, "args": [...], "kwargs": {...}} on the channel, for `replay_call` in the parent."""

    def __init__(self, channel: JobChannel, methods: Sequence[str]):
        self._channel, self._methods = channel, tuple(methods)

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._methods:
            raise AttributeError(name)

        def forward(*args, **kwargs) -> None:
            self._channel.emit({"call": name, "args": list(args), "kwargs": kwargs})

        return forward


def replay_call(recorder, record: dict, methods: Sequence[str]) -> None:
    """Make the call a `CallForwarder` forwarded, on the parent's `recorder`."""
    name = record.get("call")
    if name not in methods:
        raise ValueError(f"a worker sent {name!r}, which is not a recorder method ({', '.join(methods)})")
    getattr(recorder, name)(*record.get("args", ()), **record.get("kwargs", {}))


# ------------------------------------------------------------------------- fine-tuning in N processes
FINETUNE_RECORDER_METHODS = ("event", "progress", "metrics", "confusion")  # `FinetuneRecorder`'s
FINETUNE_WHAT = "distributed fine-tuning"


def finetune_workers(nproc: int) -> JobWorkers:
    """The processes that fine-tune every model of a run in `nproc` processes (`finetune_model(workers=)`)."""
    return JobWorkers(nproc, module=WORKER_MODULE, what=FINETUNE_WHAT)


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


def finetune_model(
    model_dir,
    parts: dict,
    *,
    label_names,
    mode: str,
    config,
    nproc: int = 1,
    recorder=None,
    out_dir=None,
    dicts=None,
    load_options: dict | None = None,
    workers: JobWorkers | None = None,
):
    """Fine-tune `model_dir` on `parts` ("train", "validation", "test") in this process (`nproc` 1) or in
    `nproc` processes (`finetune_distributed`; in `workers` where given, the run's processes); returns a
    `FinetuneResult`. The classifier is loaded with `dicts`, `config.seed` and `load_options`
    (`load_classifier`'s `max_len`, `data_source`); `recorder` (a `FinetuneRecorder`) hears the run either way."""
    if int(nproc) > 1:
        return finetune_distributed(
            model_dir,
            parts,
            label_names=label_names,
            mode=mode,
            config=config,
            nproc=nproc,
            recorder=recorder,
            out_dir=out_dir,
            dicts=dicts,
            load_options=load_options,
            workers=workers,
        )
    from pipeline.models.load import load_classifier
    from pipeline.training.finetune import finetune

    model = load_classifier(model_dir, len(label_names), dicts=dicts, seed=config.seed, **(load_options or {}))
    return finetune(
        model,
        parts["train"],
        parts.get("validation"),
        parts.get("test"),
        label_names=label_names,
        mode=mode,
        config=config,
        recorder=recorder,
        out_dir=out_dir,
        dicts=dicts,
    )


def finetune_distributed(
    model_dir,
    parts: dict,
    *,
    label_names,
    mode: str,
    config,
    nproc: int,
    recorder=None,
    out_dir=None,
    dicts=None,
    load_options: dict | None = None,
    work_dir=None,
    workers: JobWorkers | None = None,
):
    """Fine-tune `model_dir` in `nproc` processes launched with torchrun (the `JobWorkers` `workers`, which
    run `_finetune_worker` in `nproc` processes, where given; else processes started for this model alone);
    returns a `FinetuneResult`.

    `parts` maps "train", "validation", "test" to datasets (Hugging Face `Dataset`s or dicts of columns).
    They are written to a work folder that every process reads; rank 0 forwards what it reports to
    `recorder` in this process (the job channel) and saves the model to `out_dir`, whose fine-tuned model
    is returned.
    """
    import shutil
    import tempfile
    from dataclasses import asdict

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
            "record": recorder is not None,
            "out_dir": str(model_out),
            "dicts_dir": None if dicts_dir is None else str(dicts_dir),
            "load_options": dict(load_options or {}),
        }
        on_event = None if recorder is None else lambda r: replay_call(recorder, r, FINETUNE_RECORDER_METHODS)
        if workers is not None:
            if workers.nproc != int(nproc):
                raise ValueError(f"fine-tuning in {nproc} processes was handed workers of {workers.nproc}")
            outcome = workers.run(job, on_event=on_event)
        else:
            outcome = run_job(job, nproc, module=WORKER_MODULE, work_dir=work, on_event=on_event, what=FINETUNE_WHAT)
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


def _finetune_worker(channel: JobChannel) -> dict:
    """One torchrun process of `finetune_distributed`: the JSON result rank 0 hands back."""
    import datasets

    from pipeline.compute import resolve_device
    from pipeline.models.load import load_classifier
    from pipeline.training.finetune import TrainConfig, finetune

    job = channel.job
    config = TrainConfig(**job["config"])
    device = resolve_device(config.device, env_local_rank())
    init_from_env(device)
    dicts = None
    if job["dicts_dir"]:
        from pipeline.data.dictionaries import GeneDictionaries

        dicts = GeneDictionaries.from_model_dir(job["dicts_dir"])
    model = load_classifier(
        job["model_dir"], len(job["label_names"]), dicts=dicts, seed=config.seed, **job["load_options"]
    )
    splits = {k: datasets.load_from_disk(v) for k, v in job["splits"].items()}
    recorder = CallForwarder(channel, FINETUNE_RECORDER_METHODS) if job["record"] and channel.main else None
    result = finetune(
        model,
        splits["train"],
        splits.get("validation"),
        splits.get("test"),
        label_names=job["label_names"],
        mode=job["mode"],
        config=config,
        recorder=recorder,
        out_dir=job["out_dir"],
        dicts=dicts,
    )
    out = {
        "best_epoch": result.best_epoch,
        "val_metrics": result.val_metrics,
        "test_metrics": result.test_metrics,
        "confusion": result.confusion,
        "test_predictions": result.test_predictions,
        "test_probabilities": result.test_probabilities,
        "history": result.history,
    }
    del model, result  # the next job's model takes their place: on a GPU, hand the cached memory back
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":  # pragma: no cover - entry point of the torchrun workers
    sys.exit(worker_main(_finetune_worker, prog=f"python -m {WORKER_MODULE}"))
