"""Tagging, notes, deletion, stopping, resuming, exporting and drawing figures, shared by the runs list
and the run screen.

Each asks in a modal first; the write itself runs in a worker on the store thread and posts
`StoreWritten`. The TUI's own commits do not move its connection's `data_version`, so a successful
write tells the app to refresh every view. Resume (`gfattn pipeline --resume`), export (`gfattn
export`) and figures (`gfattn plot`) are started detached by `launcher`, like a new run.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Callable

from textual import work

from gfattn_tui.launcher import EXPORT_FORMATS, default_out_dir
from gfattn_tui.messages import StoreWritten
from gfattn_tui.screens.confirm import ConfirmScreen
from gfattn_tui.screens.prompt import PromptScreen
from gfattn_tui.widgets.store_view import StoreBacked

# screen actions that write the store or act on runs: greyed in the footer, and refused with a notice,
# over a read-only store
READ_ONLY_REFUSED = {
    "new_run": "launching runs",
    "stop": "stopping runs",
    "tag": "tagging",
    "note": "notes",
    "delete": "deleting runs",
    "resume": "resuming runs",
}


class RunActions(StoreBacked):
    """Mixin for screens; needs `post_message`, `app` and `push_screen` from `Screen`."""

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Keys that need a writable store are greyed (disabled) over a read-only one."""
        if action in READ_ONLY_REFUSED and getattr(self.app, "read_only", False):
            return None
        return True

    def on_key(self, event) -> None:
        """A greyed write key still says why it does nothing."""
        if not getattr(self.app, "read_only", False):
            return
        active = self.active_bindings.get(event.key)  # type: ignore[attr-defined]
        if active is not None and not active.enabled and active.binding.action in READ_ONLY_REFUSED:
            event.stop()
            self.app._refuse_read_only(READ_ONLY_REFUSED[active.binding.action])

    @work(thread=True, exit_on_error=False, group="store-write", name="store write")
    def write_store(self, fn: Callable, summary: str) -> None:
        self.client.call(fn)
        self.post_message(StoreWritten(summary))

    def on_store_written(self, message: StoreWritten) -> None:
        self.app.notify(message.summary, title="Saved", timeout=3)
        self.app.notify_store_changed()

    def ask_tag(self, run_ids: list[int]) -> None:
        if not run_ids:
            return
        who = f"run {run_ids[0]}" if len(run_ids) == 1 else f"{len(run_ids)} runs"

        def done(text: str | None) -> None:
            tags = [t for t in (text or "").replace(",", " ").split() if t.strip("-")]
            if not tags:
                return

            def apply(st) -> None:
                for rid in run_ids:
                    for tag in tags:
                        if tag.startswith("-"):
                            st.remove_tag(rid, tag[1:])
                        else:
                            st.add_tag(rid, tag)

            self.write_store(apply, f"tags {' '.join(tags)} on {who}")

        self.app.push_screen(
            PromptScreen(f"Tags for {who}", placeholder="baseline keep", hint="space-separated; -tag removes a tag"),
            done,
        )

    def ask_note(self, run_id: int, current: str = "") -> None:
        def done(text: str | None) -> None:
            if text is None:
                return
            self.write_store(lambda st: st.set_note(run_id, text), f"note on run {run_id}")

        self.app.push_screen(PromptScreen(f"Note for run {run_id}", value=current or "", placeholder="free text"), done)

    def ask_delete(self, runs: list[dict], after: Callable[[], None] | None = None) -> None:
        if not runs:
            return
        names = ", ".join(f"{r['id']} {r.get('name', '')}" for r in runs[:5]) + (" …" if len(runs) > 5 else "")
        running = [r for r in runs if r.get("status") == "running"]
        detail = "Everything they own (child runs, metrics, tables) is deleted."
        if running:
            detail += f"\n{len(running)} of them still running: stop them first or their writes will fail."

        def done(yes: bool | None) -> None:
            if not yes:
                return
            ids = [int(r["id"]) for r in runs]

            def apply(st) -> None:
                import shutil

                from pipeline.paths import run_folders

                for rid in ids:
                    owned = run_folders(st, rid)  # its checkpoints under .gfattn-cache go with it
                    st.delete_run(rid)
                    for folder in owned:
                        shutil.rmtree(folder, ignore_errors=True)

            self.write_store(apply, f"deleted {len(ids)} run{'s' if len(ids) != 1 else ''}")
            if after:
                after()

        self.app.push_screen(ConfirmScreen(f"Delete {names}?", detail, yes="Delete"), done)

    def ask_stop(self, run: dict) -> None:
        """SIGTERM a running run's process (its `track` marks it interrupted), when it runs on this host."""
        if run.get("status") != "running":
            self.app.notify(f"run {run['id']} is {run.get('status')}, not running", severity="warning")
            return
        pid, host = run.get("pid"), run.get("host")
        if not pid:
            self.app.notify(f"run {run['id']} has no recorded process id", severity="warning")
            return
        if host and host != socket.gethostname():
            self.app.notify(f"run {run['id']} runs on {host}; stop it there (pid {pid})", severity="warning")
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                self.app.notify(f"process {pid} is gone; the run will show as lost", severity="warning")
            except PermissionError as exc:
                self.app.report_error(exc, where=f"stop run {run['id']}")
            else:
                self.app.stopped_pids.add(int(pid))
                self.app.notify(f"sent SIGTERM to pid {pid}; the run will read as interrupted", title="Stopping")

        self.app.push_screen(
            ConfirmScreen(f"Stop run {run['id']} {run.get('name', '')}?", f"Sends SIGTERM to pid {pid}.", yes="Stop"),
            done,
        )

    def ask_resume(self, run: dict) -> None:
        """`gfattn pipeline --resume RUN`: a failed, interrupted or lost pipeline run continues."""
        rid = int(run["id"])
        if run.get("kind") not in (None, "pipeline"):
            parent = run.get("parent_id")
            where = f"; resume its pipeline run {parent}" if parent is not None else ""
            self.app.notify(f"run {rid} is a {run.get('kind')} run{where}", severity="warning")
            return
        if run.get("status") not in RESUMABLE:
            self.app.notify(f"run {rid} is {run.get('status')}; only failed, interrupted or lost runs resume")
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.app.start_resume(rid)

        detail = "Runs `gfattn pipeline --resume` detached: finished stages are reused, the rest are redone."
        self.app.push_screen(ConfirmScreen(f"Resume run {rid} {run.get('name', '')}?", detail, yes="Resume"), done)

    def ask_export(self, run: dict) -> None:
        """`gfattn export RUN --format F --out DIR`, asked as one line "FORMAT DIR"."""
        rid = int(run["id"])
        out = default_out_dir(self.app.store_path, rid, "export")

        def done(text: str | None) -> None:
            if not text or not text.strip():
                return
            fmt, _, folder = text.strip().partition(" ")
            if fmt not in EXPORT_FORMATS:
                self.app.notify(f"format must be one of {', '.join(EXPORT_FORMATS)}", severity="warning")
                return
            self.app.start_export(rid, fmt, folder.strip() or out)

        hint = (
            f"FORMAT [FOLDER]; formats {', '.join(EXPORT_FORMATS)}; every table of the run and its children; "
            "the folder is under the current folder unless you give another"
        )
        self.app.push_screen(PromptScreen(f"Export run {rid}", value=f"csv {out}", hint=hint), done)

    def ask_plot(self, run: dict) -> None:
        """`gfattn plot RUN --out DIR`, asked for the folder."""
        rid = int(run["id"])
        out = default_out_dir(self.app.store_path, rid, "figures")

        def done(text: str | None) -> None:
            if text is not None:
                self.app.start_plot(rid, text.strip() or out)

        hint = "the thesis's figures of this run, drawn by `gfattn plot`, into a folder under the current folder"
        self.app.push_screen(PromptScreen(f"Figures of run {rid} into", value=str(out), hint=hint), done)


RESUMABLE = ("failed", "interrupted", "lost")
