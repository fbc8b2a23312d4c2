"""Tokenized datasets on disk, real data (DatlingerBock2021), vocabularies for gfattn-built models,
and cache keys."""

import json

import numpy as np
import pytest

from pipeline.data.dictionaries import GeneDictionaries
from pipeline.errors import InputError
from pipeline.tokenize.encode import (
    REPORT_FILE,
    build_vocabulary,
    hash_file,
    load_cached_tokenization,
    load_tokenize_report,
    load_tokenized,
    save_tokenized,
    tokenization_cache_key,
    tokenize_anndata,
    tokenize_to_disk,
)

from tests._helpers_tokenize import (
    assert_same_ranking,
    datlinger_anndata,
    load_raw_dicts,
    reference_gene_ids,
    reference_tokenize,
    tiny_counts_adata,
    tiny_vocabulary,
)


@pytest.fixture(scope="module")
def tiny():
    raw = tiny_vocabulary(n_genes=40, version="V2", seed=1)
    return raw, GeneDictionaries(raw["token"], raw["median"], raw["names"], raw["mapping"], "V2")


@pytest.fixture(scope="module")
def datlinger(tmp_path_factory):
    from pipeline.paths import shared_dir

    shared = shared_dir()
    if shared is None:
        pytest.skip("GFATTN_SHARED is not set: no DatlingerBock2021 subset")
    adata = datlinger_anndata(shared)
    path = tmp_path_factory.mktemp("datlinger") / "datlinger.h5ad"
    adata.write_h5ad(path)
    return adata, path


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_datlingerbock2021_ingests_and_tokenizes(geneformer_dir, datlinger, tmp_path, version):
    adata, path = datlinger
    assert adata.shape == (7500, 2000)
    raw = load_raw_dicts(geneformer_dir, version)
    dicts = GeneDictionaries.from_geneformer_dir(geneformer_dir, version)
    report = tokenize_to_disk(path, dicts, tmp_path / "tok", obs_columns=["perturbation", "perturbation_2"])
    ds = load_tokenized(tmp_path / "tok")
    assert report.n_counts_source == "obs['ncounts']" and report.gene_ids == "gene symbols in var index"
    # symbols through gene_name_id_dict (README: 1,611 V1 / 1,631 V2), plus Ensembl IDs and aliases
    assert report.genes_mapped >= (1611 if version == "V1" else 1631)
    assert report.cells_out + report.skipped_no_genes == 7500 and report.cells_out >= 7490
    assert set(ds["perturbation_2"]) == {"stimulated", "unstimulated"}
    assert 5 < report.length_median < 40
    ref = reference_tokenize(
        adata.X,
        list(adata.obs_names),
        adata.obs["ncounts"].to_numpy(),
        reference_gene_ids(list(adata.var_names), raw),
        raw,
    )
    assert ds["cell_id"] == [r[0] for r in ref]
    for got, (_cid, ids, full, values) in zip(ds["input_ids"], ref):
        assert_same_ranking(got, ids, full, values, version)


def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    raw, dicts = tiny
    ds, report = tokenize_anndata(tiny_counts_adata(raw, n_cells=10), dicts)
    out = tmp_path / "a" / "b" / "tok"

    def broken(self, path, *args, **kwargs):
        (__import__("pathlib").Path(path) / "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise OSError("disk full")

    import datasets

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken)
    with pytest.raises(OSError):
        save_tokenized(ds, out, report)
    assert not (tmp_path / "a").exists()
    monkeypatch.undo()
    save_tokenized(ds, out, report)
    assert load_tokenize_report(out).cells_out == 10
    with pytest.raises(InputError, match="already exists"):
        save_tokenized(ds, out, report)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok"]


