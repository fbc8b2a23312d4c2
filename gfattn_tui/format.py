"""How values read on screen: timestamps, durations, numbers, run status marks, colour scales and the
order of class labels (doses ascending, `low` before `high`, as in the thesis's figures)."""

from __future__ import annotations

import math
import re
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

STATUS_MARKS: dict[str, tuple[str, str]] = {
    "running": ("●", "bold yellow"),
    "completed": ("✔", "green"),
    "failed": ("✘", "bold red"),
    "interrupted": ("■", "magenta"),
    "stopped": ("■", "magenta"),
    "lost": ("?", "bold red"),
    "pending": ("·", "dim"),
    "skipped": ("–", "dim"),
}

STATUSES = ("running", "completed", "failed", "interrupted", "lost")


def as_epoch(value: Any) -> float | None:
    """Seconds since the epoch from whatever the store returns (number, numeric text or ISO 8601)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
    if dt.tzinfo is None:
        # The store writes UTC; a naive timestamp is UTC, not local time.
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def fmt_time(value: Any, *, utc: bool = False, seconds: bool = False) -> str:
    epoch = as_epoch(value)
    if epoch is None:
        return "—"
    fmt = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.gmtime(epoch) if utc else time.localtime(epoch))


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def run_duration(run: dict, now: float) -> float | None:
    """Wall time of a run: until it finished, or until `now` while it runs."""
    start = as_epoch(run.get("created") or run.get("started"))
    if start is None:
        return None
    end = as_epoch(run.get("finished"))
    if end is None:
        if run.get("status") != "running":
            end = as_epoch(run.get("heartbeat")) or start
        else:
            end = now
    return end - start


def fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** (-digits)):
            return f"{value:.{max(digits - 1, 1)}e}"
        if float(value).is_integer() and abs(value) < 1e5:
            return f"{value:.{digits}f}" if digits and abs(value) < 10 else f"{int(value):,}"
        return f"{value:.{digits}f}"
    try:
        import numpy as np

        if isinstance(value, np.integer):
            return f"{int(value):,}"
        if isinstance(value, np.floating):
            return fmt_num(float(value), digits)
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def finite_float(value: Any) -> float | None:
    """`value` as a finite float, or None where it is missing, not a number, NaN or infinite."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def significance_stars(p: Any) -> str:
    """`***` p < 0.001, `**` p < 0.01, `*` p < 0.05, else empty."""
    p = finite_float(p)
    if p is None:
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def fmt_p(p: Any, *, stars: bool = True) -> str:
    """A p-value in scientific notation ("5.0e-04"), with its significance stars."""
    value = finite_float(p)
    if value is None:
        return "—"
    text = "1" if value >= 0.9995 else f"{value:.1e}" if value < 0.01 else f"{value:.3f}"
    return text + (significance_stars(value) if stars else "")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


_DOSE_RE = re.compile(r"^\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*(?:u?m|µm|um|nm)?\s*$", re.IGNORECASE)
_WORD_ORDER = {"control": -3.0, "vehicle": -3.0, "dmso": -3.0, "low": -2.0, "mid": -1.5, "medium": -1.5, "high": -1.0}


def label_sort_key(label: str) -> tuple[int, float, str]:
    text = str(label)
    match = _DOSE_RE.match(text)
    if match:
        return (1, float(match.group(1)), text)
    word = text.strip().lower()
    if word in _WORD_ORDER:
        return (0, _WORD_ORDER[word], text)
    return (2, 0.0, text)


def dose_order(labels: Sequence[str]) -> list[int]:
    """Permutation putting class labels in dose order (numbers ascending; control < low < high)."""
    return sorted(range(len(labels)), key=lambda i: label_sort_key(labels[i]))


