"""The Key genes tab and what feeds it: the deletion, randomisation-cascade and key-gene readers of
`store.results`, the tab's numbers, sortable tables and model switcher, the Genes tab opening on the key
score, the Overview's key genes and matched DE p, and runs written before these results existed.

Unit tests use a small store built here through the `Store` API; one slow test reads a real
`gfattn pipeline --quick` run (the session's `quick_run`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from textual.widgets import DataTable, Select, Static

from gfattn_tui.format import fmt_p, fmt_p_resolved
from gfattn_tui.widgets.genes import GenesView
from gfattn_tui.widgets.keygenes import KeyGenesView, SortableTable, fmt_delta, sort_rows
from store import results as R

from tests._helpers_tui import FixtureIds, make_app, settle
from tests.tui.test_tui_run_screen import open_run, show_tab, static_text

SIZE = (100, 30)
MODELS = ("frozen", "unfrozen")
SCORES = ["key_score", "attn", "de"]
KS = [5, 20]


def _sets(rng: np.random.Generator, shift: float) -> list[dict]:
    rows = []
    for i, score in enumerate(SCORES):
        for k in KS:
            delta = shift - 0.01 * (i + 1) * (k / 5) - 0.001 * rng.random()
            rows.append(
                {
                    "score": score,
                    "k": k,
                    "n_genes": k,
                    "n_cells_affected": 50 + k,
                    "delta_prob_mean": delta,
                    "delta_prob_ci_low": delta - 0.01,
                    "delta_prob_ci_high": delta + 0.01,
                    "delta_logit_mean": 2 * delta,
                    "delta_logit_ci_low": 2 * delta - 0.02,
                    "delta_logit_ci_high": 2 * delta + 0.02,
                    "accuracy_before": 0.8,
                    "accuracy_after": 0.8 + delta,
                    "random_delta_prob_mean": delta / 10,
                    "random_delta_prob_low": delta / 5,
                    "random_delta_prob_high": 0.0005 * (i + 1),
                    "p_empirical": round(0.01 + 0.07 * i + 0.013 * k + shift, 4),
                }
            )
    return rows


def _single(rng: np.random.Generator, genes: pd.DataFrame, n: int) -> pd.DataFrame:
    top = genes.head(n)
    effect = -np.sort(rng.uniform(0.001, 0.2, n))[::-1] * rng.choice([1, -1], n, p=[0.8, 0.2])
    return pd.DataFrame(
        {
            "ensembl_id": top["ensembl_id"].to_numpy(),
            "symbol": top["symbol"].to_numpy(),
            "token_id": np.arange(100, 100 + n),
            "n_cells_expressing": rng.permutation(np.arange(10, 10 + 3 * n, 3)),
            "delta_logit_mean": effect,
            "delta_logit_ci_low": effect - 0.05,
            "delta_logit_ci_high": effect + 0.05,
            "delta_prob_mean": effect / 3,
            "top_of": [",".join(SCORES[: 1 + i % 3]) for i in range(n)],
        }
    )


def _genes(rng: np.random.Generator, n: int, *, key: bool) -> pd.DataFrame:
    attn_a = rng.gamma(1.5, 1.0, n)
    table = {
        "ensembl_id": [f"ENSG{i:011d}" for i in range(n)],
        "symbol": [f"KG{i:03d}" for i in range(n)],
        "n_cells": rng.integers(1, 300, n),
        "attn_a": attn_a,
        "attn_b": attn_a * rng.lognormal(0, 0.4, n),
        "attn_scaled_a": attn_a / attn_a.max(),
    }
    if key:
        for s in R.MODEL_SUFFIXES:
            score = rng.normal(0, 1, n)
            score[rng.random(n) < 0.1] = np.nan  # genes in too few cells
            table[R.col_key_score(s)] = score
        table[R.col_deletion_logit("b")] = np.where(rng.random(n) < 0.3, rng.normal(0, 0.05, n), np.nan)
    return pd.DataFrame(table)


def build_keygenes_store(path: Path) -> dict:
    """A pipeline with a current analysis (key score, deletion and cascade for both models) and an older
    one (attention only)."""
    from store import Store

    rng = np.random.default_rng(11)
    ids: dict = {"path": path}
    with Store(path) as st:
        ids["pipeline"] = st.create_run("demo", "pipeline", {"run": {"preset": "quick"}})
        rid = ids["new"] = st.create_run(
            "lowhigh: frozen vs unfrozen", "analysis", {"a": "frozen", "b": "unfrozen"}, parent_id=ids["pipeline"]
        )
        genes = _genes(rng, 120, key=True).sort_values(R.col_key_score("b"), ascending=False, na_position="last")
        st.put_gene_table(rid, R.TABLE_GENES, genes)
        ids["genes"] = genes
        st.put_json(
            rid,
            R.JSON_KEY_GENES,
            {
                "default_score": "key_score_b",
                "definition": "shrunk log2 ratio of attention received to expected",
                "min_cells": 5,
                "frequency_spearman": {"attn_b": 0.93, "key_score_b": 0.05},
                "warnings": [
                    "frozen: rankings that track detection frequency: attn_a 0.97",
                    "unfrozen: rankings that track detection frequency: attn_b 0.93",
                ],
            },
        )
        overlap = [
            {"k": k, "overlap": k // 5, "expected": 0.4, "p_value": p, "p_matched": 3 * p, "expected_matched": 0.9}
            for k, p in ((10, 0.0012), (20, 0.021))
        ]
        st.put_json(rid, R.JSON_DE_OVERLAP, {"attention_column": "key_score_b", "overlap": overlap})
        ids["sets"], ids["single"] = {}, {}
        for model, shift in zip(MODELS, (0.002, -0.05)):
            sets = _sets(rng, shift)
            single = _single(rng, genes, 12 if model == "unfrozen" else 7)
            st.put_json(
                rid,
                R.json_deletion(model),
                {
                    "model": model,
                    "n_cells": 64 if model == "unfrozen" else 48,
                    "ks": KS,
                    "n_random": 5,
                    "scores": SCORES,
                    "accuracy_before": 0.8,
                    "sets": sets,
                    "random_delta_prob": {s: {str(k): [0.0] * 5 for k in KS} for s in SCORES},
                    "top_tokens": {s: [100, 101] for s in SCORES},
                    "frequency_spearman": {
                        "key_score": 0.05,
                        "deletion_effect": 0.31 if model == "unfrozen" else 0.12,
                        "key_score_same_genes": -0.2,
                        "n_genes_deleted": len(single),
                    },
                    "headline": f"{model}: deleting the top 20 genes",
                },
            )
            st.put_gene_table(rid, R.table_deletion(model), single)
            ids["sets"][model], ids["single"][model] = pd.DataFrame(sets), single
        steps = ["head", "layer 1", "layer 0", "embeddings"]
        st.put_json(
            rid,
            R.json_sanity("unfrozen"),
            {
                "steps": steps,
                "scores": {
                    "key_score": {"spearman": [1.0, 0.4, 0.1, 0.0], "jaccard": [1.0, 0.3, 0.1, 0.0]},
                    "attn_norm": {"spearman": [1.0, 0.95, 0.9, 0.88], "jaccard": [1.0, 0.8, 0.7, 0.7]},
                },
                "flagged": ["attn_norm"],
                "flag_rule": "Spearman >= 0.8 with the trained model's score once every part is re-initialised",
            },
        )
        st.finish_run(rid, "completed")
        old = ids["old"] = st.create_run(
            "dose: frozen vs unfrozen", "analysis", {"a": "frozen", "b": "unfrozen"}, parent_id=ids["pipeline"]
        )
        st.put_gene_table(old, R.TABLE_GENES, _genes(rng, 40, key=False))
        st.finish_run(old, "completed")
        st.finish_run(ids["pipeline"], "completed")
    return ids


@pytest.fixture
def kg_store(tmp_path) -> dict:
    return build_keygenes_store(tmp_path / "gfattn.db")


def app_for(ids: dict):
    return make_app(FixtureIds(path=ids["path"]), poll=False)


def rows_of(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


# ------------------------------------------------------------------------------------------- readers
def test_readers_return_the_stored_deletion_cascade_and_key_genes(kg_store):
    from store import Store

    with Store(kg_store["path"], readonly=True) as st:
        new, old = kg_store["new"], kg_store["old"]
        deletion = R.read_deletion(st, new, "unfrozen")
        assert deletion is not None and deletion.model == "unfrozen"
        assert deletion.scores == SCORES
        expected = kg_store["sets"]["unfrozen"]
        assert len(deletion.sets) == len(expected)
        assert np.allclose(deletion.sets["p_empirical"], expected["p_empirical"])
        assert list(deletion.curve("attn")["k"]) == KS
        assert deletion.info["frequency_spearman"]["deletion_effect"] == 0.31
        assert list(deletion.single["symbol"]) == list(kg_store["single"]["unfrozen"]["symbol"])
        assert R.read_deletion(st, new, "frozen").info["n_cells"] == 48

        sanity = R.read_sanity(st, new, "unfrozen")
        assert sanity["flagged"] == ["attn_norm"] and sanity["steps"][-1] == "embeddings"
        assert R.read_sanity(st, new, "frozen") is None
        assert R.read_key_genes(st, new)["default_score"] == "key_score_b"

        # a run written before these results: nothing, no error
        assert R.read_deletion(st, old, "unfrozen") is None
        assert R.read_sanity(st, old, "unfrozen") is None
        assert R.read_key_genes(st, old) is None


def test_analysis_headline_leads_with_key_genes_and_matched_p(kg_store):
    from store import Store

    with Store(kg_store["path"], readonly=True) as st:
        head = R.read_analysis_headline(st, kg_store["new"])
        genes = kg_store["genes"]
        for s in R.MODEL_SUFFIXES:
            top = genes.dropna(subset=[R.col_key_score(s)]).nlargest(10, R.col_key_score(s))["symbol"]
            assert head.key_genes[s] == list(top)
        assert head.de_overlap[0]["p_matched"] == pytest.approx(0.0036)
        assert head.de_attention_column == "key_score_b"
        assert len(head.key_warnings) == 2
        old = R.read_analysis_headline(st, kg_store["old"])
        assert old.key_genes == {} and old.key_warnings == [] and old.top_genes  # as before


def test_sort_rows_keeps_missing_values_last():
    rows = [{"v": 2.0}, {"v": None}, {"v": float("nan")}, {"v": -1.0}, {"v": 5.0}]
    assert [r["v"] for r in sort_rows(rows, "v", False)][:3] == [-1.0, 2.0, 5.0]
    assert [r["v"] for r in sort_rows(rows, "v", True)][:3] == [5.0, 2.0, -1.0]
    assert fmt_delta(7.1e-07) == "+0.0000" and fmt_delta(-0.02415) == "-0.0242" and fmt_delta(None) == "—"


# ------------------------------------------------------------------------------------------- the tab
async def open_keygenes(app, pilot, run_id: int) -> KeyGenesView:
    screen = await open_run(app, pilot, run_id, tab="keygenes")
    await show_tab(pilot, "keygenes")  # as a user gets there: its number key, which focuses the tab
    return screen.query_one(KeyGenesView)


@pytest.mark.asyncio
async def test_key_genes_tab_shows_the_last_models_deletion_and_cascade(kg_store):
    app = app_for(kg_store)
    async with app.run_test(size=SIZE) as pilot:
        view = await open_keygenes(app, pilot, kg_store["new"])
        assert view.suffix == "b" and view.query_one("#kg-model", Select).value == "b"
        head = static_text(view.query_one("#kg-head", Static))
        assert "deletion from unfrozen: 64 cells" in head
        assert "deletion effect +0.31" in head and "key score +0.05" in head
        assert "unfrozen: rankings that track detection frequency: attn unfrozen 0.93" in head

        sets = view.query_one("#kg-sets", SortableTable)
        expected = kg_store["sets"]["unfrozen"]
        rows = rows_of(sets)
        assert len(rows) == len(expected)
        for row, (_, want) in zip(rows, expected.iterrows()):
            assert row[0] == want["score"] and row[1] == str(want["k"])
            assert row[2] == fmt_delta(want["delta_prob_mean"])
            assert row[6] == fmt_p(want["p_empirical"])
        single = view.query_one("#kg-single", SortableTable)
        want_single = kg_store["single"]["unfrozen"].sort_values("delta_logit_mean")
        assert [r[0] for r in rows_of(single)] == list(want_single["symbol"])

        flagged = static_text(view.query_one("#kg-flagged", Static))
        assert "not model-dependent: attn_norm" in flagged
        assert not view.query_one("#kg-del-msg").display and not view.query_one("#kg-sanity-msg").display
        curves = view.query_one("#kg-curves").plt
        assert curves is not None


@pytest.mark.asyncio
async def test_tables_sort_by_a_key_and_by_a_header_click(kg_store):
    app = app_for(kg_store)
    async with app.run_test(size=SIZE) as pilot:
        view = await open_keygenes(app, pilot, kg_store["new"])
        sets = view.query_one("#kg-sets", SortableTable)
        expected = kg_store["sets"]["unfrozen"]
        sets.focus()
        sets.move_cursor(row=0, column=2)  # Δp
        await pilot.press("o")
        await settle(pilot)
        first = expected.sort_values("delta_prob_mean").iloc[0]  # the largest drop first
        assert rows_of(sets)[0][:2] == [first["score"], str(first["k"])]
        await pilot.press("o")
        await settle(pilot)
        last = expected.sort_values("delta_prob_mean", ascending=False).iloc[0]
        assert rows_of(sets)[0][:2] == [last["score"], str(last["k"])]
        await pilot.press("O")
        await settle(pilot)
        assert rows_of(sets)[0][:2] == [first["score"], str(first["k"])]

        # a click on the "cells" header of the single-gene table sorts by cells expressing, most first
        single = view.query_one("#kg-single", SortableTable)
        single.scroll_visible(animate=False)
        await settle(pilot)
        before = rows_of(single)[0][0]
        columns = single.ordered_columns
        x = sum(c.get_render_width(single) for c in columns[:2]) + 2
        await pilot.click(single, offset=(x, 0))
        await settle(pilot)
        want = kg_store["single"]["unfrozen"].sort_values("n_cells_expressing", ascending=False).iloc[0]
        assert single.order_by == "n_cells_expressing" and single.descending
        assert rows_of(single)[0][0] == want["symbol"] != before


@pytest.mark.asyncio
async def test_model_switcher_shows_the_other_models_results(kg_store):
    app = app_for(kg_store)
    async with app.run_test(size=SIZE) as pilot:
        view = await open_keygenes(app, pilot, kg_store["new"])
        assert app.focused is view.query_one("#kg-sets")
        await pilot.press("m")
        await settle(pilot)
        assert view.suffix == "a" and view.query_one("#kg-model", Select).value == "a"
        head = static_text(view.query_one("#kg-head", Static))
        assert "deletion from frozen: 48 cells" in head and "deletion effect +0.12" in head
        expected = kg_store["sets"]["frozen"]
        assert [r[6] for r in rows_of(view.query_one("#kg-sets", DataTable))] == [
            fmt_p(p) for p in expected["p_empirical"]
        ]
        assert view.query_one("#kg-single", DataTable).row_count == len(kg_store["single"]["frozen"])
        # the frozen model has no randomisation cascade in this run: one line says so
        msg = view.query_one("#kg-sanity-msg", Static)
        assert msg.display and "No randomisation cascade for frozen" in static_text(msg)
        assert not view.query_one("#kg-sanity").display

        view.query_one("#kg-model", Select).value = "b"
        await settle(pilot)
        assert view.suffix == "b"
        assert "deletion from unfrozen" in static_text(view.query_one("#kg-head", Static))


@pytest.mark.asyncio
async def test_a_run_without_deletion_says_so(kg_store):
    app = app_for(kg_store)
    async with app.run_test(size=SIZE) as pilot:
        view = await open_keygenes(app, pilot, kg_store["old"])
        msg = view.query_one("#kg-del-msg", Static)
        assert msg.display and static_text(msg) == "No deletion results for unfrozen in this run."
        assert not view.query_one("#kg-del").display
        assert "No randomisation cascade for unfrozen" in static_text(view.query_one("#kg-sanity-msg", Static))
        assert "No key-gene score" in static_text(view.query_one("#kg-head", Static))
        await pilot.press("m")
        await settle(pilot)
        assert "No deletion results for frozen" in static_text(view.query_one("#kg-del-msg", Static))


@pytest.mark.asyncio
async def test_genes_tab_opens_on_the_key_score_and_overview_leads_with_key_genes(kg_store):
    app = app_for(kg_store)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, kg_store["pipeline"])
        text = static_text(screen.query_one("#ov-results", Static))
        top_b = kg_store["genes"].dropna(subset=["key_score_b"]).nlargest(3, "key_score_b")["symbol"]
        assert "key genes unfrozen: " + ", ".join(top_b) in text
        assert "DE overlap (top k by key score unfrozen): k=10 2 (p 1.2e-03**, matched p 3.6e-03**)" in text
        assert "warning: unfrozen: rankings that track detection frequency" in text

        await show_tab(pilot, "genes")
        genes = screen.query_one(GenesView)
        assert genes.order_by == "key_score_b" and genes.descending
        assert genes.columns[1:4] == ["key_score_a", "key_score_b", "deletion_logit_b"]
        shown = genes.query_one("#genes-grid", DataTable)
        first = kg_store["genes"].nlargest(1, "key_score_b")["symbol"].iloc[0]
        assert str(shown.get_row_at(0)[1]) == first

        await show_tab(pilot, "keygenes")
        view = screen.query_one(KeyGenesView)
        assert view.shown_analysis == kg_store["new"]  # the pipeline's first analysis


@pytest.mark.asyncio
async def test_genes_tab_of_an_older_run_is_as_before(kg_store):
    app = app_for(kg_store)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, kg_store["old"], tab="genes")
        genes = screen.query_one(GenesView)
        assert genes.order_by == "attn_b"  # attn_scaled_b is not in this table
        assert "key_score_b" not in genes.columns


# ------------------------------------------------------------------------------------ a real quick run
@pytest.mark.slow
@pytest.mark.asyncio
async def test_key_genes_tab_of_a_quick_pipeline_run(quick_run, tmp_path):
    import shutil

    from store import Store

    src, _ = quick_run
    db = tmp_path / "gfattn.db"
    shutil.copyfile(src, db)
    with Store(db, readonly=True) as st:
        pipeline = next(r for r in st.list_runs() if r["kind"] == R.KIND_PIPELINE)
        scope = R.collect_scope(st, pipeline["id"])
        analysis = scope.analyses[0]
        models = R.compared_models(st.get_run(analysis["id"]))
        deletion = R.read_deletion(st, analysis["id"], models[1])
        sanity = R.read_sanity(st, analysis["id"], models[1])
        assert deletion is not None and len(deletion.sets) and sanity is not None
        genes = st.gene_table_df(analysis["id"], R.TABLE_GENES)
    app = make_app(FixtureIds(path=db), poll=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_run(app, pilot, pipeline["id"], tab="keygenes")
        view = screen.query_one(KeyGenesView)
        assert view.shown_analysis == analysis["id"] and view.data["model"] == models[1]
        rows = rows_of(view.query_one("#kg-sets", DataTable))
        # the smallest p each test's matched random sets can give, 1/(R+1), R raised while p sat at its floor
        assert [r[6] for r in rows] == [
            fmt_p_resolved(r["p_empirical"], floor=1 / (r["n_random"] + 1), at_floor=r["p_at_floor"], q=r["q_value"])
            for r in deletion.sets.to_dict("records")
        ]
        flagged = static_text(view.query_one("#kg-flagged", Static))
        for name in sanity.get("flagged") or ["none"]:
            assert name in flagged
        await show_tab(pilot, "genes")
        grid = screen.query_one(GenesView)
        assert grid.order_by == R.col_key_score("b")
        top = genes.dropna(subset=[R.col_key_score("b")]).nlargest(1, R.col_key_score("b"))
        assert str(grid.query_one("#genes-grid", DataTable).get_row_at(0)[1]) == R.gene_label(top.iloc[0].to_dict())
