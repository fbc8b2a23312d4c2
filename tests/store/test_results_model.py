"""`store.results`, the read model of a run's results: on the TUI's fixture store, every typed value
equals what the store holds under the names the constants give."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from store import Store
from store import results as R

from tests._helpers_tui import copy_store, template_store

N_GENES = 500


@pytest.fixture(scope="module")
def fixture():
    path, ids = template_store(n_genes=N_GENES)
    with Store(path) as st:
        yield st, ids


def test_the_module_is_headless():
    code = (
        "import sys, store.results; "
        "print(sorted(m for m in ('textual', 'torch', 'pipeline', 'pandas', 'gfattn_tui') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_names_are_the_ones_the_pipeline_writes():
    assert R.vec_rank_received("a") == "rank_received_a"
    assert R.vec_rank_received_lower("b") == "rank_received_b_lower"
    assert R.vec_rank_received_lh("a") == "rank_received_lh_a"
    assert R.grid_norm("a") == "norm_a" and R.grid_norm_summed("b") == "norm_summed_b"
    assert R.grid_norm_summed("a").startswith(R.GRID_NORM_PREFIX) and R.grid_norm("b").startswith(R.GRID_NORM_PREFIX)
    assert not R.GRID_P_VALUE_NORM.startswith(R.GRID_NORM_PREFIX)
    assert R.col_attn_pos_ratio("b") == "attn_pos_ratio_b" and R.col_rank_mean_group("low") == "rank_mean_low"
    assert R.per_label_metric("recall", "high") == "recall/high"
    assert len(set(R.RUN_KINDS)) == len(R.RUN_KINDS)


def test_scope_holds_the_pipeline_and_its_children_in_order(fixture):
    st, ids = fixture
    scope = R.collect_scope(st, ids.pipeline)
    assert scope.run["id"] == ids.pipeline
    assert [r["id"] for r in scope.data_runs] == [ids.data]
    assert [r["id"] for r in scope.analyses] == [ids.analyses["dose"], ids.analyses["lowhigh"]]
    assert [R.task_and_mode(r) for r in scope.finetunes] == [
        ("dose", "frozen"),
        ("dose", "unfrozen"),
        ("dose", "last-1"),
        ("lowhigh", "frozen"),
        ("lowhigh", "unfrozen"),
        ("lowhigh", "last-1"),
    ]
    assert {r["kind"] for r in scope.runs} <= set(R.RUN_KINDS)
    assert R.collect_scope(st, ids.data).runs == [st.get_run(ids.data)]


def test_finetune_results_equal_the_stored_metrics_and_matrix(fixture):
    st, ids = fixture
    results = R.read_finetunes(st, R.collect_scope(st, ids.pipeline), curves=True)
    assert [ft.key for ft in results][:2] == ["dose/frozen", "dose/unfrozen"]
    for ft in results:
        assert ft.run_id == ids.finetunes[ft.key] and ft.status == "completed" and ft.name == ft.key
        test = {m["name"]: m["value"] for m in st.metrics(ft.run_id, split=R.SPLIT_TEST)}
        assert ft.accuracy == pytest.approx(test[R.METRIC_ACCURACY])
        assert ft.macro_f1 == pytest.approx(test[R.METRIC_MACRO_F1])
        stored = st.confusions(ft.run_id)[0]
        assert ft.confusion.labels == stored["labels"] and ft.confusion.split == R.SPLIT_TEST
        np.testing.assert_array_equal(ft.confusion.matrix, stored["matrix"])
        train = [m for m in st.metrics(ft.run_id, name=R.METRIC_LOSS) if m["split"] == R.SPLIT_TRAIN]
        (loss,) = [c for c in ft.curves[R.METRIC_LOSS] if c.label == "train"]
        assert loss.x == [float(m["step"]) for m in train] and loss.y == pytest.approx([m["value"] for m in train])
        val = [m for m in st.metrics(ft.run_id, name=R.METRIC_ACCURACY) if m["split"] == R.SPLIT_VALIDATION]
        (acc,) = [c for c in ft.curves[R.METRIC_ACCURACY] if c.label == "val acc"]
        assert acc.y == pytest.approx([m["value"] for m in val])
    assert R.read_finetune(st, st.get_run(ids.finetunes["dose/frozen"])).curves is None


def test_scores_fall_back_to_the_confusion_matrix(tmp_path):
    ids = copy_store(tmp_path, n_genes=N_GENES)
    with Store(ids.path) as st:
        rid = st.create_run("dose/frozen", R.KIND_FINETUNE, {"task": "dose", "mode": "frozen"})
        st.put_confusion(rid, ["0", "1"], np.array([[3, 1], [0, 4]]))
        ft = R.read_finetune(st, st.get_run(rid))
        assert ft.accuracy == pytest.approx(7 / 8)
        assert ft.macro_f1 == pytest.approx(np.mean([2 * 0.75 / 1.75, 2 * 0.8 / 1.8]))
        assert R.read_finetune(st, st.get_run(ids.failed)).confusion is None


def test_pair_analysis_equals_what_the_store_holds(fixture):
    st, ids = fixture
    rid = ids.analyses["lowhigh"]
    an = R.read_pair_analysis(st, rid, genes=True, hist_sources=[ids.data])
    assert an.run_id == rid and an.name == "lowhigh: frozen vs unfrozen" and an.status == "completed"
    assert an.models == ("frozen", "unfrozen") and an.model_names == {"a": "frozen", "b": "unfrozen"}
    assert an.grid_names == st.grid_names(rid)
    for name, grid in an.grids.items():
        stored = st.grid(rid, name)
        np.testing.assert_array_equal(grid.values, stored["values"])
        for bound in ("lower", "upper"):
            if stored.get(bound) is None:
                assert getattr(grid, bound) is None
            else:
                np.testing.assert_array_equal(getattr(grid, bound), stored[bound])
    assert an.grids[R.GRID_COSINE].lower is not None and an.grids[R.GRID_COSINE].shape == (6, 4)
    assert [g.name for g in an.norm_grids()] == [R.grid_norm("a"), R.grid_norm("b")]
    np.testing.assert_array_equal(an.ranks.a, st.vector(rid, R.vec_rank_received("a")))
    np.testing.assert_array_equal(an.ranks.b, st.vector(rid, R.vec_rank_received("b")))
    np.testing.assert_array_equal(an.ranks.pct_diff, st.vector(rid, R.VEC_RANK_PCT_DIFF))
    np.testing.assert_array_equal(an.ranks.log_ratio, st.vector(rid, R.VEC_RANK_LOG_RATIO))
    hist = an.ranks.length_hist  # the analysis run's own histogram comes before the data run's
    np.testing.assert_array_equal(hist.counts, st.vector(rid, R.VEC_LENGTH_HIST))
    assert hist.meta == st.vector_meta(rid, R.VEC_LENGTH_HIST) and hist.median == hist.meta[R.META_MEDIAN]
    assert an.de_overlap == st.get_json(rid, R.JSON_DE_OVERLAP)
    assert an.stats == st.get_json(rid, R.JSON_STATS) and an.summary is None
    assert set(an.json) == set(st.json_names(rid))
    assert an.gene_table_names == [R.TABLE_GENES]
    pd.testing.assert_frame_equal(an.genes, st.gene_table_df(rid, R.TABLE_GENES))
    assert R.read_pair_analysis(st, st.get_run(rid)).genes is None


def test_rank_curves_take_the_histogram_from_the_data_run_when_the_analysis_has_none(fixture):
    st, ids = fixture
    other = R.read_rank_curves(st, ids.data, hist_sources=[ids.analyses["dose"]])
    assert other.a is None and other.pct_diff is None
    np.testing.assert_array_equal(other.length_hist.counts, st.vector(ids.data, R.VEC_LENGTH_HIST))
    assert R.read_rank_curves(st, ids.pipeline).length_hist is None


def test_reduce_rank_vector_sums_layers_and_heads():
    lh = np.arange(24, dtype=float).reshape(2, 3, 4)
    np.testing.assert_array_equal(R.reduce_rank_vector(lh), lh.sum(axis=(0, 1)))


def test_grid_choice_and_top_genes(fixture):
    st, ids = fixture
    rid = ids.analyses["dose"]
    names = st.grid_names(rid)
    assert R.default_grid(names, None) == R.GRID_COSINE
    assert R.default_grid(names, R.grid_norm("b")) == R.grid_norm("b")
    assert R.default_grid(["x", "y"], "z") == "x" and R.default_grid([], "z") is None
    df = st.gene_table_df(rid, R.TABLE_GENES)
    top = df.sort_values(R.col_attn("a"), ascending=False).head(5)
    assert R.top_genes(st, rid, R.col_attn("a"), 5) == [R.gene_label(r) for _, r in top.iterrows()]
    assert R.top_genes(st, rid, "no_such_column") == [] and R.top_genes(st, ids.data, R.col_attn("a")) == []
    assert R.gene_label({R.COL_SYMBOL: "", R.COL_ENSEMBL_ID: "ENSG1"}) == "ENSG1"


def test_data_record_equals_the_data_run(fixture):
    st, ids = fixture
    rec = R.read_data_record(st, st.get_run(ids.data))
    assert rec.run_id == ids.data and rec.name == "data"
    pd.testing.assert_frame_equal(rec.cells, st.cells(ids.data))
    assert rec.has_umap() and {R.CELL_DOSE, R.CELL_GROUP, R.CELL_LENGTH} <= set(rec.cells.columns)
    assert rec.labels == st.labels(ids.data)
    assert rec.qc == st.get_json(ids.data, R.JSON_QC_REPORT)
    np.testing.assert_array_equal(rec.length_hist.counts, st.vector(ids.data, R.VEC_LENGTH_HIST))


def test_de_result_reads_the_completed_de_run(tmp_path):
    ids = copy_store(tmp_path, n_genes=N_GENES)
    table = pd.DataFrame({R.COL_ENSEMBL_ID: ["ENSG1", "ENSG2"], R.COL_SYMBOL: ["A", "B"], R.COL_SCORE: [3.0, -1.0]})
    with Store(ids.path) as st:
        assert R.completed_de(st, R.collect_scope(st, ids.pipeline).de_runs) is None
        cfg = {"groupby": "group", "group": R.GROUP_HIGH, "reference": R.GROUP_LOW}
        rid = st.create_run("de: high vs low", R.KIND_DE, cfg, parent_id=ids.pipeline)
        st.put_gene_table(rid, R.TABLE_DE, table)
        scope = R.collect_scope(st, ids.pipeline)
        assert R.completed_de(st, scope.de_runs) is None  # still running
        st.finish_run(rid, "completed")
        de = R.completed_de(st, R.collect_scope(st, ids.pipeline).de_runs)
        assert (de.run_id, de.groupby, de.group, de.reference) == (rid, "group", "high", "low")
        pd.testing.assert_frame_equal(de.table[table.columns], table, check_dtype=False)


def test_config_helpers():
    run = {"name": "lowhigh: frozen vs unfrozen", "config": '{"run": {"preset": "quick"}}'}
    assert R.run_preset(run) == "quick" and R.config_value(R.run_config(run), "run.nothing", 3) == 3
    assert R.compared_models(run) == ("frozen", "unfrozen")
    assert R.compared_models({"config": {"model_a": "x", "model_b": "y"}}) == ("x", "y")
    assert R.task_and_mode({"name": "dose/last-1", "config": {}}) == ("dose", "last-1")
