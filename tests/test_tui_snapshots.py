"""SVG snapshots (pytest-textual-snapshot) of the runs list, the confusion tab, the attention grid and
the gene table at 100x30. The app's clock is frozen and timestamps are shown in UTC, the store path is
relative, and the change poll is off, so the pictures depend on nothing but the fixture store.
Regenerate with `pytest tests/test_tui_snapshots.py --snapshot-update` after an intended change."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfattn_tui.screens.run import RunScreen
from gfattn_tui.widgets.genes import GenesView

from _helpers_tui import copy_store, make_app, settle

SIZE = (100, 30)


@pytest.fixture
def snap_store(tmp_path, monkeypatch):
    ids = copy_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    return ids


def app_for(ids):
    return make_app(ids, store_path=Path("gfattn.db"), poll=False)


def open_tab(ids, tab: str, after=None):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.app.push_screen(RunScreen(ids.pipeline, tab=tab))
        await settle(pilot)
        if after is not None:
            await after(pilot)
            await settle(pilot)

    return run_before


def test_runs_list(snap_compare, snap_store):
    assert snap_compare(app_for(snap_store), terminal_size=SIZE, run_before=settle)


def test_confusion_tab(snap_compare, snap_store):
    assert snap_compare(app_for(snap_store), terminal_size=SIZE, run_before=open_tab(snap_store, "confusion"))


def test_attention_grid(snap_compare, snap_store):
    async def select_head(pilot) -> None:
        pilot.app.screen.query_one("#attn-grid").focus()
        await pilot.press("right", "right", "down")

    run_before = open_tab(snap_store, "attention", select_head)
    assert snap_compare(app_for(snap_store), terminal_size=SIZE, run_before=run_before)


def test_gene_table(snap_compare, snap_store):
    async def twenty_thousand_genes(pilot) -> None:
        pilot.app.screen.query_one(GenesView).query_one("#genes-analysis").value = snap_store.analyses["lowhigh"]
        await settle(pilot)
        pilot.app.screen.query_one("#genes-grid").focus()

    run_before = open_tab(snap_store, "genes", twenty_thousand_genes)
    assert snap_compare(app_for(snap_store), terminal_size=SIZE, run_before=run_before)
