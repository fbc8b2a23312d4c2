"""What the attention and attribution benchmarks share: the V1-6L config they load and how a worker
process measures its memory (resident set now, and the high-water mark since a reset of
/proc/self/clear_refs, where the kernel allows it; else ru_maxrss)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

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
