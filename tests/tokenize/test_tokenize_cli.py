"""`gfattn tokenize` end to end: the happy path, and every bad input exits 2 with one line and
leaves nothing behind."""

import os
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tests import REPO
from tests._helpers_cli import cli
from tests._helpers_tokenize import tiny_counts_adata, tiny_vocabulary, write_vocabulary


def gfattn(*args, cwd=None):
    """`gfattn tokenize ARGS` in this process (`pipeline.cli.main`)."""
    return cli("tokenize", *args, cwd=cwd or REPO)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    raw = tiny_vocabulary(n_genes=40, version="V2", seed=5)
    paths = write_vocabulary(raw, base / "dicts")
    adata = tiny_counts_adata(raw, n_cells=20, seed=5)
    good = base / "good.h5ad"
    adata.write_h5ad(good)
    return base, raw, paths, adata, good


def dict_args(paths):
    return [
        "--token-dictionary",
        paths["token_dictionary"],
        "--gene-median",
        paths["gene_median_dictionary"],
        "--gene-mapping",
        paths["ensembl_mapping_dict"],
        "--gene-name-id",
        paths["gene_name_id_dict"],
    ]


def test_cli_tokenizes_and_reports(setup, tmp_path):
    _, _, paths, adata, good = setup
    out = tmp_path / "nested" / "tok"
    r = gfattn(good, "--out", out, *dict_args(paths), "--obs-columns", "label,dose", "--max-len", "10")
    assert r.returncode == 0, r.stderr
    assert "cells: 20 in, 20 tokenized" in r.stdout and "genes: 40 of 40 mapped to the V2 vocabulary" in r.stdout
    assert "n_counts: obs['n_counts']" in r.stdout and "length: median" in r.stdout
    from pipeline.tokenize.encode import load_tokenize_report, load_tokenized

    ds = load_tokenized(out)
    assert set(ds.column_names) == {"input_ids", "length", "cell_id", "label", "dose"}
    assert ds["cell_id"] == list(adata.obs_names)
    assert all(ids[0] == 2 and ids[-1] == 3 and len(ids) <= 10 for ids in ds["input_ids"])
    assert load_tokenize_report(out).cells_out == 20
    assert [p.name for p in out.parent.iterdir()] == ["tok"]  # no temporary leftovers
    r = gfattn(good, "--out", out, *dict_args(paths))
    assert r.returncode == 2 and "already exists" in r.stderr
    from pipeline.cli import main

    assert main(["tokenize", str(good), "--out", str(out), *map(str, dict_args(paths)), "--overwrite"]) == 0
    assert len(load_tokenized(out)) == 20


def _write(adata, path):
    adata.write_h5ad(path)
    return path


def _bad_inputs(base, raw, adata, good):
    """(name, data path, extra args, expected message fragment)."""
    cases = [("missing file", base / "nope.h5ad", [], "no such file")]
    junk = base / "junk.h5ad"
    junk.write_bytes(b"this is not HDF5")
    cases.append(("unreadable file", junk, [], "cannot read as .h5ad"))
    lognorm = adata.copy()
    lognorm.X = sp.csr_matrix(np.log1p(lognorm.X.toarray()))
    cases.append(("log-normalised X", _write(lognorm, base / "lognorm.h5ad"), [], "non-integer values"))
    neg = adata.copy()
    neg.X = neg.X.copy()
    neg.X.data[3] = -2
    cases.append(("negative counts", _write(neg, base / "neg.h5ad"), [], "negative values"))
    noid = ad.AnnData(X=adata.X, obs=adata.obs, var=pd.DataFrame(index=[str(i) for i in range(adata.n_vars)]))
    cases.append(("no gene-ID column", _write(noid, base / "noid.h5ad"), [], "no gene-ID column"))
    mouse = ad.AnnData(
        X=adata.X, obs=adata.obs, var=pd.DataFrame(index=[f"Gm{i}" for i in range(30)] + list(adata.var_names[30:]))
    )
    cases.append(("few genes map", _write(mouse, base / "mouse.h5ad"), [], "only 10 of 40 genes (25.0%)"))
    cases.append(("missing obs column", good, ["--obs-columns", "label,cell_type"], "no obs column 'cell_type'"))
    cases.append(("missing n_counts column", good, ["--n-counts-column", "umi"], "no obs column 'umi'"))
    cases.append(("missing layer", good, ["--layer", "counts"], "no layer 'counts'"))
    cases.append(("missing gene-ID column", good, ["--gene-id-column", "symbol"], "no var column 'symbol'"))
    return cases


def test_cli_bad_inputs_exit_2_and_write_nothing(setup, tmp_path):
    base, raw, paths, adata, good = setup
    for k, (name, data, extra, fragment) in enumerate(_bad_inputs(base, raw, adata, good)):
        out = tmp_path / f"run{k}" / "out"
        r = gfattn(data, "--out", out, *dict_args(paths), *extra)
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gfattn tokenize: error: "), (name, r.stderr)
        assert fragment in lines[0], (name, lines[0])
        assert not out.parent.exists(), (name, list(out.parent.iterdir()))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_dictionary_errors(setup, tmp_path):
    _, _, paths, _, good = setup
    out = tmp_path / "out"
    r = gfattn(good, "--out", out)
    assert r.returncode == 2 and "--geneformer-dir" in r.stderr and "--token-dictionary" in r.stderr
    r = gfattn(good, "--out", out, "--token-dictionary", paths["token_dictionary"])
    assert r.returncode == 2 and "go together" in r.stderr
    # a hostile pickle is refused before anything runs
    marker = tmp_path / "pwned"
    evil = tmp_path / "token_dictionary.pkl"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    r = gfattn(good, "--out", out, "--token-dictionary", evil, "--gene-median", paths["gene_median_dictionary"])
    assert r.returncode == 2 and "refusing to unpickle posix.system" in r.stderr
    assert not marker.exists() and not out.exists()
    r = gfattn(good, "--out", out, "--geneformer-dir", tmp_path)
    assert r.returncode == 2 and "no V2 dictionaries found" in r.stderr and not out.exists()


def test_cli_real_geneformer_dir(geneformer_dir, tmp_path):
    """Ensembl IDs with version suffixes against the real V1 dictionaries."""
    with open(geneformer_dir / "gene_dictionaries_30m" / "token_dictionary_gc30M.pkl", "rb") as fh:
        genes = [g for g in pickle.load(fh) if not g.startswith("<")][:300]
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(0.5, size=(15, 300)).astype(np.float32))
    adata = ad.AnnData(
        X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(15)]), var=pd.DataFrame(index=[f"{g}.7" for g in genes])
    )
    adata.write_h5ad(tmp_path / "v.h5ad")
    r = gfattn(
        tmp_path / "v.h5ad", "--out", tmp_path / "tok", "--geneformer-dir", geneformer_dir, "--model-version", "V1"
    )
    assert r.returncode == 0, r.stderr
    assert "300 of 300 mapped to the V1 vocabulary" in r.stdout and "computed from X" in r.stdout
