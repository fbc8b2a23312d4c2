"""Running the `gfattn` command line in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys


def gfattn(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
