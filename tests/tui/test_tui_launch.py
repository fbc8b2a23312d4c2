"""The New run form: validation, a detached launch with its own session and log file, and the real
`gfattn pipeline --preset quick` (with a config of overrides) started from the form and followed in the runs list until it ends."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gfattn_tui.config import TuiConfig
from gfattn_tui.launcher import RunRequest, log_dir_for_store
from gfattn_tui.screens.new_run import NewRunScreen
from gfattn_tui.screens.runs import RunsScreen
from gfattn_tui.widgets.runs_table import RunsTable
from store import Store

from tests._helpers_tui import make_app, settle

SIZE = (100, 30)


def _smaller_quick(folder: Path) -> Path:
    path = folder / "tui-demo.toml"
    path.write_text(
        "[data]\numap = false\n[train]\nepochs = 1\nmin_steps = 0\n[analysis]\nmax_cells = 40\nn_boot = 20\n"
        "deletion_k = [5]\ndeletion_random_sets = 3\ndeletion_top_genes = 5\nig_steps = 8\nig_max_steps = 16\n"
    )
    return path


class EmptyStore:
    def __init__(self, path: Path):
        self.path = path


def _kill_leftovers(app) -> None:
    for launched in list(app.launched):
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGTERM)
            launched.process.wait(timeout=30)


@pytest.mark.asyncio
async def test_form_refuses_missing_files_and_cancels(tmp_path):
    app = make_app(EmptyStore(tmp_path / "gfattn.db"), poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "No runs in" in str(app.screen.query_one("#runs-empty").content)
        await pilot.press("N")
        await settle(pilot)
        form = app.screen
        assert isinstance(form, NewRunScreen)
        form.query_one("#nr-data").value = str(tmp_path / "missing.h5ad")
        form.query_one("#nr-epochs").value = "2"
        await pilot.pause()
        command = str(form.query_one("#nr-command").content)
        assert command.startswith("gfattn pipeline --store") and "--data" in command and "--epochs 2" in command
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert app.screen is form
        assert "missing.h5ad does not exist" in str(form.query_one("#nr-problems").content)
        assert app.launched == []
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, RunsScreen)


@pytest.mark.asyncio
async def test_form_starts_a_detached_run_that_the_list_follows(tmp_path, monkeypatch):
    """The command is replaced by a stand-in that records a run from its own process and session."""
    store_path = tmp_path / "gfattn.db"
    script = textwrap.dedent(f"""
        import os, sys
        from store import Store
        print("session leader:", os.getsid(0) == os.getpid(), flush=True)
        with Store({str(store_path)!r}) as st:
            rid = st.create_run("stand-in", "pipeline", {{"run": {{"preset": "quick"}}}})
            st.finish_run(rid, "completed")
    """)
    monkeypatch.setattr(RunRequest, "argv", lambda self, store: [sys.executable, "-c", script])
    app = make_app(EmptyStore(store_path), config=TuiConfig(utc=True, poll_interval=0.05))
    started = []
    launch = app.launch_run
    app.launch_run = lambda request, **kw: started.append(launch(request, **kw)) or started[-1]
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("N")
        await settle(pilot)
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert isinstance(app.screen, RunsScreen)
        launched = started[0]
        deadline = time.monotonic() + 90  # a loaded CI machine may take a while to start Python
        while time.monotonic() < deadline:
            await pilot.pause(0.1)
            if not app.launched and app.screen.runs:
                break
        await settle(pilot)
        assert app.launched == []  # exited and reaped
        assert [r["name"] for r in app.screen.runs] == ["stand-in"]
        assert app.screen.query_one(RunsTable).selected_run_id() == app.screen.runs[0]["id"]
    log = launched.log_path
    assert log.parent == log_dir_for_store(store_path)
    assert "session leader: True" in log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.asyncio
async def test_quick_run_with_a_config_started_from_the_form_finishes_in_the_list(quick_run):
    """The form's quick preset with a config file of overrides (the quick run made smaller: one epoch, no
    minimum of steps, no UMAP, fewer cells and deletion sets), started into a store beside the session's quick run (its data,
    embedded model and tokenization cached there; the run keeps checkpoints of its own), is followed live to
    its end, and the run it records is the preset with the file's overrides."""
    try:
        import pipeline.commands.pipeline  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"`gfattn pipeline` is not available in this checkout ({exc})")
    db = quick_run[0].with_name("tui-demo.db")
    # the list polls the store once a second: the run it follows keeps the cores
    app = make_app(EmptyStore(db), config=TuiConfig(utc=True, poll_interval=1.0))
    async with app.run_test(size=SIZE) as pilot:
        try:
            await settle(pilot)
            await pilot.press("N")
            await settle(pilot)
            form = app.screen
            # choose the preset with the keyboard: open the select, move to "quick", confirm
            await pilot.press("enter")
            await pilot.pause(0.2)
            order = list(form.presets)
            await pilot.press(*["down"] * (order.index("quick") - order.index(form.initial_preset)), "enter")
            await pilot.pause(0.2)
            assert form.query_one("#nr-preset").value == "quick"
            form.query_one("#nr-config").value = str(_smaller_quick(db.parent))
            await pilot.pause()
            assert "--config" in str(form.query_one("#nr-command").content)
            await pilot.press("ctrl+s")
            await settle(pilot)
            assert isinstance(app.screen, RunsScreen)
            launched = app.launched[0]  # the demo runs for many seconds: still there

            seen: set[str] = set()
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                await pilot.pause(1.0)
                runs = app.screen.runs
                seen |= {r["status"] for r in runs}
                if runs and runs[0]["status"] != "running" and not app.launched:
                    break
            await settle(pilot)
            runs = app.screen.runs
            assert runs, f"no run appeared; log:\n{launched.log_tail(30)}"
            assert runs[0]["kind"] == "pipeline" and runs[0]["status"] == "completed", launched.log_tail(30)
            assert "running" in seen  # it was followed live, not only found at the end
            assert app.screen.details[runs[0]["id"]]["preset"] == "quick"
            config = Store(db).get_run(runs[0]["id"])["config"]
            assert config["train"]["epochs"] == 1 and config["data"]["umap"] is False
        finally:
            _kill_leftovers(app)
