"""The table of runs: one row per run, the cursor kept on the same run across refreshes."""

from __future__ import annotations

from typing import Iterable

from rich.text import Text
from textual.widgets import DataTable

from gfattn_tui.format import STATUS_MARKS, fmt_duration, fmt_time, run_duration, short_path
from store.results import KIND_PIPELINE

# Ordered by what a glance needs; at 80 columns everything up to the test metrics is visible.
COLUMNS: list[tuple[str, str, int | None]] = [
    ("status", "status", 11),
    ("id", "id", 4),
    ("name", "name", 18),
    ("preset", "preset", 9),
    ("started", "started", 16),
    ("duration", "took", 6),
    ("headline", "test metrics", 18),
    ("data", "data", 14),
    ("model", "model", 10),
    ("tags", "tags", 12),
]


def status_text(status: str) -> Text:
    mark, style = STATUS_MARKS.get(status, ("·", ""))
    return Text(f"{mark} {status}", style=style)


def id_text(run_id: int, marked: bool) -> Text:
    text = Text(justify="right")
    if marked:
        text.append("▶", style="bold reverse")
    text.append(str(run_id))
    return text


def detail_cells(run: dict, info: dict | None) -> tuple[str, str, str, str]:
    """Preset, data, model and headline cells; blank until the details worker has read them."""
    if info is None:
        return ("…", "", "", "")
    pipeline = run.get("kind") == KIND_PIPELINE
    preset = info.get("preset") or ("" if pipeline else str(run.get("kind") or ""))
    data = short_path(info.get("data_path"), 14) if info.get("data_path") else ("synthetic" if pipeline else "")
    model = short_path(info.get("model_path"), 14) if info.get("model_path") else ("embedded" if pipeline else "")
    return preset, data, model, info.get("headline", "")


class RunsTable(DataTable):
    """Runs with status, provenance, timing and headline test metrics."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.run_ids: list[int] = []

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def show(
        self,
        runs: Iterable[dict],
        *,
        details: dict[int, dict],
        now: float,
        utc: bool,
        marked: set[int],
    ) -> None:
        keep = self.selected_run_id()
        self.clear(columns=False)
        self.run_ids = []
        for run in runs:
            rid = int(run["id"])
            self.run_ids.append(rid)
            indent = "└ " if run.get("parent_id") is not None else ""
            preset, data, model, head = detail_cells(run, details.get(rid))
            self.add_row(
                status_text(str(run.get("status", ""))),
                id_text(rid, rid in marked),
                indent + str(run.get("name") or ""),
                preset,
                fmt_time(run.get("created"), utc=utc),
                Text(fmt_duration(run_duration(run, now)), justify="right"),
                head,
                data,
                model,
                ", ".join(run.get("tags") or ()),
                key=str(rid),
            )
        if keep is not None:
            self.select_run(keep)

    def update_durations(self, runs: Iterable[dict], now: float) -> None:
        for run in runs:
            if run.get("status") == "running" and str(run["id"]) in self.rows:
                took = Text(fmt_duration(run_duration(run, now)), justify="right")
                self.update_cell(str(run["id"]), "duration", took)

    def update_details(self, run: dict, info: dict | None) -> None:
        key = str(run["id"])
        if key not in self.rows:
            return
        for column, value in zip(("preset", "data", "model", "headline"), detail_cells(run, info)):
            self.update_cell(key, column, value)

    def selected_run_id(self) -> int | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return int(key.value) if key.value is not None else None

    def select_run(self, run_id: int) -> bool:
        if str(run_id) not in self.rows:
            return False
        self.move_cursor(row=self.get_row_index(str(run_id)))
        return True
