"""One run in tabs: Overview, Key genes, Training, Confusion, Attention, Ranks, Genes, DE, Data.

The tabs depend on the run's kind (`KIND_TABS`): a pipeline has all of them, a finetune its metrics,
curves and confusion matrix, an analysis its attention results, a DE run opens on its gene table. The
number keys keep their tab across kinds (4 is always Confusion). The analysis run the results tabs show
is chosen once for the screen (`RunScreen.analysis_id`), so every tab shows the same one.

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
from gfattn_tui.screens.run_actions import RESUMABLE, RunActions
from gfattn_tui.widgets.attention import AttentionView
from gfattn_tui.widgets.confusion import ConfusionView
from gfattn_tui.widgets.data_view import DataView
from gfattn_tui.widgets.de import DEView
from gfattn_tui.widgets.genes import GenesView
from gfattn_tui.widgets.keygenes import KeyGenesView
from gfattn_tui.widgets.overview import OverviewView
from gfattn_tui.widgets.ranks import RanksView
from gfattn_tui.widgets.training import TrainingView
from store import results as R

TABS: list[tuple[str, str, type]] = [
    ("overview", "Overview", OverviewView),
    ("keygenes", "Key genes", KeyGenesView),
    ("training", "Training", TrainingView),
    ("confusion", "Confusion", ConfusionView),
    ("attention", "Attention", AttentionView),
    ("ranks", "Ranks", RanksView),
    ("genes", "Genes", GenesView),
    ("de", "DE", DEView),
    ("data", "Data", DataView),
]
ALL_TABS = tuple(key for key, _, _ in TABS)
# the tabs of each run kind, the first one opening; kinds not listed get every tab
KIND_TABS: dict[str, tuple[str, ...]] = {
    R.KIND_FINETUNE: ("overview", "training", "confusion"),
    R.KIND_ANALYSIS: ("overview", "keygenes", "attention", "ranks", "genes", "de"),
    R.KIND_MODEL: ("overview", "keygenes", "genes"),
    R.KIND_DE: ("de", "overview"),
    R.KIND_DATA: ("overview", "data"),
    R.KIND_PRETRAIN: ("overview",),
}


def tabs_for(kind: str | None) -> tuple[str, ...]:
    return KIND_TABS.get(str(kind), ALL_TABS)


class RunScreen(RunActions, Screen):
    BINDINGS = [
        # shown in the footer in this order (the most important first, for 80 columns)
        Binding("escape", "back", "Back", id="run.back"),
        Binding("question_mark", "app.keys", "Keys", id="app.keys"),
        Binding("k", "stop", "Stop", id="run.stop"),
        Binding("R", "resume", "Resume", id="run.resume"),
        Binding("e", "export", "Export", id="run.export"),
        Binding("p", "plot", "Figures", show=False, id="run.plot"),
        Binding("q", "app.quit", "Quit", id="run.quit"),
        *[
            Binding(str(i + 1), f"show_tab('{key}')", title, show=False, id=f"run.tab_{key}")
            for i, (key, title, _) in enumerate(TABS)
        ],
        Binding("t", "tag", "Tag", show=False, id="run.tag"),
        Binding("n", "note", "Note", show=False, id="run.note"),
        Binding("d", "delete", "Delete", show=False, id="run.delete"),
        Binding("r", "reload", "Reload", show=False, id="run.reload"),
    ]

    def __init__(self, run_id: int, *, tab: str | None = None, kind: str | None = None) -> None:
        super().__init__()
        self.run_id = int(run_id)
        self.initial_tab = tab
        self.kind = kind
        self.run: dict | None = None
        self.analysis_id: int | None = None  # the analysis run every results tab shows
        self.tab_keys: tuple[str, ...] = ALL_TABS
        self._ready = False
        self._building: set[str] = set()

    @property
    def keys_title(self) -> str:
        return f"run {self.run_id}"

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="run-title")
        with TabbedContent(id="run-tabs"):
            for key, title, _view in TABS:
                yield TabPane(title, id=key)
        yield Footer()

    async def on_mount(self) -> None:
        self.app.store_changed.subscribe(self, lambda _v: self._store_changed())
        if self.kind is None:
            run_id = self.run_id
            try:
                self.kind = (await self.client.acall(lambda st: st.get_run(run_id))).get("kind")
            except Exception as exc:  # a deleted run: the title worker reports it
                self.app.report_error(exc, where=f"run {run_id}")
        self.tab_keys = tabs_for(self.kind)
        tabs = self.query_one(TabbedContent)
        for key in ALL_TABS:
            if key not in self.tab_keys:
                tabs.hide_tab(key)
        first = self.initial_tab if self.initial_tab in self.tab_keys else self.tab_keys[0]
        tabs.active = first
        self._ready = True
        self.load_title()
        await self.show_view(first, focus=True)  # the tab takes the keys at once (PageDown scrolls)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "show_tab" and parameters and parameters[0] not in self.tab_keys:
            return False
        # stop and resume only where they apply, so the footer keeps room for the tab's own keys
        status = (self.run or {}).get("status")
        if action == "stop" and status != "running":
            return False
        if action == "resume" and (status not in RESUMABLE or (self.run or {}).get("kind") != R.KIND_PIPELINE):
            return False
        return super().check_action(action, parameters)

    def views(self) -> list:
        return [view for key, _, _ in TABS for view in self.query(f"#view-{key}")]

    def active_key(self) -> str:
        return self.query_one(TabbedContent).active or TABS[0][0]

    async def show_view(self, key: str, *, focus: bool = False) -> None:
        """Build the tab's view on first use, load it if stale, optionally focus it."""
        if key in self._building or not self._ready or key not in self.tab_keys:
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
        if getattr(view, "uses_analysis", False) and view.shown_analysis != self.analysis_id:
            view.stale = True  # another tab chose another analysis run
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
        self.refresh_bindings()

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

    def action_resume(self) -> None:
        if self.run is not None:
            self.ask_resume(self.run)

    def action_export(self) -> None:
        if self.run is not None:
            self.ask_export(self.run)

    def action_plot(self) -> None:
        if self.run is not None:
            self.ask_plot(self.run)

    def action_delete(self) -> None:
        if self.run is not None:
            self.ask_delete([self.run], after=self.app.pop_screen)

    def action_reload(self) -> None:
        self._store_changed()
