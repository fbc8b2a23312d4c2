"""Key genes tab: what an analysis run says about each model's key genes, beyond attention received.

For the model chosen (either model of the pair; the last one first, as `key_score_b` is the default
ranking): the key score's frequency warnings and its Spearman with detection frequency beside that of the
deletion effect; set deletion as curves (change of the true-class probability against k, one line per
score, the chosen score's matched random sets as a dotted 2.5-97.5% band) and as a sortable table; the
single-gene deletion table; and the randomisation cascade (each score's Spearman with the trained
model's as the model is re-initialised from the head down, the flag line at 0.8, the flagged scores
named). Runs written before these results existed get a one-line message in their place.

Both tables sort by a column when its header is clicked or with `o` on the column under the cursor
(`O` reverses); missing values stay last either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Label, Select, Static
from textual_plotext import PlotextPlot

from gfattn_tui.format import finite_float, fmt_deletion_p, fmt_num, in_model_words
from gfattn_tui.messages import Loaded
from gfattn_tui.results import model_gates, run_choices
from gfattn_tui.widgets.analysis_picker import AnalysisPicker
from gfattn_tui.widgets.store_view import RunView
from store import results as R

# one colour per score, in the document's order; the band takes its score's colour
SCORE_COLORS = ("blue+", "red+", "green+", "magenta+", "cyan+", "orange", "yellow+", "white")
BAND_POINTS = 48  # points of each dotted band line


def read_keygenes(st, run_id: int, analysis_id: int | None, suffix: str | None) -> dict:
    """The analysis runs to choose from, the chosen one's models, and the chosen model's deletion,
    randomisation cascade and the run's key-gene document (None for each where the run has none)."""
    scope = R.collect_scope(st, run_id)
    analyses, chosen = run_choices(scope.analyses, analysis_id)
    out: dict = {
        "analyses": analyses,
        "chosen": chosen,
        "models": {},
        "suffix": None,
        "model": None,
        "deletion": None,
        "sanity": None,
        "key_genes": None,
    }
    if chosen is None:
        return out
    models = dict(zip(R.MODEL_SUFFIXES, R.compared_models(st.get_run(chosen))))
    suffix = suffix if suffix in models else R.MODEL_SUFFIXES[-1]
    model = models[suffix]
    out.update(
        models=models,
        suffix=suffix,
        model=model,
        deletion=R.read_deletion(st, chosen, model),
        sanity=R.read_sanity(st, chosen, model),
        key_genes=R.read_key_genes(st, chosen),
    )
    out["ranked_by"], out["ranked"] = ranked_genes(st, chosen, suffix, out["deletion"])
    out["not_learned"] = [m for m, gate in model_gates(st, chosen).items() if R.did_not_learn(gate)]
    return out


RANKED_N = 50  # genes in the ranked key-gene table


def ranked_genes(st, run_id: int, suffix: str, deletion: R.Deletion | None, n: int = RANKED_N):
    """The model's top `n` genes by its key score (else by attention received), each with its attention,
    the cells expressing it and its single-gene deletion effect where the run deleted it."""
    if R.TABLE_GENES not in st.gene_tables(run_id):
        return None, []
    columns = st.gene_table_columns(run_id, R.TABLE_GENES)
    by = next((c for c in (R.col_key_score(suffix), R.col_attn(suffix)) if c in columns), None)
    if by is None:
        return None, []
    rows = st.gene_table(run_id, R.TABLE_GENES, order_by=by, descending=True, limit=n, where={by: ("is not", None)})
    effects: dict[str, dict] = {}
    if deletion is not None and deletion.single is not None and len(deletion.single):
        for row in deletion.single.to_dict("records"):
            effects[str(row.get(R.COL_ENSEMBL_ID))] = row
    out = []
    for rank, row in enumerate(rows, 1):
        effect = effects.get(str(row.get(R.COL_ENSEMBL_ID))) or {}
        out.append(
            {
                "rank": rank,
                R.COL_SYMBOL: row.get(R.COL_SYMBOL) or row.get(R.COL_ENSEMBL_ID),
                "score": row.get(by),
                "attn": row.get(R.col_attn(suffix)),
                R.COL_N_CELLS: row.get(R.COL_N_CELLS),
                R.DEL_LOGIT: effect.get(R.DEL_LOGIT, row.get(R.col_deletion_logit(suffix))),
                R.DEL_LOGIT_LOW: effect.get(R.DEL_LOGIT_LOW),
                R.DEL_LOGIT_HIGH: effect.get(R.DEL_LOGIT_HIGH),
            }
        )
    return by, out


