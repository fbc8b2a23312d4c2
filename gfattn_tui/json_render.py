"""Readable rendering of the small JSON results of a run (QC report, DE overlap, statistics).

Their shapes belong to the pipeline and may grow, so the rendering is structural: scalars as
key/value rows, lists of records as tables, nested objects as titled sections.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gfattn_tui.format import fmt_bytes, fmt_num


def _scalar_text(value: Any, key: str = "") -> Text:
    if value is None:
        return Text("—", style="dim")
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return Text(f"{value:.2e}")
        return Text(fmt_num(value, 4))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str(key).endswith("_bytes"):
        return Text(fmt_bytes(value))
    if isinstance(value, (int, bool)):
        return Text(fmt_num(value))
    if isinstance(value, dict):
        # a nested record in a table cell: its scalars as key=value, never a Python repr
        return Text(", ".join(f"{k}={_scalar_text(v, k).plain}" for k, v in value.items()))
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return Text("; ".join(_scalar_text(v).plain for v in value[:10]) + (" …" if len(value) > 10 else ""))
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        shown = ", ".join(_scalar_text(v).plain for v in value[:20]) + (" …" if len(value) > 20 else "")
        return Text(shown)
    return Text(str(value))


def is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def records_table(records: list[dict], title: str | None = None) -> Table:
    keys: list[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold", pad_edge=False)
    for k in keys:
        table.add_column(str(k), justify="right")
    for r in records:
        table.add_row(*[_scalar_text(r.get(k), k) for k in keys])
    return table


def render_json(value: Any, title: str | None = None, depth: int = 0) -> RenderableType:
    if is_records(value):
        return records_table(value, title)
    if isinstance(value, dict):
        scalars = Table.grid(padding=(0, 2))
        scalars.add_column(style="bold")
        scalars.add_column()
        nested: list[RenderableType] = []
        for k, v in value.items():
            if isinstance(v, dict) or is_records(v):
                nested.append(
                    render_json(
                        v,
                        f"{title} · {k}".replace("_", " ") if title and depth else str(k).replace("_", " "),
                        depth + 1,
                    )
                )
            else:
                scalars.add_row(str(k).replace("_", " "), _scalar_text(v, k))
        parts: list[RenderableType] = []
        if title and not is_records(value):
            parts.append(Text(title, style="bold underline"))
        if scalars.row_count:
            parts.append(scalars)
        parts.extend(nested)
        return Group(*parts)
    body = _scalar_text(value)
    return Group(Text(title, style="bold underline"), body) if title else body
