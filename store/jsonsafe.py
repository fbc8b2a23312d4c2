"""JSON-safe copies of results, the one owner for every JSON document gfattn writes (store, files, logs).

`plain(obj)` copies numpy scalars and arrays to Python, NaN and infinities to null (strict JSON that any
tool reads), paths to strings, sets and tuples to lists and dataclasses to dicts; `json_default` is the
`json.dumps(default=...)` hook for the same types; `dumps` combines both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np


def plain(obj: Any) -> Any:
    """A JSON-safe copy: numpy to Python, NaN/inf to None, paths to str, sets/tuples to lists."""
    if isinstance(obj, dict) or (hasattr(obj, "items") and not isinstance(obj, (str, bytes))):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, bytes):
        return obj.decode()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    return obj


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)`: numpy, paths, sets, dates and dataclasses; anything else is an error."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any, **kw) -> str:
    """JSON text of `obj` with NaN/inf as null (strict JSON, readable by any tool)."""
    return json.dumps(plain(obj), default=json_default, **kw)
