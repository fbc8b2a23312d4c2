"""Devices, seeds and determinism: the one owner of "where does it run" and "same seed, same numbers".

- `resolve_device(name, local_rank)`: `auto | cpu | cuda` to a `torch.device` (`auto` prefers CUDA);
  asking for CUDA where torch sees none is an `InputError`.
- `seed_everything(seed)`: Python's, numpy's and torch's global generators (every CUDA device too).
  gfattn calls it at the start of each unit of work (building a classifier head, a fine-tuning, a
  pretraining), so a unit's result never depends on what ran before it in the process: a child run
  restarted by `--resume` in a fresh process draws exactly what the uninterrupted run drew.
- `pin_threads(n)`: torch's CPU thread count, set again before every pipeline stage because CPU
  results depend on it and other libraries (scanpy's UMAP) reset the OpenMP pool torch shares.
- `configure_determinism(device)` / `determinism_report(device)`: on CUDA, deterministic cuDNN and
  cuBLAS settings and `torch.use_deterministic_algorithms(True, warn_only=True)`; the report says what
  holds (CPU kernels are deterministic for a fixed thread count; fused CUDA attention backward and
  atomics-based kernels may not be) and is recorded on the pipeline run.
- `fault_point(name, value)`: where the crash-safety tests kill the process or fill the disk.
"""

from __future__ import annotations

import os
import random

import numpy as np

from pipeline.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", local_rank: int = 0):
    """The `torch.device` for `auto | cpu | cuda` (CUDA device `local_rank` under torchrun)."""
    import torch

    if name not in DEVICE_CHOICES:
        raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (and every CUDA device's)."""
    import torch

    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pin_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count (`None`: keep the current one) and return it.

    CPU kernels reduce in an order that depends on the thread count, so a count that changes between two
    runs changes the last bits of their results. Other libraries reset the OpenMP pool torch shares
    (scanpy's UMAP, through numba and threadpoolctl, leaves it at the number of cores), so the pipeline
    pins the count again at the start of every stage.
    """
    import torch

    n = int(threads) if threads else torch.get_num_threads()
    torch.set_num_threads(n)
    return n


def configure_determinism(device) -> None:
    """Ask torch for deterministic kernels on CUDA (a no-op on CPU, whose kernels already are)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def determinism_report(device, threads: int | None = None) -> dict:
    """What "same seed, same numbers" rests on for this run, recorded in the store."""
    import torch

    kind = getattr(device, "type", str(device))
    report = {
        "device": kind,
        "torch": torch.__version__,
        "threads": int(threads or torch.get_num_threads()),
        "seeded": [
            "data split",
            "cell subsampling",
            "classifier head",
            "dropout",
            "batch order",
            "pretraining",
            "bootstrap",
            "UMAP",
        ],
    }
    if kind == "cuda":
        report["deterministic"] = bool(torch.are_deterministic_algorithms_enabled())
        report["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
        report["note"] = (
            "CUDA: deterministic algorithms requested with warn_only; kernels without a deterministic "
            "implementation (some fused attention backward passes, atomics-based scatter) may "
            "still vary in the last bits between runs"
        )
    else:
        report["deterministic"] = True
        report["note"] = "CPU: bit-identical for the same seed, software and thread count"
    return report


def fault_point(name: str, value: object) -> None:
    """Fault injection for the crash-safety tests, a no-op unless `GFATTN_FAULT=NAME:VALUE[:ACTION]` names
    this point: ACTION `kill` (default, SIGKILL), `int` (SIGINT, as Ctrl-C) or `enospc` (a full disk)."""
    spec = os.environ.get("GFATTN_FAULT")
    if not spec:
        return
    want, _, rest = spec.partition(":")
    target, _, action = (
        rest.rpartition(":")
        if rest.count(":") and rest.rsplit(":", 1)[1] in ("kill", "int", "enospc")
        else (rest, "", "kill")
    )
    if want != name or target != str(value):
        return
    if action == "enospc":
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    import signal

    os.kill(os.getpid(), signal.SIGINT if action == "int" else signal.SIGKILL)
