"""New run form: preset, data, model and the key options of `gfattn pipeline`, started detached.

With a data file (.h5ad or .loom; the path completes with tab or right) or a tokenized dataset, the
form reads its obs in a worker thread (backed: the counts are never loaded, through the same readers as
`gfattn inspect`) and lists the obs columns. The user picks the label column, then its classes in the
values table (space or enter, in the order picked), or writes groups (`KO=ZAP70_1,LCK_1; ctrl=control`,
passed in a generated config's `[[tasks]]`), and a filter (`COL=V1,V2; COL2=V3`, `--filter` flags).
The cells per class those give are shown live, computed by the pipeline's own design functions, with
every problem on its own line; Start is refused while there are any.

The command line being built is shown live under the form, so what the TUI runs can be rerun by hand.
Dismisses with the started process id (or None when cancelled); the runs list then follows that run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.suggester import Suggester
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Select, Static
from textual.worker import get_current_worker

from gfattn_tui.launcher import DEVICES, RunRequest, available_presets
from gfattn_tui.run_design import (
    Design,
    Sizes,
    class_sizes,
    filter_flags,
    form_config_path,
    form_config_text,
    input_problems,
    parse_assignments,
    preset_task_columns,
    suggest_path,
)

FIELDS: list[tuple[str, str, str]] = [
    ("data", "data (.h5ad/.loom)", "empty: the embedded synthetic sci-Plex-like data (tab completes a path)"),
    ("tokenized", "tokenized dir", "or a dataset tokenized by Geneformer, instead of a data file"),
    ("model", "model dir", "empty: gfattn's small model (the shipped one, or one pretrained on your cells)"),
    ("geneformer_dir", "Geneformer dir", "dictionaries, when the model dir has none"),
    ("config", "config TOML", "overrides on top of the preset"),
    ("name", "run name", "default: preset and time"),
    ("epochs", "epochs", "fine-tuning epochs (default: the preset's)"),
    ("nproc", "processes", "training processes (default 1)"),
]
PATH_FIELDS = {"data": ((".h5ad", ".loom"), False), "tokenized": ((), True)}
MAX_VALUES = 500  # values listed for a label column (most frequent first)
SHOWN_CLASSES = 12


class PathSuggester(Suggester):
    """Suggests folders and data files for a partly typed path (see `run_design.suggest_path`)."""

    def __init__(self, suffixes: tuple[str, ...] = (".h5ad", ".loom"), *, dirs_only: bool = False) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.suffixes = suffixes
        self.dirs_only = dirs_only

    async def get_suggestion(self, value: str) -> str | None:
        return suggest_path(value, self.suffixes, dirs_only=self.dirs_only)


class PathInput(Input):
    """An Input whose tab accepts the shown path completion (and moves on when there is none)."""

    BINDINGS = [Binding("tab", "complete", "Complete path", show=False)]

    def action_complete(self) -> None:
        if self.cursor_at_end and self._suggestion and self._suggestion != self.value:
            self.value = self._suggestion
            self.cursor_position = len(self.value)
        else:
            self.screen.focus_next()


class ValuesTable(DataTable):
    """A label column's values with their cell counts; space or enter picks a value as a class."""

    BINDINGS = [Binding("space", "select_cursor", "Pick class", show=False)]


