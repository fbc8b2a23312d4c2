"""Messages that workers post back to the widgets that started them."""

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
