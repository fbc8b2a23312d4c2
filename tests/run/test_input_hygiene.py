"""Input hygiene before a run is recorded: NaN labels counted, a class too small for the split refused in
one line, the gene mapping counted over the genes detected in the selected cells (an unfiltered symbol
matrix self-pretrains), flags named by error messages exist, library warnings stay off the terminal."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline import config
from pipeline.errors import InputError

from tests import REPO


def _synthetic(path: Path, *, scale: float = 0.06, seed: int = 0, geneformer_dir=None):
    from pipeline.data.synth import make_sciplex_like

    adata = make_sciplex_like(scale=scale, preset="thesis", seed=seed, geneformer_dir=geneformer_dir)
    adata.uns.pop("gfattn_truth", None)
    return adata


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Synthetic counts with a `cell_type` column: two big classes, a 4-cell class and 9 NaN labels."""
    root = tmp_path_factory.mktemp("hygiene")
    adata = _synthetic(root)
    n = adata.n_obs
    kind = np.where(np.arange(n) % 2 == 0, "T cell", "CD14 Mono").astype(object)
    kind[:4] = "pDC"
    kind[4:13] = np.nan
    adata.obs["cell_type"] = kind
    path = root / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def _cfg(path, **flags):
    return config.resolve("default", None, {"data.path": str(path), "data.umap": False, **flags})


def test_nan_labels_are_counted_in_the_selection_line(labelled, tmp_path):
    from pipeline.run.context import Context
    from pipeline.run.preflight import preflight
    from pipeline.run.stages.data import stage_data

    cfg = _cfg(labelled, tasks=[{"name": "cell_type", "column": "cell_type", "classes": ["T cell", "CD14 Mono"]}])
    pre = preflight(cfg)
    assert pre.selection.no_label == 9

    class Lines:
        def __init__(self):
            self.lines = []

        def line(self, text, **_):
            self.lines.append(text)

    rep = Lines()
    ctx = Context(cfg=cfg, store=None, run_id=0, rep=rep, cache=tmp_path, device="cpu", preflight=pre)
    stage_data(ctx)
    selection = next(line for line in rep.lines if "cells selected of" in line)
    assert selection.endswith("; 9 cells without a label (NaN) dropped"), selection


def test_a_class_too_small_for_the_split_is_one_line_before_any_run(labelled, tmp_path):
    from pipeline.run.driver import run_pipeline
    from store import Store

    cfg = _cfg(labelled, tasks=[{"name": "cell_type", "column": "cell_type"}])
    db = tmp_path / "gfattn.db"
    with pytest.raises(InputError) as err:
        run_pipeline(cfg, db)
    message = str(err.value)
    assert "\n" not in message
    assert "class 'pDC' has 4 cells; each class needs at least 14" in message
    assert "validation (15%) and test (15%) hold 2 or more" in message and "--classes" in message
    assert Store(db).list_runs() == []  # refused before a run was recorded
    # dropped with --classes, the same data passes
    from pipeline.run.preflight import preflight

    ok = _cfg(labelled, tasks=[{"name": "cell_type", "column": "cell_type", "classes": ["T cell", "CD14 Mono"]}])
    assert set(preflight(ok).selection.class_names("cell_type")) == {"T cell", "CD14 Mono"}


def test_min_class_cells_follows_the_split():
    from pipeline.data.design import min_class_cells

    assert min_class_cells(0.15, 0.15) == 14  # ceil(2 / 0.15): 2 test and 2 validation cells
    assert min_class_cells(0.3, 0.3) == 10  # never fewer than MIN_CLASS_CELLS
    assert min_class_cells(0.1, 0.2) == 20