class NewRunScreen(Screen[int | None]):
    BINDINGS = [
        Binding("ctrl+s", "start", "Start run", id="new_run.start", priority=True),
        Binding("escape", "cancel", "Cancel", id="new_run.cancel"),
    ]

    def __init__(self, *, preset: str | None = None, state: dict | None = None, error: str = "") -> None:
        super().__init__()
        self.presets = available_presets()
        fallback = "default" if "default" in self.presets else next(iter(self.presets))
        state = dict(state or {})
        preset = state.get("preset", preset)
        self.initial_preset = preset if preset in self.presets else fallback
        self.state = state  # a form to fill in again (a launch that failed), restored on mount
        self.launch_error = error  # why that launch failed: its last log line
        self._pending_design: dict | None = None  # label column and classes, applied once the obs is read
        self.input_problems: list[str] = []  # the pipeline's own checks of data, model and dictionaries
        self._inputs_checked: tuple | None = None
        self.obs = None  # the data's obs table, once read
        self.obs_columns: dict[str, dict] = {}  # column -> its `gfattn inspect` description
        self.obs_source: tuple[str, str] | None = None  # (kind, path) read or being read
        self.obs_error = ""
        self.picked: list[str] = []  # classes, in the order picked
        self.sizes = Sizes()
        self._rows_cache: dict = {}
        self._preset_columns: dict[str, list[str]] = {}
        self._form_config: Path | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="new-run-form"):
            yield Label("New pipeline run", classes="section")
            yield Static(
                f"the last run started from this form failed: {self.launch_error}",
                id="nr-launch-error",
                classes="error-box",
                markup=False,
            )
            with Horizontal(classes="form-row"):
                yield Label("preset", classes="form-label")
                yield Select(
                    [(name, name) for name in self.presets],
                    value=self.initial_preset,
                    allow_blank=False,
                    id="nr-preset",
                    compact=True,
                )
            yield Static(self.presets.get(self.initial_preset, ""), id="nr-preset-help", classes="hint")
            for key, label, placeholder in FIELDS:
                with Horizontal(classes="form-row"):
                    yield Label(label, classes="form-label")
                    if key in PATH_FIELDS:
                        suffixes, dirs_only = PATH_FIELDS[key]
                        suggester = PathSuggester(suffixes, dirs_only=dirs_only)
                        yield PathInput(placeholder=placeholder, id=f"nr-{key}", suggester=suggester, compact=True)
                    else:
                        kind = "integer" if key in ("epochs", "nproc") else "text"
                        yield Input(placeholder=placeholder, id=f"nr-{key}", type=kind, compact=True)
            with Horizontal(classes="form-row"):
                yield Label("device", classes="form-label")
                yield Select([(d, d) for d in DEVICES], value="auto", allow_blank=False, id="nr-device", compact=True)
            yield Label("labels", classes="section")
            yield Static(
                "give a data file to choose labels from its obs columns", id="nr-obs", classes="hint", markup=False
            )
            with Horizontal(classes="form-row"):
                yield Label("label column", classes="form-label")
                yield Select([], prompt="(the preset's tasks)", id="nr-label-column", compact=True)
            table = ValuesTable(id="nr-values", cursor_type="row", zebra_stripes=True)
            table.add_column("class", key="pick", width=5)
            table.add_column("value", key="value")
            table.add_column("cells", key="cells")
            yield table
            with Horizontal(classes="form-row"):
                yield Label("groups", classes="form-label")
                yield Input(
                    placeholder="instead of classes: KO=ZAP70_1,LCK_1; ctrl=control", id="nr-groups", compact=True
                )
            with Horizontal(classes="form-row"):
                yield Label("filter", classes="form-label")
                yield Input(placeholder="keep cells: COL=V1,V2; COL2=V3 (* wildcards)", id="nr-filter", compact=True)
            yield Static("", id="nr-input-problems", classes="error-text", markup=False)
            yield Static("", id="nr-sizes", markup=False)
            yield Static("", id="nr-design-problems", classes="error-text", markup=False)
            yield Label("command", classes="section")
            yield Static("", id="nr-command", classes="command", markup=False)
            yield Static("", id="nr-problems", classes="error-text", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="nr-start")
                yield Button("Cancel (esc)", id="nr-cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#nr-launch-error").display = bool(self.launch_error)
        self.query_one("#nr-preset", Select).focus()
        if self.state:
            self._restore(self.state)
        self._refresh_command()

    def form_state(self) -> dict:
        """What the form holds, to fill it in again (`NewRunScreen(state=...)`) after a failed launch."""
        preset = self.query_one("#nr-preset", Select).value
        device = self.query_one("#nr-device", Select).value
        state: dict = {key: self._text(key) for key, _, _ in FIELDS}
        state.update(
            preset=preset if isinstance(preset, str) else self.initial_preset,
            device=device if isinstance(device, str) else "auto",
            label_column=self.label_column(),
            classes=list(self.picked),
            groups=self._text("groups"),
            filter=self._text("filter"),
        )
        return state

    def _restore(self, state: dict) -> None:
        for key, _, _ in FIELDS:
            if state.get(key):
                self.query_one(f"#nr-{key}", Input).value = str(state[key])
        for key in ("groups", "filter"):
            if state.get(key):
                self.query_one(f"#nr-{key}", Input).value = str(state[key])
        if state.get("device") in DEVICES:
            self.query_one("#nr-device", Select).value = state["device"]
        if state.get("label_column"):
            self._pending_design = {"column": state["label_column"], "classes": list(state.get("classes") or ())}

    # the form's state --------------------------------------------------------------------------------
    def _text(self, key: str) -> str:
        return self.query_one(f"#nr-{key}", Input).value.strip()

    def label_column(self) -> str:
        value = self.query_one("#nr-label-column", Select).value
        return value if isinstance(value, str) and value in self.obs_columns else ""

    def design(self) -> tuple[Design, list[str]]:
        """The picked design and the problems of the typed groups and filter."""
        groups, group_problems = parse_assignments(self._text("groups"), "groups")
        filters, filter_problems = parse_assignments(self._text("filter"), "filter")
        design = Design(column=self.label_column(), classes=list(self.picked), groups=groups, filters=filters)
        return design, group_problems + filter_problems

    def form_config(self) -> Path:
        if self._form_config is None:
            self._form_config = form_config_path(self.app.store_path)
        return self._form_config

    def request(self) -> RunRequest:
        def number(key: str) -> int | None:
            value = self._text(key)
            return int(value) if value.lstrip("-").isdigit() else None

        preset = self.query_one("#nr-preset", Select).value
        device = self.query_one("#nr-device", Select).value
        design, _ = self.design()
        request = RunRequest(
            preset=str(preset) if isinstance(preset, str) else self.initial_preset,
            data=self._text("data"),
            tokenized=self._text("tokenized"),
            model=self._text("model"),
            geneformer_dir=self._text("geneformer_dir"),
            config=self._text("config"),
            name=self._text("name"),
            device=str(device) if isinstance(device, str) else "auto",
            epochs=number("epochs"),
            nproc=number("nproc"),
            filters=filter_flags(design.filters),
        )
        if design.column and design.groups:
            try:
                request.config_text = form_config_text(design, request.config)
            except Exception:  # an unreadable config file: reported by design_problems
                pass
            else:
                request.config = str(self.form_config())
        elif design.column:
            request.label_column = design.column
            request.classes = list(design.classes)
        return request

    def design_problems(self) -> list[str]:
        """What the labels part of the form gets wrong, one line each (the live sizes' problems too)."""
        design, problems = self.design()
        preset = self.query_one("#nr-preset", Select).value
        if self.obs_source and self.obs is None:
            problems.append(self.obs_error or "the data's obs columns are still being read")
        if design.groups and not design.column:
            problems.append("groups need a label column")
        if design.groups and design.column and self._text("config"):
            try:
                form_config_text(design, self._text("config"))
            except Exception as exc:
                problems.append(f"config TOML: {exc}")
        if self.obs is not None:
            problems += self.sizes.problems
            if not design.column and isinstance(preset, str):
                if preset not in self._preset_columns:
                    self._preset_columns[preset] = preset_task_columns(preset)
                lacking = [c for c in self._preset_columns[preset] if c not in self.obs_columns]
                if lacking:
                    problems.append(
                        f"choose the label column: the preset's tasks read obs column {', '.join(lacking)}, "
                        "which this data lacks"
                    )
        return problems

    # refreshing ------------------------------------------------------------------------------------
    def _refresh_command(self) -> None:
        argv = self.request().argv(self.app.store_path)
        shown = ["gfattn", *argv[3:]]
        self.query_one("#nr-command", Static).update(" ".join(shlex.quote(a) for a in shown))

    def _check_inputs(self) -> None:
        """Run the pipeline's checks of data, model and dictionaries again when one of them changed."""
        preset = self.query_one("#nr-preset", Select).value
        key = (
            preset if isinstance(preset, str) else self.initial_preset,
            self._text("data"),
            self._text("model"),
            self._text("geneformer_dir"),
            self._text("config"),
        )
        if key == self._inputs_checked:
            return
        self._inputs_checked = key
        self.input_problems = ["checking the data, model and dictionaries as the pipeline will ..."]
        self._run_input_checks(key)

    @work(thread=True, exclusive=True, group="new-run-inputs")
    def _run_input_checks(self, key: tuple) -> None:
        worker = get_current_worker()
        problems = input_problems(*key)
        if not worker.is_cancelled:
            self.app.call_from_thread(self._inputs_ready, key, problems)

    def _inputs_ready(self, key: tuple, problems: list[str]) -> None:
        if key != self._inputs_checked:
            return
        self.input_problems = problems
        self.query_one("#nr-input-problems", Static).update("\n".join(problems))

    def _refresh_design(self) -> None:
        self._check_inputs()
        self.query_one("#nr-input-problems", Static).update("\n".join(self.input_problems))
        design, _ = self.design()
        if self.obs is not None:
            self.sizes = class_sizes(self.obs, design, cache=self._rows_cache)
        else:
            self.sizes = Sizes()
        self.query_one("#nr-sizes", Static).update(self._sizes_text(design))
        self.query_one("#nr-design-problems", Static).update("\n".join(self.design_problems()))
        self._refresh_command()

    def _sizes_text(self, design: Design) -> str:
        if self.obs is None:
            return ""
        sizes = self.sizes
        where = " after the filter" if design.filters else ""
        if not sizes.classes:
            return f"{sizes.cells:,} cells{where}" if design.filters else ""
        parts = [f"{name} {n:,}" for name, n in list(sizes.classes.items())[:SHOWN_CLASSES]]
        more = len(sizes.classes) - SHOWN_CLASSES
        if more > 0:
            parts.append(f"... {more} more classes")
        return f"cells per class{where}: " + " · ".join(parts) + f"  ({sizes.cells:,} cells)"

    # reading the data's obs ------------------------------------------------------------------------
    def _data_source(self) -> tuple[str, str] | None:
        data, tokenized = self._text("data"), self._text("tokenized")
        if data:
            p = Path(data).expanduser()
            return ("data", str(p)) if p.is_file() and p.suffix in (".h5ad", ".loom") else None
        if tokenized:
            p = Path(tokenized).expanduser()
            return ("tokenized", str(p)) if p.is_dir() else None
        return None

    def _source_changed(self) -> None:
        source = self._data_source()
        if source == self.obs_source:
            return
        self.obs_source = source
        self.obs = None
        self.obs_columns = {}
        self.obs_error = ""
        self._rows_cache = {}
        self.picked = []
        self.query_one("#nr-label-column", Select).set_options([])
        self.query_one("#nr-values", DataTable).clear()
        if source is None:
            self.query_one("#nr-obs", Static).update("give a data file to choose labels from its obs columns")
            return
        self.query_one("#nr-obs", Static).update(f"reading the obs of {source[1]} ...")
        self._read_obs(source)

    @work(thread=True, exclusive=True, group="new-run-obs")
    def _read_obs(self, source: tuple[str, str]) -> None:
        worker = get_current_worker()
        kind, path = source
        try:
            from pipeline.commands.inspect import obs_columns, read_obs_table

            if kind == "tokenized":
                from pipeline.run.preflight import tokenized_obs

                obs = tokenized_obs(path)
            else:
                obs = read_obs_table(path)
            columns = obs_columns(obs, max_values=MAX_VALUES)
        except Exception as exc:
            if not worker.is_cancelled:
                self.app.call_from_thread(self._obs_failed, source, exc)
            return
        if not worker.is_cancelled:
            self.app.call_from_thread(self._obs_ready, source, obs, columns)

    def _obs_failed(self, source: tuple[str, str], exc: Exception) -> None:
        if source != self.obs_source:
            return
        self.obs_error = f"cannot read the obs of {source[1]}: {exc}"
        self.query_one("#nr-obs", Static).update(self.obs_error)
        self._refresh_design()

    def _obs_ready(self, source: tuple[str, str], obs, columns: list[dict]) -> None:
        if source != self.obs_source:
            return
        self.obs = obs
        self.obs_columns = {c["name"]: c for c in columns}
        self.query_one("#nr-obs", Static).update(
            f"{len(obs):,} cells, {len(columns)} obs columns: choose the label column, then pick its classes"
        )
        self.query_one("#nr-label-column", Select).set_options(
            [(Text(f"{c['name']} ({_count(c['n_values'], 'value')})"), c["name"]) for c in columns]
        )
        pending, self._pending_design = self._pending_design, None
        if pending and pending["column"] in self.obs_columns:
            self._pending_design = pending  # its classes are picked once the column's values are listed
            self.query_one("#nr-label-column", Select).value = pending["column"]
        self._refresh_design()

    def _fill_values(self) -> None:
        table = self.query_one("#nr-values", DataTable)
        table.clear()
        self.picked = []
        column = self.obs_columns.get(self.label_column())
        if not column:
            return
        for value, n in column.get("values", {}).items():
            table.add_row(Text(""), Text(value), Text(f"{n:,}", justify="right"), key=value)

    def toggle_class(self, value: str) -> None:
        """Pick `value` as the next class, or drop it (the later ones move up)."""
        if value in self.picked:
            self.picked.remove(value)
        else:
            self.picked.append(value)
        table = self.query_one("#nr-values", DataTable)
        for row_key in table.rows:
            key = str(row_key.value)
            mark = str(self.picked.index(key) + 1) if key in self.picked else ""
            table.update_cell(row_key, "pick", Text(mark))
        self._refresh_design()

    # events ----------------------------------------------------------------------------------------
    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "nr-preset" and isinstance(event.value, str):
            self.query_one("#nr-preset-help", Static).update(self.presets.get(event.value, ""))
        if event.select.id == "nr-label-column":
            self._fill_values()
            pending = self._pending_design
            if pending and self.obs is not None and pending["column"] == self.label_column():
                self._pending_design = None
                for value in pending["classes"]:
                    if value in self.obs_columns[pending["column"]].get("values", {}):
                        self.toggle_class(value)
        self._refresh_design()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        if event.input.id in ("nr-data", "nr-tokenized"):
            self._source_changed()
        self._refresh_design()

    @on(Input.Submitted)
    def _input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()

    @on(DataTable.RowSelected, "#nr-values")
    def _value_selected(self, event: DataTable.RowSelected) -> None:
        self.toggle_class(str(event.row_key.value))

    @on(Button.Pressed, "#nr-start")
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#nr-cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    def action_start(self) -> None:
        request = self.request()
        problems = request.validate() + self.input_problems + self.design_problems()
        self.query_one("#nr-problems", Static).update("\n".join(problems))
        if problems:
            self.app.notify(problems[0], title="Cannot start", severity="warning")
            return
        try:
            launched = self.app.launch_run(request, form=self.form_state())
        except OSError as exc:
            self.app.report_error(exc, where="start run")
            return
        self.dismiss(launched.pid)

    def action_cancel(self) -> None:
        self.dismiss(None)


def _count(n: int, word: str) -> str:
    """ "1 value", "2,304 values"."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")