# ------------------------------------------------------------------------------------------ formatting
def fmt_delta(value: Any) -> str:
    """A signed change with four decimals ("+0.0123"; one format for the whole column), missing "—"."""
    f = finite_float(value)
    if f is None:
        return "—"
    return f"{f:+.4f}"


def fmt_interval(low: Any, high: Any) -> str:
    """ "[-0.0381, -0.0121]": fixed width (bounds to 4 decimals), so a column of intervals stays narrow."""
    lo, hi = finite_float(low), finite_float(high)
    if lo is None and hi is None:
        return "—"
    return "[" + ", ".join("—" if v is None else f"{v:+.4f}" for v in (lo, hi)) + "]"


def sort_rows(rows: list[dict], key: str, descending: bool) -> list[dict]:
    """Rows by `key` (numbers numerically, text case-insensitively); missing values last either way."""

    def value(row: dict):
        v = row.get(key)
        if isinstance(v, str):
            return v.lower()
        return finite_float(v)

    present = [r for r in rows if value(r) is not None]
    missing = [r for r in rows if value(r) is None]
    return sorted(present, key=value, reverse=descending) + missing


# ------------------------------------------------------------------------------------- sortable tables
@dataclass
class Column:
    key: str  # the row field the column sorts by
    label: str
    render: Callable[[dict], Text | str]
    ascending_first: bool = False  # the first click sorts ascending (names, p-values, deletion effects)


def _num(fmt: Callable[[Any], str], key: str) -> Callable[[dict], Text]:
    return lambda row: Text(fmt(row.get(key)), justify="right")


def _whole(value: Any) -> str:
    """A count or rank as a whole number ("1,204"), "—" where missing."""
    return fmt_num(value, 0) if finite_float(value) is not None else "—"


def _cells(value: Any) -> str:
    return fmt_num(int(value)) if finite_float(value) is not None else "—"


def _interval_column(low: str, high: str, label: str = "95% CI") -> Column:
    """A column showing the interval [row[low], row[high]], sorted by its lower end (smallest first)."""
    return Column(low, label, lambda r: Text(fmt_interval(r.get(low), r.get(high)), justify="right"), True)


def _logit_columns() -> list[Column]:
    """A single gene's deletion effect on the true-class logit and its 95% interval."""
    return [
        Column(R.DEL_LOGIT, "Δlogit", _num(fmt_delta, R.DEL_LOGIT), ascending_first=True),
        _interval_column(R.DEL_LOGIT_LOW, R.DEL_LOGIT_HIGH),
    ]


SET_COLUMNS = [
    Column(R.DEL_SCORE, "score", lambda r: str(r.get(R.DEL_SCORE, "")), ascending_first=True),
    Column(R.DEL_K, "k", _num(_whole, R.DEL_K)),
    Column(R.DEL_DELTA_PROB, "Δp", _num(fmt_delta, R.DEL_DELTA_PROB), ascending_first=True),
    _interval_column(R.DEL_DELTA_PROB_LOW, R.DEL_DELTA_PROB_HIGH),
    Column(R.DEL_RANDOM_MEAN, "random Δp", _num(fmt_delta, R.DEL_RANDOM_MEAN), ascending_first=True),
    _interval_column(R.DEL_RANDOM_LOW, R.DEL_RANDOM_HIGH, "random 2.5–97.5%"),
    Column(R.DEL_P, "p", lambda r: Text(_deletion_p(r), justify="right"), ascending_first=True),
    Column(R.DEL_ACCURACY_AFTER, "acc after", _num(lambda v: fmt_num(finite_float(v)), R.DEL_ACCURACY_AFTER)),
]


def _deletion_p(row: dict) -> str:
    """The empirical p, "<= 0.048" at its floor 1/(random sets + 1); stars only on q where stored."""
    return fmt_deletion_p(row, row.get("_floor"))


