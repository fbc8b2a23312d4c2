"""`?`: the keys of the screen it was opened on, in a dialog (as lazygit and k9s do): every binding
active there, the focused widget's first, then the keys of the tab in front (its widgets' own keys,
which act once the tab has the focus) and the screen's keys that a focused widget shadows (enter),
each with its description and binding id (for `[keymap]`)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Label, Static

SCREEN_TITLES = {"RunsScreen": "runs list", "NewRunScreen": "New run form", "CompareScreen": "compare"}
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
    shown_keys = {row[0] for row in rows}
    for widget in [screen, *front_widgets(screen)]:
        for binding in own_bindings(widget):
            marker = (binding.action, binding.description)
            display = screen.app.get_key_display(binding)
            if marker in seen or binding.action in _SKIP or (widget is screen and display in shown_keys):
                continue
            seen.add(marker)
            shown_keys.add(display)
            rows.append((display, binding.description, binding.id or ""))
    return rows


def own_bindings(widget) -> list[Binding]:
    """The described bindings gfattn's own classes give `widget` (not Textual's internals)."""
    out = []
    for cls in type(widget).__mro__:
        if not cls.__module__.startswith("gfattn_tui"):
            continue
        for binding in cls.__dict__.get("BINDINGS", ()):
            if isinstance(binding, Binding) and binding.description:
                out.append(binding)
    return out


def front_widgets(screen: Screen) -> list:
    """The widgets of the tab in front (every TabbedContent's active pane), its descendants included."""
    from textual.widgets import TabbedContent

    out: list = []
    for tabs in screen.query(TabbedContent):
        pane = tabs.active_pane
        if pane is not None:
            out += [pane, *pane.query("*")]
    return out


def front_tab_title(screen: Screen) -> str:
    from textual.widgets import TabbedContent

    for tabs in screen.query(TabbedContent):
        pane = tabs.active_pane
        if pane is not None:
            try:
                return str(tabs.get_tab(pane.id or "").label.plain)
            except Exception:
                return ""
    return ""


class KeysScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close", id="keys.close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, screen: Screen) -> None:
        super().__init__()
        self.keys = screen_keys(screen)
        tab = front_tab_title(screen)
        where = getattr(screen, "keys_title", "") or SCREEN_TITLES.get(type(screen).__name__, "this screen")
        self.title_text = f"Keys: {where}" + (f" · {tab} tab" if tab else "")

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
