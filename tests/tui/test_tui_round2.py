"""Pilot tests of the TUI's second round, each at 80x24 and 120x40: a failed launch shows its error and
reopens the form filled in, the form refuses what the pipeline refuses (gene symbols without
dictionaries), export over a read-only store writes its files where the user can write, write keys are
greyed there, the Overview holds results and no raw record (baselines, did-not-learn marks, warnings,
p floors, model names) and scrolls at once, progress counts the whole run's stages with a whole-run ETA
that keeps its unit, the runs list names task, mode and macro-F1."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from textual.widgets import Static

from gfattn_tui.launcher import _start
from gfattn_tui.screens.new_run import NewRunScreen
from gfattn_tui.screens.runs import RunsScreen
from gfattn_tui.widgets.overview import OverviewView
from gfattn_tui.widgets.runs_table import RunsTable, layout_columns

from tests import REPO
from tests._helpers_tui import copy_store, make_app, settle
from tests.tui.test_tui_run_screen import open_run

SIZES = {"80x24": (80, 24), "120x40": (120, 40)}
SYMBOL_ERROR = "genes are named by symbol"


def _h5ad(path: Path, var_names: list[str]) -> Path:
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n = 24
    obs = pd.DataFrame({"guide": np.repeat(["control", "ZAP70_1", "LCK_1"], 8)}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=var_names)
    X = sp.csr_matrix(rng.poisson(1.0, size=(n, len(var_names))).astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return path


def all_text(widget) -> str:
    """Every Static's content under `widget`, collapsed ones included, as plain text."""
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    parts = []
    statics = [widget] if isinstance(widget, Static) else list(widget.query(Static))
    for static in statics:
        console.print(static.content if hasattr(static, "content") else static.renderable)
        parts.append(console.export_text())
    return "\n".join(parts)


# ----------------------------------------------------------------------------- 1: launches watched
@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_a_failed_launch_shows_its_error_and_reopens_the_form_filled_in(tmp_path, size):
    ids = copy_store(tmp_path, with_de=True)
    data = _h5ad(tmp_path / "cells.h5ad", [f"ENSG{i:011d}" for i in range(6)])
    app = make_app(ids, poll=False)
    notes: list[str] = []
    async with app.run_test(size=SIZES[size]) as pilot:
        await settle(pilot)
        app.notify = lambda message, **kw: notes.append(str(message))
        # a launch that the pipeline refuses: its last log line is its error, exit status 2
        error = "gfattn pipeline: error: cells.h5ad: pass --geneformer-dir"
        code = f"import sys; print('reading'); print({error!r}); sys.exit(2)"
        launched = _start([sys.executable, "-c", code], ids.path, what="run", log_dir=tmp_path / "logs")
        launched.form = {
            "preset": "quick",
            "data": str(data),
            "name": "my T cells",
            "label_column": "guide",
            "classes": ["control", "LCK_1"],
            "device": "cpu",
        }
        app.launched.append(launched)
        assert launched.process.wait(timeout=30) == 2
        app._reap_launched()
        await settle(pilot, rounds=6)
        form = app.screen
        assert isinstance(form, NewRunScreen)
        assert any(error in n for n in notes), notes
        banner = form.query_one("#nr-launch-error", Static)
        assert banner.display and error in str(banner.content)
        assert form.query_one("#nr-data").value == str(data)
        assert form.query_one("#nr-name").value == "my T cells"
        assert form.label_column() == "guide" and form.picked == ["control", "LCK_1"]
        assert "--classes control,LCK_1" in str(form.query_one("#nr-command").content)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_the_form_refuses_gene_symbols_without_dictionaries_as_the_pipeline_does(tmp_path, size):
    ids = copy_store(tmp_path, with_de=True)
    data = _h5ad(tmp_path / "symbols.h5ad", ["CD3E", "ZAP70", "LCK", "CD4", "CD8A", "IL2"])
    app = make_app(ids, poll=False)
    started = []
    async with app.run_test(size=SIZES[size]) as pilot:
        await settle(pilot)
        app.launch_run = lambda request, **kw: started.append(request)
        await pilot.press("N")
        await settle(pilot)
        form = app.screen
        form.query_one("#nr-data").value = str(data)
        await settle(pilot, rounds=6)
        problems = str(form.query_one("#nr-input-problems").content)
        # the pipeline's own message (pipeline.run.driver._check_embedded_genes)
        assert SYMBOL_ERROR in problems and "--geneformer-dir" in problems
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert started == [] and app.screen is form
        assert SYMBOL_ERROR in str(form.query_one("#nr-problems").content)


