"""One page of a per-gene table; the header marks the column the rows are sorted by. The rank and the
symbol stay pinned at the left while the other columns scroll."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import DataTable

from gfattn_tui.format import model_label
from store.results import COL_IN_REFERENCE_SET

FLAG_COLUMNS = (COL_IN_REFERENCE_SET,)


def column_scientific(values) -> bool:
    """One number format per column: scientific for a column whose values are all tiny (or all huge),
    else fixed decimals for every row (never "+1.6e-05" beside "+0.0001")."""
    sizes = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v) and v != 0]
    return bool(sizes) and (max(sizes) < 1e-3 or min(sizes) >= 1e6)


def gene_cell(column: str, value, scientific: bool | None = None) -> Text | str:
    if value is None:
        return Text("—", style="dim", justify="right")
    if column in FLAG_COLUMNS:
        return Text("●", style="bold magenta", justify="center") if value else Text("")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, int):
        return Text(f"{value:,}", justify="right")
    if isinstance(value, float):
        if not math.isfinite(value):
            return Text(str(value), justify="right")
        if scientific is not None:
            return Text(f"{value:.3e}" if scientific else f"{value:.4f}", justify="right")
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return Text(f"{value:.3e}", justify="right")
        return Text(f"{value:.4f}", justify="right")
    return str(value)


class GeneTable(DataTable):
    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="cell", zebra_stripes=True, fixed_columns=2, **kwargs)
        self.columns_shown: list[str] = []
        self.rows_shown: list[dict] = []
        self.models: tuple[str, str] | None = None  # the compared models, to name `_a` / `_b` columns
        self._sort_marks: tuple = (None, True)

    def show(
        self,
        columns: list[str],
        rows: list[dict],
        order_by: str | None,
        descending: bool,
        offset: int,
        *,
        ranks: dict | None = None,
    ) -> None:
        """`ranks`: {ensembl_id: place in the whole sorted table} when the rows are a search's or filter's
        (their row number on the page is not their rank); else the rank is offset + row."""
        keep = self.cursor_coordinate
        if columns != self.columns_shown or self._sort_marks != (order_by, descending):
            self.clear(columns=True)
            self.columns_shown = list(columns)
            self._sort_marks = (order_by, descending)
            self.add_column(Text("rank", style="dim"), key="_n")
            for col in columns:
                mark = (" ↓" if descending else " ↑") if col == order_by else ""
                label = model_label(col, self.models) if self.models else col
                self.add_column(Text(label + mark, style="bold" if mark else ""), key=col)
        else:
            self.clear(columns=False)
        self.rows_shown = rows
        formats = {col: column_scientific([row.get(col) for row in rows]) for col in columns}
        for i, row in enumerate(rows):
            rank = (ranks or {}).get(row.get("ensembl_id")) if ranks else offset + i + 1
            self.add_row(
                Text("—" if rank is None else str(rank), style="dim", justify="right"),
                *[gene_cell(col, row.get(col), formats[col]) for col in columns],
                key=f"{offset + i}:{row.get('ensembl_id')}",
            )
        if rows:
            self.move_cursor(row=min(keep.row, len(rows) - 1), column=max(keep.column, 0), animate=False)

    def column_at_cursor(self) -> str | None:
        column = self.cursor_coordinate.column
        if 1 <= column <= len(self.columns_shown):
            return self.columns_shown[column - 1]
        return None
