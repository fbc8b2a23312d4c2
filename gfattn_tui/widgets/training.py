"""Training tab: loss and validation accuracy curves per task, one line per training mode, redrawn
whenever a running fine-tuning logs new metrics."""

from __future__ import annotations

import re

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Static
from textual_plotext import PlotextPlot

from gfattn_tui.messages import Loaded
from gfattn_tui.widgets.store_view import RunView
from store import results as R


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


class TrainingView(RunView, VerticalScroll):
    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.series: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="train-empty", classes="empty")

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="training", name="training curves")
    def load(self) -> None:
        run_id = self.run_id

        def read(st) -> list[dict]:
            out = []
            for run in R.collect_scope(st, run_id).finetunes:
                task, mode = R.task_and_mode(run)
                curves = R.training_curves(st, run)
                out.append({"task": task, "mode": mode, "status": run.get("status"), "curves": curves})
            return out

        self.post_message(Loaded("training", self.client.call(read)))

    def on_loaded(self, message: Loaded) -> None:
        self.series = message.data
        empty = self.query_one("#train-empty", Static)
        empty.display = not self.series
        empty.update("No fine-tuning runs (yet) under this run.")
        tasks: dict[str, list[dict]] = {}
        for s in self.series:
            tasks.setdefault(s["task"], []).append(s)
        wanted = {f"train-{safe_id(t)}" for t in tasks}
        for row in list(self.query(".plot-row")):
            if row.id not in wanted:
                row.remove()
        for task, items in tasks.items():
            row_id = f"train-{safe_id(task)}"
            rows = self.query(f"#{row_id}")
            if rows:
                loss, acc = rows.first().query(PlotextPlot)
                self._draw(loss, acc, task, items)
            else:
                loss, acc = PlotextPlot(classes="plot"), PlotextPlot(classes="plot")
                self.mount(Horizontal(loss, acc, id=row_id, classes="plot-row"))
                self.call_after_refresh(self._draw, loss, acc, task, items)

    def _draw(self, loss: PlotextPlot, acc: PlotextPlot, task: str, items: list[dict]) -> None:
        for widget, kind, title, xlabel in (
            (loss, R.METRIC_LOSS, f"{task}: loss", "step"),
            (acc, R.METRIC_ACCURACY, f"{task}: validation accuracy", "epoch"),
        ):
            plt = widget.plt
            plt.clear_figure()
            plt.title(title)
            plt.xlabel(xlabel)
            drawn = False
            for item in items:
                for curve in item["curves"].get(kind, []):
                    if curve.label.startswith("val") and kind == R.METRIC_LOSS:
                        continue
                    if kind == R.METRIC_ACCURACY and "F1" in curve.label:
                        continue
                    label = item["mode"] + ("" if item["status"] != "running" else " (running)")
                    draw = plt.scatter if len(curve.x) == 1 else plt.plot  # one epoch is a point, not a line
                    draw(curve.x, curve.y, label=label, marker="braille" if len(curve.x) > 1 else "dot")
                    drawn = True
            if kind == R.METRIC_ACCURACY and drawn:
                plt.ylim(0, 1)
            widget.refresh()
