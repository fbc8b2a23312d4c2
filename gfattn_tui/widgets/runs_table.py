"""The table of runs: one row per run, the cursor kept on the same run across refreshes.

Columns fit the terminal: status, id, name and the headline metric are always there; the name widens
with the width left over, and preset, tags, started, data and model appear as the terminal grows
(`layout_columns`). Child runs, when shown, follow their parent as a tree.
"""

from __future__ import annotations

from typing import Iterable

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from gfattn_tui.format import STATUS_MARKS, fmt_duration, fmt_time, run_duration, short_path
from store.results import KIND_PIPELINE

# key, label, width; `None` width: the name, which takes what is left
COLUMNS: list[tuple[str, str, int | None]] = [
    ("status", "status", 13),
    ("id", "id", 4),
    ("name", "name", None),
    ("preset", "preset", 9),
    ("started", "started", 16),
    ("duration", "took", 6),
    ("headline", "best test macro-F1", 26),
    ("data", "data", 14),
    ("model", "model", 10),
    ("tags", "tags", 12),
]
ALWAYS = ("status", "id", "name", "duration", "headline")
# optional columns, in the order they appear as the terminal widens (the last ones drop first)
OPTIONAL = ("preset", "tags", "started", "model", "data")
NAME_MIN = 16
NAME_MAX = 48
NAME_ROOM = 26  # an optional column appears only while the name keeps this much room
CELL_PAD = 2  # a DataTable cell's padding, both sides


def layout_columns(width: int) -> list[tuple[str, str, int]]:
    """The columns shown at a table `width`, with the name's width filling what is left."""
    widths = {key: w for key, _, w in COLUMNS if w is not None}
    shown = set(ALWAYS)
    used = sum(widths[k] + CELL_PAD for k in ALWAYS if k != "name") + CELL_PAD + 2  # + scrollbar
    for key in OPTIONAL:
        if width - used - (widths[key] + CELL_PAD) >= NAME_ROOM:
            shown.add(key)
            used += widths[key] + CELL_PAD
    name_w = max(NAME_MIN, min(NAME_MAX, width - used))
    return [(key, label, name_w if w is None else w) for key, label, w in COLUMNS if key in shown]


def status_text(status: str) -> Text:
    mark, style = STATUS_MARKS.get(status, ("·", ""))
    return Text(f"{mark} {status}", style=style)


def id_text(run_id: int, marked: bool) -> Text:
    text = Text(justify="right")
    if marked:
        text.append("▶", style="bold reverse")
    text.append(str(run_id))
    return text


def fit_headline(text: str, width: int) -> str:
    """A headline of several tasks that does not fit: its first task and how many more ("+1 task")."""
    if len(text) <= width or " · " not in text:
        return text
    parts = text.split(" · ")
    for more in (f" +{len(parts) - 1} task{'s' if len(parts) > 2 else ''}", f" +{len(parts) - 1}"):
        if len(parts[0] + more) <= width:
            return parts[0] + more
    return parts[0]


def detail_cells(run: dict, info: dict | None, width: int = 1000) -> dict[str, object]:
    """Preset, data, model and headline cells; blank until the details worker has read them."""
    if info is None:
        return {"preset": "…", "data": "", "model": "", "headline": ""}
    pipeline = run.get("kind") == KIND_PIPELINE
    preset = info.get("preset") or ("" if pipeline else str(run.get("kind") or ""))
    data = short_path(info.get("data_path"), 14) if info.get("data_path") else ("synthetic" if pipeline else "")
    model = short_path(info.get("model_path"), 14) if info.get("model_path") else ("embedded" if pipeline else "")
    head: object = fit_headline(str(info.get("headline", "")), width)
    if run.get("status") == "running" and info.get("progress"):
        head = Text(info["progress"], style="yellow")
    return {"preset": preset, "data": data, "model": model, "headline": head}


class RunsTable(DataTable):
    """Runs with status, provenance, timing and headline test metrics."""

    BINDINGS = [
        Binding("home", "first_run", "First run", show=False, id="runs.first"),
        Binding("end", "last_run", "Last run", show=False, id="runs.last"),
    ]

    def action_first_run(self) -> None:
        if self.row_count:
            self.move_cursor(row=0)

    def action_last_run(self) -> None:
        if self.row_count:
            self.move_cursor(row=self.row_count - 1)

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.run_ids: list[int] = []
        self.layout_keys: list[str] = []
        self._last: tuple | None = None
        self._width = 0

    def on_mount(self) -> None:
        self._relayout(self.size.width or 100)

    def on_resize(self, event) -> None:
        if event.size.width != self._width:
            self._relayout(event.size.width)
            if self._last is not None:
                runs, kwargs = self._last
                self.show(runs, **kwargs)

    def _relayout(self, width: int) -> None:
        self._width = width
        layout = layout_columns(width)
        self.layout_keys = [key for key, _, _ in layout]
        self.clear(columns=True)
        for key, label, w in layout:
            self.add_column(label, key=key, width=w)

    def show(
        self,
        runs: Iterable[dict],
        *,
        details: dict[int, dict],
        now: float,
        utc: bool,
        marked: set[int],
        indents: dict[int, str] | None = None,
    ) -> None:
        runs = list(runs)
        self._last = (runs, {"details": details, "now": now, "utc": utc, "marked": marked, "indents": indents})
        keep = self.selected_run_id()
        self.clear(columns=False)
        self.run_ids = []
        indents = indents or {}
        for run in runs:
            rid = int(run["id"])
            self.run_ids.append(rid)
            cells = {
                "status": status_text(str(run.get("status", ""))),
                "id": id_text(rid, rid in marked),
                "name": indents.get(rid, "") + str(run.get("name") or ""),
                "started": fmt_time(run.get("created"), utc=utc),
                "duration": Text(fmt_duration(run_duration(run, now)), justify="right"),
                "tags": ", ".join(run.get("tags") or ()),
                **detail_cells(run, details.get(rid), self.headline_width()),
            }
            self.add_row(*[cells[key] for key in self.layout_keys], key=str(rid))
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
        for column, value in detail_cells(run, info, self.headline_width()).items():
            if column in self.layout_keys:
                self.update_cell(key, column, value)

    def headline_width(self) -> int:
        return next((w for key, _, w in layout_columns(self._width or 100) if key == "headline"), 1000)

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