def test_tokenization_cache_entries(tiny, tmp_path):
    """save_tokenized(..., cache=True) / load_cached_tokenization: what the pipeline caches tokenizations with."""
    raw, dicts = tiny
    ds, report = tokenize_anndata(tiny_counts_adata(raw, n_cells=10), dicts)
    entry = tmp_path / "cache" / "tokenized" / tokenization_cache_key("0" * 64, dicts, {"max_len": 2048})
    assert load_cached_tokenization(entry) is None
    assert save_tokenized(ds, entry, report, cache=True) == entry
    got, got_report = load_cached_tokenization(entry)
    assert got.to_dict() == ds.to_dict() and got_report == report
    # the report is the pipeline's flat layout under the pipeline's name, with the tokenizer format
    on_disk = json.loads((entry / REPORT_FILE).read_text())
    assert REPORT_FILE == "gfattn_tokenize_report.json" and on_disk["cells_out"] == 10 and on_disk["format"] == 1
    # a second writer of the same entry neither fails nor replaces the complete copy
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    save_tokenized(ds.select(range(3)), entry, report, cache=True)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before and len(load_tokenized(entry)) == 10
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
    # an entry without a report is incomplete: not served, replaced by the next save
    (entry / REPORT_FILE).unlink()
    assert load_cached_tokenization(entry) is None
    save_tokenized(ds.select(range(3)), entry, report, cache=True)
    assert len(load_cached_tokenization(entry)[0]) == 3


def test_reads_reports_of_earlier_layouts(tiny, tmp_path):
    raw, dicts = tiny
    ds, report = tokenize_anndata(tiny_counts_adata(raw, n_cells=4), dicts)
    ds.save_to_disk(str(tmp_path / "old"))
    (tmp_path / "old" / "tokenize_report.json").write_text(json.dumps({"format": 1, "report": report.to_dict()}))
    assert load_tokenize_report(tmp_path / "old") == report
    ds.save_to_disk(str(tmp_path / "pipeline"))  # the pipeline's cache wrote the bare report
    (tmp_path / "pipeline" / REPORT_FILE).write_text(json.dumps(report.to_dict()))
    assert load_cached_tokenization(tmp_path / "pipeline")[1] == report
    ds.save_to_disk(str(tmp_path / "none"))
    assert load_tokenize_report(tmp_path / "none") is None