# --------------------------------------------------------------------------- 2: read-only stores
@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_export_over_a_read_only_store_writes_into_the_current_folder(tmp_path, monkeypatch, size):
    ids = copy_store(tmp_path, with_de=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    app = make_app(ids, poll=False, readonly=True)
    async with app.run_test(size=SIZES[size]) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        # keys that need a writable store are greyed in the footer
        for key in ("N", "k"):
            active = screen.active_bindings.get(key)
            assert active is not None and not active.enabled, key
        assert screen.active_bindings["e"].enabled
        screen.query_one(RunsTable).select_run(ids.failed)
        await pilot.press("e")
        await settle(pilot)
        prompt = app.screen
        assert "current folder" in str(prompt.query_one(".hint", Static).content)
        value = prompt.query_one("Input").value
        assert value == f"csv {work / 'gfattn-export' / f'run-{ids.failed}'}"
        await pilot.press("enter")
        await settle(pilot)
        assert len(app.launched) == 1
        launched = app.launched[0]
        assert launched.process.wait(timeout=120) == 0, launched.log_tail()
        assert launched.log_path.is_relative_to(work)  # not beside the store
    files = list((work / "gfattn-export" / f"run-{ids.failed}").rglob("*.csv"))
    assert files, list(work.rglob("*"))


# --------------------------------------------------------------------------------- 3: the Overview
def _round_two_results(ids) -> dict:
    """Values other parts of the pipeline add (written through the Store API): baselines and a gate on
    the finetunes, warnings and a checkpoint check on the pipeline, q-values and floors, deletion, the
    cascade and attribution documents on the lowhigh analysis."""
    from store import Store
    from store import results as R

    frozen = ids.finetunes["dose/frozen"]
    with Store(ids.path) as st:
        for rid in ids.finetunes.values():
            st.log_metrics(
                rid,
                [
                    {"name": R.METRIC_BASELINE_ACCURACY, "value": 0.2, "split": "test"},
                    {"name": R.METRIC_BASELINE_MACRO_F1, "value": 0.067, "split": "test"},
                    {"name": R.METRIC_MAJORITY_RATE, "value": 0.2, "split": "test"},
                ],
            )
        gate = {
            "learned": False,
            "reasons": ["predicts 0 for 97% of test cells"],
            "predicted_share": 0.97,
            "predicted_class": "0",
            "balanced_accuracy": 0.21,
            "balanced_accuracy_ci": [0.18, 0.24],
            "chance": 0.2,
        }
        st.put_json(frozen, R.JSON_GATE, gate)
        st.put_json(ids.pipeline, R.JSON_WARNINGS, [{"kind": "labels", "message": "class 25 has only 40 test cells"}])
        st.put_json(
            ids.pipeline,
            R.JSON_CHECKPOINT_CHECK,
            {"cells": 50, "top1": 0.31, "top10": 0.62, "baseline_top1": 0.02, "baseline_top10": 0.1, "ok": True},
        )
        st.put_json(ids.pipeline, "resources", {"peak_rss_bytes": 1_060_401_152, "stages": [{"k": 10, "overlap": 9}]})
        an = ids.analyses["lowhigh"]
        st.put_json(
            an,
            R.JSON_DE_OVERLAP,
            {
                "attention_column": "key_score_b",
                "overlap": [
                    {"k": 10, "overlap": 3, "p_value": 0.001, "p_floor": 0.001, "at_floor": True, "q": 0.004},
                    {"k": 50, "overlap": 12, "p_value": 0.2, "p_floor": 0.001, "at_floor": False, "q": 0.3},
                ],
                "by_group": {"high vs low": {}, "low vs high": {}},
                "directions": [
                    {"direction": "up", "label": "up in high", "overlap": []},
                    {
                        "direction": "down",
                        "label": "up in low",
                        "overlap": [{"k": 10, "overlap": 1, "p_value": 0.5, "q_value": 0.6}],
                    },
                ],
            },
        )
        sets = [
            {
                "score": "key_score",
                "k": k,
                "delta_prob_mean": -0.1 * k / 10,
                "random_delta_prob_mean": -0.01,
                "p_empirical": 1 / 21,
            }
            for k in (10, 20)
        ]
        for model in ("frozen", "unfrozen"):
            st.put_json(an, R.json_deletion(model), {"sets": sets, "n_random": 20, "n_cells": 40})
            st.put_json(an, R.json_sanity(model), {"flagged": ["attn_b"], "scores": {}})
            st.put_json(
                an,
                R.json_attribution(model),
                {"methods": ["hao", "ig"], "n_cells": 40, "parameters": {"hao": {"steps": 20}}},
            )
    return {"frozen": frozen}


@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_overview_is_results_without_raw_records_and_scrolls_at_once(tmp_path, size):
    ids = copy_store(tmp_path, with_de=True)
    _round_two_results(ids)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZES[size]) as pilot:
        screen = await open_run(app, pilot, ids.pipeline)
        view = screen.query_one(OverviewView)
        results = all_text(screen.query_one("#ov-results"))
        assert "⚠ class 25 has only 40 test cells" in results
        assert "✘ did not learn: dose frozen: predicts 0 for 97% of test cells" in results
        assert "baseline acc" in results and "0.067" in results
        assert "checkpoint check: top-1 0.310 (baseline 0.020)" in results
        # model names, not suffixes; the p floor resolved, the stars on q
        assert "DE overlap, up in high (top k by key score unfrozen)" in results
        assert "DE overlap, up in low: k=10 1 (p 0.500, q 0.600)" in results
        assert "k=10 3 (p <= 0.001, q 4.0e-03**)" in results
        assert "(high vs low; 1 more comparisons in the DE tab)" in results
        assert "deletion from unfrozen: top 20 by key score: Δp -0.200 vs random -0.010 (p <= 0.0476)" in results
        assert "0.048*" not in results and "0.0476*" not in results
        assert "randomisation cascade of unfrozen: scores that survive randomisation: attn unfrozen" in results
        assert "attribution of frozen: hao, ig on 40 cells" in results
        everything = all_text(view)
        for raw in ("{'", "[{", "key_score_b", "attn_norm_a", "attribution_frozen", "parameters.hao", "_bytes"):
            assert raw not in everything, raw
        assert "1011.3 MiB" in everything  # a byte count in bytes
        # the Overview has the keys: PageDown scrolls without a Tab first
        assert app.focused is view
        await pilot.press("pagedown")
        await settle(pilot)
        assert view.scroll_y > 0