@pytest.fixture(scope="module")
def unfiltered_symbols(tmp_path_factory, geneformer_dir):
    """Counts over real Geneformer genes named by symbol, plus three times as many genes no cell expresses
    (an unfiltered matrix of an older annotation): a quarter of var maps, every detected gene does."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from pipeline.data.dictionaries import GeneDictionaries

    root = tmp_path_factory.mktemp("unfiltered")
    adata = _synthetic(root, scale=0.06, geneformer_dir=geneformer_dir)
    dicts = GeneDictionaries.from_geneformer_dir(geneformer_dir, "V2")
    symbol_of = {v: k for k, v in (dicts.name_to_id or {}).items()}
    ids = [str(i) for i in adata.var_names]
    keep = [i for i, g in enumerate(ids) if g in symbol_of]
    symbols = [symbol_of[ids[i]] for i in keep]
    counts = sp.csr_matrix(adata.X)[:, keep]
    n_junk = 3 * len(keep)
    X = sp.hstack([counts, sp.csr_matrix((adata.n_obs, n_junk), dtype=counts.dtype)]).tocsr()
    var = pd.DataFrame(index=symbols + [f"FAKE-OLD-{i}" for i in range(n_junk)])
    out = ad.AnnData(X=X, obs=adata.obs.copy(), var=var)
    out.var_names_make_unique()
    path = root / "unfiltered.h5ad"
    out.write_h5ad(path)
    return path, len(keep), n_junk


def test_inspect_reports_the_detected_share_and_its_counts(unfiltered_symbols, geneformer_dir):
    from pipeline.commands.inspect import describe, format_description

    path, n_real, n_junk = unfiltered_symbols
    doc = describe(path, geneformer_dir=geneformer_dir)
    v2 = next(m for m in doc["mapping"] if m["dictionaries"] == "V2")
    assert v2["genes"] == n_real + n_junk and v2["mapped"] <= n_real
    assert v2["mapped_detected"] == v2["detected"] and v2["counts_share"] == pytest.approx(1.0)
    text = format_description(doc, geneformer_dir=geneformer_dir)
    assert f"of the {v2['detected']:,} genes detected in some cell" in text and "100.0% of the counts" in text


def test_an_unfiltered_symbol_matrix_self_pretrains(unfiltered_symbols, geneformer_dir, tmp_path):
    """Without --model, the vocabulary check counts the genes detected in the selected cells: an unfiltered
    matrix whose var is three quarters unexpressed, unknown symbols passes, pretrains and fine-tunes."""
    import io

    from pipeline.run.driver import run_pipeline
    from store import Store

    path, n_real, n_junk = unfiltered_symbols
    assert n_real / (n_real + n_junk) < 0.5  # counted over all of var, the old check refused it
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(
        "[train]\ntasks = ['lowhigh']\nmodes = ['frozen']\nepochs = 1\n[analysis]\ntasks = []\npairs = []\nde = false\n"
        "[pretrain]\ncorpus_cells = 100\nlayers = 1\nhidden = 16\nheads = 2\nintermediate = 32\nmax_len = 64\n"
        "epochs = 1\ncell_loss_weight = 0.0\n[model]\nmax_len = 64\n[data]\numap = false\n"
        "[compute]\nthreads = 1\n"
    )
    cfg = config.resolve("default", tiny, {"data.path": str(path), "model.geneformer_dir": str(geneformer_dir)})
    out = io.StringIO()
    assert run_pipeline(cfg, tmp_path / "gfattn.db", stdout=out) == 0
    st = Store(tmp_path / "gfattn.db")
    events = " ".join(e["message"] for e in st.events(1))
    assert "pretraining gfattn's small model (1 layers x 16) by masked genes on the" in events
    assert "pretrained by masked genes on this data's training cells" in out.getvalue()


def test_the_pretraining_line_names_the_objective():
    from pipeline.models.pretrain import pretraining_objective

    default = config.resolve("default")["pretrain"]
    assert pretraining_objective(default) == (
        "masked genes plus the first position regressing the cell's top 32 principal components (weight 3)"
    )
    assert pretraining_objective({**default, "cell_loss_weight": 0.0}) == "masked genes"


def test_flags_named_by_error_messages_exist():
    """Every `--flag` the pipeline's messages name is a flag of `gfattn pipeline` (or of the command named)."""
    from pipeline.cli import build_parser

    options = {o for a in build_parser("pipeline")[0]._actions for o in a.option_strings}
    other = {"--embedded": "pretrain"}  # "rebuilt by `gfattn pretrain --embedded`"
    root = REPO / "pipeline"
    named = set()
    for name in (
        "data/counts.py",
        "run/driver.py",
        "data/design.py",
        "training/baseline.py",
        "models/checkpoint_check.py",
    ):
        named |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", (root / name).read_text()))
    for flag in sorted(named):
        if flag in other:
            assert flag in {o for a in build_parser(other[flag])[0]._actions for o in a.option_strings}
        else:
            assert flag in options, f"{flag} is named in a message but `gfattn pipeline` has no such flag"


def test_layer_flags_map_to_the_config(capsys):
    from pipeline.cli import main

    assert main(["pipeline", "--print-config", "--layer", "counts", "--gene-id-column", "gene_ids"]) == 0
    out = capsys.readouterr().out
    assert 'layer = "counts"' in out and 'gene_id_column = "gene_ids"' in out


def test_library_warnings_stay_off_the_terminal():
    from scipy import stats
    from sklearn.metrics import precision_score

    from pipeline.run.driver import quiet_library_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_library_warnings():
            stats.spearmanr([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
            precision_score([0, 1], [0, 0])
        assert seen == []
        stats.spearmanr([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])  # outside, the filter is gone again
        assert any(issubclass(w.category, stats.ConstantInputWarning) for w in seen)
