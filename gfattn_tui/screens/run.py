"""One run in tabs: Overview, Training, Confusion, Attention, Ranks, Genes, DE vs attention, Data.

A tab's widgets are built and its data loaded when it is first shown, so opening a run costs one tab.
When the store changes, the visible tab reloads and the others are marked stale, so a live run costs one
tab's queries per change, not eight.
"""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from gfattn_tui.format import STATUS_MARKS, fmt_duration, fmt_time, run_duration
from gfattn_tui.messages import Loaded
from gfattn_tui.screens.run_actions import RunActions
from gfattn_tui.widgets.attention import AttentionView
from gfattn_tui.widgets.confusion import ConfusionView
from gfattn_tui.widgets.data_view import DataView
from gfattn_tui.widgets.de import DEView
from gfattn_tui.widgets.genes import GenesView
from gfattn_tui.widgets.overview import OverviewView
from gfattn_tui.widgets.ranks import RanksView
from gfattn_tui.widgets.training import TrainingView

TABS: list[tuple[str, str, type]] = [
    ("overview", "Overview", OverviewView),
    ("training", "Training", TrainingView),
    ("confusion", "Confusion", ConfusionView),
    ("attention", "Attention", AttentionView),
    ("ranks", "Ranks", RanksView),
    ("genes", "Genes", GenesView),
    ("de", "DE vs attention", DEView),
    ("data", "Data", DataView),
]


class RunScreen(RunActions, Screen):
    BINDINGS = [
        Binding("escape", "back", "Back", id="run.back"),
        *[
            Binding(str(i + 1), f"show_tab('{key}')", title, show=False, id=f"run.tab_{key}")
            for i, (key, title, _) in enumerate(TABS)
        ],
        Binding("t", "tag", "Tag", id="run.tag"),
        Binding("n", "note", "Note", id="run.note"),
        Binding("k", "stop", "Stop", show=False, id="run.stop"),
        Binding("d", "delete", "Delete", show=False, id="run.delete"),
        Binding("r", "reload", "Reload", show=False, id="run.reload"),
    ]

    def __init__(self, run_id: int, *, tab: str = "overview") -> None:
        super().__init__()
        self.run_id = int(run_id)
        self.initial_tab = tab
        self.run: dict | None = None
        self._building: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="run-title")
        with TabbedContent(initial=self.initial_tab, id="run-tabs"):
            for key, title, view in TABS:
                with TabPane(title, id=key):
                    if key == self.initial_tab:
                        yield view(self.run_id, id=f"view-{key}")
        yield Footer()

    async def on_mount(self) -> None:
        self.app.store_changed.subscribe(self, lambda _v: self._store_changed())
        self.load_title()
        await self.show_view(self.initial_tab)

    def views(self) -> list:
        return [view for key, _, _ in TABS for view in self.query(f"#view-{key}")]

    def active_key(self) -> str:
        return self.query_one(TabbedContent).active or TABS[0][0]

    async def show_view(self, key: str, *, focus: bool = False) -> None:
        """Build the tab's view on first use, load it if stale, optionally focus it."""
        if key in self._building:
            return  # being mounted by the other path (key binding vs. tab activation)
        found = self.query(f"#view-{key}")
        if found:
            view = found.first()
        else:
            self._building.add(key)
            try:
                view_cls = next(cls for k, _, cls in TABS if k == key)
                view = view_cls(self.run_id, id=f"view-{key}")
                await self.query_one(f"#{key}", TabPane).mount(view)
            finally:
                self._building.discard(key)
        view.refresh_if_stale()
        if focus:
            self.call_after_refresh(view.focus_main)

    def _store_changed(self) -> None:
        for view in self.views():
            view.stale = True
        self.load_title()
        self.run_worker(self.show_view(self.active_key()), group="show-view")

    @on(TabbedContent.TabActivated)
    async def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.tabbed_content.id == "run-tabs":
            await self.show_view(self.active_key())

    # title ---------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="run-title", name="run title")
    def load_title(self) -> None:
        run_id = self.run_id
        self.post_message(Loaded("run", self.client.call(lambda st: st.get_run(run_id))))

    def on_loaded(self, message: Loaded) -> None:
        if message.key != "run":
            return
        run = self.run = message.data
        status = str(run.get("status"))
        mark, style = STATUS_MARKS.get(status, ("·", ""))
        text = Text()
        text.append(f" {mark} {status} ", style=style)
        text.append(f" #{run['id']} ", style="bold")
        text.append(str(run.get("name") or ""), style="bold")
        text.append(f"  {run.get('kind', '')}", style="dim")
        text.append(f"  started {fmt_time(run.get('created'), utc=self.app.config.utc)}")
        text.append(f"  took {fmt_duration(run_duration(run, self.app.now()))}")
        if run.get("tags"):
            text.append("  tags " + ", ".join(run["tags"]), style="italic")
        self.query_one("#run-title", Static).update(text)
        self.sub_title = f"run {run['id']} {run.get('name', '')}"

    # actions -------------------------------------------------------------------------------------
    def action_back(self) -> None:
        self.app.pop_screen()

    async def action_show_tab(self, key: str) -> None:
        self.query_one(TabbedContent).active = key
        await self.show_view(key, focus=True)

    def action_tag(self) -> None:
        self.ask_tag([self.run_id])

    def action_note(self) -> None:
        self.ask_note(self.run_id, (self.run or {}).get("note") or "")

    def action_stop(self) -> None:
        if self.run is not None:
            self.ask_stop(self.run)

    def action_delete(self) -> None:
        if self.run is not None:
            self.ask_delete([self.run], after=self.app.pop_screen)

    def action_reload(self) -> None:
        self._store_changed()