# --------------------------------------------------------------------------------- 4: progress
@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_progress_counts_the_whole_runs_stages_with_a_whole_run_eta(tmp_path, size):
    from pipeline import config
    from store import Store

    from tests._helpers_tui import T0, frozen_time

    ids = copy_store(tmp_path, with_de=True)
    cfg = config.resolve("quick")
    # quick: data, model, tokenize, record, 3 fine-tunings of lowhigh, one DE (binary), one attention = 9
    with frozen_time(T0 + 86_400) as clock, Store(ids.path) as st:
        rid = st.create_run("quick live", "pipeline", cfg, device="cpu")
        for stage in ("data", "model", "tokenize", "record"):
            st.set_stage(rid, stage, "running")
            clock.advance(30)
            st.set_stage(rid, stage, "completed")
        st.set_stage(rid, "finetune lowhigh/frozen", "running")
        st.set_progress(rid, "finetune lowhigh/frozen", 40, 120, unit="steps", eta_s=60.0)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZES[size]) as pilot:
        screen = await open_run(app, pilot, rid)
        label = screen.query_one("#ov-progress-label")
        text = str(label.render())
        # 60 s left of this stage + 4 stages to come at 30 s each
        assert "stage 5 of 11: finetune lowhigh/frozen · ETA 4m00s for the run" in text
        assert "ETA 1m00s" in text
        await pilot.press("escape")
        await settle(pilot)
        table = app.screen.query_one(RunsTable)
        row = table.get_row(str(rid))
        cell = str(row[table.layout_keys.index("headline")])
        assert cell == "5 of 11 · ETA 4m00s"
        width = dict(
            (k, w)
            for k, _, w in __import__("gfattn_tui.widgets.runs_table").widgets.runs_table.layout_columns(
                table.size.width
            )
        )["headline"]
        assert len(cell) <= width