def _lerp(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _ink_for(rgb: tuple[int, int, int]) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#000000" if luminance > 140 else "#ffffff"


# A perceptually ordered sequential ramp (dark blue -> teal -> yellow), readable on dark and light themes.
_SEQ = [(30, 40, 110), (33, 102, 172), (40, 160, 150), (120, 200, 90), (240, 225, 60)]
_NEG, _MID, _POS = (49, 94, 190), (235, 235, 235), (200, 60, 50)


def sequential_style(t: float | None) -> str:
    """`fg on bg` for a value scaled to [0, 1]; blank style for missing values."""
    if t is None or not math.isfinite(t):
        return "dim"
    t = min(max(t, 0.0), 1.0)
    pos = t * (len(_SEQ) - 1)
    i = min(int(pos), len(_SEQ) - 2)
    rgb = _lerp(_SEQ[i], _SEQ[i + 1], pos - i)
    return f"{_ink_for(rgb)} on {_hex(rgb)}"


def fraction_style(frac: float) -> str:
    """Confusion-matrix cell: white at 0, deep blue at 1 (row fraction)."""
    if not math.isfinite(frac) or frac <= 0:
        return ""
    rgb = _lerp((225, 235, 250), (20, 60, 150), min(frac, 1.0) ** 0.7)
    return f"{_ink_for(rgb)} on {_hex(rgb)}"


def diverging_style(value: float | None, vmax: float) -> str:
    """Blue for negative, red for positive differences, white at zero."""
    if value is None or not math.isfinite(value) or vmax <= 0:
        return "dim"
    t = max(-1.0, min(1.0, value / vmax))
    rgb = _lerp(_MID, _POS, t) if t >= 0 else _lerp(_MID, _NEG, -t)
    return f"{_ink_for(rgb)} on {_hex(rgb)}"


def finite(values: Iterable[Any]) -> list[float]:
    """The finite numbers among `values`, as floats."""
    return [f for f in map(finite_float, values) if f is not None]


def short_path(path: Any, width: int = 24) -> str:
    if not path:
        return "—"
    text = str(path).rstrip("/")
    name = text.rsplit("/", 1)[-1]
    if len(name) > width:
        return "…" + name[-(width - 1) :]
    return name


def fmt_p_resolved(p: Any, *, floor: Any = None, at_floor: Any = None, q: Any = None) -> str:
    """A p-value as resolved as its test allows: "<= 0.048" at the floor of a permutation or empirical
    test (the smallest p it can give); the stars go on q (the adjusted value) when there is one."""
    value = finite_float(p)
    if value is None:
        return "—"
    try:
        lowest = float(floor) if floor is not None else None
    except (TypeError, ValueError):
        lowest = None
    # an empirical p = (exceedances + 1) / (draws + 1) is never below its floor: at it means "no draw did"
    floored = bool(at_floor) if at_floor is not None else (lowest is not None and abs(value - lowest) <= 1e-9 * lowest)
    if floored and lowest is not None:
        text = f"<= {lowest:.3g}"
    else:
        text = fmt_p(value, stars=False)
    has_q = q is not None and fmt_p(q, stars=False) != "—"
    if has_q:
        return text
    # without a q-value, a p at its floor carries no stars: it says only how far the test could resolve
    return text if floored else text + significance_stars(value)


def fmt_q(q: Any) -> str:
    """An adjusted p-value (q) with its significance stars."""
    return fmt_p(q)


_SUFFIX_RE = re.compile(r"^(?P<stem>.+?)_(?P<suffix>[ab])$")


def model_label(name: str, models: Sequence[str] | None) -> str:
    """A stored name in the researcher's words: `key_score_b` -> "key score unfrozen" (the `_a` / `_b`
    suffix names the compared models in order), `attribution_frozen` -> "attribution frozen"."""
    text = str(name)
    match = _SUFFIX_RE.match(text)
    if match and models and len(models) >= 2:
        model = models[0] if match.group("suffix") == "a" else models[1]
        return f"{match.group('stem').replace('_', ' ')} {model}"
    return text.replace("_", " ")


_SUFFIXED_WORD = re.compile(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)*_[ab])\b")


def in_model_words(text: str, models: Sequence[str] | None) -> str:
    """A sentence with its stored names (`attn_norm_a`) in model names ("attn norm frozen")."""
    if not models or len(models) < 2:
        return str(text)
    return _SUFFIXED_WORD.sub(lambda m: model_label(m.group(1), models), str(text))


def fmt_deletion_floor(row: dict, default: float | None = None) -> float | None:
    """The floor 1/(R+1) of a deletion test's empirical p, R its own number of random sets (raised while p sat
    at its floor), else `default`."""
    n = row.get("n_random")
    try:
        return 1.0 / (int(n) + 1) if n is not None and n == n and int(n) > 0 else default
    except (TypeError, ValueError):
        return default


def fmt_deletion_p(row: dict, default_floor: float | None = None) -> str:
    """A deletion test's empirical p as resolved as it is: "<= 0.048" at its floor (`fmt_deletion_floor`), the
    stars on its q where stored (`q_value`, or an older `q`)."""
    return fmt_p_resolved(
        row.get("p_empirical"),
        floor=fmt_deletion_floor(row, default_floor),
        at_floor=row.get("p_at_floor"),
        q=row.get("q_value", row.get("q")),
    )
