"""Two runs side by side: headline test metrics, the configuration keys that differ, attention grids
(B minus A, each value on selection) and training curves overlaid."""

from __future__ import annotations

import math

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, OptionList, Static, TabbedContent, TabPane
from textual.widgets.option_list import Option
from textual_plotext import PlotextPlot

from gfattn_tui.format import STATUS_MARKS, fmt_num
from gfattn_tui.messages import Loaded
from gfattn_tui.widgets.head_grid import HeadGrid
from gfattn_tui.widgets.store_view import StoreBacked
from store import results as R

TABS = [("cmp-metrics", "Metrics"), ("cmp-config", "Config"), ("cmp-grids", "Grids"), ("cmp-curves", "Curves")]


def read_side(st, run_id: int) -> dict:
    scope = R.collect_scope(st, run_id)
    metrics, curves, grids = {}, {}, {}
    for ft in R.read_finetunes(st, scope, curves=True):
        metrics[ft.key] = {R.METRIC_ACCURACY: ft.accuracy, R.METRIC_MACRO_F1: ft.macro_f1}
        curves[ft.key] = ft.curves
    for an in scope.analyses:
        for name, grid in R.read_grids(st, an["id"]).items():
            grids[f"{an.get('name')} · {name}"] = grid.values
    return {"run": scope.run, "metrics": metrics, "curves": curves, "grids": grids}


def read_compare(st, a: int, b: int) -> dict:
    side_a, side_b = read_side(st, a), read_side(st, b)
    diff = R.config_differences(R.run_config(side_a["run"]), R.run_config(side_b["run"]))
    return {"a": side_a, "b": side_b, "config_diff": diff}


def _delta_text(a: float | None, b: float | None) -> Text:
    if a is None or b is None:
        return Text("")
    d = b - a
    style = "green" if d > 0 else "red" if d < 0 else ""
    return Text(f"{d:+.3f}", style=style, justify="right")


