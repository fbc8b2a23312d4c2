"""Two runs side by side: what each run is matched with on the other side, then its numbers together.

Runs are matched unit by unit (`pair_units`): two fine-tunings, two analyses, or the fine-tunings
(by task/mode) and analyses (by name) of two pipelines. Tabs: Metrics (test accuracy, macro-F1, best
epoch, mean cosine, DE overlap, with B - A), Config (keys that differ), Grids (matched by quantity,
B - A heatmap), Curves (training curves overlaid), Ranks (attention per rank position overlaid),
Genes (key genes of A and B with their ranks in both), Confusion (matrices side by side)."""

from __future__ import annotations

import math

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, OptionList, Static, TabbedContent, TabPane
from textual.widgets.option_list import Option
from textual_plotext import PlotextPlot

from gfattn_tui.format import STATUS_MARKS, fmt_num, fmt_p, model_label
from gfattn_tui.messages import Loaded
from gfattn_tui.results import ordered_confusion
from gfattn_tui.widgets.confusion_matrix import ConfusionMatrix
from gfattn_tui.widgets.head_grid import HeadGrid
from gfattn_tui.widgets.store_view import StoreBacked
from store import results as R

TABS = [
    ("cmp-metrics", "Metrics"),
    ("cmp-config", "Config"),
    ("cmp-grids", "Grids"),
    ("cmp-curves", "Curves"),
    ("cmp-ranks", "Ranks"),
    ("cmp-genes", "Genes"),
    ("cmp-confusion", "Confusion"),
]
KEY_GENES = 20


def pair_units(a: dict, b: dict, kind_a: str | None, kind_b: str | None, unit: str) -> list[tuple[str, object, object]]:
    """(label, unit of A, unit of B) for the units (`finetunes` or `analyses`, keyed by name) of two
    sides. Two single runs of the same kind are matched with each other whatever their names (dose/frozen
    with dose/unfrozen); pipelines are matched by name; a unit on one side only is paired with None."""
    units_a, units_b = a[unit], b[unit]
    single = {R.KIND_FINETUNE, R.KIND_ANALYSIS}
    if kind_a == kind_b and kind_a in single and len(units_a) == 1 and len(units_b) == 1:
        (ka, ua), (kb, ub) = next(iter(units_a.items())), next(iter(units_b.items()))
        return [(ka if ka == kb else f"{ka} | {kb}", ua, ub)]
    keys = list(dict.fromkeys([*units_a, *units_b]))
    return [(k, units_a.get(k), units_b.get(k)) for k in keys]


def read_side(st, run_id: int) -> dict:
    scope = R.collect_scope(st, run_id)
    finetunes = {}
    for ft in R.read_finetunes(st, scope, curves=True):
        ft.best_epoch = R.best_epoch(st, ft.run_id)  # type: ignore[attr-defined]
        if ft.confusion is not None:
            labels, matrix = ordered_confusion(ft.confusion.labels, ft.confusion.matrix)
            ft.confusion = R.Confusion(labels, matrix, ft.confusion.split)
        finetunes[ft.key] = ft
    analyses = {}
    for an in scope.analyses:
        pair = R.read_pair_analysis(st, an)
        head = R.read_analysis_headline(st, an)
        analyses[pair.name or str(pair.run_id)] = {"pair": pair, "head": head}
    return {"run": scope.run, "finetunes": finetunes, "analyses": analyses}


