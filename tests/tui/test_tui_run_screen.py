"""Pilot tests of a run's tabs (Overview ... Data), the gene table's paging, sorting, search and filter,
and the comparison of two runs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from textual.widgets import DataTable, Input, OptionList, RichLog, Static

from gfattn_tui.screens.compare import CompareScreen
from gfattn_tui.screens.run import TABS, RunScreen
from gfattn_tui.widgets.attention import AttentionView
from gfattn_tui.widgets.confusion_matrix import ConfusionMatrix
from gfattn_tui.widgets.data_view import DataView
from gfattn_tui.widgets.de import DEView
from gfattn_tui.widgets.gene_table import GeneTable
from gfattn_tui.widgets.genes import GenesView
from gfattn_tui.widgets.head_grid import HeadGrid
from gfattn_tui.widgets.overview import OverviewView
from gfattn_tui.widgets.ranks import RanksView
from gfattn_tui.widgets.training import TrainingView

from tests._helpers_tui import make_app, settle, tui_store  # noqa: F401  (fixture)

SIZE = (100, 30)


async def open_run(app, pilot, run_id: int, tab: str = "overview") -> RunScreen:
    await settle(pilot)
    screen = RunScreen(run_id, tab=tab)
    await app.push_screen(screen)
    await settle(pilot)
    return screen


async def show_tab(pilot, key: str) -> None:
    await pilot.press(str([k for k, _, _ in TABS].index(key) + 1))
    await settle(pilot)


def static_text(widget: Static) -> str:
    """What a Static shows, as plain text (rich renderables printed wide enough not to wrap)."""
    content = widget.content
    if isinstance(content, str):
        return content
    if hasattr(content, "plain"):
        return content.plain
    console = Console(width=400, file=io.StringIO(), record=True, color_system=None)
    console.print(content)
    return console.export_text()


@pytest.mark.asyncio
async def test_every_tab_of_a_pipeline_run(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline)

        overview = screen.query_one(OverviewView)
        assert overview.run["id"] == tui_store.pipeline
        assert screen.query_one("#ov-children", DataTable).row_count == 10
        screen.query_one("#ov-log-box").collapsed = False  # details are collapsed under the results
        await settle(pilot)
        assert len(screen.query_one("#ov-log", RichLog).lines) == 14
        assert not screen.query_one("#ov-error").display

        await show_tab(pilot, "training")
        training = screen.query_one(TrainingView)
        assert len(training.series) == 6
        assert {s["task"] for s in training.series} == {"dose", "lowhigh"}
        assert len(training.query(".plot-row")) == 2

        await show_tab(pilot, "confusion")
        matrices = list(screen.query(ConfusionMatrix))
        assert len(matrices) == 6
        assert matrices[0].labels == ["0", "1.25", "2.5", "12.5", "25"]  # dose order, not the stored order
        assert matrices[3].labels == ["low", "high"]
        assert matrices[0].accuracy == pytest.approx(0.55) and matrices[0].f1 == pytest.approx(0.53)
        assert "acc 0.550  macro-F1 0.530" in static_text(matrices[0])

        await show_tab(pilot, "attention")
        view = screen.query_one(AttentionView)
        grid = screen.query_one(HeadGrid)
        assert view.grid_name == "cosine"
        assert grid.row_count == 6 and len(grid.columns) == 5
        info = static_text(screen.query_one("#attn-info", Static))
        assert "layer 0  head 0" in info and "interval [" in info
        grid.focus()
        await pilot.press("right", "down")
        await settle(pilot)
        assert "layer 1  head 1" in static_text(screen.query_one("#attn-info", Static))
        options = screen.query_one("#attn-grids", OptionList)
        options.focus()
        await pilot.press("down", "down")
        await settle(pilot)
        assert view.grid_name == "norm_a"
        assert "no interval stored" in static_text(screen.query_one("#attn-info", Static))

        await show_tab(pilot, "ranks")
        ranks = screen.query_one(RanksView)
        assert len(ranks.data["a"]) == 256 and len(ranks.data["b"]) == 256
        assert ranks.data["diff_name"] == "rank_pct_diff"
        assert ranks.data["median"] is not None and ranks.data["names"] == ("frozen", "unfrozen")

        await show_tab(pilot, "genes")
        genes = screen.query_one(GenesView)
        assert genes.count == 2_000
        assert genes.order_by == "attn_scaled_b"
        assert screen.query_one(GeneTable).row_count == app.config.page_size

        await show_tab(pilot, "de")
        de = screen.query_one(DEView)
        text = static_text(screen.query_one("#de-results", Static))
        assert "Spearman" in text and "(p 1.0e-05***)" in text  # p-values in scientific notation, starred
        assert screen.query_one("#de-plot").display
        assert de.analysis_id == tui_store.analyses["dose"]

        await show_tab(pilot, "data")
        data = screen.query_one(DataView)
        assert len(data.data["cells"]["umap1"]) == 600
        assert data.data["qc"]["cells_kept"] == 600
        await pilot.press("c")
        await settle(pilot)
        assert data.colour_by == "group"

        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, RunScreen)


@pytest.mark.asyncio
async def test_gene_table_of_20000_genes_sorts_searches_filters_and_pages(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline, tab="genes")
        genes = screen.query_one(GenesView)
        table = screen.query_one(GeneTable)

        # the 20,000-gene table sits on the second analysis run
        picker = screen.query_one("#genes-analysis")
        picker.value = tui_store.analyses["lowhigh"]
        await settle(pilot)
        assert genes.count == 20_000
        first = [r["attn_scaled_b"] for r in table.rows_shown]
        assert first == sorted(first, reverse=True) and first[0] == pytest.approx(1.0)

        table.focus()
        page = app.config.page_size
        await pilot.press("right_square_bracket")
        await settle(pilot)
        assert genes.row_offset == page
        assert table.rows_shown[0]["attn_scaled_b"] <= first[-1]
        await pilot.press("right_curly_bracket")
        await settle(pilot)
        assert genes.row_offset == 20_000 - page and table.row_count == page
        await pilot.press("left_curly_bracket")
        await settle(pilot)
        assert genes.row_offset == 0

        # sort by the column under the cursor: symbol (column 2 after the row number and ensembl_id)
        assert genes.columns[0] == "symbol"  # pinned at the left, after the rank
        table.move_cursor(row=0, column=1)
        await pilot.press("o")
        await settle(pilot)
        assert genes.order_by == "symbol" and genes.descending is False
        symbols = [r["symbol"] for r in table.rows_shown]
        assert symbols == sorted(symbols)
        await pilot.press("o")
        await settle(pilot)
        assert genes.descending is True

        # search by symbol, then by Ensembl ID
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press("m", "d", "m", "2")
        await settle(pilot)
        assert genes.count == 1 and table.rows_shown[0]["symbol"] == "MDM2"
        search = screen.query_one("#genes-search", Input)
        search.value = "ENSG0000000001"
        await settle(pilot)
        assert genes.count == 10
        search.value = ""
        await settle(pilot)

        # filter: the reference set, by a condition line
        await pilot.press("escape", "f")
        await pilot.press(*"in_reference_set=1")
        await pilot.press("enter")
        await settle(pilot)
        assert genes.count == 10
        assert {r["in_reference_set"] for r in table.rows_shown} == {1}
        assert isinstance(app.focused, GeneTable)

        # a bad filter is explained and changes nothing
        flt = screen.query_one("#genes-filter", Input)
        flt.value = "nonsense > 1"
        await flt.action_submit()
        await settle(pilot)
        assert genes.count == 10


@pytest.mark.asyncio
async def test_failed_run_shows_its_error_in_full(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, tui_store.failed)
        box = screen.query_one("#ov-error", Static)
        assert box.display
        text = static_text(box)
        assert "obs column 'dose_value' is missing" in text and 'dose_column = "dose"' in text
        for key, _, _ in TABS[1:]:
            await show_tab(pilot, key)
        assert "No fine-tuning runs" in static_text(screen.query_one("#train-empty", Static))
        assert screen.query_one("#genes-empty").display


@pytest.mark.asyncio
async def test_running_run_shows_progress_eta_and_stages(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, tui_store.running)
        assert screen.query_one("#ov-progress").display
        label = str(screen.query_one("#ov-progress-label").render())
        assert "finetune: 40 / 120 steps" in label and "ETA 32s" in label
        stages = static_text(screen.query_one("#ov-stages", Static))
        assert "● finetune" in stages and "· summary" in stages


@pytest.mark.asyncio
async def test_child_runs_open_from_the_overview(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline)
        children = screen.query_one("#ov-children", DataTable)
        children.focus()
        await pilot.press("down", "enter")  # the first fine-tuning run
        await settle(pilot)
        child = app.screen
        assert isinstance(child, RunScreen) and child.run_id == tui_store.finetunes["dose/frozen"]
        await show_tab(pilot, "confusion")
        assert len(child.query(ConfusionMatrix)) == 1


@pytest.mark.asyncio
async def test_compare_two_runs(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = CompareScreen(tui_store.finetunes["dose/frozen"], tui_store.pipeline)
        await app.push_screen(screen)
        await settle(pilot)
        metrics = screen.query_one("#cmp-metrics-table", DataTable)
        rows = [[str(c) for c in metrics.get_row_at(i)] for i in range(metrics.row_count)]
        # the finetune is matched with the pipeline's fine-tuning of the same task/mode
        assert rows[0][4] == "dose/frozen" and rows[0][0] == "accuracy" and rows[0][3] == "+0.000"
        assert sum(1 for r in rows if r[0] in ("accuracy", "macro-F1")) == 12
        config = screen.query_one("#cmp-config-table", DataTable)
        keys = {str(config.get_row_at(i)[0]) for i in range(config.row_count)}
        assert {"task", "mode", "run.preset", "train.epochs"} <= keys

        await pilot.press("3")
        await settle(pilot)
        # the finetune run has no grids: nothing in common
        assert screen.grid_key is None

        screen.run_b = tui_store.pipeline
        screen.run_a = tui_store.pipeline
        screen.load()
        await settle(pilot)
        assert screen.grid_key == "dose: frozen vs unfrozen · cosine"
        grid = screen.query_one("#cmp-grid", HeadGrid)
        assert grid.row_count == 6
        assert "B − A +0.0000" in static_text(screen.query_one("#cmp-grid-info", Static))

        await pilot.press("4")
        await settle(pilot)
        assert screen.curve_key == "dose/frozen"
        await pilot.press("x")
        await settle(pilot)
        assert (screen.run_a, screen.run_b) == (tui_store.pipeline, tui_store.pipeline)
