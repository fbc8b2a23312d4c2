"""The gene table's filter line, e.g. `in_reference_set = 1 and attn_a > 0.5`, turned into the
`where` mapping of `Store.gene_table` (column -> (op, value); values are bound by the store)."""

from __future__ import annotations

import re
from typing import Any

OPS = ("is not", "<=", ">=", "!=", "<>", "==", "=", "<", ">", "like", "in", "is")
_SPLIT = re.compile(r"\s+and\s+|\s*;\s*|\s*&&\s*", re.IGNORECASE)
_COND = re.compile(
    r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(is\s+not|<=|>=|!=|<>|==|=|<|>|like|in|is)\s*(.*?)\s*$", re.IGNORECASE
)


class FilterError(ValueError):
    """A filter the user can fix; the message says what is wrong and shows the syntax."""


def _value(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    low = text.lower()
    if low in ("null", "none"):
        return None
    if low in ("true", "yes"):
        return 1
    if low in ("false", "no"):
        return 0
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_gene_filter(text: str, columns: list[str] | None = None) -> dict[str, tuple[str, Any]]:
    """`"attn_a > 0.5 and symbol like MDM%"` -> {"attn_a": (">", 0.5), "symbol": ("like", "MDM%")}."""
    where: dict[str, tuple[str, Any]] = {}
    text = (text or "").strip()
    if not text:
        return where
    known = {c.lower(): c for c in columns or ()}
    for part in _SPLIT.split(text):
        if not part.strip():
            continue
        match = _COND.match(part)
        if not match:
            raise FilterError(
                f"cannot read {part!r}; write COLUMN OP VALUE, e.g. attn_a > 0.5 and in_reference_set = 1"
            )
        column, op, raw = match.group(1), " ".join(match.group(2).lower().split()), match.group(3)
        if known:
            if column.lower() not in known:
                raise FilterError(f"no column {column!r}; columns: {', '.join(columns or ())}")
            column = known[column.lower()]
        if column in where:
            raise FilterError(f"one condition per column ({column!r} appears twice)")
        if not raw and op not in ("is", "is not"):
            raise FilterError(f"{column} {op} needs a value")
        if op == "in":
            inner = raw.strip()
            if inner.startswith("(") and inner.endswith(")"):
                inner = inner[1:-1]
            value: Any = [_value(v) for v in inner.split(",") if v.strip()]
        else:
            value = _value(raw) if raw else None
        where[column] = (op if op != "==" else "=", value)
    return where
