"""What every store-backed widget and screen shares: the store client and the one error path.

Loads run in `@work(thread=True, exclusive=True, exit_on_error=False)` workers that post a message with
their result. A worker that raises ends in the ERROR state; the state change arrives here and goes to
`GfattnApp.report_error`, the single place where failures become notifications.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from gfattn_tui.app import GfattnApp
    from gfattn_tui.client import StoreClient


class StoreBacked:
    """Mixin for widgets and screens that read the store in workers."""

    app: GfattnApp

    @property
    def client(self) -> StoreClient:
        return self.app.client

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.app.report_error(event.worker.error, where=event.worker.name)


class RunView(StoreBacked):
    """A tab of the run screen: loads when shown, reloads when the store changed while shown."""

    run_id: int
    stale: bool = True

    def reload(self) -> None:  # pragma: no cover - every view implements it
        raise NotImplementedError

    def refresh_if_stale(self) -> None:
        if self.stale:
            self.stale = False
            self.reload()

    focus_selector: str | None = None
    # tabs that show one analysis run of the scope share the screen's choice (`RunScreen.analysis_id`)
    uses_analysis: bool = False
    shown_analysis: int | None = None
    _own_analysis: int | None = None

    def _shared(self):
        try:
            screen = self.screen  # type: ignore[attr-defined]
        except Exception:  # not mounted yet
            return None
        return screen if hasattr(screen, "analysis_id") else None

    @property
    def analysis_id(self) -> int | None:
        screen = self._shared()
        return screen.analysis_id if screen is not None else self._own_analysis

    @analysis_id.setter
    def analysis_id(self, value: int | None) -> None:
        screen = self._shared()
        if screen is not None:
            screen.analysis_id = value
        else:
            self._own_analysis = value

    def focus_main(self) -> None:
        """Focus the widget the tab's own keys act on (its table, or the tab itself)."""
        if self.focus_selector:
            for widget in self.query(self.focus_selector):  # type: ignore[attr-defined]
                if widget.display:
                    widget.focus()
                    return
        if getattr(self, "can_focus", False):
            self.focus()  # type: ignore[attr-defined]
