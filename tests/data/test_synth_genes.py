"""Named genes of the generator against the real Geneformer dictionaries and the Fischer p53 census."""

from __future__ import annotations

import csv

import pytest

from pipeline.data import synth, synth_genes
from pipeline.data.dictionaries import load_pickle_restricted


def test_named_gene_tables_are_consistent():
    ids = synth_genes.GENE_IDS
    assert len(set(ids.values())) == len(ids)
    tables = [
        synth_genes.P53_TARGETS_UP,
        synth_genes.CELL_CYCLE_DOWN,
        synth_genes.MITO_CP10K,
        synth_genes.HOUSEKEEPING_CP10K,
        synth_genes.A549_CP10K,
    ]
    for table in tables:
        assert set(table) <= set(ids)
    for syms in list(synth_genes.CELL_TYPE_MARKERS.values()) + list(synth_genes.STATE_PROGRAMS.values()):
        assert set(syms) <= set(ids)
    assert len(synth_genes.RIBOSOMAL) >= 70 and len(synth_genes.MITO_CP10K) == 13
    for lo, hi, base in synth_genes.P53_TARGETS_UP.values():
        assert 0 < lo < hi <= 4 and base > 0


def test_named_genes_match_real_dictionaries(geneformer_dir):
    v2_names = load_pickle_restricted(geneformer_dir / "gene_name_id_dict_gc104M.pkl")
    v2_tokens = load_pickle_restricted(geneformer_dir / "token_dictionary_gc104M.pkl")
    v1_tokens = load_pickle_restricted(geneformer_dir / "gene_dictionaries_30m" / "token_dictionary_gc30M.pkl")
    wrong = {s: (e, v2_names.get(s)) for s, e in synth_genes.GENE_IDS.items() if v2_names.get(s) != e}
    assert not wrong
    missing = [s for s, e in synth_genes.GENE_IDS.items() if e not in v2_tokens or e not in v1_tokens]
    assert not missing


def test_planted_p53_targets_are_fischer_census_genes(shared):
    path = shared / "data" / "genesets" / "fischer2017_p53_targets_343.tsv"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    with open(path, newline="") as fh:
        census = {row["ensembl_id"]: row["symbol"] for row in csv.DictReader(fh, delimiter="\t")}
    for sym in synth_genes.P53_TARGETS_UP:
        assert census.get(synth_genes.GENE_IDS[sym]) == sym
    assert not {synth_genes.GENE_IDS[s] for s in synth_genes.CELL_CYCLE_DOWN} & set(census)


def test_synthetic_universe_ids():
    var = synth.gene_universe("thesis")
    assert len(var) == 5000 and var.index.is_unique and var.index.is_monotonic_increasing
    synthetic = var.index[var.index.str.startswith("ENSG9")]
    assert len(synthetic) == 5000 - len(synth_genes.GENE_IDS)
    assert all(len(g) == 15 and g[4:].isdigit() for g in var.index)
    assert var.loc[synthetic, "gene_symbol"].str.match(r"^SYN\d{5}$").all()
    assert synth.gene_universe("thesis").equals(var)
    assert len(synth.gene_universe("thesis", n_genes=800)) == 800


def test_universe_from_a_geneformer_vocabulary(geneformer_dir):
    v2_tokens = load_pickle_restricted(geneformer_dir / "token_dictionary_gc104M.pkl")
    v1_tokens = load_pickle_restricted(geneformer_dir / "gene_dictionaries_30m" / "token_dictionary_gc30M.pkl")
    names = load_pickle_restricted(geneformer_dir / "gene_name_id_dict_gc104M.pkl")
    symbol_of = {e: s for s, e in names.items()}
    var = synth.gene_universe("thesis", geneformer_dir)
    assert len(var) == 5000 and var.index.is_unique
    assert all(g in v2_tokens and g in v1_tokens for g in var.index)
    assert all(symbol_of.get(g, g) == s for g, s in zip(var.index, var["gene_symbol"]))
    # a checkout's root (holding geneformer/) finds the same vocabulary
    if (geneformer_dir.parent / "geneformer").is_dir():
        assert synth.gene_universe("thesis", geneformer_dir.parent).equals(var)
    a = synth.make_sciplex_like(scale=0.03, preset="thesis", geneformer_dir=geneformer_dir)
    c = synth.make_corpus(n_cells=60, preset="thesis", geneformer_dir=geneformer_dir)
    assert a.var.equals(var) and c.var.equals(var)
    assert synth.ground_truth(a)["vocabulary"] == "geneformer"
