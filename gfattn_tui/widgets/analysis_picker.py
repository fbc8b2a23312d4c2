"""Choosing which analysis run ("lowhigh: frozen vs unfrozen") a results tab shows."""

from __future__ import annotations

from textual.widgets import Select


class AnalysisPicker(Select[int]):
    """A compact select of analysis runs; keeps the choice across refreshes."""

    def __init__(self, **kwargs) -> None:
        super().__init__([], allow_blank=True, compact=True, prompt="no analysis runs", **kwargs)
        self._ids: list[int] = []

    def set_analyses(self, analyses: list[dict], chosen: int | None) -> None:
        ids = [int(a["id"]) for a in analyses]
        if ids != self._ids:
            self._ids = ids
            with self.prevent(Select.Changed):
                self.set_options([(f"{a.get('name')}  (run {a['id']})", int(a["id"])) for a in analyses])
        if chosen is not None and chosen in ids and self.value != chosen:
            with self.prevent(Select.Changed):
                self.value = chosen

    @property
    def chosen(self) -> int | None:
        value = self.value
        return value if isinstance(value, int) else None
