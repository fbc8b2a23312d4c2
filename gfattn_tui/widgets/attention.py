"""Attention tab: layer x head grids of an analysis run (cosine similarity of the two models' attention,
its spread, attention norms; thesis section 4.3, Kobayashi et al. 2020) as coloured tables, with the
stored interval of the highlighted head."""

from __future__ import annotations

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, OptionList, Select, Static
from textual.widgets.option_list import Option

from gfattn_tui.messages import Loaded
from gfattn_tui.results import run_choices
from gfattn_tui.widgets.analysis_picker import AnalysisPicker
from gfattn_tui.widgets.head_grid import HeadGrid
from gfattn_tui.widgets.store_view import RunView
from store import results as R

P_GRIDS = (R.GRID_P_VALUE, R.GRID_P_VALUE_ADJ, R.GRID_P_VALUE_NORM)


def grid_title(name: str, models: tuple[str, str]) -> str:
    """A readable name of a stored grid: `norm_summed_b` -> "norm, heads summed: unfrozen"."""
    names = dict(zip(R.MODEL_SUFFIXES, models))
    fixed = {
        R.GRID_COSINE: "cosine similarity",
        R.GRID_COSINE_STD: "cosine std",
        R.GRID_P_VALUE: "p centre",
        R.GRID_P_VALUE_ADJ: "p centre (BH adj.)",
        R.GRID_P_VALUE_NORM: "p norm",
    }
    if name in fixed:
        return fixed[name]
    for stem, label in (("norm_summed", "norm Σheads"), ("norm", "norm"), ("centre", "centre")):
        for s in R.MODEL_SUFFIXES:
            if name == f"{stem}_{s}":
                return f"{label} {names[s]}"
    return name


GRID_ORDER = ("cosine", "cosine_std", "norm_", "norm_summed_", "centre_", "p_value")


def grid_sort_key(name: str) -> tuple[int, str]:
    """Cosine first, then norms, centres and the p-values; unknown grids last."""
    best = len(GRID_ORDER)
    for i, prefix in enumerate(GRID_ORDER):
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)) or name.startswith(prefix):
            best = i
    return (best, name)


GRID_LEGEND = {
    R.GRID_COSINE: "cosine similarity of the two models' attention per layer and head (1 = identical); "
    "interval: bootstrap CI",
    R.GRID_COSINE_STD: "spread of the per-cell cosine similarity",
    R.GRID_P_VALUE: "paired test: does the centre of attention (mean attended rank) differ between the models?",
    R.GRID_P_VALUE_ADJ: "the centre-of-attention p-values, Benjamini-Hochberg adjusted over the grid",
    R.GRID_P_VALUE_NORM: "paired test: does the norm-based attention (Kobayashi et al.) differ?",
    "norm": "norm-based attention |alpha f(x)| per layer and head (Kobayashi et al. 2020); interval: CI",
    "norm_summed": "norm-based attention per layer, heads summed; interval: CI",
    "centre": "centre of attention: the mean rank position attended to, per layer and head",
}


def grid_legend(name: str) -> str:
    if name in GRID_LEGEND:
        text = GRID_LEGEND[name]
    else:
        stem = name.rsplit("_", 1)[0]
        text = GRID_LEGEND.get(stem, "")
    if name in P_GRIDS:
        text += f"  · * p < {R.SIGNIFICANCE}, ** < 0.01, *** < 0.001"
    return text


def read_analysis_grids(st, run_id: int, analysis_id: int | None, grid_name: str | None) -> dict:
    analyses, chosen = run_choices(R.collect_scope(st, run_id).analyses, analysis_id)
    names = sorted(st.grid_names(chosen), key=grid_sort_key) if chosen is not None else []
    grid_name = R.default_grid(names, grid_name)
    grid = R.read_grid(st, chosen, grid_name) if grid_name else None
    models = R.compared_models(R.full_run(st, chosen)) if chosen is not None else ("model a", "model b")
    return {
        "analyses": analyses,
        "chosen": chosen,
        "names": names,
        "grid_name": grid_name,
        "grid": grid,
        "models": models,
    }


