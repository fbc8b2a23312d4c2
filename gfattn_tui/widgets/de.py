"""DE vs attention tab: how the genes the model attends to compare with differentially expressed genes
(Wilcoxon, scanpy `rank_genes_groups`): overlap at k with its hypergeometric p-value, Spearman
correlation, reference-set enrichment (docs/architecture.md, "Analysis 6: DE vs attention")."""

from __future__ import annotations

from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Select, Static
from textual_plotext import PlotextPlot

from gfattn_tui.json_render import is_records, render_json
from gfattn_tui.messages import Loaded
from gfattn_tui.results import run_choices
from gfattn_tui.widgets.analysis_picker import AnalysisPicker
from gfattn_tui.widgets.store_view import RunView
from store import results as R

PRIMARY = R.JSON_DE_NAMES


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


def read_de(st, run_id: int, analysis_id: int | None) -> dict:
    analyses, chosen = run_choices(R.collect_scope(st, run_id).analyses, analysis_id)
    results: dict[str, Any] = {}
    if chosen is not None:
        docs = R.read_json(st, chosen)
        for name in sorted(docs, key=lambda n: (n not in PRIMARY, n)):
            results[name] = docs[name]
    return {"analyses": analyses, "chosen": chosen, "results": results}


class DEView(RunView, Vertical):
    focus_selector = "#de-body"

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True

    def compose(self) -> ComposeResult:
        yield AnalysisPicker(id="de-analysis")
        with VerticalScroll(id="de-body"):
            yield PlotextPlot(id="de-plot", classes="plot")
            yield Static("", id="de-results")
        yield Static("No DE comparison (yet) under this run.", id="de-empty", classes="empty")

    def on_mount(self) -> None:
        self.query_one("#de-empty").display = False

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="de", name="DE vs attention")
    def load(self) -> None:
        run_id, analysis_id = self.run_id, self.analysis_id
        self.post_message(Loaded("de", self.client.call(lambda st: read_de(st, run_id, analysis_id))))

    def on_loaded(self, message: Loaded) -> None:
        data = message.data
        self.query_one(AnalysisPicker).set_analyses(data["analyses"], data["chosen"])
        self.analysis_id = self.shown_analysis = data["chosen"]
        results = data["results"]
        self.query_one("#de-empty").display = not results
        self.query_one("#de-body").display = bool(results)
        if not results:
            return
        self.query_one("#de-results", Static).update(render_json({name: value for name, value in results.items()}))
        records = None
        for name in PRIMARY:
            if name in results:
                records = find_overlap_records(results[name])
                if records:
                    break
        plot = self.query_one("#de-plot", PlotextPlot)
        plot.display = bool(records)
        if records:
            ks = [float(r["k"]) for r in records]
            plt = plot.plt
            plt.clear_figure()
            plt.title("top-k attended genes that are also top-k DE genes")
            overlap_key = next(k for k in records[0] if "overlap" in k)
            plt.plot(ks, [float(r.get(overlap_key) or 0) for r in records], label="observed", marker="braille")
            if all("expected" in r for r in records):
                plt.plot(ks, [float(r["expected"] or 0) for r in records], label="expected by chance", marker="braille")
            plt.xlabel("k")
            plot.refresh()

    @on(Select.Changed, "#de-analysis")
    def _analysis_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.analysis_id:
            self.analysis_id = event.value
            self.load()
