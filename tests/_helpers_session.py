"""What the pytest-xdist workers of one test session share: a folder they all see, a lock, and a command
started once for all of them in the background (the session's quick run, conftest.py's `quick_run`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path


def session_folder(tmp_path_factory) -> Path:
    """A folder every worker of this test session sees: the session's base temporary folder, which holds each
    xdist worker's own (`popen-gw0`, ...); without xdist, the session's base folder itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def exclusive(lock: Path):
    """Held by one process of the session at a time (an exclusive flock on the file `lock`)."""
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_once(folder: Path, argv: list[str]) -> threading.Thread | None:
    """Start `argv` in the background unless a process of this session already did: the one that creates
    `folder` starts it, with stdout and stderr in files there, and a thread of that process writes the exit
    code to `folder/returncode` when the command ends. Returns that thread to the process that started it."""
    try:
        folder.mkdir()
    except FileExistsError:
        return None
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def record_exit() -> None:
        code = proc.wait()
        tmp = folder / "returncode.tmp"
        tmp.write_text(str(code))
        os.replace(tmp, folder / "returncode")

    thread = threading.Thread(target=record_exit, name=f"wait for {folder.name}", daemon=True)
    thread.start()
    return thread


def wait_for(folder: Path, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The command `start_once` started in `folder` once it has ended, in any process of the session."""
    done = folder / "returncode"
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"`{' '.join(argv)}` has not ended after {timeout:.0f} s")
        time.sleep(0.2)
    return subprocess.CompletedProcess(
        argv, int(done.read_text()), (folder / "stdout").read_text(), (folder / "stderr").read_text()
    )
