"""Ranks tab: attention received per rank position for both models and their difference (thesis
figures 5 and 6), with the median cell length marked and the length distribution beside them."""

from __future__ import annotations

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Select, Static
from textual_plotext import PlotextPlot

from gfattn_tui.messages import Loaded
from gfattn_tui.results import histogram_axis, run_choices
from gfattn_tui.widgets.analysis_picker import AnalysisPicker
from gfattn_tui.widgets.store_view import RunView
from store import results as R


def read_ranks(st, run_id: int, analysis_id: int | None) -> dict:
    scope = R.collect_scope(st, run_id)
    analyses, chosen = run_choices(scope.analyses, analysis_id)
    out: dict = {
        "analyses": analyses,
        "chosen": chosen,
        "a": None,
        "b": None,
        "diff": None,
        "diff_name": "",
        "hist": None,
        "hist_meta": {},
        "median": None,
        "names": ("model a", "model b"),
    }
    if chosen is None:
        return out
    out["names"] = R.compared_models(st.get_run(chosen))
    ranks = R.read_rank_curves(st, chosen, hist_sources=[d["id"] for d in scope.data_runs])
    out["a"], out["b"], out["median"] = ranks.a, ranks.b, ranks.median_length
    for diff_name, diff in ((R.VEC_RANK_PCT_DIFF, ranks.pct_diff), (R.VEC_RANK_LOG_RATIO, ranks.log_ratio)):
        if diff is not None:
            out["diff"], out["diff_name"] = diff, diff_name
            break
    else:
        if out["a"] is not None and out["b"] is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                out["diff"] = 100 * (out["b"] - out["a"]) / out["a"]
            out["diff_name"] = "percent difference (computed)"
    if ranks.length_hist is not None:
        out["hist"], out["hist_meta"] = ranks.length_hist.counts, ranks.length_hist.meta
    if out["hist_meta"].get(R.META_MEDIAN) is not None:
        out["median"] = out["hist_meta"][R.META_MEDIAN]
    return out


MAX_BARS = 24


def rebin(x: list[float], counts: list[float], n: int) -> tuple[list[float], list[float]]:
    """At most `n` bars: neighbouring bins merged (centre = mean of the merged centres)."""
    if len(counts) <= n:
        return list(x), list(counts)
    step = -(-len(counts) // n)
    xs, cs = [], []
    for i in range(0, len(counts), step):
        xs.append(float(np.mean(x[i : i + step])))
        cs.append(float(sum(counts[i : i + step])))
    return xs, cs


class RanksView(RunView, Vertical):
    focus_selector = "#ranks-body"
    uses_analysis = True

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.data: dict | None = None

    def compose(self) -> ComposeResult:
        yield AnalysisPicker(id="ranks-analysis")
        with VerticalScroll(id="ranks-body"):
            yield PlotextPlot(id="ranks-received", classes="plot")
            with Horizontal(classes="plot-row"):
                yield PlotextPlot(id="ranks-diff", classes="plot")
                yield PlotextPlot(id="ranks-lengths", classes="plot")
                yield Static("", id="ranks-lengths-note", classes="empty")
        yield Static("No per-rank attention (yet) under this run.", id="ranks-empty", classes="empty")

    def on_mount(self) -> None:
        self.query_one("#ranks-empty").display = False
        self.query_one("#ranks-lengths-note").display = False

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="ranks", name="attention per rank")
    def load(self) -> None:
        run_id, analysis_id = self.run_id, self.analysis_id
        self.post_message(Loaded("ranks", self.client.call(lambda st: read_ranks(st, run_id, analysis_id))))

    def on_loaded(self, message: Loaded) -> None:
        data = self.data = message.data
        self.query_one(AnalysisPicker).set_analyses(data["analyses"], data["chosen"])
        self.analysis_id = self.shown_analysis = data["chosen"]
        has = data["a"] is not None or data["b"] is not None
        self.query_one("#ranks-empty").display = not has
        self.query_one("#ranks-body").display = has
        if has:
            self._draw(data)

    def _draw(self, data: dict) -> None:
        median = data["median"]
        n_ranks = max(len(v) for v in (data["a"], data["b"]) if v is not None)
        # a median beyond the ranks drawn would only stretch the axis; it is named in the label instead
        mark = median is not None and float(median) <= n_ranks
        name_a, name_b = data["names"]
        received = self.query_one("#ranks-received", PlotextPlot)
        plt = received.plt
        plt.clear_figure()
        plt.title("attention received per rank position (summed over layers and heads)")
        for values, label in ((data["a"], name_a), (data["b"], name_b)):
            if values is not None and len(values):
                plt.plot(list(range(1, len(values) + 1)), [float(v) for v in values], label=label, marker="braille")
        if mark:
            plt.vline(float(median), "red")
        if median is not None:
            plt.xlabel(f"rank   ({'red: ' if mark else ''}median length {float(median):.0f})")
        else:
            plt.xlabel("rank")
        received.refresh()

        diff = self.query_one("#ranks-diff", PlotextPlot)
        plt = diff.plt
        plt.clear_figure()
        plt.title(f"{name_b} vs {name_a}: {data['diff_name'] or 'difference'}")
        if data["diff"] is not None and len(data["diff"]):
            d = np.asarray(data["diff"], dtype=float)
            keep = np.isfinite(d)
            x = np.arange(1, len(d) + 1)[keep]
            plt.plot(x.tolist(), d[keep].tolist(), marker="braille")
            plt.hline(0.0)
            if mark:
                plt.vline(float(median), "red")
        plt.xlabel("rank")
        diff.refresh()

        lengths = self.query_one("#ranks-lengths", PlotextPlot)
        plt = lengths.plt
        plt.clear_figure()
        plt.title("cell lengths (genes per cell)")
        hist = data["hist"]
        note = self.query_one("#ranks-lengths-note", Static)
        note.display = False
        lengths.display = True
        if hist is not None and len(hist):
            x = histogram_axis(data["hist_meta"], len(hist))
            counts = [float(v) for v in hist]
            filled = [i for i, c in enumerate(counts) if c > 0]
            if len(filled) <= 1:
                # every cell has the same length (truncated to the model's input size): no distribution
                # (a plot of one bar is an empty box: say it in words instead)
                where = x[filled[0]] if filled else 0
                note.update(f"cell lengths: all {sum(counts):.0f} cells have {where:.0f} genes (the input size)")
                note.display, lengths.display = True, False
            else:
                x, counts = rebin(x[filled[0] : filled[-1] + 1], counts[filled[0] : filled[-1] + 1], MAX_BARS)
                plt.bar(x, counts, width=0.8)
                if median is not None:
                    plt.vline(float(median), "red")
        lengths.refresh()

    @on(Select.Changed, "#ranks-analysis")
    def _analysis_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.analysis_id:
            self.analysis_id = event.value
            self.load()