def _key_genes(st, pa: dict | None, pb: dict | None) -> list[dict]:
    """Top genes of A and of B by the last model's key score (summed attention in stores without one), each
    with its rank in both tables."""
    if pa is None or pb is None:
        return []
    ra, rb = pa["pair"].run_id, pb["pair"].run_id
    column = R.col_key_score(R.MODEL_SUFFIXES[1])
    if any(
        column not in st.gene_table_columns(rid, R.TABLE_GENES)
        for rid in (ra, rb)
        if R.TABLE_GENES in st.gene_tables(rid)
    ):
        column = R.col_attn(R.MODEL_SUFFIXES[1])
    out = []
    tops = []
    for rid in (ra, rb):
        if R.TABLE_GENES in st.gene_tables(rid) and column in st.gene_table_columns(rid, R.TABLE_GENES):
            tops.append(st.gene_table(rid, R.TABLE_GENES, order_by=column, descending=True, limit=KEY_GENES))
        else:
            tops.append([])
    ids_a = [g[R.COL_ENSEMBL_ID] for g in tops[0]]
    ids_b = [g[R.COL_ENSEMBL_ID] for g in tops[1]]
    in_b = R.gene_ranks(st, rb, column, ids_a)
    in_a = R.gene_ranks(st, ra, column, ids_b)
    for i in range(max(len(ids_a), len(ids_b))):
        row: dict = {"rank": i + 1}
        if i < len(ids_a):
            row.update(a_gene=R.gene_label(tops[0][i]), a_in_b=in_b.get(ids_a[i]))
        if i < len(ids_b):
            row.update(b_gene=R.gene_label(tops[1][i]), b_in_a=in_a.get(ids_b[i]))
        out.append(row)
    return out


def read_compare(st, a: int, b: int) -> dict:
    side_a, side_b = read_side(st, a), read_side(st, b)
    kind_a, kind_b = side_a["run"].get("kind"), side_b["run"].get("kind")
    finetunes = pair_units(side_a, side_b, kind_a, kind_b, "finetunes")
    analyses = pair_units(side_a, side_b, kind_a, kind_b, "analyses")
    genes = {label: _key_genes(st, ua, ub) for label, ua, ub in analyses if ua is not None and ub is not None}
    diff = R.config_differences(R.run_config(side_a["run"]), R.run_config(side_b["run"]))
    out = {"a": side_a, "b": side_b, "finetunes": finetunes, "analyses": analyses, "genes": genes, "config_diff": diff}
    out["refused"] = refusal(side_a["run"], side_b["run"], finetunes, analyses)
    return out


def refusal(run_a: dict, run_b: dict, finetunes: list, analyses: list) -> str:
    """Why two runs cannot be compared ("" when they can): nothing of one is matched on the other."""
    matched = [u for u in [*finetunes, *analyses] if u[1] is not None and u[2] is not None]
    if matched or not (finetunes or analyses):
        return ""
    kinds = f"run {run_a['id']} is a {run_a.get('kind')} run, run {run_b['id']} a {run_b.get('kind')} run"
    return (
        f"nothing to compare: {kinds}, and no fine-tuning or analysis of one is matched on the other; "
        "compare two fine-tunings, two analyses (an analysis holds its two models side by side), or two pipelines"
    )


def _delta_text(a: float | None, b: float | None, *, digits: int = 3) -> Text:
    if a is None or b is None:
        return Text("")
    d = float(b) - float(a)
    if not math.isfinite(d):
        return Text("")
    style = "green" if d > 0 else "red" if d < 0 else ""
    return Text(f"{d:+.{digits}f}", style=style, justify="right")


