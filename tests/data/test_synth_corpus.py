"""The healthy pretraining corpus: cell types from co-expressed programs over the sci-Plex-like genes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import synth, synth_genes
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def corpus():
    return synth.make_corpus(n_cells=1200, seed=0, preset="thesis")


def test_corpus_layout_and_universe(corpus):
    assert corpus.n_obs == 1200
    assert list(corpus.obs.columns) == ["cell_type", "n_counts", "ngenes", "percent_mito", "percent_ribo"]
    assert set(corpus.obs["cell_type"]) == set(synth_genes.CELL_TYPE_MARKERS)
    assert corpus.X.format == "csr" and corpus.X.dtype == np.int32
    # same genes, same order as the sci-Plex-like data of the preset: the pretrained vocabulary covers it
    assert corpus.var.equals(synth.gene_universe("thesis"))
    assert corpus.var.equals(synth.make_sciplex_like(scale=0.02, preset="thesis", seed=5).var)
    med = np.median(corpus.obs["ngenes"])
    assert 0.7 * 680 < med < 1.3 * 680


def test_each_type_expresses_its_markers(corpus):
    x = corpus.X
    libs = np.asarray(x.sum(axis=1)).ravel()
    types = corpus.obs["cell_type"].astype(str).to_numpy()
    names = list(synth_genes.CELL_TYPE_MARKERS)
    for name, markers in synth_genes.CELL_TYPE_MARKERS.items():
        cols = corpus.var.index.get_indexer([synth_genes.GENE_IDS[s] for s in markers])
        score = [np.asarray(x[types == t][:, cols].sum(axis=1)).ravel().sum() / libs[types == t].sum() for t in names]
        assert names[int(np.argmax(score))] == name


def test_state_programs_are_co_expressed(corpus):
    """Two halves of a program correlate across cells (the gene-gene structure pretraining learns);
    two halves of as many random genes do not."""
    x = corpus.X
    libs = np.asarray(x.sum(axis=1)).ravel()
    rng = np.random.default_rng(0)

    def half_correlation(cols):
        expr = np.log1p(1e4 * x[:, cols].toarray() / libs[:, None])
        h = len(cols) // 2
        return np.corrcoef(expr[:, :h].mean(axis=1), expr[:, h:].mean(axis=1))[0, 1]

    for program, syms in synth_genes.STATE_PROGRAMS.items():
        cols = corpus.var.index.get_indexer([synth_genes.GENE_IDS[s] for s in syms])
        others = rng.choice(np.setdiff1d(np.arange(corpus.n_vars), cols), size=len(cols), replace=False)
        within, control = half_correlation(cols), half_correlation(others)
        assert within > 0.25 and within > abs(control) + 0.15, (program, within, control)


def test_corpus_truth_and_determinism(corpus):
    truth = synth.ground_truth(corpus)
    assert truth["kind"] == "corpus" and truth["seed"] == 0
    assert truth["cell_types"]["name"] == list(synth_genes.CELL_TYPE_MARKERS)
    assert set(truth["state_programs"]) == set(synth_genes.STATE_PROGRAMS)
    a = synth.make_corpus(n_cells=80, seed=2, preset="thesis", n_types=3)
    b = synth.make_corpus(n_cells=80, seed=2, preset="thesis", n_types=3)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert set(a.obs["cell_type"]) == set(list(synth_genes.CELL_TYPE_MARKERS)[:3])


def test_corpus_bad_arguments():
    with pytest.raises(InputError, match="n_types"):
        synth.make_corpus(n_cells=10, n_types=20)
    with pytest.raises(InputError, match="n_cells"):
        synth.make_corpus(n_cells=0)


def test_atlas_p53_response_is_graded_and_arrests_the_cycle():
    """Like an atlas's stressed cells: p53 targets rise with the response's strength, cycling genes fall,
    and strongly responding cells leave S and G2/M; the strength is recorded per cell."""
    corpus = synth.make_corpus(n_cells=1200, seed=0, preset="thesis", atlas=True)
    truth = synth.ground_truth(corpus)
    cells = truth["cells"]
    assert cells["cell_id"] == list(corpus.obs_names)
    act = np.asarray(cells["p53_activity"])
    active = act > 0
    assert 0.15 < active.mean() < 0.35 and 0.0 <= act.min() and act.max() <= 1.0
    # graded: active cells span weak to strong responses
    assert np.quantile(act[active], 0.25) < 0.4 < 0.6 < np.quantile(act[active], 0.75)
    x = corpus.X
    libs = np.asarray(x.sum(axis=1)).ravel()

    def program(syms):
        cols = corpus.var.index.get_indexer([synth_genes.GENE_IDS[s] for s in syms])
        return np.log1p(1e4 * np.asarray(x[:, cols].sum(axis=1)).ravel() / libs)

    p53 = program(synth_genes.P53_TARGETS_UP)
    assert np.corrcoef(act, p53)[0, 1] > 0.5
    strong, none = act > 0.7, ~active
    cycling = np.isin(np.asarray(cells["phase"]), ["S", "G2M"])
    assert cycling[strong].mean() < 0.5 * cycling[none].mean()
    cc = program(synth_genes.CELL_CYCLE_DOWN)
    assert cc[strong & ~cycling].mean() < cc[none & ~cycling].mean()


def test_healthy_corpus_records_its_p53_cells(corpus):
    cells = synth.ground_truth(corpus)["cells"]
    act = np.asarray(cells["p53_activity"])
    assert len(act) == corpus.n_obs and 0.05 < (act > 0).mean() < 0.2 and act[act > 0].min() >= 0.5


def test_lineage_cells_join_the_corpus_as_a_dosed_cell_line_without_doses():
    """`lineage_cells`: the corpus ends with cells of a sci-Plex-like line drawn with its own seed (so not
    the data it is compared with), in a graded stress series whose strength is recorded, no dose column."""
    base = synth.make_corpus(n_cells=300, seed=2, preset="thesis", atlas=True)
    corpus = synth.make_corpus(n_cells=300, seed=2, preset="thesis", atlas=True, lineage_cells=120)
    assert corpus.n_obs == 420 and list(corpus.obs.columns) == list(base.obs.columns)
    assert (corpus.X[:300] != base.X).nnz == 0  # the corpus itself is unchanged, draw for draw
    line = corpus.obs["cell_type"].to_numpy()[300:]
    assert set(line) == {synth.LINEAGE_TYPE} and synth.LINEAGE_TYPE not in set(base.obs["cell_type"])
    truth = synth.ground_truth(corpus)
    cells = truth["cells"]
    assert cells["cell_id"] == list(corpus.obs_names) and len(cells["phase"]) == 420
    response = np.asarray(cells["p53_activity"][300:])
    # the line's cells span the dose series: vehicle-like and saturated responses both present
    assert response.min() < 0.05 and response.max() > 0.9
    assert truth["lineage"]["seed"] == 2 + synth.LINEAGE_SEED_OFFSET
    x = corpus.X[300:]
    cols = corpus.var.index.get_indexer([synth_genes.GENE_IDS[s] for s in synth_genes.P53_TARGETS_UP])
    p53 = np.log1p(1e4 * np.asarray(x[:, cols].sum(axis=1)).ravel() / np.asarray(x.sum(axis=1)).ravel())
    assert np.corrcoef(response, p53)[0, 1] > 0.5  # the p53 targets follow the recorded strength
    with pytest.raises(InputError, match="lineage_cells"):
        synth.make_corpus(n_cells=10, seed=0, preset="thesis", lineage_cells=-1)
