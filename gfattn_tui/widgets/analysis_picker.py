"""Choosing which analysis run ("lowhigh: frozen vs unfrozen") a results tab shows.

The choice belongs to the run screen (`RunScreen.analysis_id`): every results tab shows the same one.
"""

from __future__ import annotations

from textual.widgets import Select


class AnalysisPicker(Select[int]):
    """A compact select of analysis runs; keeps the choice across refreshes. It offers a blank entry
    ("no analysis runs") only while there is nothing to choose."""

    def __init__(self, **kwargs) -> None:
        super().__init__([], allow_blank=True, compact=True, prompt="no analysis runs", **kwargs)
        self._ids: list[int] = []

    def set_analyses(self, analyses: list[dict], chosen: int | None) -> None:
        ids = [int(a["id"]) for a in analyses]
        if ids != self._ids:
            self._ids = ids
            with self.prevent(Select.Changed):
                self._allow_blank = not ids  # Select offers the blank prompt as an option otherwise
                self.set_options([(f"{a.get('name')}  (run {a['id']})", int(a["id"])) for a in analyses])
        if chosen is not None and chosen in ids and self.value != chosen:
            with self.prevent(Select.Changed):
                self.value = chosen

    @property
    def chosen(self) -> int | None:
        value = self.value
        return value if isinstance(value, int) else None
