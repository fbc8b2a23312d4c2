"""What the tabs built around one sortable, searchable, paged table share (the DE and Genes tabs): the
table's state (sort column and direction, first row shown, search text, columns) and how sorting and
searching change it. Each tab says how it shows its rows again (`show_rows`: the DE tab sorts the rows it
holds, the Genes tab reads one page from SQL) and which columns sort ascending on their first click."""

from __future__ import annotations

from gfattn_tui.widgets.store_view import RunView


class SortedRowsView(RunView):
    """A run tab whose table sorts by a column (descending first, except `ascending_first`), is searched
    by text and is shown a page at a time from `row_offset`."""

    ascending_first: tuple[str, ...] = ()  # columns whose first click sorts ascending (names, p-values)

    def __init__(self, run_id: int, *, order_by: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.order_by: str | None = order_by
        self.descending = True
        self.row_offset = 0
        self.search = ""
        self.columns: list[str] = []

    def show_rows(self) -> None:  # pragma: no cover - every tab implements it
        """Show the rows again from `row_offset` after the sort or the search changed."""
        raise NotImplementedError

    def sorts_ascending_first(self, column: str) -> bool:
        return column in self.ascending_first

    def sort_by(self, column: str) -> None:
        """Sort by `column`; the column already sorted by turns its direction round."""
        if column not in self.columns:
            return
        if column == self.order_by:
            self.descending = not self.descending
        else:
            self.order_by, self.descending = column, not self.sorts_ascending_first(column)
        self.row_offset = 0
        self.show_rows()

    def set_search(self, text: str) -> None:
        """Show the rows whose symbol or Ensembl ID holds `text`, from the first."""
        self.search = text.strip()
        self.row_offset = 0
        self.show_rows()