# ------------------------------------------------------------------------------------ 5: runs list
@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_runs_list_names_task_mode_and_macro_f1_sorts_within_tasks_and_has_home_end(tmp_path, size):
    ids = copy_store(tmp_path, with_de=True)
    _round_two_results(ids)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZES[size]) as pilot:
        await settle(pilot)
        screen = app.screen
        info = screen.details[ids.pipeline]
        # per task the best mode by macro-F1, counted here from the stored metrics; dose/frozen did not learn
        from store import Store

        with Store(ids.path, readonly=True) as st:
            f1 = {
                key: next(m["value"] for m in st.metrics(rid, split="test") if m["name"] == "macro_f1")
                for key, rid in ids.finetunes.items()
            }
        expected = []
        for task in ("dose", "lowhigh"):
            key = max((k for k in f1 if k.startswith(task + "/") and k != "dose/frozen"), key=f1.get)
            expected.append(f"{task} {key.split('/')[1]} F1 {f1[key]:.2f}")
        assert info["headline"] == " · ".join(expected)
        table = screen.query_one(RunsTable)
        cell = str(table.get_row(str(ids.pipeline))[table.layout_keys.index("headline")])
        width = {k: w for k, _, w in layout_columns(table.size.width)}["headline"]
        assert width >= 26 and len(cell) <= width  # never cut: a second task is counted when it does not fit
        assert cell in (info["headline"], f"{expected[0]} +1 task", f"{expected[0]} +1")
        # sorting by the metric keeps each task's runs together and sorts within the task
        metrics = {901: ("lowhigh", 0.9), 902: ("dose", 0.5), 903: None, 904: ("dose", 0.8), 905: ("lowhigh", 0.6)}
        saved = (screen.runs, screen.details)
        screen.runs = [{"id": i, "name": f"r{i}", "kind": "finetune", "status": "completed"} for i in metrics]
        screen.details = {i: {"metric": m} for i, m in metrics.items()}
        screen.sort_key = "metric"
        for reverse, expected in ((True, [904, 902, 901, 905, 903]), (False, [902, 904, 905, 901, 903])):
            screen.sort_reverse = reverse
            assert [r["id"] for r in screen.filtered_runs()] == expected
        screen.runs, screen.details = saved
        screen.sort_key, screen.sort_reverse = "started", True
        screen.render_runs()
        await settle(pilot)
        table.focus()
        await pilot.press("end")
        assert table.cursor_row == table.row_count - 1
        await pilot.press("home")
        assert table.cursor_row == 0


# ------------------------------------------------------------------------------ 9: help and footer
def _footer_cut(screen) -> list[str]:
    """The footer keys that do not fit left of the palette key (cut or hidden at this width)."""
    from textual.widgets import Footer

    keys = list(screen.query_one(Footer).query("FooterKey"))
    palette = [k for k in keys if k.action == "app.command_palette" or "palette" in str(k.description)]
    right = palette[0].region.x if palette else screen.size.width
    return [f"{k.key} {k.description}" for k in keys if k not in palette and k.region.right > right]


