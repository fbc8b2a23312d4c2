"""Headless progress: the store always hears it; the terminal gets a Rich display or plain lines.

On a terminal, a Rich progress bar shows the running stage; otherwise (logs, CI, a TUI-launched run
writing to a file) each event is one timestamped line on stderr. Results go to stdout, never here.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable

GPU_MEMORY_JSON = "gpu_memory"  # store.results.JSON_GPU_MEMORY: stage -> peak CUDA memory allocated (bytes)
PLAN_ETA_UNTIL = 0.2  # a stage's ETA comes from its planned time until this share of its work is done


class Reporter:
    """Progress for one pipeline run: stage transitions, done/total, throughput and ETA."""

    def __init__(self, store=None, run_id: int | None = None, *, stream=None, min_interval_s: float = 1.0):
        self.store = store
        self.run_id = run_id
        self.stream = stream or sys.stderr
        self.min_interval_s = min_interval_s
        self._last_line = 0.0
        self._stage = None
        self._started = None
        self._rich = None
        self._task = None
        self.estimates: dict[str, float] = {}  # stage -> planned seconds (`pipeline.run.plan.record_plan`)
        self.gpu_peaks: dict[str, int] = {}  # stage -> peak CUDA memory allocated in it (bytes)
        if getattr(self.stream, "isatty", lambda: False)():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self._rich = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed:.0f}/{task.total}"),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=Console(file=self.stream),
                    transient=True,
                )
                self._rich.start()
            except Exception:  # pragma: no cover - rich unavailable or console oddities
                self._rich = None

    def line(self, message: str, level: str = "info") -> None:
        stamp = time.strftime("%H:%M:%S")
        text = f"{stamp} {self._stage or '-':<10} {message}"
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)
        if self.store is not None and self.run_id is not None:
            self.store.log_event(self.run_id, message, stage=self._stage, level=level)

    @contextmanager
    def stage(self, name: str):
        previous = self._stage
        self._stage, self._started = name, time.monotonic()
        if self.store is not None and self.run_id is not None:
            self.store.set_stage(self.run_id, name, "running")
        planned = self.estimates.get(name)
        self.line("started" + (f" (planned: about {planned:.0f} s)" if planned else ""))
        if planned and self.store is not None and self.run_id is not None:
            self.store.set_progress(self.run_id, name, 0, None, eta_s=planned)
        cuda = _cuda_reset_peak()
        ok = False
        try:
            yield self
            ok = True
        finally:
            self._record_gpu_peak(name, cuda)
            if self.store is not None and self.run_id is not None:
                self.store.set_stage(self.run_id, name, "completed" if ok else "failed")
            if ok:
                self.line(f"done in {time.monotonic() - self._started:.1f} s")
            if self._task is not None and self._rich is not None:
                self._rich.remove_task(self._task)
                self._task = None
            self._stage = previous

    def skip(self, name: str, why: str) -> None:
        if self.store is not None and self.run_id is not None:
            self.store.set_stage(self.run_id, name, "skipped")
        previous, self._stage = self._stage, name
        self.line(f"skipped: {why}")
        self._stage = previous

    def update(
        self,
        done: float,
        total: float | None = None,
        *,
        unit: str = "",
        throughput: float | None = None,
        eta_s: float | None = None,
        message: str | None = None,
    ) -> None:
        """Progress within the current stage; throttled for the terminal, always cheap for the store."""
        now = time.monotonic()
        planned = self.estimates.get(self._stage or "")
        if eta_s is None and planned and self._started and (not total or done < PLAN_ETA_UNTIL * total):
            eta_s = max(planned - (now - self._started), 0.0)
        if eta_s is None and total and done and self._started:
            rate = done / max(now - self._started, 1e-9)
            eta_s = (total - done) / rate if rate > 0 else None
        if (
            self.store is not None
            and self.run_id is not None
            and (now - self._last_line >= self.min_interval_s or (total and done >= total))
        ):
            self.store.set_progress(
                self.run_id, self._stage or "", done, total, unit=unit, throughput=throughput, eta_s=eta_s
            )
        if self._rich is not None:
            if self._task is None:
                self._task = self._rich.add_task(self._stage or "", total=total)
            self._rich.update(
                self._task, completed=done, total=total, description=f"{self._stage} {message or ''}".strip()
            )
            return
        if now - self._last_line >= max(self.min_interval_s, 5.0) or (total and done >= total):
            self._last_line = now
            parts = [f"{done:.0f}/{total:.0f} {unit}".strip() if total else f"{done:.0f} {unit}".strip()]
            if throughput:
                parts.append(f"{throughput:.1f} {unit}/s" if unit else f"{throughput:.1f}/s")
            if eta_s is not None:
                parts.append(f"ETA {eta_s:.0f} s")
            if message:
                parts.append(message)
            stamp = time.strftime("%H:%M:%S")
            print(f"{stamp} {self._stage or '-':<10} " + ", ".join(parts), file=self.stream, flush=True)

    def callback(self, unit: str = "", *, stage: str | None = None) -> Callable[..., None]:
        """A `progress(done, total, *, throughput=None, eta_s=None, message=None, unit=None)` callable, the form
        the training, pretraining and attention loops report through, forwarding to `update` (in `unit`
        unless the call names its own).

        `stage` labels the lines (and the store's progress row) without entering `stage()`, for a command
        that records its stages itself; by default the current stage is used.
        """

        def progress(done, total=None, *, throughput=None, eta_s=None, message=None, **kw):
            previous = self._stage
            if stage is not None:
                self._stage = stage
            try:
                now_unit = kw.get("unit") or unit  # a caller that names its unit ("steps", "cells encoded")
                self.update(done, total, unit=now_unit, throughput=throughput, eta_s=eta_s, message=message)
            finally:
                self._stage = previous

        return progress

    def _record_gpu_peak(self, name: str, was_initialised: bool) -> None:
        """The stage's peak CUDA memory (allocator peak, reset at the stage's start), logged and kept on the run
        as JSON `gpu_memory`; nothing for a stage that never touched CUDA."""
        torch = sys.modules.get("torch")
        try:
            if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
                return
            peak = int(torch.cuda.max_memory_allocated())
        except Exception:  # pragma: no cover - a broken CUDA runtime must not fail the stage
            return
        if not peak and not was_initialised:
            return
        self.gpu_peaks[name] = peak
        self.line(f"peak GPU memory {peak / 2**20:.0f} MiB")
        if self.store is not None and self.run_id is not None:
            self.store.put_json(self.run_id, GPU_MEMORY_JSON, dict(self.gpu_peaks))

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def _cuda_reset_peak() -> bool:
    """Reset CUDA's peak-memory counter when CUDA is in use (torch imported and initialised); True if it was."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return False
        torch.cuda.reset_peak_memory_stats()
        return True
    except Exception:  # pragma: no cover
        return False