RANKED_COLUMNS = [
    Column("rank", "#", _num(_whole, "rank"), True),
    Column(R.COL_SYMBOL, "gene", lambda r: str(r.get(R.COL_SYMBOL) or ""), ascending_first=True),
    Column("score", "key score", _num(lambda v: fmt_fixed(v, 4), "score")),
    Column("attn", "attention", _num(lambda v: fmt_fixed(v, 4), "attn")),
    Column(R.COL_N_CELLS, "cells", _num(_cells, R.COL_N_CELLS)),
    *_logit_columns(),
]


def fmt_fixed(value: Any, digits: int = 4) -> str:
    """One format for a whole column: fixed decimals ("0.0123"), never a switch to scientific notation."""
    f = finite_float(value)
    return "—" if f is None else f"{f:.{digits}f}"


SINGLE_COLUMNS = [
    Column(R.COL_SYMBOL, "symbol", lambda r: str(r.get(R.COL_SYMBOL) or r.get(R.COL_ENSEMBL_ID) or ""), True),
    Column(R.DEL_TOP_OF, "top of", lambda r: str(r.get(R.DEL_TOP_OF) or ""), ascending_first=True),
    Column(R.DEL_N_CELLS_EXPRESSING, "cells", _num(_cells, R.DEL_N_CELLS_EXPRESSING)),
    *_logit_columns(),
]


class SortableTable(DataTable):
    """A table of a few hundred rows held in memory, sorted by a column on header click or `o`."""

    BINDINGS = [
        Binding("o", "sort_column", "Sort", id="keygenes.sort"),
        Binding("O", "reverse_sort", "Reverse", show=False, id="keygenes.sort_reverse"),
    ]

    def __init__(self, columns: list[Column], *, sort: tuple[str | None, bool] = (None, False), **kwargs) -> None:
        super().__init__(cursor_type="cell", zebra_stripes=True, **kwargs)
        self.spec = columns
        self.rows_data: list[dict] = []
        self.rows_shown: list[dict] = []
        self.order_by, self.descending = sort

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for col in self.spec:
            mark = (" ↓" if self.descending else " ↑") if col.key == self.order_by else ""
            self.add_column(Text(col.label + mark, style="bold" if mark else ""), key=col.key)

    def show(self, rows: list[dict]) -> None:
        self.rows_data = list(rows)
        self._render_rows()

    def _render_rows(self) -> None:
        keep = self.cursor_coordinate
        self.clear(columns=True)
        self._add_columns()
        rows = sort_rows(self.rows_data, self.order_by, self.descending) if self.order_by else self.rows_data
        self.rows_shown = rows
        for row in rows:
            self.add_row(*[col.render(row) for col in self.spec])
        if rows:
            self.move_cursor(row=min(keep.row, len(rows) - 1), column=max(keep.column, 0), animate=False)

    def sort_by(self, key: str) -> None:
        column = next((c for c in self.spec if c.key == key), None)
        if column is None:
            return
        if key == self.order_by:
            self.descending = not self.descending
        else:
            self.order_by, self.descending = key, not column.ascending_first
        self._render_rows()

    def first_row(self) -> dict | None:
        return self.rows_shown[0] if self.rows_shown else None

    @on(DataTable.HeaderSelected)
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(str(event.column_key.value))

    def action_sort_column(self) -> None:
        column = self.cursor_coordinate.column
        if 0 <= column < len(self.spec):
            self.sort_by(self.spec[column].key)

    def action_reverse_sort(self) -> None:
        if self.order_by is not None:
            self.descending = not self.descending
            self._render_rows()


# ------------------------------------------------------------------------------------------- the view
def _spearman(value: Any) -> str:
    f = finite_float(value)
    return "—" if f is None else f"{f:+.2f}"


def frequency_line(deletion: R.Deletion | None, key_genes: dict | None, key_score: str | None) -> Text | None:
    """One line: the Spearman with detection frequency of the key score and of the deletion effect."""
    rho = (deletion.info.get("frequency_spearman") if deletion is not None else None) or {}
    key_rho = rho.get("key_score")
    if key_rho is None and key_genes and key_score:
        key_rho = (key_genes.get("frequency_spearman") or {}).get(key_score)
    if key_rho is None and rho.get("deletion_effect") is None:
        return None
    line = Text("Spearman with detection frequency: ", style="bold")
    line.append(f"key score {_spearman(key_rho)}")
    if rho.get("deletion_effect") is not None:
        n = rho.get("n_genes_deleted")
        over = f" over the {n} genes deleted one at a time" if n is not None else ""
        line.append(f"; deletion effect {_spearman(rho['deletion_effect'])}")
        if rho.get("key_score_same_genes") is not None:
            line.append(f", key score {_spearman(rho['key_score_same_genes'])}")
        line.append(over)
    return line


