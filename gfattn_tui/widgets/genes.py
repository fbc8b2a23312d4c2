"""Genes tab: the key-gene table of an analysis run (thesis table 8: attention, scaled, per occurrence,
position-controlled, rank statistics, DE score, reference-set mark), or the DE table it is compared
with, paged from SQL. Where the run has the key score, the table opens sorted by the last model's
(`key_score_b`), with both models' key scores and the last model's single-gene deletion effect first.

Only one page of rows is ever read (`Store.gene_table(limit, offset, order_by, search, where)`), so
sorting, searching and filtering 20,000 genes cost one indexed query each and stay instant.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Label, Select, Static

from gfattn_tui.format import model_label
from gfattn_tui.gene_filter import FilterError, parse_gene_filter
from gfattn_tui.messages import Loaded
from gfattn_tui.widgets.analysis_picker import AnalysisPicker
from gfattn_tui.widgets.gene_table import GeneTable
from gfattn_tui.widgets.sorted_rows import SortedRowsView
from store import results as R

_A, _B = R.MODEL_SUFFIXES
DEFAULT_SORT = (
    R.col_key_score(_B),  # the controlled key-gene score of the last model, where the run has it
    R.col_key_score(_A),
    R.col_attn_scaled(_B),
    R.col_attn(_B),
    R.col_attn_scaled(_A),
    R.col_attn(_A),
    R.COL_DE_SCORE,
    R.COL_SCORE,
)
ASCENDING_FIRST = (R.COL_SYMBOL, R.COL_ENSEMBL_ID, R.COL_RANK_MEAN, R.COL_PVAL, R.COL_PVAL_ADJ)  # first sort ascending
# the columns a researcher reads first, right after the pinned symbol; the rest follow, IDs last
PREFERRED = (
    R.col_key_score(_A),
    R.col_key_score(_B),
    R.col_deletion_logit(_B),
    R.col_attn_scaled(_A),
    R.col_attn_scaled(_B),
    R.COL_ATTN_SCALED_DIFF,
    R.col_attn(_A),
    R.col_attn(_B),
    R.COL_ATTN_DIFF,
    R.COL_ATTN_LOG2_RATIO,
    R.col_attn_pos_ratio(_A),
    R.col_attn_pos_ratio(_B),
    R.COL_POS_RATIO_DIFF,
    R.COL_DE_SCORE,
    R.COL_SCORE,
    R.COL_LOGFC,
    R.COL_PVAL_ADJ,
    R.COL_IN_REFERENCE_SET,
    R.COL_N_CELLS,
    R.COL_RANK_MEAN,
)
LAST = (R.COL_ENSEMBL_ID, R.COL_TOKEN_ID)


def display_columns(columns: list[str]) -> list[str]:
    """Symbol first (pinned), the preferred result columns, the others, the IDs last."""
    first = [c for c in (R.COL_SYMBOL, *PREFERRED) if c in columns]
    last = [c for c in LAST if c in columns]
    return first + [c for c in columns if c not in first and c not in last] + last


def filter_example(columns: list[str]) -> str:
    """A filter line that works on these columns (the placeholder of the filter input)."""
    parts = []
    numeric = [c for c in display_columns(columns) if c not in R.TEXT_COLUMNS and c not in LAST]
    if numeric:
        parts.append(f"{numeric[0]} > 0.5")
    if R.COL_IN_REFERENCE_SET in columns:
        parts.append(f"{R.COL_IN_REFERENCE_SET} = 1")
    elif R.COL_N_CELLS in columns:
        parts.append(f"{R.COL_N_CELLS} >= 10")
    parts.append(f"{R.COL_SYMBOL} like MDM%")
    return "f filter: " + " and ".join(parts[:2])


def read_gene_page(st, run_id: int, q: dict) -> dict:
    scope = R.collect_scope(st, run_id)
    # attention key-gene tables first, then the differential-expression tables they are compared with
    analyses = [{"id": r["id"], "name": r.get("name")} for r in [*scope.analyses, *scope.de_runs]]
    with_tables = []
    for a in analyses:
        tables = st.gene_tables(a["id"])
        if tables:
            with_tables.append({**a, "tables": tables})
    ids = [a["id"] for a in with_tables]
    chosen = q["analysis_id"] if q["analysis_id"] in ids else (ids[0] if ids else None)
    out = {
        "ranks": {},
        "analyses": with_tables,
        "chosen": chosen,
        "table": None,
        "tables": [],
        "columns": [],
        "rows": [],
        "count": 0,
        "order_by": q["order_by"],
        "descending": q["descending"],
        "offset": q["offset"],
    }
    if chosen is None:
        return out
    tables = next(a["tables"] for a in with_tables if a["id"] == chosen)
    chosen_run = R.full_run(st, chosen)
    out["models"] = R.compared_models(chosen_run) if chosen_run.get("kind") == R.KIND_ANALYSIS else None
    table = q["table"] if q["table"] in tables else (R.TABLE_GENES if R.TABLE_GENES in tables else tables[0])
    columns = st.gene_table_columns(chosen, table)
    order_by = q["order_by"] if q["order_by"] in columns else next((c for c in DEFAULT_SORT if c in columns), None)
    where = q["where"] or None
    count = st.gene_table_count(chosen, table, search=q["search"] or None, where=where)
    offset = min(q["offset"], max(0, (count - 1) // q["limit"] * q["limit"]))
    rows = st.gene_table(
        chosen,
        table,
        order_by=order_by,
        descending=q["descending"],
        limit=q["limit"],
        offset=offset,
        search=q["search"] or None,
        where=where,
    )
    if (q["search"] or where) and order_by and order_by not in R.TEXT_COLUMNS:
        # a search or filter shows rows of the whole ranking: number them by their place in it
        ids = [r[R.COL_ENSEMBL_ID] for r in rows]
        out["ranks"] = R.gene_ranks(st, chosen, order_by, ids, table=table, descending=q["descending"])
    columns = display_columns(columns)
    out.update(table=table, tables=tables, columns=columns, rows=rows, count=count, order_by=order_by, offset=offset)
    return out


class GenesView(SortedRowsView, Vertical):
    focus_selector = "GeneTable"
    uses_analysis = True
    ascending_first = ASCENDING_FIRST

    BINDINGS = [
        Binding("slash", "focus_search", "Search", id="genes.search"),
        Binding("f", "focus_filter", "Filter", id="genes.filter"),
        Binding("o", "sort_column", "Sort", id="genes.sort"),
        Binding("O", "reverse_sort", "Reverse", show=False, id="genes.sort_reverse"),
        Binding("right_square_bracket", "page(1)", "Next page", show=False, id="genes.next_page"),
        Binding("left_square_bracket", "page(-1)", "Prev page", show=False, id="genes.prev_page"),
        Binding("right_curly_bracket", "last_page", "Last page", show=False, id="genes.last_page"),
        Binding("left_curly_bracket", "first_page", "First page", show=False, id="genes.first_page"),
    ]

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(run_id, **kwargs)
        self.table: str | None = None
        self.where: dict = {}
        self.count = 0
        self._request = 0
        self._shown_request = 0

    @property
    def page_size(self) -> int:
        return self.app.config.page_size

    def compose(self) -> ComposeResult:
        with Horizontal(classes="bar"):
            yield AnalysisPicker(id="genes-analysis")
            yield Select([], id="genes-table-name", compact=True, allow_blank=True, prompt="table")
        with Horizontal(classes="bar", id="genes-inputs"):
            yield Input(placeholder="/ symbol or Ensembl ID", id="genes-search", compact=True)
            yield Input(placeholder="f filter: COLUMN > VALUE and ...", id="genes-filter", compact=True)
        yield Label("", id="genes-status")
        yield GeneTable(id="genes-grid")
        yield Static("No gene tables (yet) under this run.", id="genes-empty", classes="empty")

    def on_mount(self) -> None:
        self.query_one("#genes-empty").display = False
        self.query_one("#genes-table-name").display = False

    def reload(self) -> None:
        self.load()

    def query_state(self) -> dict:
        return {
            "analysis_id": self.analysis_id,
            "table": self.table,
            "order_by": self.order_by,
            "descending": self.descending,
            "offset": self.row_offset,
            "limit": self.page_size,
            "search": self.search,
            "where": dict(self.where),
        }

    def load(self) -> None:
        self._request += 1
        self._load(self._request, self.query_state())

    @work(thread=True, exclusive=True, exit_on_error=False, group="genes", name="gene table page")
    def _load(self, request: int, q: dict) -> None:
        data = self.client.call(lambda st: read_gene_page(st, self.run_id, q))
        self.post_message(Loaded("genes", (request, data)))

    def on_loaded(self, message: Loaded) -> None:
        request, data = message.data
        if request < self._shown_request:
            return  # an older query answered after a newer one
        self._shown_request = request
        has = data["chosen"] is not None
        self.query_one("#genes-empty").display = not has
        self.query_one(GeneTable).display = has
        self.query_one("#genes-inputs").display = has
        self.query_one(AnalysisPicker).set_analyses(data["analyses"], data["chosen"])
        self.analysis_id = self.shown_analysis = data["chosen"]
        if not has:
            self.query_one("#genes-status", Label).update("")
            return
        picker = self.query_one("#genes-table-name", Select)
        if len(data["tables"]) > 1:
            with picker.prevent(Select.Changed):
                picker.set_options([(t, t) for t in data["tables"]])
                picker.value = data["table"]
        picker.display = len(data["tables"]) > 1
        self.table, self.columns = data["table"], data["columns"]
        self.order_by, self.row_offset, self.count = data["order_by"], data["offset"], data["count"]
        self.query_one("#genes-filter", Input).placeholder = filter_example(data["columns"])
        table = self.query_one(GeneTable)
        if table.models != data.get("models"):
            table.models = data.get("models")
            table.columns_shown = []  # the headers are named again
        table.show(data["columns"], data["rows"], self.order_by, self.descending, self.row_offset, ranks=data["ranks"])
        self._update_status()

    def _update_status(self) -> None:
        size = self.page_size
        first = self.row_offset + 1 if self.count else 0
        last = min(self.row_offset + size, self.count)
        pages = max(1, -(-self.count // size))
        arrow = "↓" if self.descending else "↑"
        parts = [
            f"{self.table}: rows {first:,}–{last:,} of {self.count:,}",
            f"page {self.row_offset // size + 1}/{pages}",
        ]
        if self.order_by:
            models = self.query_one(GeneTable).models
            parts.append(f"sorted by {model_label(self.order_by, models) if models else self.order_by} {arrow}")
        if self.search:
            parts.append(f"search {self.search!r}")
        if self.where:
            parts.append("filter " + " and ".join(f"{k} {op} {v}" for k, (op, v) in self.where.items()))
        self.query_one("#genes-status", Label).update("  ·  ".join(parts) + "    [ ] page  o sort")

    # input -------------------------------------------------------------------------------------
    @on(Input.Changed, "#genes-search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.set_search(event.value)

    @on(Input.Submitted, "#genes-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        try:
            self.where = parse_gene_filter(event.value, self.columns)
        except FilterError as exc:
            self.app.notify(str(exc), title="Filter", severity="warning")
            return
        self.row_offset = 0
        self.load()
        self.query_one(GeneTable).focus()

    @on(Input.Submitted, "#genes-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.query_one(GeneTable).focus()

    def on_key(self, event) -> None:
        if event.key == "escape" and isinstance(self.app.focused, Input):
            event.stop()
            self.query_one(GeneTable).focus()

    @on(Select.Changed, "#genes-analysis")
    def _analysis_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.analysis_id:
            self.analysis_id, self.table, self.row_offset = event.value, None, 0
            self.load()

    @on(Select.Changed, "#genes-table-name")
    def _table_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.table:
            self.table, self.row_offset = event.value, 0
            self.load()

    @on(DataTable.HeaderSelected, "#genes-grid")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.sort_by(str(event.column_key.value))

    # actions -----------------------------------------------------------------------------------
    def show_rows(self) -> None:
        self.load()

    def action_sort_column(self) -> None:
        column = self.query_one(GeneTable).column_at_cursor()
        if column:
            self.sort_by(column)

    def action_reverse_sort(self) -> None:
        self.descending = not self.descending
        self.row_offset = 0
        self.load()

    def action_page(self, delta: int) -> None:
        new = self.row_offset + delta * self.page_size
        if 0 <= new < max(self.count, 1):
            self.row_offset = new
            self.load()

    def action_first_page(self) -> None:
        if self.row_offset:
            self.row_offset = 0
            self.load()

    def action_last_page(self) -> None:
        last = max(0, (self.count - 1) // self.page_size * self.page_size)
        if last != self.row_offset:
            self.row_offset = last
            self.load()

    def action_focus_search(self) -> None:
        self.query_one("#genes-search", Input).focus()

    def action_focus_filter(self) -> None:
        self.query_one("#genes-filter", Input).focus()