@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_footer_never_cuts_a_binding_and_help_lists_the_tabs_keys(tmp_path, size):
    from gfattn_tui.screens.compare import CompareScreen
    from gfattn_tui.screens.keys import KeysScreen
    from gfattn_tui.screens.run import RunScreen

    ids = copy_store(tmp_path, with_de=True)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZES[size]) as pilot:
        await settle(pilot)
        assert _footer_cut(app.screen) == []
        await pilot.press("question_mark")
        await settle(pilot)
        keys = app.screen
        assert isinstance(keys, KeysScreen) and keys.title_text == "Keys: runs list"
        listed = {k for k, _, _ in keys.keys}
        assert {"⏎", "N", "/", "home", "end"} <= listed, listed
        await pilot.press("escape")
        screen = RunScreen(ids.pipeline)
        await app.push_screen(screen)
        await settle(pilot)
        for tab, own in (("keygenes", {"m", "o"}), ("genes", {"/", "f", "o", "[", "]"}), ("data", {"c"})):
            await screen.action_show_tab(tab)
            await settle(pilot)
            assert _footer_cut(screen) == [], tab
            await pilot.press("question_mark")
            await settle(pilot)
            keys = app.screen
            assert isinstance(keys, KeysScreen), tab
            assert keys.title_text.startswith(f"Keys: run {ids.pipeline} · "), keys.title_text
            listed = {k for k, _, _ in keys.keys}
            assert own <= listed and {"esc", "e", "1"} <= listed, (tab, listed)
            await pilot.press("escape")
            await settle(pilot)
        await app.push_screen(CompareScreen(ids.analyses["dose"], ids.analyses["lowhigh"]))
        await settle(pilot)
        assert _footer_cut(app.screen) == []
        await pilot.press("N")  # over the runs list underneath: nothing; the form from the runs list
        await app.pop_screen()
        await app.pop_screen()
        await settle(pilot)
        await pilot.press("N")
        await settle(pilot)
        assert isinstance(app.screen, NewRunScreen) and _footer_cut(app.screen) == []


# ------------------------------------------------------------------------------------ 7: key genes
@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_key_genes_tab_ranks_each_models_genes_with_deletion_effects_and_resolved_p(tmp_path, size):
    from gfattn_tui.widgets.keygenes import SortableTable
    from store import Store
    from store import results as R

    from tests._helpers_tui import FixtureIds
    from tests.tui.test_tui_keygenes import build_keygenes_store, open_keygenes

    kg = build_keygenes_store(tmp_path / "gfattn.db")
    with Store(kg["path"]) as st:  # 20 random sets per set: the empirical p cannot go below 1/21
        doc = st.get_json(kg["new"], R.json_deletion("unfrozen"))
        doc["n_random"] = 20
        doc["sets"][0]["p_empirical"] = 1 / 21
        st.put_json(kg["new"], R.json_deletion("unfrozen"), doc)
        single = st.gene_table_df(kg["new"], R.table_deletion("unfrozen"))
    app = make_app(FixtureIds(path=kg["path"]), poll=False)
    async with app.run_test(size=SIZES[size]) as pilot:
        view = await open_keygenes(app, pilot, kg["new"])
        ranked = view.query_one("#kg-ranked", SortableTable)
        genes = kg["genes"].dropna(subset=["key_score_b"]).nlargest(50, "key_score_b")
        assert [r["symbol"] for r in ranked.rows_shown] == list(genes["symbol"])
        effects = dict(zip(single["symbol"], single["delta_logit_mean"]))
        for row in ranked.rows_shown:
            if row["symbol"] in effects:
                assert row["delta_logit_mean"] == pytest.approx(effects[row["symbol"]])
        assert any(row["symbol"] in effects for row in ranked.rows_shown)
        title = str(view.query_one("#kg-ranked-title").render())
        assert "Key genes of unfrozen: top 50 by key score" in title
        # the set table: the p at its floor resolved, no stars
        sets = view.query_one("#kg-sets", SortableTable)
        p_col = [c.key for c in sets.spec].index(R.DEL_P)
        shown = [str(sets.get_row_at(i)[p_col]) for i in range(sets.row_count)]
        assert "<= 0.0476" in shown and not any(p.startswith("0.048") or "*" in p for p in shown if "<=" in p)
        # legends outside the plots, named by score
        assert "key_score" in str(view.query_one("#kg-curves-legend").render())
        assert "key_score" in str(view.query_one("#kg-cascade-legend").render())
        await pilot.press("m")
        await settle(pilot)
        assert "Key genes of frozen" in str(view.query_one("#kg-ranked-title").render())


