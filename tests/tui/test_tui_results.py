"""Pilot tests of what a researcher reads first: the Overview's results, Compare of two analyses and two
finetunes, tables that fit 80 columns, tabs by run kind, one analysis choice, p-values, the DE table,
stop/resume/export and the keys dialog (the defects of "results first" reproduced and fixed)."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable, OptionList, Select, Static, TabbedContent

from gfattn_tui.screens.compare import CompareScreen
from gfattn_tui.screens.keys import KeysScreen
from gfattn_tui.screens.run import ALL_TABS, RunScreen
from gfattn_tui.screens.runs import RunsScreen, tree_order
from gfattn_tui.widgets.analysis_picker import AnalysisPicker
from gfattn_tui.widgets.confusion_matrix import ConfusionMatrix
from gfattn_tui.widgets.de import DEView
from gfattn_tui.widgets.gene_table import GeneTable
from gfattn_tui.widgets.genes import GenesView
from gfattn_tui.widgets.head_grid import HeadGrid
from gfattn_tui.widgets.runs_table import RunsTable, layout_columns

from tests._helpers_tui import make_app, settle, tui_store  # noqa: F401  (fixture)
from tests.tui.test_tui_run_screen import open_run, show_tab, static_text

SMALL = (80, 24)


async def push(app, pilot, screen):
    await settle(pilot)
    await app.push_screen(screen)
    await settle(pilot)
    return screen


def rows_of(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


@pytest.mark.asyncio
async def test_compare_two_analyses_matches_grids_ranks_and_key_genes(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await push(app, pilot, CompareScreen(tui_store.analyses["dose"], tui_store.analyses["lowhigh"]))
        rows = rows_of(screen.query_one("#cmp-metrics-table", DataTable))
        cosine = next(r for r in rows if r[0] == "mean cosine")
        assert cosine[1] != "—" and cosine[2] != "—" and cosine[3].startswith(("+", "-"))
        assert any(r[0] == "DE overlap k=50" for r in rows)
        # grids are matched by quantity although the analyses have different names
        assert screen.grid_key is not None and screen.grid_key.endswith("· cosine")
        assert screen.query_one("#cmp-grid", HeadGrid).row_count == 6
        assert "B − A" in static_text(screen.query_one("#cmp-grid-info", Static))
        assert screen.rank_key is not None
        genes = rows_of(screen.query_one("#cmp-genes-table", DataTable))
        assert len(genes) == 20 and genes[0][2] and genes[0][4]
        assert any(r[3] not in ("—", "") for r in genes)  # ranks in the other run's table


@pytest.mark.asyncio
async def test_compare_two_finetunes_of_one_task_aligns_metrics_curves_and_matrices(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        a, b = tui_store.finetunes["dose/frozen"], tui_store.finetunes["dose/unfrozen"]
        screen = await push(app, pilot, CompareScreen(a, b))
        rows = rows_of(screen.query_one("#cmp-metrics-table", DataTable))
        assert [r[0] for r in rows] == ["accuracy", "macro-F1", "best epoch"]
        assert rows[0][4] == "dose/frozen | dose/unfrozen"
        assert rows[0][1] == "0.550" and rows[0][2] == "0.840" and rows[0][3] == "+0.290"
        assert screen.curve_key == "dose/frozen | dose/unfrozen"
        assert len(screen.query("#cmp-confusion-body ConfusionMatrix")) == 2


@pytest.mark.asyncio
async def test_pipeline_overview_opens_on_results(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline)
        text = static_text(screen.query_one("#ov-results", Static))
        assert "accuracy" in text and "best epoch" in text and "lowhigh" in text
        assert "cosine frozen vs unfrozen: mean" in text and "per layer" in text
        assert "DE overlap" in text and "1.0e-05***" in text
        assert "key genes" in text


@pytest.mark.asyncio
async def test_finetune_and_de_runs_show_their_own_tabs_and_q_quits(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_run(app, pilot, tui_store.finetunes["dose/frozen"])
        tabs = screen.query_one(TabbedContent)
        assert screen.tab_keys == ("overview", "training", "confusion")
        assert "acc" in static_text(screen.query_one("#ov-results", Static))
        await pilot.press(str(ALL_TABS.index("attention") + 1))  # not a tab of a finetune
        await settle(pilot)
        assert tabs.active == "overview"
        await pilot.press("escape")
        screen = await push(app, pilot, RunScreen(tui_store.de))  # no tab asked: the kind's first
        assert screen.query_one(TabbedContent).active == "de"
        de = screen.query_one(DEView)
        assert de.rows and de.columns[:4] == ["symbol", "score", "logfoldchange", "pval_adj"]
        assert any(c.startswith("rank_") for c in de.columns)  # the attention rank per model
        await pilot.press("q")
        await settle(pilot)
        assert not app.is_running


@pytest.mark.asyncio
async def test_de_table_sorts_and_searches(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline, tab="de")
        de = screen.query_one(DEView)
        scores = [r["score"] for r in de.rows]
        assert scores == sorted(scores, reverse=True) and de.rows[0]["symbol"] in (
            "MDM2",
            "CDKN1A",
            "BAX",
            "FAS",
            "GDF15",
            "TP53I3",
            "RRM2B",
            "SESN1",
            "ZMAT3",
            "TNFRSF10B",
        )
        de.sort_by("pval_adj")
        assert de.descending is False
        de.query_one("#de-search").value = "mdm2"
        await settle(pilot)
        assert [r["symbol"] for r in de.rows] == ["MDM2"]


@pytest.mark.asyncio
async def test_genes_keep_symbol_and_sort_column_in_view_and_true_ranks(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline, tab="genes")
        genes = screen.query_one(GenesView)
        table = screen.query_one(GeneTable)
        assert table.fixed_columns == 2 and genes.columns[0] == "symbol"
        assert genes.columns.index(genes.order_by) <= 3  # the default sort column is on screen
        placeholder = screen.query_one("#genes-filter").placeholder
        from gfattn_tui.gene_filter import parse_gene_filter

        parse_gene_filter(placeholder.split(":", 1)[1], genes.columns)  # its own example works
        genes.search = "MDM2"
        genes.load()
        await settle(pilot)
        rank = str(table.get_row_at(0)[0])
        assert genes.count == 1 and rank != "1"  # its place in the whole ranking, not on the page


@pytest.mark.asyncio
async def test_confusion_matrices_all_on_screen_at_80_columns(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline, tab="confusion")
        matrices = list(screen.query(ConfusionMatrix))
        assert len(matrices) == 6
        for m in matrices:
            assert m.region.right <= 80 and m.region.width > 0
            assert "macro-F1 0.5" in static_text(m) or "macro-F1 0." in static_text(m)
            text = static_text(m)
            assert all(len(line) <= m.region.width for line in text.splitlines())


@pytest.mark.asyncio
async def test_runs_list_fits_80_columns_and_tree_of_children(tui_store):
    assert [k for k, _, _ in layout_columns(80)] == ["status", "id", "name", "duration", "headline"]
    assert {"started", "data", "model"} <= {k for k, _, _ in layout_columns(160)}
    assert dict((k, w) for k, _, w in layout_columns(160))["name"] > 18
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        table = app.screen.query_one(RunsTable)
        assert "dose unfrozen F1 0.82" in str(table.get_cell(str(tui_store.pipeline), "headline"))
        label = str(app.screen.query_one("#runs-filters").render())
        assert label.endswith("4/4")
        await pilot.press("a")
        await settle(pilot)
        shown = [int(r["id"]) for r in app.screen.shown]
        at = shown.index(tui_store.pipeline)
        assert shown[at + 1] == tui_store.data  # children follow their parent
        assert str(table.get_cell(str(tui_store.analyses["lowhigh"]), "name")).startswith("└ ")
        assert str(table.get_cell(str(tui_store.data), "name")).startswith("├ ")
    runs = [{"id": 3, "parent_id": 1}, {"id": 2}, {"id": 1}, {"id": 4, "parent_id": 1}]
    assert [r["id"] for r in tree_order(runs)] == [2, 1, 3, 4]


@pytest.mark.asyncio
async def test_runs_sort_by_metric(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        while app.screen.sort_key != "metric":
            await pilot.press("s")
        assert app.screen.shown[0]["id"] == tui_store.pipeline  # the one run with a metric first


@pytest.mark.asyncio
async def test_attention_p_values_in_scientific_notation_and_grid_names(tui_store):
    from store import Store

    with Store(tui_store.path) as st:
        import numpy as np

        p = np.full((6, 4), 0.5)
        p[0, 0] = 0.0005
        st.put_grid(tui_store.analyses["dose"], "p_value_adj", p)
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline, tab="attention")
        options = screen.query_one("#attn-grids", OptionList)
        labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert "cosine similarity" in labels and "norm frozen" in labels and "p centre (BH adj.)" in labels
        view = screen.query_one("#view-attention")
        view.grid_name = "p_value_adj"
        view.load()
        await settle(pilot)
        grid = screen.query_one(HeadGrid)
        assert "5.0e-04***" in str(grid.get_cell_at((0, 1)))
        assert "1 of 24 heads with p < 0.05" in static_text(screen.query_one("#attn-summary", Static))


@pytest.mark.asyncio
async def test_one_analysis_choice_for_every_tab_and_no_blank_option(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_run(app, pilot, tui_store.pipeline, tab="attention")
        picker = screen.query_one("#attn-analysis", AnalysisPicker)
        assert Select.BLANK not in [v for _, v in picker._options]
        picker.value = tui_store.analyses["lowhigh"]
        await settle(pilot)
        await show_tab(pilot, "ranks")
        assert screen.query_one("#ranks-analysis", AnalysisPicker).value == tui_store.analyses["lowhigh"]
        assert screen.analysis_id == tui_store.analyses["lowhigh"]


@pytest.mark.asyncio
async def test_progress_of_an_ended_stage_is_not_shown(tui_store):
    from store import Store

    with Store(tui_store.path) as st:
        st.set_progress(tui_store.running, "model", 28, 34, unit="steps", eta_s=0.0)
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_run(app, pilot, tui_store.running)
        label = str(screen.query_one("#ov-progress-label").render())
        assert "model" not in label and "stage 4 of 7" in label


@pytest.mark.asyncio
async def test_stop_is_shown_and_a_stopped_run_is_no_failure(tui_store, monkeypatch):
    app = make_app(tui_store, poll=False)
    notes = []
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        footer_keys = {b.binding.key for b in app.screen.active_bindings.values() if b.binding.show}
        assert "k" in footer_keys

        class Done:
            pid, what, out_dir, log_path = 4242, "run", None, "x.log"

            def poll(self):
                return 130

            def log_tail(self, n):
                return "run 20 interrupted; resume with: gfattn pipeline --resume 20"

        monkeypatch.setattr(app, "notify", lambda msg, **kw: notes.append((msg, kw)))
        app.launched.append(Done())
        app._reap_launched()
        msg, kw = notes[-1]
        assert kw["title"] == "Run stopped" and "press R" in msg and "failed" not in msg.lower()


@pytest.mark.asyncio
async def test_resume_export_and_figures_start_the_cli(tui_store, monkeypatch):
    from gfattn_tui import app as app_module
    from gfattn_tui.launcher import export_argv, plot_argv, resume_argv

    started = []
    for name in ("start_resume", "start_export", "start_plot"):
        monkeypatch.setattr(app_module, name, lambda *a, _n=name, **kw: started.append((_n, a)) or _Fake())
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.screen.query_one(RunsTable).select_run(tui_store.failed)
        await pilot.press("R")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
        assert started[-1][0] == "start_resume" and started[-1][1][0] == tui_store.failed
        await pilot.press("e")
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert started[-1][0] == "start_export" and started[-1][1][2] == "csv"
        await pilot.press("p")
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert started[-1][0] == "start_plot"
    assert resume_argv(7, "s.db")[3:] == ["pipeline", "--resume", "7", "--store", "s.db"]
    assert export_argv(7, "s.db", "json", "out")[3:] == [
        "export",
        "7",
        "--format",
        "json",
        "--out",
        "out",
        "--store",
        "s.db",
    ]
    assert plot_argv(7, "s.db", "figs")[3:] == ["plot", "7", "--out", "figs", "--store", "s.db"]


class _Fake:
    pid, what, out_dir, log_path = 1, "x", None, "x.log"

    def poll(self):
        return None


@pytest.mark.asyncio
async def test_question_mark_lists_the_keys_of_the_screen(tui_store):
    app = make_app(tui_store, poll=False)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)
        assert isinstance(app.screen, KeysScreen)
        described = {d for _, d, _ in app.screen.keys}
        assert {"Stop", "Resume", "Export", "Compare", "Sort"} <= described
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, RunsScreen)
        screen = await open_run(app, pilot, tui_store.pipeline, tab="genes")
        screen.query_one(GeneTable).focus()
        await pilot.press("question_mark")
        await settle(pilot)
        assert "Sort" in {d for _, d, _ in app.screen.keys}
        assert isinstance(screen, RunScreen)
