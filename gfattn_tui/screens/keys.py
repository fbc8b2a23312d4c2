"""`?`: the keys of the screen it was opened on, in a dialog (as lazygit and k9s do): every binding
active there, the focused widget's first, with its description and binding id (for `[keymap]`)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Label, Static

# Textual's own widget internals that need no explaining here
_SKIP = {"command_palette", "app.command_palette", "app.keys"}


def screen_keys(screen: Screen) -> list[tuple[str, str, str]]:
    """(key, description, binding id) of every described binding active on `screen`."""
    rows: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for active in screen.active_bindings.values():
        binding = active.binding
        if binding.action in _SKIP or not binding.description or binding.system:
            continue
        if not binding.id and not binding.show:
            continue
        marker = (binding.action, binding.description)
        if marker in seen:
            continue
        seen.add(marker)
        rows.append((screen.app.get_key_display(binding), binding.description, binding.id or ""))
    return rows


class KeysScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close", id="keys.close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, screen: Screen) -> None:
        super().__init__()
        self.keys = screen_keys(screen)
        self.title_text = f"Keys: {getattr(screen, 'keys_title', type(screen).__name__)}"

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        table.add_column(style="dim")
        for key, description, binding_id in self.keys:
            table.add_row(key, description, binding_id)
        with VerticalScroll(id="keys-dialog", classes="dialog"):
            yield Label(self.title_text, id="dialog-question")
            yield Static(table, id="keys-table")
            yield Static(
                Text("ctrl+p: every key as a command · remap by id in [keymap] of the TUI config · esc closes"),
                classes="hint",
            )

    def action_dismiss(self) -> None:
        self.dismiss(None)
