"""The runs list: every run of the store with live status, filters, search and run actions.

The list is one `list_runs` query (instant for hundreds of runs). Per-run details that need more than
that row -- preset, data and model paths from the run's config, headline test metrics -- are filled in
afterwards by a second worker, in chunks, and cached for runs that can no longer change. A crashed run
turns `lost` through the store's own change detector (`data_version` records lost runs), so the list
needs no clock-driven re-reads; only the running durations tick.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Static

from gfattn_tui.format import STATUSES, as_epoch, run_duration
from gfattn_tui.messages import Loaded, OpenRun
from gfattn_tui.results import headline_and_value, pipeline_progress_text
from gfattn_tui.screens.run_actions import RunActions
from gfattn_tui.widgets.runs_table import RunsTable
from store import results as R

SORTS = ("started", "name", "status", "duration", "metric", "id")
DESCENDING_FIRST = ("started", "duration", "metric")
DETAILS_CHUNK = 25


class RunsScreen(RunActions, Screen):
    BINDINGS = [
        # shown in the footer in this order (the most important first, for 80 columns)
        Binding("enter", "open", "Open", id="runs.open"),
        Binding("question_mark", "app.keys", "Keys", id="app.keys"),
        Binding("N", "new_run", "New", id="runs.new"),
        Binding("space", "mark", "Mark", id="runs.mark"),
        Binding("c", "compare", "Compare", id="runs.compare"),
        Binding("k", "stop", "Stop", id="runs.stop"),
        Binding("s", "cycle_sort", "Sort", id="runs.sort"),
        Binding("slash", "search", "Search", show=False, id="runs.search"),  # the search box says it
        Binding("q", "app.quit", "Quit", id="app.quit"),
        Binding("R", "resume", "Resume", show=False, id="runs.resume"),
        Binding("e", "export", "Export", show=False, id="runs.export"),
        Binding("p", "plot", "Figures", show=False, id="runs.plot"),
        Binding("f", "cycle_status", "Status filter", show=False, id="runs.filter_status"),
        Binding("g", "tag_filter", "Tag filter", show=False, id="runs.filter_tag"),
        Binding("S", "reverse_sort", "Reverse sort", show=False, id="runs.sort_reverse"),
        Binding("a", "toggle_children", "Child runs", show=False, id="runs.children"),
        Binding("t", "tag", "Tag", show=False, id="runs.tag"),
        Binding("n", "note", "Note", show=False, id="runs.note"),
        Binding("d", "delete", "Delete", show=False, id="runs.delete"),
        Binding("r", "reload", "Reload", show=False, id="runs.reload"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[dict] = []
        self.shown: list[dict] = []
        self.details: dict[int, dict] = {}
        self._final_details: set[int] = set()
        self.status_filter: str | None = None
        self.tag_filter: str | None = None
        self.search_text = ""
        self.sort_key = "started"
        self.sort_reverse = True
        self.show_children = False
        self.marked: set[int] = set()
        self.loaded = False
        self.follow_pid: int | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="runs-bar", classes="bar"):
            yield Input(placeholder="/ search name, tag, preset, note", id="runs-search", compact=True)
            yield Label("", id="runs-filters")
        yield RunsTable(id="runs-table")
        yield Static("", id="runs-empty")
        yield Footer()

    def on_mount(self) -> None:
        self.app.store_changed.subscribe(self, lambda _v: self.load_runs())
        self.set_interval(1.0, self._tick_durations, name="durations")
        self.query_one(RunsTable).focus()
        self._update_filter_label()
        self.load_runs()

    # loading -------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="runs-load", name="load runs")
    def load_runs(self) -> None:
        every = self.show_children
        runs = self.client.call(lambda st: st.list_runs() if every else st.list_runs(parent_id=None))
        self.post_message(Loaded("runs", runs))

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs-details", name="run details")
    def load_details(self, runs: list[dict]) -> None:
        for start in range(0, len(runs), DETAILS_CHUNK):
            chunk = runs[start : start + DETAILS_CHUNK]
            self.post_message(Loaded("details", self.client.call(lambda st, chunk=chunk: _details(st, chunk))))

    def on_loaded(self, message: Loaded) -> None:
        if message.key == "runs":
            self.runs = list(message.data)
            self.loaded = True
            ids = {int(r["id"]) for r in self.runs}
            self.marked &= ids
            self.render_runs()
            todo = [r for r in self.runs if int(r["id"]) not in self._final_details]
            if todo:
                self.load_details(todo)
            self._follow_launched()
        elif message.key == "details":
            table = self.query_one(RunsTable)
            by_id = {int(r["id"]): r for r in self.runs}
            for rid, info in message.data.items():
                self.details[rid] = info
                run = by_id.get(rid)
                if run is not None and run.get("status") != "running":
                    self._final_details.add(rid)
                if run is not None:
                    table.update_details(run, info)

    # display -------------------------------------------------------------------------------------
    def filtered_runs(self) -> list[dict]:
        runs = self.runs
        if self.status_filter:
            runs = [r for r in runs if r.get("status") == self.status_filter]
        if self.tag_filter:
            runs = [r for r in runs if self.tag_filter in (r.get("tags") or ())]
        if self.search_text:
            needle = self.search_text.lower()
            runs = [r for r in runs if needle in self._haystack(r)]
        now = self.app.now()

        def key(r: dict):
            if self.sort_key == "name":
                return str(r.get("name") or "").lower()
            if self.sort_key == "status":
                return str(r.get("status") or "")
            if self.sort_key == "duration":
                return run_duration(r, now) or 0.0
            if self.sort_key == "id":
                return int(r["id"])
            if self.sort_key == "metric":
                metric = self.details.get(int(r["id"]), {}).get("metric")
                # runs without the metric sort last in both directions; tasks stay together (in task
                # order), the metric sorts within each task
                if metric is None:
                    return (not self.sort_reverse, "", 0.0)
                task, value = metric
                return (self.sort_reverse, _reversed_text(task) if self.sort_reverse else task, value)
            return (as_epoch(r.get("created")) or 0.0, int(r["id"]))

        ordered = sorted(runs, key=key, reverse=self.sort_reverse)
        return tree_order(ordered) if self.show_children else ordered

    def render_runs(self) -> None:
        self.shown = self.filtered_runs()
        table = self.query_one(RunsTable)
        table.show(
            self.shown,
            details=self.details,
            now=self.app.now(),
            utc=self.app.config.utc,
            marked=self.marked,
            indents=tree_indents(self.shown) if self.show_children else None,
        )
        empty = self.query_one("#runs-empty", Static)
        if not self.runs:
            empty.update(
                f"No runs in {self.app.store_path} yet. Press N to start one (preset quick is a one-minute demo)."
            )
        elif not self.shown:
            empty.update("No run matches the filters. Press f / g to change them, or clear the search.")
        empty.display = not self.shown
        self._update_filter_label()

    def _update_filter_label(self) -> None:
        arrow = "↓" if self.sort_reverse else "↑"
        parts = [
            f"f:{self.status_filter or 'all'}",
            f"g:{self.tag_filter or 'any tag'}",
            f"s:{self.sort_key}{arrow}",
            f"{len(self.shown)}/{len(self.runs)}" + (" +children" if self.show_children else ""),
        ]
        if self.marked:
            parts.append(f"{len(self.marked)} marked")
        self.query_one("#runs-filters", Label).update(" · ".join(parts))

    def _tick_durations(self) -> None:
        running = [r for r in self.shown if r.get("status") == "running"]
        if running:
            self.query_one(RunsTable).update_durations(running, self.app.now())

    def _follow_launched(self) -> None:
        if self.follow_pid is None:
            return
        for run in self.runs:
            if run.get("pid") == self.follow_pid:
                self.follow_pid = None
                if run not in self.shown:
                    self.status_filter = self.tag_filter = None
                    self.search_text = ""
                    self.query_one("#runs-search", Input).value = ""
                    self.render_runs()
                self.query_one(RunsTable).select_run(int(run["id"]))
                return

    # the run(s) an action applies to -----------------------------------------------------------
    def current_run(self) -> dict | None:
        rid = self.query_one(RunsTable).selected_run_id()
        return next((r for r in self.shown if int(r["id"]) == rid), None)

    def _targets(self) -> list[dict]:
        if self.marked:
            return [r for r in self.runs if int(r["id"]) in self.marked]
        run = self.current_run()
        return [run] if run else []

    # events --------------------------------------------------------------------------------------
    @on(DataTable.RowSelected, "#runs-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    @on(DataTable.HeaderSelected, "#runs-table")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        columns = {"started": "started", "name": "name", "status": "status", "duration": "duration", "id": "id"}
        key = {**columns, "headline": "metric"}.get(str(event.column_key.value))
        if key:
            self.sort_reverse = not self.sort_reverse if key == self.sort_key else key in DESCENDING_FIRST
            self.sort_key = key
            self.render_runs()

    @on(Input.Changed, "#runs-search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.search_text = event.value.strip()
        self.render_runs()

    @on(Input.Submitted, "#runs-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.query_one(RunsTable).focus()

    def on_key(self, event) -> None:
        if event.key == "escape" and isinstance(self.focused, Input):
            event.stop()
            self.query_one(RunsTable).focus()

    # actions -------------------------------------------------------------------------------------
    def action_open(self) -> None:
        run = self.current_run()
        if run is None:
            return
        self.post_message(OpenRun(int(run["id"])))

    def action_new_run(self) -> None:
        self.app.open_new_run()

    def action_mark(self) -> None:
        run = self.current_run()
        if run is None:
            return
        rid = int(run["id"])
        self.marked ^= {rid}
        table = self.query_one(RunsTable)
        row = table.cursor_row
        self.render_runs()
        table.move_cursor(row=min(row + 1, table.row_count - 1))

    def action_compare(self) -> None:
        current = self.current_run()
        ids = sorted(self.marked)
        if len(ids) == 1 and current is not None and int(current["id"]) != ids[0]:
            ids.append(int(current["id"]))
        if len(ids) != 2:
            self.app.notify(
                "Mark one run with space, then press c on another (or mark exactly two).", severity="warning"
            )
            return
        from gfattn_tui.screens.compare import CompareScreen

        self.marked.clear()
        self.render_runs()
        self.app.push_screen(CompareScreen(ids[0], ids[1]))

    def action_search(self) -> None:
        self.query_one("#runs-search", Input).focus()

    def action_cycle_status(self) -> None:
        options = (None, *STATUSES)
        self.status_filter = options[(options.index(self.status_filter) + 1) % len(options)]
        self.render_runs()

    def action_tag_filter(self) -> None:
        from gfattn_tui.screens.prompt import PromptScreen

        tags = sorted({t for r in self.runs for t in (r.get("tags") or ())})

        def done(text: str | None) -> None:
            if text is None:
                return
            self.tag_filter = text.strip() or None
            self.render_runs()

        hint = ("tags in use: " + ", ".join(tags[:12])) if tags else "no run has a tag yet"
        prompt = PromptScreen("Show runs with tag (empty = any)", value=self.tag_filter or "", hint=hint)
        self.app.push_screen(prompt, done)

    def action_cycle_sort(self) -> None:
        self.sort_key = SORTS[(SORTS.index(self.sort_key) + 1) % len(SORTS)]
        self.sort_reverse = self.sort_key in DESCENDING_FIRST
        self.render_runs()

    def action_reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self.render_runs()

    def action_toggle_children(self) -> None:
        self.show_children = not self.show_children
        self.load_runs()

    def action_tag(self) -> None:
        self.ask_tag([int(r["id"]) for r in self._targets()])

    def action_note(self) -> None:
        run = self.current_run()
        if run is not None:
            self.ask_note(int(run["id"]), run.get("note") or "")

    def action_delete(self) -> None:
        self.ask_delete(self._targets(), after=self.marked.clear)

    def action_stop(self) -> None:
        run = self.current_run()
        if run is not None:
            self.ask_stop(run)

    def action_resume(self) -> None:
        run = self.current_run()
        if run is not None:
            self.ask_resume(run)

    def action_export(self) -> None:
        run = self.current_run()
        if run is not None:
            self.ask_export(run)

    def action_plot(self) -> None:
        run = self.current_run()
        if run is not None:
            self.ask_plot(run)

    def action_reload(self) -> None:
        self._final_details.clear()
        self.load_runs()

    def _haystack(self, run: dict) -> str:
        info = self.details.get(int(run["id"]), {})
        tags = run.get("tags") or ()
        parts = (run.get("name"), run.get("kind"), info.get("preset"), run.get("note"), *tags, run.get("id"))
        return " ".join(str(x) for x in parts if x).lower()


def _reversed_text(text: str) -> tuple:
    """A key that sorts text backwards, so a reversed sort still lists the tasks in order."""
    return tuple(-ord(c) for c in str(text)) + (0,)


def _details(st, runs: list[dict]) -> dict[int, dict]:
    """Preset, data and model of each run (from `get_run`) and its headline test metrics."""
    out = {}
    for run in runs:
        rid = int(run["id"])
        try:
            full = st.get_run(rid)
            text, value = headline_and_value(st, run)
            out[rid] = {
                "preset": R.run_preset(full),
                "data_path": full.get("data_path") or R.config_value(R.run_config(full), "data.path") or "",
                "model_path": full.get("model_path") or R.config_value(R.run_config(full), "model.path") or "",
                "headline": text,
                "metric": value,
                "progress": pipeline_progress_text(st, run) if run.get("status") == "running" else "",
            }
        except Exception:  # a run deleted meanwhile, or results still being written
            out[rid] = {}
    return out


def tree_order(runs: list[dict]) -> list[dict]:
    """Runs as a tree: each run followed by its children (oldest first), roots in the given order.
    A run whose parent is not in the list is a root."""
    ids = {int(r["id"]) for r in runs}
    children: dict[int, list[dict]] = {}
    roots = []
    for r in runs:
        parent = r.get("parent_id")
        if parent is not None and int(parent) in ids:
            children.setdefault(int(parent), []).append(r)
        else:
            roots.append(r)
    out: list[dict] = []

    def visit(run: dict) -> None:
        out.append(run)
        for child in sorted(children.get(int(run["id"]), []), key=lambda c: int(c["id"])):
            visit(child)

    for root in roots:
        visit(root)
    return out


def tree_indents(runs: list[dict]) -> dict[int, str]:
    """The name prefix of each run in `tree_order`: "├ " / "└ " under its parent, nested deeper."""
    by_id = {int(r["id"]): r for r in runs}
    last_child: dict[int, int] = {}
    for r in runs:
        parent = r.get("parent_id")
        if parent is not None and int(parent) in by_id:
            last_child[int(parent)] = int(r["id"])
    out = {}
    for r in runs:
        depth, node = 0, r
        while node.get("parent_id") is not None and int(node["parent_id"]) in by_id and depth < 5:
            depth += 1
            node = by_id[int(node["parent_id"])]
        if depth:
            parent = int(r["parent_id"])
            mark = "└ " if last_child.get(parent) == int(r["id"]) else "├ "
            out[int(r["id"])] = "  " * (depth - 1) + mark
    return out
