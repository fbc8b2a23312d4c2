"""SVG snapshots (pytest-textual-snapshot) at 80x24 and 120x40 of the runs list, a pipeline's Overview,
the Genes and Confusion tabs, and Compare of two analyses and of two finetunes; the attention grid at
100x30. The app's clock is frozen and timestamps are shown in UTC, the store path is relative, and the
change poll is off, so the pictures depend on nothing but the fixture store.
Regenerate with `pytest tests/tui/test_tui_snapshots.py --snapshot-update` after an intended change."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfattn_tui.screens.compare import CompareScreen
from gfattn_tui.screens.run import RunScreen
from gfattn_tui.widgets.genes import GenesView

from tests._helpers_tui import copy_store, make_app, settle

SIZES = {"80x24": (80, 24), "120x40": (120, 40)}


@pytest.fixture
def snap_store(tmp_path, monkeypatch):
    import sqlite3

    ids = copy_store(tmp_path, with_de=True)
    # the Overview shows the host, pid, git commit and package versions of the process that built the
    # store: fix them
    with sqlite3.connect(ids.path) as conn:
        conn.execute(
            "UPDATE runs SET host = 'lab-host', pid = 4242, git_commit = '0123abcd', versions = NULL "
            "WHERE status != 'running'"
        )
    monkeypatch.chdir(tmp_path)
    return ids


def app_for(ids):
    return make_app(ids, store_path=Path("gfattn.db"), poll=False)


def open_tab(ids, tab: str, after=None):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.app.push_screen(RunScreen(ids.pipeline, tab=tab))
        await settle(pilot)
        await pilot.pause(0.2)  # the log lays out its lines once it has its size
        await settle(pilot)
        if after is not None:
            await after(pilot)
            await settle(pilot)

    return run_before


def compare(a: int, b: int):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.app.push_screen(CompareScreen(a, b))
        await settle(pilot)

    return run_before


@pytest.mark.parametrize("size", SIZES)
def test_runs_list(snap_compare, snap_store, size):
    assert snap_compare(app_for(snap_store), terminal_size=SIZES[size], run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_pipeline_overview(snap_compare, snap_store, size):
    run_before = open_tab(snap_store, "overview")
    assert snap_compare(app_for(snap_store), terminal_size=SIZES[size], run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_confusion_tab(snap_compare, snap_store, size):
    run_before = open_tab(snap_store, "confusion")
    assert snap_compare(app_for(snap_store), terminal_size=SIZES[size], run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_gene_table(snap_compare, snap_store, size):
    async def twenty_thousand_genes(pilot) -> None:
        pilot.app.screen.query_one(GenesView).query_one("#genes-analysis").value = snap_store.analyses["lowhigh"]
        await settle(pilot)
        pilot.app.screen.query_one("#genes-grid").focus()

    run_before = open_tab(snap_store, "genes", twenty_thousand_genes)
    assert snap_compare(app_for(snap_store), terminal_size=SIZES[size], run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_compare_two_analyses(snap_compare, snap_store, size):
    run_before = compare(snap_store.analyses["dose"], snap_store.analyses["lowhigh"])
    assert snap_compare(app_for(snap_store), terminal_size=SIZES[size], run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_compare_two_finetunes(snap_compare, snap_store, size):
    run_before = compare(snap_store.finetunes["dose/frozen"], snap_store.finetunes["dose/unfrozen"])
    assert snap_compare(app_for(snap_store), terminal_size=SIZES[size], run_before=run_before)


def test_attention_grid(snap_compare, snap_store):
    async def select_head(pilot) -> None:
        pilot.app.screen.query_one("#attn-grid").focus()
        await pilot.press("right", "right", "down")

    run_before = open_tab(snap_store, "attention", select_head)
    assert snap_compare(app_for(snap_store), terminal_size=(100, 30), run_before=run_before)