RICH_COLORS = {
    "blue+": "bright_blue",
    "red+": "bright_red",
    "green+": "bright_green",
    "magenta+": "bright_magenta",
    "cyan+": "bright_cyan",
    "orange": "dark_orange",
    "yellow+": "bright_yellow",
    "white": "white",
}


def legend(scores: list[str]) -> Text:
    """The plot's legend as a line under it (plotext draws its own over the curves)."""
    text = Text("  ")
    for i, score in enumerate(scores):
        color = SCORE_COLORS[i % len(SCORE_COLORS)]
        text.append("━━ ", style=RICH_COLORS.get(color, "white"))
        text.append(f"{score}   ")
    return text


def _densify(x: list[float], y: list[float], n: int = BAND_POINTS) -> tuple[list[float], list[float]]:
    """Points along the polyline through (x, y), for a dotted line."""
    if len(x) < 2:
        return list(x), list(y)
    xs = np.linspace(min(x), max(x), n)
    return xs.tolist(), np.interp(xs, x, y).tolist()


class KeyGenesView(RunView, Vertical):
    uses_analysis = True

    BINDINGS = [Binding("m", "next_model", "Model", id="keygenes.model")]

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.suffix: str | None = None  # the model shown: a MODEL_SUFFIXES entry; None: the last model
        self.band: str | None = None  # the score whose matched random band is drawn
        self.data: dict | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(classes="bar"):
            yield AnalysisPicker(id="kg-analysis")
            yield Select([], id="kg-model", compact=True, allow_blank=True, prompt="model")
        with VerticalScroll(id="kg-body"):
            yield Static("", id="kg-head")
            yield Label("Key genes", classes="section", id="kg-ranked-title")
            yield SortableTable(RANKED_COLUMNS, id="kg-ranked")
            yield Label("Set deletion: change of the true-class probability", classes="section")
            yield Static("", id="kg-del-msg", classes="hint")
            with Vertical(id="kg-del"):
                with Horizontal(classes="bar"):
                    yield Label("matched random band of ", classes="hint")
                    yield Select([], id="kg-band", compact=True, allow_blank=True, prompt="score")
                yield PlotextPlot(id="kg-curves", classes="plot")
                yield Static("", id="kg-curves-legend")
                yield SortableTable(SET_COLUMNS, id="kg-sets")
                yield Label("Single-gene deletion: change of the true-class logit", classes="section")
                yield SortableTable(SINGLE_COLUMNS, sort=(R.DEL_LOGIT, False), id="kg-single")
            yield Label("Randomisation cascade", classes="section")
            yield Static("", id="kg-sanity-msg", classes="hint")
            with Vertical(id="kg-sanity"):
                yield PlotextPlot(id="kg-cascade", classes="plot")
                yield Static("", id="kg-cascade-legend")
                yield Static("", id="kg-flagged")
        yield Static("No analysis runs (yet) under this run.", id="kg-empty", classes="empty")

    def on_mount(self) -> None:
        self.query_one("#kg-empty").display = False

    def focus_main(self) -> None:
        """The set deletion table where the model has one, else the model switcher."""
        # the tab stays scrolled to its top: the warnings and the Spearman line are read first
        if self.query_one("#kg-body").display and self.query_one("#kg-del").display:
            self.query_one("#kg-sets").focus(scroll_visible=False)
        elif self.query_one("#kg-model").display:
            self.query_one("#kg-model").focus(scroll_visible=False)

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="keygenes", name="key genes")
    def load(self) -> None:
        run_id, analysis_id, suffix = self.run_id, self.analysis_id, self.suffix
        self.post_message(
            Loaded("keygenes", self.client.call(lambda st: read_keygenes(st, run_id, analysis_id, suffix)))
        )

    def on_loaded(self, message: Loaded) -> None:
        data = self.data = message.data
        self.query_one(AnalysisPicker).set_analyses(data["analyses"], data["chosen"])
        self.analysis_id = self.shown_analysis = data["chosen"]
        has = data["chosen"] is not None
        self.query_one("#kg-empty").display = not has
        self.query_one("#kg-body").display = has
        self.query_one("#kg-model").display = has
        if not has:
            return
        self.suffix = data["suffix"]
        picker = self.query_one("#kg-model", Select)
        with picker.prevent(Select.Changed):
            not_learned = data.get("not_learned") or ()
            picker.set_options(
                [(name + (" ✘ did not learn" if name in not_learned else ""), s) for s, name in data["models"].items()]
            )
            picker.value = data["suffix"]
        self._show_head(data)
        self._show_ranked(data)
        self._show_deletion(data)
        self._show_sanity(data)

    # sections ----------------------------------------------------------------------------------------
    def _show_head(self, data: dict) -> None:
        key_genes, deletion, model = data["key_genes"], data["deletion"], data["model"]
        key_score = R.col_key_score(data["suffix"])
        lines: list[Text] = []
        if model in (data.get("not_learned") or ()):
            lines.append(
                Text(
                    f"✘ {model} did not learn (see the Overview): its key genes explain no learned signal", style="red"
                )
            )
        if deletion is not None:
            info = deletion.info
            acc = finite_float(info.get("accuracy_before"))
            text = f"deletion from {model}: {info.get('n_cells', '?')} cells"
            if acc is not None:
                text += f", accuracy {acc:.3f} before deletion"
            if info.get("n_random") is not None:
                text += f", {info['n_random']} matched random sets per set"
            lines.append(Text(text))
        freq = frequency_line(deletion, key_genes, key_score)
        if freq is not None:
            lines.append(freq)
        models = list((data.get("models") or {}).values())
        for warning in (key_genes or {}).get("warnings") or ():
            lines.append(Text(f"warning: {in_model_words(warning, models)}", style="yellow"))
        if key_genes:
            default = key_genes.get("default_score")
            line = Text("key score: ", style="bold").append(str(key_genes.get("definition") or key_score), style="dim")
            if default:
                line.append(f"  (default ranking: {in_model_words(str(default), models)})", style="dim")
            lines.append(line)
        if not lines:
            lines.append(Text("No key-gene score in this run (written before it existed).", style="dim"))
        self.query_one("#kg-head", Static).update(Text("\n").join(lines))

    def _show_ranked(self, data: dict) -> None:
        rows, by = data.get("ranked") or [], data.get("ranked_by")
        table = self.query_one("#kg-ranked", SortableTable)
        title = self.query_one("#kg-ranked-title", Label)
        table.display = title.display = bool(rows)
        if rows:
            what = "key score" if by == R.col_key_score(data["suffix"]) else "attention received (no key score stored)"
            title.update(f"Key genes of {data['model']}: top {len(rows)} by {what}, with single-gene deletion")
            table.show(rows)

    def _show_deletion(self, data: dict) -> None:
        deletion: R.Deletion | None = data["deletion"]
        has = deletion is not None and len(deletion.sets) > 0
        msg = self.query_one("#kg-del-msg", Static)
        msg.display = not has
        self.query_one("#kg-del").display = has
        if not has:
            msg.update(f"No deletion results for {data['model']} in this run.")
            return
        scores = deletion.scores
        if self.band not in scores:
            self.band = scores[0] if scores else None
        band = self.query_one("#kg-band", Select)
        with band.prevent(Select.Changed):
            band.set_options([(s, s) for s in scores])
            if self.band is not None:
                band.value = self.band
        self._draw_curves(deletion, data["model"])
        floor = 1.0 / (int(deletion.info["n_random"]) + 1) if deletion.info.get("n_random") else None
        sets = [{**row, "_floor": floor} for row in deletion.sets.to_dict("records")]
        self.query_one("#kg-sets", SortableTable).show(sets)
        single = self.query_one("#kg-single", SortableTable)
        rows = deletion.single.to_dict("records") if deletion.single is not None else []
        single.show(rows)

    def _draw_curves(self, deletion: R.Deletion, model: str) -> None:
        plot = self.query_one("#kg-curves", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        plt.title(f"{model}: change of the true-class probability when the top k genes are deleted")
        ks: set[float] = set()
        for i, score in enumerate(deletion.scores):
            curve = deletion.curve(score)
            x = [float(v) for v in curve[R.DEL_K]]
            y = [float(v) if finite_float(v) is not None else float("nan") for v in curve[R.DEL_DELTA_PROB]]
            ks.update(x)
            color = SCORE_COLORS[i % len(SCORE_COLORS)]
            plt.plot(x, y, color=color, marker="braille")  # the legend is drawn below the plot
            if score == self.band and {R.DEL_RANDOM_LOW, R.DEL_RANDOM_HIGH} <= set(curve.columns):
                for bound in (R.DEL_RANDOM_LOW, R.DEL_RANDOM_HIGH):
                    pts = [(k, finite_float(v)) for k, v in zip(x, curve[bound])]
                    pts = [(k, v) for k, v in pts if v is not None]
                    if pts:
                        bx, by = _densify([p[0] for p in pts], [p[1] for p in pts])
                        plt.scatter(bx, by, color=color, marker="·")
        plt.hline(0.0)
        if ks:
            plt.xticks(sorted(ks), [f"{k:g}" for k in sorted(ks)])
        plt.xlabel(f"k   (dotted: 2.5–97.5% of matched random sets for {self.band})")
        plot.refresh()
        self.query_one("#kg-curves-legend", Static).update(legend(deletion.scores))

    def _show_sanity(self, data: dict) -> None:
        sanity = data["sanity"]
        scores = {k: v for k, v in ((sanity or {}).get("scores") or {}).items() if isinstance(v, dict)}
        has = bool(scores) and bool(sanity.get("steps"))
        msg = self.query_one("#kg-sanity-msg", Static)
        msg.display = not has
        self.query_one("#kg-sanity").display = has
        if not has:
            msg.update(f"No randomisation cascade for {data['model']} in this run.")
            return
        steps = [str(s) for s in sanity["steps"]]
        plot = self.query_one("#kg-cascade", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        plt.title(f"{data['model']}: Spearman with the trained model's score, re-initialised from the head down")
        x = list(range(1, len(steps) + 1))
        for i, (_score, values) in enumerate(scores.items()):
            pts = [(xi, finite_float(v)) for xi, v in zip(x, values.get("spearman") or ())]
            pts = [(xi, v) for xi, v in pts if v is not None]
            if pts:
                color = SCORE_COLORS[i % len(SCORE_COLORS)]
                plt.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker="braille")
        plt.hline(R.SANITY_FLAG_RHO, "red")
        plt.xticks(x, steps)
        plt.ylim(-1.05, 1.05)
        plt.xlabel(f"re-initialised up to   (red: {R.SANITY_FLAG_RHO})")
        plot.refresh()
        self.query_one("#kg-cascade-legend", Static).update(legend(list(scores)))
        flagged = [str(f) for f in sanity.get("flagged") or ()]
        text = Text("not model-dependent: ", style="bold")
        text.append(", ".join(flagged) if flagged else "none", style="yellow" if flagged else "")
        rule = sanity.get("flag_rule") or f"Spearman >= {R.SANITY_FLAG_RHO} once everything is re-initialised"
        text.append(f"  ({rule})", style="dim")
        self.query_one("#kg-flagged", Static).update(text)

    # events ------------------------------------------------------------------------------------------
    @on(Select.Changed, "#kg-analysis")
    def _analysis_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.analysis_id:
            self.analysis_id = event.value
            self.load()

    @on(Select.Changed, "#kg-model")
    def _model_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.suffix:
            self.show_model(event.value)

    @on(Select.Changed, "#kg-band")
    def _band_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.band:
            self.band = event.value
            if self.data is not None and self.data.get("deletion") is not None:
                self._draw_curves(self.data["deletion"], self.data["model"])

    def show_model(self, suffix: str) -> None:
        self.suffix = suffix
        self.load()

    def action_next_model(self) -> None:
        models = list((self.data or {}).get("models") or ())
        if len(models) > 1:
            current = models.index(self.suffix) if self.suffix in models else len(models) - 1
            self.show_model(models[(current + 1) % len(models)])
