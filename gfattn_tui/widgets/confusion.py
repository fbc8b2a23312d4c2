"""Confusion tab: the test-split confusion matrices of every task x training mode, side by side per
task (thesis figure 3), wrapped onto more rows where the terminal is narrow."""

from __future__ import annotations

from rich.cells import cell_len
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Label, Static

from gfattn_tui.messages import Loaded
from gfattn_tui.results import ordered_confusion
from gfattn_tui.widgets.confusion_matrix import ConfusionMatrix, render_confusion
from gfattn_tui.widgets.store_view import RunView
from store import results as R


class ConfusionView(RunView, VerticalScroll):
    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.matrices: list[dict] = []
        self._width = 0

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="conf-empty", classes="empty")
        yield Static(
            "test split · rows: true class, columns: predicted · shading: fraction of the true class", classes="hint"
        )

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="confusion", name="confusion matrices")
    def load(self) -> None:
        run_id = self.run_id

        def read(st) -> list[dict]:
            out = []
            for ft in R.read_finetunes(st, R.collect_scope(st, run_id)):
                if ft.confusion is None:
                    continue
                labels, matrix = ordered_confusion(ft.confusion.labels, ft.confusion.matrix)
                out.append(
                    {
                        "run_id": ft.run_id,
                        "task": ft.task,
                        "mode": ft.mode,
                        "split": ft.confusion.split,
                        "labels": labels,
                        "matrix": matrix,
                        R.METRIC_ACCURACY: ft.accuracy,
                        R.METRIC_MACRO_F1: ft.macro_f1,
                        "not_learned": R.did_not_learn(R.model_gate(st, ft.run_id)),
                    }
                )
            return out

        self.post_message(Loaded("confusion", self.client.call(read)))

    def on_loaded(self, message: Loaded) -> None:
        self.matrices = message.data
        self._layout()

    def on_resize(self, event) -> None:
        if event.size.width != self._width and self.matrices:
            self._layout()

    def _layout(self) -> None:
        """One row of matrices per task, wrapped onto further rows where the terminal is too narrow,
        so every matrix is on screen (and the tab scrolls vertically, by keyboard too)."""
        self._width = self.size.width
        room = max(20, self.size.width - 4)
        with self.app.batch_update():
            for old in list(self.query(".conf-task")):
                old.remove()
            empty = self.query_one("#conf-empty", Static)
            empty.display = not self.matrices
            empty.update("No confusion matrices (yet): they are written when a fine-tuning run is evaluated.")
            tasks: dict[str, list[dict]] = {}
            for m in self.matrices:
                tasks.setdefault(m["task"], []).append(m)
            for task, items in tasks.items():
                self.mount(Label(f"task {task}", classes="section conf-task"))
                row: list[ConfusionMatrix] = []
                used = 0
                for m in items:
                    text = render_confusion(
                        _title(m), m["labels"], m["matrix"], m[R.METRIC_ACCURACY], m[R.METRIC_MACRO_F1]
                    )
                    width = max(cell_len(line) for line in text.plain.splitlines()) + 2
                    if row and used + width > room:
                        self.mount(Horizontal(*row, classes="conf-row conf-task"))
                        row, used = [], 0
                    row.append(
                        ConfusionMatrix(
                            _title(m),
                            m["labels"],
                            m["matrix"],
                            m[R.METRIC_ACCURACY],
                            m[R.METRIC_MACRO_F1],
                            classes="confusion",
                        )
                    )
                    used += width
                if row:
                    self.mount(Horizontal(*row, classes="conf-row conf-task"))


def _title(m: dict) -> str:
    split = "" if m.get("split") == "test" else f", {m.get('split')} split"
    mark = "  ✘ did not learn" if m.get("not_learned") else ""
    return f"{m['mode']}{mark}  (run {m['run_id']}{split})"
