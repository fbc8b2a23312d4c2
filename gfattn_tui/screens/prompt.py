"""One line of text in a modal dialog (tags, notes, the tag filter)."""

from __future__ import annotations

from textual._time import get_time as monotonic
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static


class PromptInput(Input):
    """An Input that ignores keys pressed before its dialog opened (typed ahead on the screen below)."""

    async def _on_key(self, event) -> None:
        opened = getattr(self.screen, "opened_at", None)
        if opened is not None and event.time < opened:
            event.stop()
            event.prevent_default()
            return
        await super()._on_key(event)


class PromptScreen(ModalScreen[str | None]):
    """Enter submits the text, Escape cancels (dismisses with None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="prompt.cancel")]

    def __init__(self, title: str, *, value: str = "", placeholder: str = "", hint: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.placeholder = placeholder
        self.hint = hint
        self.opened_at = monotonic()  # keys older than the dialog are not its input

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog"):
            yield Label(self.title_text, id="dialog-question")
            yield PromptInput(value=self.value, placeholder=self.placeholder, id="prompt-input")
            if self.hint:
                yield Static(self.hint, classes="hint", markup=False)

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
