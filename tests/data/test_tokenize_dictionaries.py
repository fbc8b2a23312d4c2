"""Gene dictionaries: restricted unpickling, discovery in a Geneformer checkout, model directories."""

import os
import pickle
import shutil

import numpy as np
import pytest

from pipeline.data.dictionaries import GeneDictionaries, load_pickle_restricted
from pipeline.errors import InputError

from tests._helpers_tokenize import tiny_vocabulary, write_vocabulary


class _Payload:
    """Unpickling this runs `os.system` (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "token_dictionary.pkl"
    evil.write_bytes(pickle.dumps({"<pad>": 0, "x": _Payload(marker)}))
    with pytest.raises(InputError) as exc:
        load_pickle_restricted(evil)
    assert "refusing to unpickle" in str(exc.value) and "system" in str(exc.value) and str(evil) in str(exc.value)
    assert not marker.exists()


def test_restricted_unpickler_refuses_object_arrays_and_classes(tmp_path):
    p = tmp_path / "a.pkl"
    p.write_bytes(pickle.dumps({"a": np.array([1, 2])}))  # ndarray reconstruction is not a scalar
    with pytest.raises(InputError, match="refusing"):
        load_pickle_restricted(p)
    p.write_bytes(pickle.dumps({"a": np.array([object()], dtype=object)[0:1]}))
    with pytest.raises(InputError):
        load_pickle_restricted(p)
    p.write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match="not a readable"):
        load_pickle_restricted(p)
    with pytest.raises(InputError, match="no such file"):
        load_pickle_restricted(tmp_path / "missing.pkl")


def test_restricted_unpickler_accepts_numpy_scalars(tmp_path):
    obj = {"g1": np.int16(7), "g2": np.float64(1.5), "g3": np.float32(2.25), "s": "x", "l": [1, (2.0, None)], "b": True}
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=4))
    got = load_pickle_restricted(p)
    assert got == obj and isinstance(got["g1"], np.int16)


def test_geneformer_dir_discovery_v1_v2(geneformer_dir):
    v2 = GeneDictionaries.from_geneformer_dir(geneformer_dir, "V2")
    assert v2.version == "V2" and (v2.pad_id, v2.mask_id, v2.cls_id, v2.eos_id) == (0, 1, 2, 3)
    assert len(v2.token_dict) == 20_275 and v2.model_input_size == 4096
    assert v2.ensembl_mapping is not None and v2.name_to_id["TP53"] == "ENSG00000141510"
    v1 = GeneDictionaries.from_geneformer_dir(geneformer_dir, "V1")
    assert v1.version == "V1" and v1.cls_id is None and v1.eos_id is None
    assert len(v1.token_dict) == 25_426 and v1.special_ids == {0, 1}
    assert all(type(v) is int for v in v1.token_dict.values())  # numpy int16 in the pickle
    tok = v1.token_dict["ENSG00000141510"]
    assert v1.id_to_gene[tok] == "ENSG00000141510" and v1.symbol(tok) == "TP53"


def test_discovery_in_a_repository_clone(tmp_path):
    raw2, raw1 = tiny_vocabulary(version="V2"), tiny_vocabulary(version="V1", seed=1)
    pkg = tmp_path / "Geneformer" / "geneformer"
    for raw, where, suffix in ((raw2, pkg, "gc104M"), (raw1, pkg / "gene_dictionaries_30m", "gc30M")):
        paths = write_vocabulary(raw, where)
        for kind, p in paths.items():
            p.rename(where / f"{kind}_{suffix}.pkl")
    for root in (tmp_path / "Geneformer", pkg):
        assert GeneDictionaries.from_geneformer_dir(root, "V2").token_dict == raw2["token"]
        assert GeneDictionaries.from_geneformer_dir(root, "V1").gene_median == raw1["median"]
    with pytest.raises(InputError, match="no V1 dictionaries"):
        GeneDictionaries.from_geneformer_dir(tmp_path, "V1")
    with pytest.raises(InputError, match="not a directory"):
        GeneDictionaries.from_geneformer_dir(tmp_path / "nope", "V2")


def test_from_files_infers_version_and_checks_it(tmp_path):
    paths = write_vocabulary(tiny_vocabulary(version="V1"), tmp_path / "v1")
    d = GeneDictionaries.from_files(paths["token_dictionary"], paths["gene_median_dictionary"])
    assert d.version == "V1" and d.name_to_id is None and d.ensembl_mapping is None
    with pytest.raises(InputError, match="<cls> and <eos>"):
        GeneDictionaries.from_files(paths["token_dictionary"], paths["gene_median_dictionary"], version="V2")
    paths2 = write_vocabulary(tiny_vocabulary(version="V2"), tmp_path / "v2")
    assert GeneDictionaries.from_files(paths2["token_dictionary"], paths2["gene_median_dictionary"]).version == "V2"
    # a median dictionary that does not cover the tokens
    small = write_vocabulary(tiny_vocabulary(n_genes=10), tmp_path / "small")
    with pytest.raises(InputError, match="no median"):
        GeneDictionaries.from_files(paths2["token_dictionary"], small["gene_median_dictionary"])


def test_save_and_model_dir_round_trip(tmp_path):
    raw = tiny_vocabulary(version="V2")
    d = GeneDictionaries(raw["token"], raw["median"], raw["names"], raw["mapping"], "V2")
    d.save(tmp_path / "model")
    names = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert "token_dictionary.pkl" in names and "gene_median_dictionary.pkl" in names
    back = GeneDictionaries.from_model_dir(tmp_path / "model")
    assert back == d and back.fingerprint() == d.fingerprint()
    shutil.copy(tmp_path / "model" / "token_dictionary.pkl", tmp_path / "model" / "token_dictionary_gc104M.pkl")
    with pytest.raises(InputError, match="several token_dictionary"):
        GeneDictionaries.from_model_dir(tmp_path / "model")
    with pytest.raises(InputError, match="no token_dictionary"):
        GeneDictionaries.from_model_dir(tmp_path)


def test_fingerprint_tracks_content():
    raw = tiny_vocabulary()
    a = GeneDictionaries(raw["token"], raw["median"], None, raw["mapping"], "V1")
    med = dict(raw["median"])
    med[next(iter(med))] *= 2
    b = GeneDictionaries(raw["token"], med, None, raw["mapping"], "V1")
    assert a.fingerprint() != b.fingerprint()
    assert (
        a.fingerprint()
        == GeneDictionaries(dict(raw["token"]), dict(raw["median"]), None, raw["mapping"], "V1").fingerprint()
    )


def test_built_vocabulary_with_cell_tokens_is_v2_style(tmp_path):
    """`build_vocabulary(special_tokens=True)`: <cls>=2 and <eos>=3 before the same genes (their order and
    medians unchanged), V2, and every tokenized cell wrapped in <cls> ... <eos> within max_len; the
    dictionaries saved with a model load back as V2."""
    from pipeline.data import synth
    from pipeline.tokenize.encode import build_vocabulary, tokenize_anndata

    corpus = synth.make_corpus(n_cells=60, seed=0, preset="thesis")
    plain = build_vocabulary(corpus)
    cells = build_vocabulary(corpus, special_tokens=True)
    assert plain.version == "V1" and cells.version == "V2"
    assert (cells.token_dict["<cls>"], cells.token_dict["<eos>"]) == (2, 3) == (cells.cls_id, cells.eos_id)
    genes = [g for g in plain.token_dict if not g.startswith("<")]
    assert all(cells.token_dict[g] == plain.token_dict[g] + 2 for g in genes)
    assert cells.gene_median == plain.gene_median
    ds, _ = tokenize_anndata(corpus, cells, max_len=32)
    ref, _ = tokenize_anndata(corpus, plain, max_len=30)
    for got, want in zip(ds["input_ids"], ref["input_ids"]):
        got = list(got)
        assert got[0] == 2 and got[-1] == 3 and len(got) <= 32
        assert got[1:-1] == [t + 2 for t in want]  # the same top genes in the same order
    cells.save(tmp_path)
    assert GeneDictionaries.from_model_dir(tmp_path).version == "V2"
