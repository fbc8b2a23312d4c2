"""Gene tables, position control, writing an analysis run, and `gfattn analyze` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.pair import (
    gene_expected,
    gene_table,
    gene_total,
    length_median,
    pair_records,
    position_controlled_attention,
)

from tests._helpers_model import save_tiny_classifier
from tests.analysis.test_attention_engine import CLS, EOS, PAD, SPECIAL, VOCAB, tiny_bert, v2_cells

ID_TO_GENE = {t: f"ENSG{t:011d}" for t in range(3, VOCAB)} | {PAD: "<pad>", CLS: "<cls>", EOS: "<eos>"}
SYMBOLS = {f"ENSG{t:011d}": f"G{t}" for t in range(3, VOCAB)}


@pytest.fixture(scope="module")
def result():
    from pipeline.analysis.attention import analyze_attention

    data = v2_cells(14, seed=12)
    return analyze_attention(
        tiny_bert(1),
        tiny_bert(2),
        data,
        pad_id=PAD,
        special_ids=SPECIAL,
        group_column="dose",
        batch_size=4,
        dtype=torch.float64,
    )


def test_gene_table_columns_and_values(result):
    df = gene_table(result, ID_TO_GENE, SYMBOLS, reference_set={"G5", "ENSG00000000007"})
    assert not set(df["token_id"]) & {PAD, CLS, EOS}  # special tokens never appear as genes
    assert set(df["token_id"]) == {t for t in range(3, VOCAB) if result.gene_occ[t] > 0}
    for col in (
        "ensembl_id",
        "symbol",
        "n_cells",
        "rank_mean",
        "rank_std",
        "rank_mean_high",
        "rank_mean_low",
        "attn_a",
        "attn_b",
        "attn_scaled_a",
        "attn_per_cell_b",
        "attn_norm_a",
        "attn_expected_b",
        "attn_pos_ratio_a",
        "attn_diff",
        "attn_log2_ratio",
        "pos_ratio_diff",
        "in_reference_set",
    ):
        assert col in df.columns, col
    # the default ranking: the last model's key score, then genes without one by attention
    scored = df["key_score_b"].notna().to_numpy()
    assert scored[: scored.sum()].all()
    assert df["key_score_b"][scored].is_monotonic_decreasing
    assert df["attn_b"][~scored].is_monotonic_decreasing
    assert df["attn_scaled_a"].max() == pytest.approx(1.0) and df["attn_scaled_a"].min() == pytest.approx(0.0)
    t = df["token_id"].to_numpy()
    np.testing.assert_allclose(df["attn_a"], gene_total(result)[0, t])
    np.testing.assert_allclose(df["attn_per_cell_b"], gene_total(result)[1, t] / result.gene_occ[t])
    np.testing.assert_allclose(df["attn_pos_ratio_a"], position_controlled_attention(result)[0, t])
    np.testing.assert_allclose(df["attn_diff"], df["attn_b"] - df["attn_a"])
    assert df.loc[df["symbol"] == "G5", "in_reference_set"].tolist() in ([1], [])
    assert df.loc[df["token_id"] == 7, "in_reference_set"].tolist() in ([1], [])
    assert df["in_reference_set"].sum() == len({5, 7} & set(t))
    # ranks are 1-based positions among genes: <cls> does not count
    assert df["rank_mean"].min() >= 1 and df["rank_std"].min() >= 0


def test_position_control_is_one_when_attention_follows_position_only(result):
    """A gene that always sits at one position and gets that position's mean attention has ratio 1."""
    ratio = position_controlled_attention(result)
    expected = gene_expected(result)
    assert ratio.shape == (2, VOCAB)
    seen = result.gene_occ > 0
    assert np.all(np.isfinite(ratio[:, seen])) and np.all(np.isnan(ratio[:, ~seen]))
    # summed over all tokens, observed and expected attention are the same total
    np.testing.assert_allclose(expected.sum(1), gene_total(result).sum(1), rtol=1e-10)
    np.testing.assert_allclose(position_controlled_attention(result, per_head=True).shape, (2, 3, 4, VOCAB))


def test_pair_records_written_into_a_store(result, tmp_path):
    from pipeline.analysis.pair import attention_statistics
    from store import Store

    st = Store(tmp_path / "s.db")
    run = st.create_run("lowhigh: frozen vs unfrozen", "analysis")
    genes = gene_table(result, ID_TO_GENE, SYMBOLS)
    stats = attention_statistics(result, n_boot=50, n_perm=100)
    records = pair_records(
        result,
        genes,
        {"overlap": [{"k": 10, "overlap": 2, "p_value": 0.1}]},
        stats,
        model_names=("frozen", "unfrozen"),
    )
    records.write(st, run)
    summary = records.json("summary")
    grids = set(st.grid_names(run))
    assert {"cosine", "cosine_std", "norm_a", "norm_b", "norm_summed_a", "norm_summed_b", "p_value"} <= grids
    cos = st.grid(run, "cosine")
    assert cos["values"].shape == (3, 4) and cos["lower"] is not None and np.all(cos["lower"] <= cos["upper"])
    assert st.grid(run, "norm_summed_a")["values"].shape == (3, 1)
    vectors = set(st.vector_names(run))
    assert {
        "rank_received_a",
        "rank_received_b",
        "rank_pct_diff",
        "rank_log_ratio",
        "rank_count",
        "length_hist",
        "rank_received_lh_a",
    } <= vectors
    assert st.vector(run, "rank_received_a").shape == (result.max_len,)
    assert st.vector(run, "rank_received_lh_b").shape == (3, 4, result.max_len)
    meta = st.vector_meta(run, "rank_pct_diff")
    assert meta["median_length"] == pytest.approx(length_median(result)) and meta["special_positions"][0] == 0
    assert st.vector(run, "length_hist").sum() == result.n_cells
    table = st.gene_table_df(run, "genes")
    assert len(table) == len(genes) and "attn_a" in table.columns
    assert st.get_json(run, "de_overlap")["overlap"][0]["k"] == 10
    assert "p_value" in st.get_json(run, "stats")
    assert summary["models"] == {"a": "frozen", "b": "unfrozen"} and len(summary["top_genes_b"]) == 10
    st.close()


