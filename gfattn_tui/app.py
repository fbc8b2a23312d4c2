"""`gfattn-tui`: the terminal face of the experiment store (docs/architecture.md, "The TUI").

The app owns the store client, the change poll and the error path. It asks the store for
`data_version()` every `poll_interval` seconds (one cheap PRAGMA on the store thread) and publishes
`store_changed` only when another connection committed; views reload then and only then. Runs launched
from the New run form are detached processes the app merely reaps and reports on.

A store that cannot be written (read-only file, folder or mount; or `--read-only`) is opened read-only:
the title says so, and launching, stopping, tagging, noting and deleting are refused with a notice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from textual import actions
from textual.app import App
from textual.binding import Binding
from textual.signal import Signal

from gfattn_tui.client import StoreClient
from gfattn_tui.commands import BindingCommands
from gfattn_tui.config import ConfigError, TuiConfig
from gfattn_tui.launcher import (
    LaunchedRun,
    RunRequest,
    start_export,
    start_pipeline,
    start_plot,
    start_resume,
    writable_log_dir,
)
from gfattn_tui.messages import OpenRun
from gfattn_tui.screens.run_actions import READ_ONLY_REFUSED, RunActions
from gfattn_tui.screens.runs import RunsScreen

# exit statuses of a process stopped by SIGTERM/SIGINT (the pipeline exits 130 on an interrupt)
STOPPED_CODES = (130, 143, -2, -15)


def describe_error(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    try:
        from store import StoreError
    except ImportError:  # pragma: no cover
        StoreError = ()  # type: ignore[assignment]
    if isinstance(error, StoreError):
        return str(error)
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text}"


class GfattnApp(App[None]):
    """Runs list, run screens, comparison and the New run form over one store."""

    CSS_PATH = "app.tcss"
    TITLE = "gfattn"
    COMMANDS = App.COMMANDS | {BindingCommands}
    BINDINGS = [
        # not in the footer (it must fit 80 columns with the screen's own keys): `?` and ctrl+p list them
        Binding(
            "ctrl+t", "toggle_theme", "Theme", show=False, id="app.toggle_theme", tooltip="Switch dark / light theme"
        ),
        Binding("f1", "toggle_help", "Key panel", show=False, id="app.help", tooltip="Show or hide the key panel"),
    ]

    def __init__(
        self,
        store_path: str | Path,
        *,
        config: TuiConfig | None = None,
        clock: Callable[[], float] = time.time,
        poll: bool = True,
        readonly: bool = False,
    ) -> None:
        super().__init__()
        self.store_path = Path(store_path)
        self.config = config or TuiConfig()
        self.clock = clock
        self.client = StoreClient(self.store_path, readonly=True if readonly else "auto")
        self.poll_enabled = poll
        self.data_version: int | None = None
        self.launched: list[LaunchedRun] = []
        self.stopped_pids: set[int] = set()  # processes the user stopped (k): their end is no failure
        self.store_changed: Signal[int] = Signal(self, "store-changed")
        self._polling = False
        self._check_again = False
        self._poll_failed = False

    # lifecycle -----------------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.theme = self._known_theme(self.config.theme, "textual-dark")
        if self.config.keymap:
            self.set_keymap(self.config.keymap)
        self.sub_title = str(self.store_path)
        self._show_store_mode()
        # the first check sets the baseline that later checks compare with
        self.run_worker(self.check_store(), group="store-check", name="store check")
        if self.poll_enabled:
            self.set_interval(self.config.poll_interval, self._poll, name="store-poll")

    def get_default_screen(self) -> RunsScreen:
        return RunsScreen()

    def on_unmount(self) -> None:
        self.client.close()

    def _known_theme(self, name: str, fallback: str) -> str:
        return name if name in self.available_themes else fallback

    @property
    def read_only(self) -> bool:
        """Whether the store is open read-only (known once the store thread opened it)."""
        return self.client.readonly

    def _show_store_mode(self) -> None:
        if self.read_only:
            self.title = f"{self.TITLE} (read-only)"
            self.sub_title = f"{self.store_path} (read-only)"

    def _refuse_read_only(self, what: str) -> None:
        reason = self.client.readonly_reason
        self.notify(
            f"{what} needs a writable store; {self.store_path} is open read-only" + (f" ({reason})" if reason else ""),
            title="Read-only store",
            severity="warning",
        )

    async def run_action(self, action, default_namespace=None, namespaces=None) -> bool:
        """Every key, palette entry and click goes through here: refuse writes on a read-only store."""
        if self.read_only and isinstance(default_namespace, RunActions):
            name = action[1] if isinstance(action, tuple) else actions.parse(action)[1]
            if name in READ_ONLY_REFUSED:
                self._refuse_read_only(READ_ONLY_REFUSED[name])
                return True
        return await super().run_action(action, default_namespace, namespaces)

    # the store -----------------------------------------------------------------------------------
    async def _poll(self) -> None:
        if not self._polling:  # a slow store skips ticks instead of queueing them
            await self.check_store()

    async def check_store(self) -> None:
        """Publish `store_changed` when the store's content changed since the last check."""
        if self._polling:
            self._check_again = True  # a check is in flight; it runs once more when done
            return
        self._polling = True
        try:
            while True:
                self._check_again = False
                try:
                    version = await self.client.acall(lambda st: st.data_version())
                except Exception as exc:  # the store may be mid-migration or gone; say so once
                    if not self._poll_failed:
                        self._poll_failed = True
                        self.report_error(exc, where="store")
                    return
                self._poll_failed = False
                if self.data_version is None:
                    self.data_version = version
                    self._show_store_mode()
                elif version != self.data_version:
                    self.data_version = version
                    self.store_changed.publish(version)
                if not self._check_again:
                    return
        finally:
            self._polling = False
            self._reap_launched()

    def notify_store_changed(self) -> None:
        """After the TUI's own writes (tag, note, delete) or a launched run ending: check at once
        instead of waiting for the next poll, so the change shows immediately and only once."""
        self.run_worker(self.check_store(), group="store-check", name="store check")

    def report_error(self, error: BaseException | None, *, where: str = "") -> None:
        """The one place failures become visible: a notification and the Textual log."""
        message = describe_error(error)
        self.log.error(f"{where}: {message}" if where else message)
        self.notify(message, title="Error" + (f" ({where})" if where else ""), severity="error", timeout=10)

    # launching -----------------------------------------------------------------------------------
    def launch_run(self, request: RunRequest, *, form: dict | None = None) -> LaunchedRun:
        if self.read_only:
            raise PermissionError(f"store {self.store_path} is open read-only; launching runs needs a writable store")
        launched = start_pipeline(request, self.store_path)
        launched.form = form
        self.launched.append(launched)
        self.notify(f"started pid {launched.pid}; log {launched.log_path}", title="New run")
        return launched

    def log_dir(self) -> Path:
        """Where launched processes log: beside the store, or where the user can write (read-only store)."""
        return writable_log_dir(self.store_path, read_only=self.read_only)

    def start_resume(self, run_id: int) -> LaunchedRun | None:
        return self._start_task(lambda: start_resume(run_id, self.store_path, log_dir=self.log_dir()), "Resume")

    def start_export(self, run_id: int, fmt: str, out_dir) -> LaunchedRun | None:
        logs = self.log_dir()
        return self._start_task(lambda: start_export(run_id, self.store_path, fmt, out_dir, log_dir=logs), "Export")

    def start_plot(self, run_id: int, out_dir) -> LaunchedRun | None:
        return self._start_task(lambda: start_plot(run_id, self.store_path, out_dir, log_dir=self.log_dir()), "Figures")

    def _start_task(self, start: Callable[[], LaunchedRun], title: str) -> LaunchedRun | None:
        try:
            launched = start()
        except (OSError, ValueError) as exc:
            self.report_error(exc, where=title.lower())
            return None
        self.launched.append(launched)
        self.notify(f"{launched.what}: pid {launched.pid}; log {launched.log_path}", title=title)
        return launched

    def _reap_launched(self) -> None:
        for launched in list(self.launched):
            code = launched.poll()
            if code is None:
                continue
            self.launched.remove(launched)
            stopped = launched.pid in self.stopped_pids or code in STOPPED_CODES
            self.stopped_pids.discard(launched.pid)
            if code == 0:
                where = f"; files in {launched.out_dir}" if launched.out_dir else ""
                self.notify(f"{launched.what} finished (pid {launched.pid}){where}", title="Finished")
            elif stopped and launched.what != "run" and not launched.what.startswith("resume"):
                self.notify(f"{launched.what} stopped (pid {launched.pid})", title="Stopped", severity="warning")
            elif stopped:
                self.notify(
                    f"{launched.what} stopped (pid {launched.pid}): the run reads as interrupted; "
                    "press R on it to resume",
                    title="Run stopped",
                    severity="warning",
                    timeout=10,
                )
            else:
                tail = launched.log_tail(6)
                last = launched.last_line() or f"exited with status {code}"
                resumable = "--resume" in tail
                self.notify(
                    f"{launched.what} failed (pid {launched.pid}, status {code}): {last}\n"
                    + ("press R on the run to resume it from here\n" if resumable else "")
                    + f"log: {launched.log_path}",
                    title="Failed",
                    severity="error",
                    timeout=30,
                )
                if launched.form is not None and not resumable:
                    # refused before anything was recorded (bad input): the form again, filled in
                    self.open_new_run(state=launched.form, error=last)
            self.notify_store_changed()

    def open_new_run(self, *, state: dict | None = None, error: str = "") -> None:
        """The New run form (filled in from `state` after a failed launch, its error on top); the runs
        list follows the run it starts."""
        from gfattn_tui.screens.new_run import NewRunScreen

        def started(pid: int | None) -> None:
            if not pid:
                return
            for screen in self.screen_stack:
                if isinstance(screen, RunsScreen):
                    screen.follow_pid = pid
                    screen.load_runs()

        self.push_screen(NewRunScreen(state=state, error=error), started)

    # navigation ----------------------------------------------------------------------------------
    def on_open_run(self, message: OpenRun) -> None:
        """Views ask for a run by message, so no widget imports the screen that shows it."""
        from gfattn_tui.screens.run import RunScreen

        self.push_screen(RunScreen(message.run_id, tab=message.tab))

    # actions -------------------------------------------------------------------------------------
    def action_toggle_theme(self) -> None:
        dark = self._known_theme(self.config.dark_theme, "textual-dark")
        light = self._known_theme(self.config.light_theme, "textual-light")
        self.theme = light if self.current_theme.dark else dark

    def action_keys(self) -> None:
        """`?`: the keys of the current screen, in a dialog (as lazygit and k9s do)."""
        from gfattn_tui.screens.keys import KeysScreen

        if isinstance(self.screen, KeysScreen):
            self.screen.dismiss()
            return
        self.push_screen(KeysScreen(self.screen))

    def action_toggle_help(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def now(self) -> float:
        return self.clock()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfattn-tui",
        description="Launch gfattn runs, watch them live and browse their results.",
    )
    parser.add_argument("--store", metavar="PATH", help="experiment store (default: $GFATTN_STORE or ./gfattn.db)")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings TOML (default: $GFATTN_TUI_CONFIG or ~/.config/gfattn/tui.toml)",
    )
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="browse only: open the store read-only (automatic when it cannot be written)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.paths import resolve_store_path

    store_path = resolve_store_path(args.store)
    if store_path.is_dir():
        print(f"gfattn-tui: error: {store_path} is a directory; pass the store file with --store", file=sys.stderr)
        return 2
    try:
        config = TuiConfig.load(args.config)
    except ConfigError as exc:
        print(f"gfattn-tui: error: {exc}", file=sys.stderr)
        return 2
    app = GfattnApp(store_path, config=config, readonly=args.read_only)
    try:
        # Open (and migrate, unless read-only) the store before the screen takes over, so an unusable
        # store (not SQLite, a newer schema, a mistyped folder) is a plain one-line error on the terminal
        # rather than a notification.
        app.client.call(lambda st: st.data_version())
    except Exception as exc:
        app.client.close()
        print(f"gfattn-tui: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    app.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