class AttentionView(RunView, Vertical):
    focus_selector = "HeadGrid"
    uses_analysis = True

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.grid_name: str | None = None
        self.grid_names: list[str] = []

    def compose(self) -> ComposeResult:
        yield AnalysisPicker(id="attn-analysis")
        with Horizontal(id="attn-body"):
            yield OptionList(id="attn-grids")
            with Vertical(id="attn-right"):
                yield HeadGrid(id="attn-grid")
                yield Static("", id="attn-info")
                yield Static("", id="attn-summary", classes="hint")
        yield Static("No attention analysis (yet) under this run.", id="attn-empty", classes="empty")

    def on_mount(self) -> None:
        self.query_one("#attn-empty").display = False

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="attention", name="attention grids")
    def load(self) -> None:
        run_id, analysis_id, grid_name = self.run_id, self.analysis_id, self.grid_name
        data = self.client.call(lambda st: read_analysis_grids(st, run_id, analysis_id, grid_name))
        self.post_message(Loaded("attention", data))

    def on_loaded(self, message: Loaded) -> None:
        data = message.data
        has = bool(data["analyses"])
        self.query_one("#attn-empty").display = not has
        self.query_one("#attn-body").display = has
        self.query_one(AnalysisPicker).set_analyses(data["analyses"], data["chosen"])
        self.analysis_id = self.shown_analysis = data["chosen"]
        names = data["names"]
        options = self.query_one("#attn-grids", OptionList)
        if names != self.grid_names:
            self.grid_names = names
            with options.prevent(OptionList.OptionHighlighted):
                options.clear_options()
                options.add_options([Option(grid_title(n, data["models"]), id=n) for n in names])
        self.grid_name = data["grid_name"]
        if self.grid_name in names:
            with options.prevent(OptionList.OptionHighlighted):
                options.highlighted = names.index(self.grid_name)
        grid = self.query_one(HeadGrid)
        if data["grid"] is None:
            grid.clear(columns=True)
            self.query_one("#attn-info", Static).update("")
            self.query_one("#attn-summary", Static).update("")
            return
        g = data["grid"]
        p_grid = self.grid_name in P_GRIDS
        title = grid_title(self.grid_name, data["models"])
        grid.show(title, g.values, g.lower, g.upper, p_values=p_grid)
        values = np.asarray(g.values, dtype=float)
        finite = values[np.isfinite(values)]
        legend = grid_legend(self.grid_name)
        if finite.size and p_grid:
            n_sig = int((finite < R.SIGNIFICANCE).sum())
            summary = f"{n_sig} of {finite.size} heads with p < {R.SIGNIFICANCE}   min p {finite.min():.1e}"
        elif finite.size:
            summary = (
                f"{values.shape[0]} layers x {values.shape[1]} heads   mean {finite.mean():.4f}   "
                f"min {finite.min():.4f}   max {finite.max():.4f}"
            )
        else:
            summary = ""
        self.query_one("#attn-summary", Static).update(f"{summary}\n{legend}" if legend else summary)
        self._describe_cursor()

    def _describe_cursor(self) -> None:
        grid = self.query_one(HeadGrid)
        cell = grid.cell_at_cursor()
        info = self.query_one("#attn-info", Static)
        info.update(grid.describe(*cell) if cell else "")

    @on(Select.Changed, "#attn-analysis")
    def _analysis_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.analysis_id:
            self.analysis_id = event.value
            self.load()

    @on(OptionList.OptionHighlighted, "#attn-grids")
    def _grid_changed(self, event: OptionList.OptionHighlighted) -> None:
        name = event.option.id
        if name and name != self.grid_name:
            self.grid_name = name
            self.load()

    @on(DataTable.CellHighlighted, "#attn-grid")
    def _cell_changed(self, event: DataTable.CellHighlighted) -> None:
        self._describe_cursor()
