"""What the attention and attribution benchmarks share: the V1-6L config they load, how a worker
process measures its memory (resident set now, and the high-water mark since a reset of
/proc/self/clear_refs, where the kernel allows it; else ru_maxrss; on CUDA the allocator's peak), and how
the parent runs one worker per method and workload (`run_worker`: `python SCRIPT --worker ...`, whose
last `RESULT {json}` line is its measurement)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def config_path(arg: str | None) -> Path:
    """The Geneformer V1-6L config: `--config`, else $GFATTN_SHARED's, else ../shared beside the repo."""
    if arg:
        return Path(arg)
    shared = os.environ.get("GFATTN_SHARED")
    candidates = [Path(shared) / "geneformer/configs/V1-6L-10M/config.json"] if shared else []
    candidates.append(ROOT.parent / "shared/geneformer/configs/V1-6L-10M/config.json")
    for c in candidates:
        if c.exists():
            return c
    raise SystemExit("V1-6L config not found: pass --config or set GFATTN_SHARED")


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """The peak memory of the code run after `start()`, above what was in use at `start()`: on CUDA
    `torch.cuda.max_memory_allocated` minus the allocation then, on CPU the resident high-water mark
    (`peak_bytes`) minus the resident size then."""

    def __init__(self, device):
        self.device = device
        self.base = 0
        self.reset_ok = False

    def start(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.reset_ok = reset_peak()
            self.base = rss_bytes()

    def synchronize(self) -> None:
        """Wait for the device's queued work, so that a clock read afterwards times it."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def above_start(self) -> int:
        if self.device.type == "cuda":
            import torch

            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_bytes(self.reset_ok)
        return max(0, peak - self.base)


def measure(run, device, repeat: int = 1) -> tuple[Any, dict]:
    """Call `run()` `repeat` times; returns its last result and the best wall and CPU seconds of one call
    with the peak memory above the start (`PeakMemory`), as a worker's result reports them."""
    memory = PeakMemory(device)
    memory.start()
    seconds = cpu_seconds = float("inf")
    out = None
    for _ in range(max(1, int(repeat))):
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        memory.synchronize()
        seconds = min(seconds, time.perf_counter() - t0)
        cpu_seconds = min(cpu_seconds, time.process_time() - c0)
    return out, {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": memory.above_start()}


def lengths_summary(lengths) -> dict:
    """The workload's cells, median and longest length, as every worker's result reports them."""
    ordered = sorted(int(n) for n in lengths)
    return {"cells": len(ordered), "median_length": float(ordered[len(ordered) // 2]), "max_length": ordered[-1]}


# ---------------------------------------------------------------------------------- worker processes
RESULT_PREFIX = "RESULT "


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options with which the parent starts a worker (`run_worker`)."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--config-path", help=argparse.SUPPRESS)


def print_result(result: dict) -> None:
    """A worker's measurement, the line `run_worker` reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script, args, method: str, workload: str, config, extra=()) -> tuple[dict | None, str]:
    """Run `python SCRIPT --worker` for one method and workload (with `args.device` and `args.threads`,
    then `extra`), in its own process so that its peak memory is its own. Returns (its result, "") or
    (None, "failed (exit N): <its last lines of output>")."""
    cmd = [sys.executable, str(script), "--worker", "--method", method, "--workload", workload]
    cmd += ["--config-path", str(config), "--device", args.device, "--threads", str(args.threads)]
    cmd += [str(a) for a in extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    if out.returncode != 0 or line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return None, f"failed (exit {out.returncode}): {' | '.join(tail)}"
    return json.loads(line[len(RESULT_PREFIX) :]), ""


def result_line(r: dict) -> str:
    """Time, CPU time and peak memory of one worker's result, with its workload's lengths."""
    return (
        f"{r['seconds']:8.2f} s (CPU {r['cpu_seconds']:8.2f} s)  peak {r['peak_bytes'] / 2**20:9.1f} MiB"
        f"  ({r['cells']} cells, median length {r['median_length']:.0f}, max {r['max_length']})"
    )