class CompareScreen(StoreBacked, Screen):
    BINDINGS = [
        Binding("escape", "back", "Back", id="compare.back"),
        *[
            Binding(str(i + 1), f"show_tab('{key}')", title, show=False, id=f"compare.tab_{key[4:]}")
            for i, (key, title) in enumerate(TABS)
        ],
        Binding("x", "swap", "Swap A/B", id="compare.swap"),
    ]

    def __init__(self, run_a: int, run_b: int) -> None:
        super().__init__()
        self.run_a, self.run_b = int(run_a), int(run_b)
        self.data: dict | None = None
        self.grid_key: str | None = None
        self.curve_key: str | None = None

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
        self._show_title(data)
        self._show_metrics(data)
        self._show_config(data)
        self._show_grid_list(data)
        self._show_curve_list(data)

    # sections ------------------------------------------------------------------------------------
    def _show_title(self, data: dict) -> None:
        text = Text()
        for side in ("a", "b"):
            run = data[side]["run"]
            mark, style = STATUS_MARKS.get(str(run.get("status")), ("·", ""))
            text.append(f" {side.upper()}: ", style="bold reverse")
            text.append(f" #{run['id']} {run.get('name', '')} ")
            text.append(f"{mark} {run.get('status')}", style=style)
            text.append("   ")
        self.query_one("#cmp-title", Static).update(text)

    def _show_metrics(self, data: dict) -> None:
        table = self.query_one("#cmp-metrics-table", DataTable)
        table.clear(columns=True)
        table.add_column("task/mode", key="key")
        table.add_column("metric", key="metric")
        table.add_column(Text("A", justify="right"), key="a")
        table.add_column(Text("B", justify="right"), key="b")
        table.add_column(Text("B − A", justify="right"), key="d")
        keys = list(dict.fromkeys([*data["a"]["metrics"], *data["b"]["metrics"]]))
        for key in keys:
            for metric in (R.METRIC_ACCURACY, R.METRIC_MACRO_F1):
                va = data["a"]["metrics"].get(key, {}).get(metric)
                vb = data["b"]["metrics"].get(key, {}).get(metric)
                table.add_row(
                    key,
                    metric,
                    Text(fmt_num(va), justify="right"),
                    Text(fmt_num(vb), justify="right"),
                    _delta_text(va, vb),
                )
        if not keys:
            table.add_row("—", "no fine-tuning results in either run", "", "", "")

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
        keys = [k for k in data["a"]["grids"] if k in data["b"]["grids"]]
        options = self.query_one("#cmp-grid-list", OptionList)
        with options.prevent(OptionList.OptionHighlighted):
            options.clear_options()
            options.add_options([Option(k, id=k) for k in keys] or [Option("no grid in both runs", disabled=True)])
        if keys:
            if self.grid_key not in keys:
                self.grid_key = next((k for k in keys if k.endswith(R.GRID_COSINE)), keys[0])
            with options.prevent(OptionList.OptionHighlighted):
                options.highlighted = keys.index(self.grid_key)
            self._show_grid()

    def _show_grid(self) -> None:
        if not self.data or not self.grid_key:
            return
        a = np.asarray(self.data["a"]["grids"][self.grid_key], dtype=float)
        b = np.asarray(self.data["b"]["grids"][self.grid_key], dtype=float)
        grid = self.query_one("#cmp-grid", HeadGrid)
        if a.shape != b.shape:
            grid.clear(columns=True)
            self.query_one("#cmp-grid-info", Static).update(
                f"shapes differ: A {a.shape}, B {b.shape}; the models are not comparable head by head"
            )
            return
        grid.show(f"{self.grid_key} (B − A)", b - a)
        self._describe_grid_cell()

    def _describe_grid_cell(self) -> None:
        if not self.data or not self.grid_key:
            return
        grid = self.query_one("#cmp-grid", HeadGrid)
        cell = grid.cell_at_cursor()
        if cell is None:
            return
        layer, head = cell
        a = float(np.asarray(self.data["a"]["grids"][self.grid_key])[layer, head])
        b = float(np.asarray(self.data["b"]["grids"][self.grid_key])[layer, head])
        d = b - a if math.isfinite(a) and math.isfinite(b) else float("nan")
        self.query_one("#cmp-grid-info", Static).update(
            f"{self.grid_key}  layer {layer} head {head}:  A {a:.4f}   B {b:.4f}   B − A {d:+.4f}"
        )

    def _show_curve_list(self, data: dict) -> None:
        keys = list(dict.fromkeys([*data["a"]["curves"], *data["b"]["curves"]]))
        options = self.query_one("#cmp-curve-list", OptionList)
        with options.prevent(OptionList.OptionHighlighted):
            options.clear_options()
            options.add_options([Option(k, id=k) for k in keys] or [Option("no training curves", disabled=True)])
        if keys:
            self.curve_key = self.curve_key if self.curve_key in keys else keys[0]
            with options.prevent(OptionList.OptionHighlighted):
                options.highlighted = keys.index(self.curve_key)
            self._show_curves()

    def _show_curves(self) -> None:
        if not self.data or not self.curve_key:
            return
        plots = (
            ("#cmp-curve-acc", R.METRIC_ACCURACY, "validation accuracy"),
            ("#cmp-curve-loss", R.METRIC_LOSS, "loss"),
        )
        for plot_id, kind, title in plots:
            plot = self.query_one(plot_id, PlotextPlot)
            plt = plot.plt
            plt.clear_figure()
            plt.title(f"{self.curve_key}: {title}, A and B overlaid")
            for side in ("a", "b"):
                for curve in self.data[side]["curves"].get(self.curve_key, {}).get(kind, []):
                    if kind == R.METRIC_ACCURACY and "F1" in curve.label:
                        continue
                    draw = plt.scatter if len(curve.x) == 1 else plt.plot
                    marker = "braille" if len(curve.x) > 1 else "dot"
                    draw(curve.x, curve.y, label=f"{side.upper()} {curve.label}", marker=marker)
            plot.refresh()

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
