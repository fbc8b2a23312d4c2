"""Running the `gfattn` command line: in a subprocess, as a user would (`gfattn`), or in this process
through `pipeline.cli.main(argv)` (`cli`), for error paths and quick commands that need no process of
their own (no torch import per call)."""

from __future__ import annotations

import subprocess
import sys


def gfattn(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`gfattn ARGS` in this process: a `CompletedProcess` with the exit code, stdout and stderr, as
    `gfattn` returns (argparse's exit is its code; an uncaught exception fails the test with its traceback).
    `cwd` and `env` (variables set for the call; None unsets one) are restored afterwards."""
    import contextlib
    import io
    import os

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    saved = {k: os.environ.get(k) for k in (env or {})}
    try:
        for k, v in (env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors and --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["gfattn", *map(str, args)], code, out.getvalue(), err.getvalue())