def _save_model(path, seed, dicts):
    save_tiny_classifier(path, dicts, seed=seed, initializer_range=0.3)


def test_gfattn_analyze_records_an_analysis_run(tmp_path, capsys):
    import datasets

    from pipeline.cli import main
    from pipeline.data.dictionaries import GeneDictionaries
    from store import Store

    tokens = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i + 2 for i in range(60)}}
    dicts = GeneDictionaries(
        tokens,
        {k: 1.0 for k in tokens if not k.startswith("<")},
        name_to_id={f"G{i}": f"ENSG{i:011d}" for i in range(60)},
        version="V1",
    )
    _save_model(tmp_path / "frozen", 1, dicts)
    _save_model(tmp_path / "unfrozen", 2, dicts)
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(2, 62), int(rng.integers(5, 30)), replace=False).tolist() for _ in range(12)]
    datasets.Dataset.from_dict(
        {
            "input_ids": seqs,
            "length": [len(s) for s in seqs],
            "cell_id": [f"c{i}" for i in range(12)],
            "group": ["high" if i % 2 else "low" for i in range(12)],
        }
    ).save_to_disk(str(tmp_path / "tok"))
    ref = tmp_path / "ref.txt"
    ref.write_text("G3\nG4\nENSG00000000010\n")
    store_path = tmp_path / "s.db"
    rc = main(
        [
            "analyze",
            "--model-a",
            str(tmp_path / "frozen"),
            "--model-b",
            str(tmp_path / "unfrozen"),
            "--data",
            str(tmp_path / "tok"),
            "--group-column",
            "group",
            "--reference-set",
            str(ref),
            "--batch-size",
            "4",
            "--n-boot",
            "20",
            "--device",
            "cpu",
            "--store",
            str(store_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "carries no split" in out  # not fine-tuned by gfattn: every cell
    assert "frozen vs unfrozen: 12 cells" in out and "cosine similarity per layer" in out
    with Store(store_path) as st:
        runs = st.list_runs(kind="analysis")
        assert len(runs) == 1 and runs[0]["status"] == "completed"
        run = runs[0]["id"]
        assert st.grid(run, "cosine")["values"].shape == (2, 2)
        genes = st.gene_table_df(run, "genes")
        assert {"rank_mean_high", "rank_mean_low", "in_reference_set"} <= set(genes.columns)
        assert genes["in_reference_set"].sum() == len({"G3", "G4", "G10"} & set(genes["symbol"]))
    rc = main(
        ["analyze", "--model-a", str(tmp_path / "frozen"), "--data", str(tmp_path / "nope"), "--store", str(store_path)]
    )
    assert rc == 2 and "is not a directory" in capsys.readouterr().err
    # a model fine-tuned by gfattn carries its split: by default only its held-out test cells are analysed
    from pipeline.training.finetune import save_split

    split = ["test" if i % 4 == 0 else "train" for i in range(12)]
    save_split(tmp_path / "frozen", [f"c{i}" for i in range(12)], split)
    args = [
        "analyze",
        "--model-a",
        str(tmp_path / "frozen"),
        "--model-b",
        str(tmp_path / "unfrozen"),
        "--data",
        str(tmp_path / "tok"),
        "--n-boot",
        "5",
        "--device",
        "cpu",
        "--store",
        str(store_path),
    ]
    assert main(args) == 0
    assert "frozen vs unfrozen: 3 cells" in capsys.readouterr().out
    (tmp_path / "ids.txt").write_text("c1\nc2\n")
    assert main([*args, "--cells", str(tmp_path / "ids.txt")]) == 0
    assert "frozen vs unfrozen: 2 cells" in capsys.readouterr().out
    assert main([*args, "--cells", "all"]) == 0
    assert "frozen vs unfrozen: 12 cells" in capsys.readouterr().out
    # a fine-tuned model whose weights changed after it was saved is refused, never analysed
    weights = tmp_path / "unfrozen" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rc = main(
        [
            "analyze",
            "--model-a",
            str(tmp_path / "frozen"),
            "--model-b",
            str(tmp_path / "unfrozen"),
            "--data",
            str(tmp_path / "tok"),
            "--store",
            str(store_path),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "sha256" in err and "unfrozen" in err, err
    with Store(store_path) as st:
        assert len(st.list_runs(kind="analysis")) == 4  # nothing recorded for the refused run
