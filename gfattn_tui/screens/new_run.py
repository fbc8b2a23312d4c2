"""New run form: preset, data, model and the key options of `gfattn pipeline`, started detached.

The command line being built is shown live under the form, so what the TUI runs can be rerun by hand.
Dismisses with the started process id (or None when cancelled); the runs list then follows that run.
"""

from __future__ import annotations

import shlex

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from gfattn_tui.launcher import DEVICES, RunRequest, available_presets

FIELDS: list[tuple[str, str, str]] = [
    ("data", "data (.h5ad)", "empty: the embedded synthetic sci-Plex-like data"),
    ("model", "model dir", "empty: the embedded small model (pretrained and cached)"),
    ("geneformer_dir", "Geneformer dir", "dictionaries, when the model dir has none"),
    ("config", "config TOML", "overrides on top of the preset"),
    ("name", "run name", "default: preset and time"),
    ("epochs", "epochs", "fine-tuning epochs (default: the preset's)"),
    ("nproc", "processes", "training processes (default 1)"),
]


class NewRunScreen(Screen[int | None]):
    BINDINGS = [
        Binding("ctrl+s", "start", "Start run", id="new_run.start", priority=True),
        Binding("escape", "cancel", "Cancel", id="new_run.cancel"),
    ]

    def __init__(self, *, preset: str | None = None) -> None:
        super().__init__()
        self.presets = available_presets()
        fallback = "default" if "default" in self.presets else next(iter(self.presets))
        self.initial_preset = preset if preset in self.presets else fallback

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="new-run-form"):
            yield Label("New pipeline run", classes="section")
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
                    kind = "integer" if key in ("epochs", "nproc") else "text"
                    yield Input(placeholder=placeholder, id=f"nr-{key}", type=kind, compact=True)
            with Horizontal(classes="form-row"):
                yield Label("device", classes="form-label")
                yield Select([(d, d) for d in DEVICES], value="auto", allow_blank=False, id="nr-device", compact=True)
            yield Label("command", classes="section")
            yield Static("", id="nr-command", classes="command")
            yield Static("", id="nr-problems", classes="error-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="nr-start")
                yield Button("Cancel (esc)", id="nr-cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#nr-preset", Select).focus()
        self._refresh_command()

    def request(self) -> RunRequest:
        def text(key: str) -> str:
            return self.query_one(f"#nr-{key}", Input).value.strip()

        def number(key: str) -> int | None:
            value = text(key)
            return int(value) if value.lstrip("-").isdigit() else None

        preset = self.query_one("#nr-preset", Select).value
        device = self.query_one("#nr-device", Select).value
        return RunRequest(
            preset=str(preset) if isinstance(preset, str) else self.initial_preset,
            data=text("data"),
            model=text("model"),
            geneformer_dir=text("geneformer_dir"),
            config=text("config"),
            name=text("name"),
            device=str(device) if isinstance(device, str) else "auto",
            epochs=number("epochs"),
            nproc=number("nproc"),
        )

    def _refresh_command(self) -> None:
        argv = self.request().argv(self.app.store_path)
        shown = ["gfattn", *argv[3:]]
        self.query_one("#nr-command", Static).update(" ".join(shlex.quote(a) for a in shown))

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "nr-preset" and isinstance(event.value, str):
            self.query_one("#nr-preset-help", Static).update(self.presets.get(event.value, ""))
        self._refresh_command()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        self._refresh_command()

    @on(Input.Submitted)
    def _input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()

    @on(Button.Pressed, "#nr-start")
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#nr-cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    def action_start(self) -> None:
        request = self.request()
        problems = request.validate()
        self.query_one("#nr-problems", Static).update("\n".join(problems))
        if problems:
            self.app.notify(problems[0], title="Cannot start", severity="warning")
            return
        try:
            launched = self.app.launch_run(request)
        except OSError as exc:
            self.app.report_error(exc, where="start run")
            return
        self.dismiss(launched.pid)

    def action_cancel(self) -> None:
        self.dismiss(None)