# ------------------------------------------------------------------------------------------- 8: DE
@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_de_tab_fits_its_columns_lists_every_shared_gene_and_picks_each_comparison(tmp_path, size):
    from textual.widgets import DataTable, Select

    from gfattn_tui.screens.run import RunScreen
    from gfattn_tui.widgets.de import DEView
    from store import Store
    from store import results as R

    ids = copy_store(tmp_path, with_de=True)
    shared = [f"GENE{i:05d}" for i in range(12)]
    with Store(ids.path) as st:
        table = st.gene_table_df(ids.de, R.TABLE_DE)
        other = st.create_run(
            "de: low vs high", "de", {"groupby": "group", "group": "low", "reference": "high"}, parent_id=ids.pipeline
        )
        st.put_gene_table(other, R.TABLE_DE, table.assign(score=-table["score"]))
        st.finish_run(other, "completed")

        def overlap(n: int) -> dict:
            return {"overlap": [{"k": 50, "overlap": n, "expected": 1.2, "p_value": 1e-4, "genes": shared[:n]}]}

        doc = {
            **overlap(12),
            "group": "high vs low",
            "by_group": {"high vs low": overlap(12), "low vs high": overlap(5)},
        }
        st.put_json(ids.analyses["lowhigh"], R.JSON_DE_OVERLAP, doc)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZES[size]) as pilot:
        await settle(pilot)
        screen = RunScreen(ids.pipeline, tab="de")
        await app.push_screen(screen)
        await settle(pilot)
        view = screen.query_one(DEView)
        view.query_one("#de-analysis").value = ids.analyses["lowhigh"]
        await settle(pilot, rounds=5)
        picker = view.query_one("#de-comparison", Select)
        assert picker.display and [v for _, v in picker._options if isinstance(v, str)] == [
            "high vs low",
            "low vs high",
        ]
        results = all_text(view.query_one("#de-results"))
        assert "k=50: 12 shared" in results and all(g in results for g in shared)
        grid = view.query_one("#de-table", DataTable)
        await pilot.pause(0.1)
        await settle(pilot)
        widths = sum(c.get_render_width(grid) for c in grid.ordered_columns)
        assert widths <= grid.size.width, (widths, grid.size.width, view.hidden)
        assert "de: high vs low" in str(view.query_one("#de-status").render())
        picker.value = "low vs high"
        await settle(pilot, rounds=5)
        assert view.comparison == "low vs high"
        assert "de: low vs high" in str(view.query_one("#de-status").render())
        results = all_text(view.query_one("#de-results"))
        assert "comparison: low vs high" in results and "k=50: 5 shared" in results


# --------------------------------------------------------------------------------------- 6: compare
@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_compare_shows_a_b_and_delta_at_80_columns_names_grids_and_refuses_a_mismatch(tmp_path, size):
    from textual.widgets import DataTable, OptionList

    from gfattn_tui.screens.compare import CompareScreen

    ids = copy_store(tmp_path, with_de=True)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZES[size]) as pilot:
        await settle(pilot)
        screen = CompareScreen(ids.analyses["dose"], ids.analyses["lowhigh"])
        await app.push_screen(screen)
        await settle(pilot)
        table = screen.query_one("#cmp-metrics-table", DataTable)
        assert app.focused is table
        labels = [str(c.label) for c in table.ordered_columns]
        assert labels[:4] == ["metric", "A", "B", "B − A"]
        # A, B and B - A are on screen
        right = sum(c.get_render_width(table) for c in table.ordered_columns[:4])
        assert right <= table.size.width
        await pilot.press("right")
        assert screen.query_one("#cmp-tabs").active == "cmp-metrics"  # Right scrolls, never switches tabs
        await pilot.press("3")
        await settle(pilot)
        options = screen.query_one("#cmp-grid-list", OptionList)
        names = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert "norm frozen" in names and "norm_a" not in names
        info = str(screen.query_one("#cmp-grid-info").render())
        assert "run B's value minus run A's" in info
        # an analysis against a finetune: refused, with the reason
        await app.pop_screen()
        screen = CompareScreen(ids.analyses["dose"], ids.finetunes["dose/frozen"])
        await app.push_screen(screen)
        await settle(pilot)
        rows = [[str(c) for c in screen.query_one("#cmp-metrics-table", DataTable).get_row_at(i)] for i in range(1)]
        assert rows[0][0].startswith("nothing to compare: run")
        assert screen.query_one("#cmp-metrics-table", DataTable).row_count == 1


