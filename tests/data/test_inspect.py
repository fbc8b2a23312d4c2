"""`gfattn inspect`: a data set described before anything is trained, checked against direct computations."""

import json

import numpy as np
import pytest

from tests._helpers_cli import cli as gfattn
from tests._helpers_tokenize import datlinger_anndata


@pytest.fixture(scope="module")
def tcells(shared, tmp_path_factory):
    adata = datlinger_anndata(shared)
    path = tmp_path_factory.mktemp("inspect") / "tcells.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_inspect_describes_real_t_cells(tcells, geneformer_dir):
    adata, path = tcells
    out = gfattn("inspect", str(path), "--geneformer-dir", str(geneformer_dir), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["cells"], doc["genes"]) == adata.shape
    detected = np.diff(adata.X.tocsr().indptr)
    assert doc["detected_genes"]["median"] == float(np.median(detected))
    stim = next(c for c in doc["obs"] if c["name"] == "perturbation_2")
    assert stim["values"] == {k: int(v) for k, v in adata.obs["perturbation_2"].value_counts().items()}
    versions = {m["dictionaries"]: m for m in doc["mapping"]}
    assert set(versions) == {"V1", "V2"} and 1500 < versions["V1"]["mapped"] < 2000  # README: ~1,611 symbols map
    assert doc["suggested_label_columns"][0] == "perturbation_2"
    text = gfattn("inspect", str(path), "--geneformer-dir", str(geneformer_dir))
    assert text.returncode == 0
    n_stim = int((adata.obs["perturbation_2"] == "stimulated").sum())
    assert "--label-column perturbation_2" in text.stdout and f"stimulated {n_stim:,}" in text.stdout


def test_inspect_refuses_a_missing_file_in_one_line(tmp_path):
    out = gfattn("inspect", str(tmp_path / "nope.h5ad"))
    assert out.returncode == 2 and "does not exist" in out.stderr.strip().splitlines()[-1]
    out = gfattn("inspect", str(tmp_path))
    assert out.returncode == 2 and "is a directory" in out.stderr
