"""Messages that workers post back to the widgets that started them, and the requests widgets post to
the app (so a widget never imports the screen it leads to)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class Loaded(Message, bubble=False):
    """A worker finished reading: `key` says what was read, `data` is the result."""

    def __init__(self, key: str, data: Any) -> None:
        super().__init__()
        self.key = key
        self.data = data


class StoreWritten(Message, bubble=False):
    """A write of the TUI (tag, note, delete) committed; `summary` is shown to the user."""

    def __init__(self, summary: str) -> None:
        super().__init__()
        self.summary = summary


class OpenRun(Message):
    """A view asks to open run `run_id` (at `tab`, else the first tab of its kind); it bubbles to the app,
    which pushes the run screen."""

    def __init__(self, run_id: int, tab: str | None = None) -> None:
        super().__init__()
        self.run_id = int(run_id)
        self.tab = tab
