"""Pilot tests of the runs list: live statuses, filters, search, sorting, tagging, notes, deletion,
themes, the command palette, remapped keys and a store with 200 runs."""

from __future__ import annotations

import pytest

from gfattn_tui.config import TuiConfig
from gfattn_tui.screens.confirm import ConfirmScreen
from gfattn_tui.screens.prompt import PromptScreen
from gfattn_tui.screens.runs import RunsScreen
from gfattn_tui.widgets.runs_table import RunsTable

from tests._helpers_tui import copy_store, make_app, settle, tui_store  # noqa: F401  (fixture)

SIZE = (100, 30)


def shown_ids(app) -> list[int]:
    return list(app.screen.query_one(RunsTable).run_ids)


async def type_text(pilot, text: str) -> None:
    await pilot.press(*[{" ": "space"}.get(c, c) for c in text])


@pytest.mark.asyncio
async def test_runs_list_shows_every_status_and_details(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        status = {r["id"]: r["status"] for r in screen.runs}
        assert status == {
            tui_store.running: "running",
            tui_store.lost: "lost",
            tui_store.failed: "failed",
            tui_store.pipeline: "completed",
        }
        # newest first
        assert shown_ids(app) == [tui_store.running, tui_store.lost, tui_store.failed, tui_store.pipeline]
        demo = screen.details[tui_store.pipeline]
        assert demo["preset"] == "quick"
        assert demo["headline"].startswith("dose unfrozen F1 0.82")
        table = app.screen.query_one(RunsTable)
        cell = lambda key: str(table.get_cell(str(tui_store.pipeline), key))  # noqa: E731
        assert "demo" in cell("name") and "quick" in cell("preset") and "13m50s" in cell("duration")
        assert screen.details[tui_store.failed]["data_path"] == "/data/sciplex2.h5ad"


@pytest.mark.asyncio
async def test_filter_by_status_search_and_tag(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f")
        assert shown_ids(app) == [tui_store.running]
        await pilot.press("f", "f", "f", "f")
        assert app.screen.status_filter == "lost"
        assert shown_ids(app) == [tui_store.lost]
        await pilot.press("f")
        assert len(shown_ids(app)) == 4

        await pilot.press("slash")
        await type_text(pilot, "crash")
        assert shown_ids(app) == [tui_store.lost]
        await pilot.press("escape")
        assert isinstance(app.focused, RunsTable)
        app.screen.query_one("#runs-search").value = ""
        await pilot.pause()
        assert len(shown_ids(app)) == 4

        await pilot.press("g")
        await settle(pilot)
        assert isinstance(app.screen, PromptScreen)
        await type_text(pilot, "baseline")
        await pilot.press("enter")
        await settle(pilot)
        assert shown_ids(app) == [tui_store.pipeline]


@pytest.mark.asyncio
async def test_sort_cycles_and_reverses(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("s")  # by name, A-Z
        assert app.screen.sort_key == "name"
        names = [r["name"] for r in app.screen.shown]
        assert names == sorted(names, key=str.lower)
        await pilot.press("S")
        assert [r["name"] for r in app.screen.shown] == sorted(names, key=str.lower, reverse=True)
        await pilot.press("s", "s")  # duration, longest first
        assert app.screen.sort_key == "duration"
        assert shown_ids(app)[0] == tui_store.running


@pytest.mark.asyncio
async def test_tag_note_and_delete_with_confirmation(tui_store):
    from store import Store

    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.screen.query_one(RunsTable)
        assert table.select_run(tui_store.failed)

        await pilot.press("t")
        await settle(pilot)
        await type_text(pilot, "needs-fix later")
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        await type_text(pilot, "dose column")
        await pilot.press("enter")
        await settle(pilot)
        run = next(r for r in app.screen.runs if r["id"] == tui_store.failed)
        assert run["tags"] == ["later", "needs-fix"]
        assert run["note"] == "dose column"

        # delete asks first; "n" keeps the run
        table.select_run(tui_store.lost)
        await pilot.press("d")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await settle(pilot)
        assert tui_store.lost in shown_ids(app)

        await pilot.press("d")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
        assert tui_store.lost not in shown_ids(app)

    with Store(tui_store.path) as st:
        assert st.get_run(tui_store.failed)["note"] == "dose column"
        assert tui_store.lost not in {r["id"] for r in st.list_runs()}


@pytest.mark.asyncio
async def test_mark_two_runs_and_compare(tui_store):
    from gfattn_tui.screens.compare import CompareScreen

    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("c")  # nothing marked: a hint, no screen
        assert isinstance(app.screen, RunsScreen)
        app.screen.query_one(RunsTable).select_run(tui_store.failed)
        await pilot.press("space")
        assert app.screen.marked == {tui_store.failed}
        app.screen.query_one(RunsTable).select_run(tui_store.pipeline)
        await pilot.press("c")
        await settle(pilot)
        assert isinstance(app.screen, CompareScreen)
        assert (app.screen.run_a, app.screen.run_b) == (tui_store.failed, tui_store.pipeline)


@pytest.mark.asyncio
async def test_theme_toggle(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.theme == "textual-dark"
        await pilot.press("ctrl+t")
        assert app.theme == "textual-light"
        assert not app.current_theme.dark
        await pilot.press("ctrl+t")
        assert app.theme == "textual-dark"


@pytest.mark.asyncio
async def test_every_binding_is_a_palette_command(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+p")
        await settle(pilot)
        await type_text(pilot, "Status filter")
        await pilot.pause(0.3)
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, RunsScreen)
        assert app.screen.status_filter == "running"


@pytest.mark.asyncio
async def test_keys_are_remappable_by_binding_id(tui_store):
    app = make_app(tui_store, poll=False, config=TuiConfig(utc=True, keymap={"runs.delete": "x"}))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("d")
        await settle(pilot)
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("x")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)


@pytest.mark.asyncio
async def test_store_changes_from_another_process_show_up(tui_store):
    from store import Store

    app = make_app(tui_store, config=TuiConfig(utc=True, poll_interval=0.05))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.pause(0.2)
        with Store(tui_store.path) as st:
            rid = st.create_run("from-elsewhere", "pipeline", {"run": {"preset": "quick"}})
            st.finish_run(rid, "completed")
        for _ in range(50):
            await pilot.pause(0.05)
            await settle(pilot, rounds=1)
            if rid in shown_ids(app):
                break
        assert shown_ids(app)[0] == rid


@pytest.mark.asyncio
async def test_two_hundred_runs_open_and_fill_in(tmp_path):
    ids = copy_store(tmp_path, n_genes=100, extra_runs=200)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, rounds=5)
        assert len(shown_ids(app)) == 204
        screen = app.screen
        assert all(rid in screen.details for rid in ids.extra)
        assert screen.details[ids.extra[0]]["headline"].startswith("dose ")
        await pilot.press("g")
        await settle(pilot)
        await type_text(pilot, "sweep")
        await pilot.press("enter")
        await settle(pilot)
        assert len(shown_ids(app)) == 100


@pytest.mark.asyncio
async def test_a_store_being_written_never_reports_an_error(tui_store):
    """A writer committing as fast as it can (as a pipeline logging steps) while the app polls and
    reloads: reads go on in WAL mode and nothing reaches the error path ("database is locked")."""
    import subprocess
    import sys
    import textwrap

    from gfattn_tui.screens.run import RunScreen

    writer = textwrap.dedent(f"""
        import time
        from store import Store
        with Store({str(tui_store.path)!r}) as st:
            end = time.time() + 4
            step = 0
            while time.time() < end:
                step += 1
                st.log_metric({tui_store.running}, "loss", 1.0 / step, step=step, split="train")
                st.log_event({tui_store.running}, f"step {{step}}", stage="finetune")
                st.set_progress({tui_store.running}, "finetune", step, 10_000, unit="steps")
    """)
    app = make_app(tui_store, config=TuiConfig(utc=True, poll_interval=0.05))
    errors = []
    app.report_error = lambda error, where="": errors.append((where, error))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await app.push_screen(RunScreen(tui_store.running))
        proc = subprocess.Popen([sys.executable, "-c", writer])
        try:
            while proc.poll() is None:
                await pilot.pause(0.1)
        finally:
            proc.wait(timeout=60)
        await settle(pilot)
        assert proc.returncode == 0
        assert app.data_version is not None
        log = app.screen.query_one("#ov-log")
        assert len(log.lines) > 3
    assert errors == []
