"""DE tab: the differential-expression table (scanpy's Wilcoxon, high vs low; thesis fig. 7) with each
gene's attention rank in every analysis, sortable and searchable, beside the overlap of the top-k DE and
top-k attended genes with its hypergeometric p-value and the Spearman correlation
(docs/architecture.md, "Analysis 6: DE vs attention")."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Label, Select, Static
from textual_plotext import PlotextPlot

from gfattn_tui.format import fmt_p, fmt_p_resolved, fmt_q, model_label
from gfattn_tui.json_render import is_records
from gfattn_tui.messages import Loaded
from gfattn_tui.results import run_choices
from gfattn_tui.widgets.analysis_picker import AnalysisPicker
from gfattn_tui.widgets.gene_table import column_scientific, gene_cell
from gfattn_tui.widgets.sorted_rows import SortedRowsView
from store import results as R

PRIMARY = R.JSON_DE_NAMES
PAGE = 100
SHOWN = (R.COL_SYMBOL, R.COL_SCORE, R.COL_LOGFC, R.COL_PVAL_ADJ)  # then the rank columns, then the ID
ASCENDING_FIRST = (R.COL_SYMBOL, R.COL_ENSEMBL_ID, R.COL_PVAL, R.COL_PVAL_ADJ)
LABELS = {R.COL_LOGFC: "logFC", R.COL_PVAL_ADJ: "adj. p", R.COL_PVAL: "p", R.COL_SCORE: "score"}


def find_overlap_records(obj: Any) -> list[dict] | None:
    """The first list of records carrying `k` and an overlap count, wherever it sits in the JSON."""
    if is_records(obj) and all("k" in r for r in obj) and any(any("overlap" in key for key in r) for r in obj):
        return obj
    if isinstance(obj, dict):
        for value in obj.values():
            found = find_overlap_records(value)
            if found:
                return found
    return None


def read_de(st, run_id: int, analysis_id: int | None, comparison: str | None = None) -> dict:
    """The DE table and the overlap of one comparison ("group vs reference"; a task of more classes has
    one per class, each offered by the picker), with the analysis runs and comparisons to choose from."""
    scope = R.collect_scope(st, run_id)
    analyses, de_runs = scope.analyses, scope.de_runs
    if (not de_runs or not analyses) and scope.run.get("parent_id") is not None:
        # a single DE or analysis run: its siblings under the pipeline hold the other half
        parent = R.collect_scope(st, scope.run["parent_id"])
        de_runs = de_runs or parent.de_runs
        analyses = analyses or parent.analyses
    choices, chosen = run_choices(analyses, analysis_id)
    overlap: dict[str, Any] = {}
    if chosen is not None:
        docs = R.read_json(st, chosen, PRIMARY)
        overlap = next((docs[n] for n in PRIMARY if n in docs), {}) or {}
    tables = []
    for r in de_runs:
        if R.TABLE_DE in st.gene_tables(r["id"]):
            cfg = R.run_config(R.full_run(st, r))
            label = f"{cfg.get('group')} vs {cfg.get('reference')}" if cfg.get("group") else str(r.get("name") or "")
            tables.append((label, r))
    by_group = overlap.get("by_group") if isinstance(overlap, dict) else None
    comparisons = list(by_group) if isinstance(by_group, dict) and by_group else [label for label, _ in tables]
    comparison = comparison if comparison in comparisons else (comparisons[0] if comparisons else None)
    if isinstance(by_group, dict) and isinstance(by_group.get(comparison), dict) and by_group[comparison]:
        overlap = {**by_group[comparison], "group": comparison}
    de_run = next((r for label, r in tables if label == comparison), tables[0][1] if tables else None)
    table = R.read_de_table(st, de_run["id"], analyses) if de_run else {"columns": [], "rows": [], "rank_columns": {}}
    return {
        "analyses": choices,
        "chosen": chosen,
        "comparisons": comparisons,
        "models": list(R.compared_models(R.full_run(st, chosen))) if chosen is not None else None,
        "comparison": comparison,
        "overlap": overlap,
        "de_run": {"id": de_run["id"], "name": de_run.get("name")} if de_run else None,
        **table,
    }


CELL_PAD = 2  # a DataTable cell's padding, both sides


def fit_columns(columns: list[str], labels: dict, page: list[dict], width: int) -> list[str]:
    """The columns, in order, that fit `width` whole (each as wide as its widest cell or label); the first
    (the gene) always. A number is never cut: a column that does not fit is left out instead."""
    shown, used = [], 2  # the vertical scrollbar
    for col in columns:
        w = max([len(labels.get(col, col)) + 2] + [_cell_len(c[col]) for c in page])
        if shown and used + w + CELL_PAD > width:
            continue
        shown.append(col)
        used += w + CELL_PAD
    return shown


def _cell_len(cell) -> int:
    return cell.cell_len if isinstance(cell, Text) else len(str(cell))


class DEView(SortedRowsView, Vertical):
    focus_selector = "#de-table"
    uses_analysis = True
    ascending_first = ASCENDING_FIRST

    BINDINGS = [
        Binding("slash", "focus_search", "Search", id="de.search"),
        Binding("o", "sort_column", "Sort", id="de.sort"),
        Binding("right_square_bracket", "page(1)", "Next page", show=False, id="de.next_page"),
        Binding("left_square_bracket", "page(-1)", "Prev page", show=False, id="de.prev_page"),
    ]

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(run_id, order_by=R.COL_SCORE, **kwargs)
        self.data: dict | None = None
        self.rows: list[dict] = []  # sorted and searched
        self.comparison: str | None = None  # the DE comparison shown ("group vs reference")
        self.hidden: list[str] = []  # columns left out because they do not fit the table's width

    def compose(self) -> ComposeResult:
        with Horizontal(classes="bar"):
            yield AnalysisPicker(id="de-analysis")
            yield Select([], id="de-comparison", compact=True, allow_blank=True, prompt="comparison")
        with Horizontal(id="de-body"):
            with Vertical(id="de-left"):
                yield Input(placeholder="/ symbol or Ensembl ID", id="de-search", compact=True)
                yield Label("", id="de-status")
                yield DataTable(id="de-table", cursor_type="cell", zebra_stripes=True, fixed_columns=1)
            with Vertical(id="de-right"):
                yield PlotextPlot(id="de-plot", classes="plot")
                yield Static("", id="de-results")
        yield Static("No DE table (yet) under this run.", id="de-empty", classes="empty")

    def on_mount(self) -> None:
        self.query_one("#de-empty").display = False
        self.query_one("#de-comparison").display = False

    def on_resize(self, event) -> None:
        if self.data is not None and self.data.get("rows"):
            self._show_page()

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="de", name="DE vs attention")
    def load(self) -> None:
        run_id, analysis_id, comparison = self.run_id, self.analysis_id, self.comparison
        self.post_message(Loaded("de", self.client.call(lambda st: read_de(st, run_id, analysis_id, comparison))))

    def on_loaded(self, message: Loaded) -> None:
        data = self.data = message.data
        self.query_one(AnalysisPicker).set_analyses(data["analyses"], data["chosen"])
        self.query_one(AnalysisPicker).display = bool(data["analyses"])
        self.analysis_id = self.shown_analysis = data["chosen"]
        self.comparison = data.get("comparison")
        picker = self.query_one("#de-comparison", Select)
        picker.display = len(data.get("comparisons") or ()) > 1
        with picker.prevent(Select.Changed):
            picker.set_options([(c, c) for c in data.get("comparisons") or ()])
            if self.comparison is not None:
                picker.value = self.comparison
        has = bool(data["rows"]) or bool(data["overlap"])
        self.query_one("#de-empty").display = not has
        self.query_one("#de-body").display = has
        if not has:
            return
        cols = data["columns"]
        self.columns = [c for c in SHOWN if c in cols] + list(data["rank_columns"])
        self.columns += [c for c in cols if c not in self.columns]
        self.query_one("#de-left").display = bool(data["rows"])
        self._apply()
        self._draw_overlap(data["overlap"])

    # the table -----------------------------------------------------------------------------------
    def _apply(self) -> None:
        rows = (self.data or {}).get("rows") or []
        if self.search:
            needle = self.search.lower()
            rows = [
                r
                for r in rows
                if needle in str(r.get(R.COL_SYMBOL) or "").lower() or needle in str(r.get(R.COL_ENSEMBL_ID)).lower()
            ]
        key = self.order_by
        if key in self.columns:
            present = [r for r in rows if r.get(key) is not None]
            missing = [r for r in rows if r.get(key) is None]
            present.sort(key=lambda r: r[key] if key in R.TEXT_COLUMNS else float(r[key]), reverse=self.descending)
            rows = present + missing
        self.rows = rows
        self.row_offset = min(self.row_offset, max(0, (len(rows) - 1) // PAGE * PAGE))
        self._show_page()

    def _show_page(self) -> None:
        table = self.query_one("#de-table", DataTable)
        labels = {**LABELS, **((self.data or {}).get("rank_columns") or {})}
        table.clear(columns=True)
        page = []
        rows = self.rows[self.row_offset : self.row_offset + PAGE]
        formats = {col: column_scientific([row.get(col) for row in rows]) for col in self.columns}
        for row in rows:
            cells = {}
            for col in self.columns:
                value = row.get(col)
                if col in (R.COL_PVAL, R.COL_PVAL_ADJ):
                    cells[col] = Text(fmt_p(value), justify="right")
                else:
                    cells[col] = gene_cell(col, value, formats[col])
            page.append(cells)
        shown = fit_columns(self.columns, labels, page, self.query_one("#de-left").size.width or 200)
        self.hidden = [c for c in self.columns if c not in shown]
        for col in shown:
            mark = (" ↓" if self.descending else " ↑") if col == self.order_by else ""
            table.add_column(Text(labels.get(col, col) + mark, style="bold" if mark else ""), key=col)
        for cells in page:
            table.add_row(*[cells[c] for c in shown])
        self.shown_columns = shown
        total = len(self.rows)
        de = (self.data or {}).get("de_run") or {}
        arrow = "↓" if self.descending else "↑"
        self.query_one("#de-status", Label).update(
            f"{de.get('name', 'DE')} (run {de.get('id')}): {min(self.row_offset + 1, total)}–"
            f"{min(self.row_offset + PAGE, total)} of {total:,} · sorted by {labels.get(self.order_by, self.order_by)} "
            f"{arrow} · o sort  [ ] page"
            + (f" · {len(self.hidden)} columns need a wider terminal" if self.hidden else "")
        )

    def _draw_overlap(self, overlap: dict) -> None:
        plot = self.query_one("#de-plot", PlotextPlot)
        records = find_overlap_records(overlap) if overlap else None
        plot.display = bool(records)
        lines = []
        if records:
            ks = [float(r["k"]) for r in records]
            plt = plot.plt
            plt.clear_figure()
            plt.title("top-k DE genes among the top-k attended")
            overlap_key = next(k for k in records[0] if "overlap" in k)
            plt.plot(ks, [float(r.get(overlap_key) or 0) for r in records], label="observed", marker="braille")
            if all("expected" in r for r in records):
                plt.plot(ks, [float(r["expected"] or 0) for r in records], label="by chance", marker="braille")
            plt.xlabel("k")
            plot.refresh()
            for r in records:
                genes = ", ".join(map(str, r.get("genes") or []))  # every shared gene, wrapped
                q_value = r.get("q", r.get("q_value"))
                p = fmt_p_resolved(r.get("p_value"), floor=r.get("p_floor"), at_floor=r.get("at_floor"), q=q_value)
                q = f", q {fmt_q(q_value)}" if q_value is not None else ""
                lines.append(f"k={r['k']}: {r.get(overlap_key)} shared (p {p}{q})  {genes}")
            for block in overlap.get("directions") or ():
                if not isinstance(block, dict) or block.get("direction") == "up":
                    continue
                parts = [
                    f"k={r.get('k')}: {r.get('overlap')} (p {fmt_p(r.get('p_value'), stars=False)})"
                    for r in block.get("overlap") or ()
                    if isinstance(r, dict)
                ]
                if parts:
                    lines.append(f"{block.get('label') or block.get('direction')}: " + "  ".join(parts))
        spearman = (overlap or {}).get("spearman") or {}
        if spearman.get("rho") is not None:
            lines.append(
                f"Spearman DE score vs attention: rho {spearman['rho']:+.3f} (p {fmt_p(spearman.get('p_value'))})"
            )
        if (overlap or {}).get("attention_column"):
            models = ((self.data or {}).get("models")) or None
            column = model_label(overlap["attention_column"], models)
            lines.append(f"attention ranked by: {column}  · * p < {R.SIGNIFICANCE}")
        if (overlap or {}).get("group"):
            lines.insert(0, f"comparison: {overlap['group']}")
        self.query_one("#de-results", Static).update("\n".join(lines))

    # input ---------------------------------------------------------------------------------------
    @on(Input.Changed, "#de-search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.set_search(event.value)

    @on(Input.Submitted, "#de-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#de-table", DataTable).focus()

    @on(DataTable.HeaderSelected, "#de-table")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.sort_by(str(event.column_key.value))

    @on(Select.Changed, "#de-comparison")
    def _comparison_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.comparison:
            self.comparison = event.value
            self.load()

    @on(Select.Changed, "#de-analysis")
    def _analysis_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.analysis_id:
            self.analysis_id = event.value
            self.load()

    def show_rows(self) -> None:
        self._apply()

    def sorts_ascending_first(self, column: str) -> bool:
        # names, p-values and every analysis's attention rank (1 = most attended)
        return super().sorts_ascending_first(column) or column in ((self.data or {}).get("rank_columns") or {})

    def action_sort_column(self) -> None:
        table = self.query_one("#de-table", DataTable)
        column = table.cursor_coordinate.column
        shown = getattr(self, "shown_columns", self.columns)
        if 0 <= column < len(shown):
            self.sort_by(shown[column])

    def action_page(self, delta: int) -> None:
        new = self.row_offset + delta * PAGE
        if 0 <= new < max(len(self.rows), 1):
            self.row_offset = new
            self._show_page()

    def action_focus_search(self) -> None:
        self.query_one("#de-search", Input).focus()