# ------------------------------------------------------------------------------ 10: number formats
def test_one_number_format_per_column_and_names_in_model_words():
    from gfattn_tui.format import in_model_words, model_label
    from gfattn_tui.widgets.gene_table import column_scientific, gene_cell
    from gfattn_tui.widgets.keygenes import fmt_delta
    from gfattn_tui.widgets.overview import _value_text

    # a column of mixed sizes is fixed-point throughout; a column of tiny values scientific throughout
    mixed = [1.6e-05, 0.0001, 0.25]
    formats = {str(gene_cell("x", v, column_scientific(mixed))) for v in mixed}
    assert formats == {"0.0000", "0.0001", "0.2500"}
    tiny = [1.6e-05, 3e-06]
    assert [str(gene_cell("x", v, column_scientific(tiny))) for v in tiny] == ["1.600e-05", "3.000e-06"]
    assert [fmt_delta(v) for v in (1.6e-05, 0.0001, -0.25)] == ["+0.0000", "+0.0001", "-0.2500"]
    models = ("frozen", "unfrozen")
    assert model_label("key_score_b", models) == "key score unfrozen"
    assert model_label("attribution_frozen", models) == "attribution frozen"
    assert (
        in_model_words("frozen: attn_a 0.97, attn_norm_a 0.95", models)
        == "frozen: attn frozen 0.97, attn norm frozen 0.95"
    )
    assert _value_text([{"name": "dose", "column": "dose_value"}]) == "name=dose, column=dose_value"


@pytest.mark.asyncio
async def test_a_prompt_ignores_keys_typed_before_it_opened(tmp_path):
    from textual import events
    from textual.widgets import Input

    from gfattn_tui.screens.prompt import PromptScreen

    ids = copy_store(tmp_path, with_de=True)
    app = make_app(ids, poll=False)
    async with app.run_test(size=SIZES["80x24"]) as pilot:
        await settle(pilot)
        early = events.Key("x", "x")  # typed on the runs list while the dialog was being opened
        screen = PromptScreen("Export run 1", value="csv out")
        await app.push_screen(screen)
        await settle(pilot)
        field = screen.query_one(Input)
        field.post_message(early)
        await settle(pilot)
        assert field.value == "csv out"
        await pilot.press("y")  # a key after it opened is its input (replacing the proposed value, selected)
        assert field.value == "y"


def test_form_checks_a_model_dir_as_the_pipeline_does_without_importing_torch(tmp_path):
    import json
    import os
    import subprocess

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 2048}))
    (model / "model.safetensors").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = (
        "import sys, json; from gfattn_tui.run_design import input_problems; "
        f"print(json.dumps([input_problems('quick', model={str(model)!r}), input_problems('quick', model={str(empty)!r}), "
        "[m for m in ('torch', 'transformers') if m in sys.modules]]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    no_dicts, no_config, imported = json.loads(out.stdout.strip().splitlines()[-1])
    # the pipeline's own messages (experiment._dictionaries_for, model.read_model_config)
    assert no_dicts == [
        f"model directory {model} carries no gene dictionaries; pass --geneformer-dir with a Geneformer"
        " checkout's dictionaries (token_dictionary_gc104M.pkl, gene_dictionaries_30m/)"
    ]
    assert no_config == [f"{empty} has no config.json; a model directory needs config.json and its weights"]
    assert imported == []