def test_accepts_a_dataset_tokenized_by_geneformer(tmp_path):
    import datasets

    datasets.Dataset.from_dict(
        {"input_ids": [[2, 7, 9, 3], [2, 5, 3]], "cell_type": ["T", "B"], "length": [4, 3]}
    ).save_to_disk(str(tmp_path / "gf.dataset"))
    ds = load_tokenized(tmp_path / "gf.dataset")
    assert ds["cell_id"] == ["0", "1"] and ds["length"] == [4, 3] and ds["cell_type"] == ["T", "B"]
    datasets.Dataset.from_dict({"input_ids": [[5, 6], [7]]}).save_to_disk(str(tmp_path / "nolength"))
    assert load_tokenized(tmp_path / "nolength")["length"] == [2, 1]
    datasets.Dataset.from_dict({"tokens": [[5, 6]]}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(InputError, match="no input_ids"):
        load_tokenized(tmp_path / "wrong")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a readable"):
        load_tokenized(tmp_path / "empty")
    with pytest.raises(InputError, match="no tokenized dataset"):
        load_tokenized(tmp_path / "missing")


def test_large_outputs_spill_or_stream_to_disk(tiny, tmp_path):
    raw, dicts = tiny
    adata = tiny_counts_adata(raw, n_cells=60, seed=3)
    ref, _ = tokenize_anndata(adata, dicts, obs_columns=["label"])
    spilled, _ = tokenize_anndata(
        adata, dicts, obs_columns=["label"], chunk_size=16, spill_dir=tmp_path / "spill", spill_tokens=100
    )
    assert list((tmp_path / "spill").glob("*.arrow")), "expected an Arrow spill file"
    assert spilled.to_dict() == ref.to_dict()
    adata.write_h5ad(tmp_path / "x.h5ad")
    # streamed to disk in several shards
    tokenize_to_disk(
        tmp_path / "x.h5ad", dicts, tmp_path / "out" / "tok", chunk_size=16, shard_bytes=500, obs_columns=["label"]
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tok"]
    assert len(list((tmp_path / "out" / "tok").glob("data-*-of-00004.arrow"))) == 4
    assert load_tokenized(tmp_path / "out" / "tok").to_dict() == ref.to_dict()


def test_build_vocabulary_exact_medians(tmp_path):
    raw = tiny_vocabulary(n_genes=30, seed=4)
    adata = tiny_counts_adata(raw, n_cells=50, seed=4)
    genes = list(adata.var_names)
    adata.var["gene_symbol"] = [f"S{i}" for i in range(len(genes))]
    X = adata.X.toarray().astype(np.float64)
    X[:, 7] = 0  # never detected: not in the vocabulary
    import scipy.sparse as sp

    adata.X = sp.csr_matrix(X.astype(np.float32))
    n = adata.obs["n_counts"].to_numpy()
    vocab = build_vocabulary(adata)
    vocab_blocks = build_vocabulary(adata, max_values_in_memory=40)  # several passes over gene blocks
    assert vocab == vocab_blocks
    assert list(vocab.token_dict)[:2] == ["<pad>", "<mask>"] and vocab.token_dict["<pad>"] == 0
    assert vocab.version == "V1" and vocab.cls_id is None
    expected_genes = sorted(g for j, g in enumerate(genes) if j != 7)
    assert list(vocab.token_dict)[2:] == expected_genes
    for j, g in enumerate(genes):
        if j == 7:
            assert g not in vocab.gene_median
            continue
        nz = X[:, j] > 0
        assert vocab.gene_median[g] == pytest.approx(np.median(X[nz, j] / n[nz] * 10_000), rel=1e-12)
    assert vocab.name_to_id["S0"] == genes[0]
    vocab.save(tmp_path / "model")
    back = GeneDictionaries.from_model_dir(tmp_path / "model")
    assert back == vocab and back.version == "V1"
    ds, report = tokenize_anndata(adata, back)
    assert report.genes_mapped == 29 and all(t not in (0, 1) for ids in ds["input_ids"] for t in ids)
    with pytest.raises(InputError, match="no gene is detected in at least"):
        build_vocabulary(adata, min_cells=10**6)
    detected = (X > 0).sum(axis=0)
    threshold = int(np.median(detected[detected > 0])) + 1
    frequent = build_vocabulary(adata, min_cells=threshold)
    assert list(frequent.token_dict)[2:] == sorted(g for j, g in enumerate(genes) if detected[j] >= threshold)


def test_build_vocabulary_refuses_unresolvable_ids():
    raw = tiny_vocabulary(n_genes=10)
    adata = tiny_counts_adata(raw, n_cells=5)
    adata.var_names = [f"G{i}" for i in range(10)]
    with pytest.raises(InputError, match="Ensembl IDs"):
        build_vocabulary(adata)
    vocab = build_vocabulary(adata, name_to_id={f"G{i}": g for i, g in enumerate(raw["mapping"])})
    assert len(vocab.token_dict) == 12 and vocab.name_to_id["G3"] == list(raw["mapping"])[3]


def test_cache_keys(tiny, tmp_path):
    raw, dicts = tiny
    a = tmp_path / "a.bin"
    a.write_bytes(b"x" * 3_000_000)
    h = hash_file(a)
    assert h == hash_file(a) and len(h) == 64
    a.write_bytes(b"x" * 2_999_999 + b"y")
    assert hash_file(a) != h
    with pytest.raises(InputError):
        hash_file(tmp_path / "missing")
    opts = {"max_len": 2048, "obs_columns": ["a", "b"], "layer": None}
    k = tokenization_cache_key(h, dicts, opts)
    assert k == tokenization_cache_key(h, dicts, dict(reversed(list(opts.items()))))
    assert k != tokenization_cache_key(h, dicts, {**opts, "max_len": 1024})
    assert k != tokenization_cache_key("0" * 64, dicts, opts)
    other = GeneDictionaries(
        raw["token"], {g: m * 2 for g, m in raw["median"].items()}, raw["names"], raw["mapping"], "V2"
    )
    assert k != tokenization_cache_key(h, other, opts)
    json.dumps(k)