class CompareScreen(StoreBacked, Screen):
    BINDINGS = [
        Binding("escape", "back", "Back", id="compare.back"),
        Binding("question_mark", "app.keys", "Keys", id="app.keys"),
        Binding("x", "swap", "Swap A/B", id="compare.swap"),
        Binding("q", "app.quit", "Quit", id="compare.quit"),
        *[
            Binding(str(i + 1), f"show_tab('{key}')", title, show=False, id=f"compare.tab_{key[4:]}")
            for i, (key, title) in enumerate(TABS)
        ],
    ]

    def __init__(self, run_a: int, run_b: int) -> None:
        super().__init__()
        self.run_a, self.run_b = int(run_a), int(run_b)
        self.data: dict | None = None
        self.grids: dict[str, tuple] = {}  # option id -> (label, grid name, A values, B values)
        self.grid_key: str | None = None
        self.curves: dict[str, tuple] = {}  # option id -> (label, A curves, B curves)
        self.curve_key: str | None = None
        self.rank_key: str | None = None

    @property
    def keys_title(self) -> str:
        return f"compare runs {self.run_a} and {self.run_b}"

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="cmp-title")
        with TabbedContent(id="cmp-tabs"):
            with TabPane("Metrics", id="cmp-metrics"):
                yield DataTable(id="cmp-metrics-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Config", id="cmp-config"):
                yield DataTable(id="cmp-config-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Grids", id="cmp-grids"):
                with Horizontal():
                    yield OptionList(id="cmp-grid-list")
                    with Vertical():
                        yield HeadGrid(id="cmp-grid")
                        yield Static("", id="cmp-grid-info")
            with TabPane("Curves", id="cmp-curves"):
                with Horizontal():
                    yield OptionList(id="cmp-curve-list")
                    with Vertical():
                        yield PlotextPlot(id="cmp-curve-acc", classes="plot")
                        yield PlotextPlot(id="cmp-curve-loss", classes="plot")
            with TabPane("Ranks", id="cmp-ranks"):
                with Horizontal():
                    yield OptionList(id="cmp-rank-list")
                    with Vertical():
                        yield PlotextPlot(id="cmp-rank-received", classes="plot")
                        yield PlotextPlot(id="cmp-rank-diff", classes="plot")
            with TabPane("Genes", id="cmp-genes"):
                yield DataTable(id="cmp-genes-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Confusion", id="cmp-confusion"):
                yield VerticalScroll(id="cmp-confusion-body")
        yield Footer()

    def on_mount(self) -> None:
        self.app.store_changed.subscribe(self, lambda _v: self.load())
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="compare", name="compare runs")
    def load(self) -> None:
        a, b = self.run_a, self.run_b
        self.post_message(Loaded("compare", self.client.call(lambda st: read_compare(st, a, b))))

    def on_loaded(self, message: Loaded) -> None:
        data = self.data = message.data
        first = self.data is not None and not self.query_one("#cmp-metrics-table", DataTable).row_count
        self._show_title(data)
        self._show_metrics(data)
        self._show_config(data)
        self._show_grid_list(data)
        self._show_curve_list(data)
        self._show_rank_list(data)
        self._show_genes(data)
        self._show_confusions(data)
        if first:  # the table has the keys (left / right scroll it), not the tab bar
            self.query_one("#cmp-metrics-table", DataTable).focus()
        if data.get("refused"):
            self.app.notify(data["refused"], title="Compare", severity="warning", timeout=10)

    # sections ------------------------------------------------------------------------------------
    def _show_title(self, data: dict) -> None:
        text = Text()
        for side in ("a", "b"):
            run = data[side]["run"]
            mark, style = STATUS_MARKS.get(str(run.get("status")), ("·", ""))
            text.append(f" {side.upper()} ", style="bold reverse")
            text.append(f" #{run['id']} {run.get('name', '')} ({run.get('kind')}) ")
            text.append(mark, style=style)
            text.append("   ")
        self.query_one("#cmp-title", Static).update(text)

    def _show_metrics(self, data: dict) -> None:
        table = self.query_one("#cmp-metrics-table", DataTable)
        table.clear(columns=True)
        # A, B and B - A first: they stay on screen at 80 columns; what the row belongs to comes last
        table.add_column("metric", key="metric")
        table.add_column(Text("A", justify="right"), key="a")
        table.add_column(Text("B", justify="right"), key="b")
        table.add_column(Text("B − A", justify="right"), key="d")
        table.add_column("of", key="key")

        def add_row(label, name, va, vb, delta) -> None:
            table.add_row(name, va, vb, delta, label)

        if data.get("refused"):
            add_row("", Text(data["refused"], style="yellow"), "", "", "")
            return
        for label, fa, fb in data["finetunes"]:
            for metric, name in ((R.METRIC_ACCURACY, "accuracy"), (R.METRIC_MACRO_F1, "macro-F1")):
                va = getattr(fa, "accuracy" if metric == R.METRIC_ACCURACY else "macro_f1", None) if fa else None
                vb = getattr(fb, "accuracy" if metric == R.METRIC_ACCURACY else "macro_f1", None) if fb else None
                add_row(label, name, _num(va), _num(vb), _delta_text(va, vb))
            ea, eb = getattr(fa, "best_epoch", None), getattr(fb, "best_epoch", None)
            add_row(label, "best epoch", _num(ea), _num(eb), _delta_text(ea, eb, digits=0))
        for label, ua, ub in data["analyses"]:
            ha = ua["head"] if ua else None
            hb = ub["head"] if ub else None
            ca, cb = getattr(ha, "cosine_mean", None), getattr(hb, "cosine_mean", None)
            add_row(label, "mean cosine", _num(ca), _num(cb), _delta_text(ca, cb))
            layers = max(len(getattr(ha, "cosine_per_layer", []) or []), len(getattr(hb, "cosine_per_layer", []) or []))
            for layer in range(layers):
                la = _at(getattr(ha, "cosine_per_layer", None), layer)
                lb = _at(getattr(hb, "cosine_per_layer", None), layer)
                add_row(label, f"cosine layer {layer}", _num(la), _num(lb), _delta_text(la, lb))
            da = {r.get("k"): r for r in getattr(ha, "de_overlap", []) or []}
            db = {r.get("k"): r for r in getattr(hb, "de_overlap", []) or []}
            for k in sorted({*da, *db}, key=lambda v: float(v or 0)):
                ra, rb = da.get(k, {}), db.get(k, {})
                add_row(
                    label,
                    f"DE overlap k={k}",
                    Text(_overlap(ra), justify="right"),
                    Text(_overlap(rb), justify="right"),
                    _delta_text(ra.get("overlap"), rb.get("overlap"), digits=0),
                )
        if not data["finetunes"] and not data["analyses"]:
            add_row("", "no fine-tuning or analysis results in either run", "", "", "")

    def _show_config(self, data: dict) -> None:
        table = self.query_one("#cmp-config-table", DataTable)
        table.clear(columns=True)
        table.add_column("config key", key="key")
        table.add_column("A", key="a")
        table.add_column("B", key="b")
        for key, va, vb in data["config_diff"]:
            table.add_row(key, "—" if va is None else str(va), "—" if vb is None else str(vb))
        if not data["config_diff"]:
            table.add_row("(identical configurations)", "", "")

    def _show_grid_list(self, data: dict) -> None:
        self.grids = {}
        for label, ua, ub in data["analyses"]:
            if ua is None or ub is None:
                continue
            ga, gb = ua["pair"].grids, ub["pair"].grids
            models = getattr(ua.get("head"), "models", None)
            for name in ga:
                if name in gb:
                    key = f"{label} · {name}"
                    self.grids[key] = (label, model_label(name, models), ga[name].values, gb[name].values)
        keys = list(self.grids)
        options = self.query_one("#cmp-grid-list", OptionList)
        with options.prevent(OptionList.OptionHighlighted):
            options.clear_options()
            shown = [Option(k if len(data["analyses"]) > 1 else self.grids[k][1], id=k) for k in keys]
            options.add_options(shown or [Option("no analysis in both runs", disabled=True)])
        if keys:
            if self.grid_key not in keys:
                self.grid_key = next((k for k in keys if self.grids[k][1] == R.GRID_COSINE), keys[0])
            with options.prevent(OptionList.OptionHighlighted):
                options.highlighted = keys.index(self.grid_key)
            self._show_grid()
        else:
            self.grid_key = None

    def _show_grid(self) -> None:
        if not self.grid_key or self.grid_key not in self.grids:
            return
        _, name, a, b = self.grids[self.grid_key]
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        grid = self.query_one("#cmp-grid", HeadGrid)
        if a.shape != b.shape:
            grid.clear(columns=True)
            self.query_one("#cmp-grid-info", Static).update(
                f"shapes differ: A {a.shape}, B {b.shape}; the models are not comparable head by head"
            )
            return
        grid.show(f"{name}: run B − run A", b - a)
        self._describe_grid_cell()

    def _describe_grid_cell(self) -> None:
        if not self.grid_key or self.grid_key not in self.grids:
            return
        grid = self.query_one("#cmp-grid", HeadGrid)
        cell = grid.cell_at_cursor()
        if cell is None:
            return
        layer, head = cell
        _, name, va, vb = self.grids[self.grid_key]
        a = float(np.asarray(va, dtype=float)[layer, head])
        b = float(np.asarray(vb, dtype=float)[layer, head])
        d = b - a if math.isfinite(a) and math.isfinite(b) else float("nan")
        self.query_one("#cmp-grid-info", Static).update(
            f"{name}, each cell run B's value minus run A's (rows: layers, columns: heads)\n"
            f"layer {layer} head {head}:  A {a:.4f}   B {b:.4f}   B − A {d:+.4f}"
        )

    def _show_curve_list(self, data: dict) -> None:
        self.curves = {}
        for label, fa, fb in data["finetunes"]:
            self.curves[label] = (label, (fa.curves or {}) if fa else {}, (fb.curves or {}) if fb else {})
        keys = list(self.curves)
        options = self.query_one("#cmp-curve-list", OptionList)
        with options.prevent(OptionList.OptionHighlighted):
            options.clear_options()
            options.add_options([Option(k, id=k) for k in keys] or [Option("no training curves", disabled=True)])
        if keys:
            self.curve_key = self.curve_key if self.curve_key in keys else keys[0]
            with options.prevent(OptionList.OptionHighlighted):
                options.highlighted = keys.index(self.curve_key)
            self._show_curves()
        else:
            self.curve_key = None

    def _show_curves(self) -> None:
        if not self.curve_key or self.curve_key not in self.curves:
            return
        label, curves_a, curves_b = self.curves[self.curve_key]
        plots = (
            ("#cmp-curve-acc", R.METRIC_ACCURACY, "validation accuracy"),
            ("#cmp-curve-loss", R.METRIC_LOSS, "loss"),
        )
        for plot_id, kind, title in plots:
            plot = self.query_one(plot_id, PlotextPlot)
            plt = plot.plt
            plt.clear_figure()
            plt.title(f"{label}: {title}, A and B overlaid")
            for side, curves in (("A", curves_a), ("B", curves_b)):
                for curve in curves.get(kind, []):
                    if kind == R.METRIC_ACCURACY and "F1" in curve.label:
                        continue
                    draw = plt.scatter if len(curve.x) == 1 else plt.plot
                    marker = "braille" if len(curve.x) > 1 else "dot"
                    draw(curve.x, curve.y, label=f"{side} {curve.label}", marker=marker)
            plot.refresh()

    def _show_rank_list(self, data: dict) -> None:
        keys = [label for label, ua, ub in data["analyses"] if ua is not None or ub is not None]
        options = self.query_one("#cmp-rank-list", OptionList)
        with options.prevent(OptionList.OptionHighlighted):
            options.clear_options()
            options.add_options([Option(k, id=k) for k in keys] or [Option("no analysis runs", disabled=True)])
        if keys:
            self.rank_key = self.rank_key if self.rank_key in keys else keys[0]
            with options.prevent(OptionList.OptionHighlighted):
                options.highlighted = keys.index(self.rank_key)
            self._show_ranks()
        else:
            self.rank_key = None

    def _show_ranks(self) -> None:
        if not self.data or not self.rank_key:
            return
        pair = next(((ua, ub) for label, ua, ub in self.data["analyses"] if label == self.rank_key), None)
        if pair is None:
            return
        received = self.query_one("#cmp-rank-received", PlotextPlot).plt
        received.clear_figure()
        received.title(f"{self.rank_key}: attention received per rank position, A and B overlaid")
        diff = self.query_one("#cmp-rank-diff", PlotextPlot).plt
        diff.clear_figure()
        diff.title("percent difference (second model vs first), A and B")
        for side, unit in zip(("A", "B"), pair):
            if unit is None:
                continue
            an = unit["pair"]
            for suffix, model in zip(R.MODEL_SUFFIXES, an.models):
                values = an.ranks.received.get(suffix)
                if values is not None and len(values):
                    x = list(range(1, len(values) + 1))
                    received.plot(x, [float(v) for v in values], label=f"{side} {model}", marker="braille")
            if an.ranks.pct_diff is not None and len(an.ranks.pct_diff):
                d = np.asarray(an.ranks.pct_diff, dtype=float)
                keep = np.isfinite(d)
                diff.plot(np.arange(1, len(d) + 1)[keep].tolist(), d[keep].tolist(), label=side, marker="braille")
        received.xlabel("rank")
        diff.xlabel("rank")
        self.query_one("#cmp-rank-received", PlotextPlot).refresh()
        self.query_one("#cmp-rank-diff", PlotextPlot).refresh()

    def _show_genes(self, data: dict) -> None:
        table = self.query_one("#cmp-genes-table", DataTable)
        table.clear(columns=True)
        for key, label in (
            ("what", "analysis"),
            ("rank", "#"),
            ("a_gene", "A key gene"),
            ("a_in_b", "its rank in B"),
            ("b_gene", "B key gene"),
            ("b_in_a", "its rank in A"),
        ):
            table.add_column(label, key=key)
        for label, rows in data["genes"].items():
            for row in rows:
                table.add_row(
                    label,
                    Text(str(row["rank"]), justify="right"),
                    row.get("a_gene", ""),
                    _num(row.get("a_in_b")),
                    row.get("b_gene", ""),
                    _num(row.get("b_in_a")),
                )
        if not data["genes"]:
            table.add_row("—", "", "no key-gene tables in both runs", "", "", "")

    def _show_confusions(self, data: dict) -> None:
        body = self.query_one("#cmp-confusion-body", VerticalScroll)
        with self.app.batch_update():
            body.remove_children()
            rows = []
            for _label, fa, fb in data["finetunes"]:
                cells = []
                for side, ft in (("A", fa), ("B", fb)):
                    if ft is None or ft.confusion is None:
                        cells.append(Static(f"{side}: no confusion matrix", classes="confusion hint"))
                        continue
                    title = f"{side}: {ft.key} (run {ft.run_id})"
                    cm = ft.confusion
                    cells.append(
                        ConfusionMatrix(title, cm.labels, cm.matrix, ft.accuracy, ft.macro_f1, classes="confusion")
                    )
                rows.append(Horizontal(*cells, classes="conf-row"))
            if not rows:
                rows.append(Static("no confusion matrices in either run", classes="empty"))
            body.mount_all(rows)

    # events --------------------------------------------------------------------------------------
    @on(OptionList.OptionHighlighted, "#cmp-grid-list")
    def _grid_chosen(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id:
            self.grid_key = event.option.id
            self._show_grid()

    @on(OptionList.OptionHighlighted, "#cmp-curve-list")
    def _curve_chosen(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id:
            self.curve_key = event.option.id
            self._show_curves()

    @on(OptionList.OptionHighlighted, "#cmp-rank-list")
    def _rank_chosen(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id:
            self.rank_key = event.option.id
            self._show_ranks()

    @on(DataTable.CellHighlighted, "#cmp-grid")
    def _grid_cell(self, event: DataTable.CellHighlighted) -> None:
        self._describe_grid_cell()

    # actions -------------------------------------------------------------------------------------
    def action_back(self) -> None:
        self.app.pop_screen()

    def action_show_tab(self, key: str) -> None:
        self.query_one("#cmp-tabs", TabbedContent).active = key

    def action_swap(self) -> None:
        self.run_a, self.run_b = self.run_b, self.run_a
        self.load()


def _num(value) -> Text:
    return Text(fmt_num(value), justify="right")


def _at(values, i: int):
    return values[i] if values is not None and i < len(values) else None


def _overlap(r: dict) -> str:
    if not r:
        return "—"
    matched = f", matched {fmt_p(r['p_matched'])}" if r.get("p_matched") is not None else ""
    return f"{r.get('overlap')} (p {fmt_p(r.get('p_value'))}{matched})"
