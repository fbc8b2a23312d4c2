"""Test data and a straightforward per-cell rank-value encoder to check the vectorised one against.

The reference follows Geneformer's `TranscriptomeTokenizer` step by step, one cell at a time, with
its own ID mapping written out plainly: strip version suffixes, symbols through the name dictionary
(aliases through the mapping dictionary), IDs through the mapping dictionary restricted to the
vocabulary, duplicate IDs summed, x / n_counts * 10,000 / median, nonzero genes ranked descending,
truncated, and `<cls>`/`<eos>` added for V2. The benchmark imports it as its baseline.
"""

from __future__ import annotations

import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np

ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)

SUFFIX = {"V2": ("", "gc104M"), "V1": ("gene_dictionaries_30m/", "gc30M")}


def load_raw_dicts(geneformer_dir, version: str) -> dict:
    """The four dictionaries, read with plain pickle (trusted shared files) into plain Python types."""
    sub, suf = SUFFIX[version]
    base = Path(geneformer_dir) / sub

    def load(kind):
        with open(base / f"{kind}_{suf}.pkl", "rb") as fh:
            return pickle.load(fh)

    tok = {k: int(v) for k, v in load("token_dictionary").items()}
    med = {k: float(v) for k, v in load("gene_median_dictionary").items()}
    return {
        "version": version,
        "token": tok,
        "median": med,
        "names": load("gene_name_id_dict"),
        "mapping": load("ensembl_mapping_dict"),
    }


def reference_gene_ids(identifiers, raw: dict) -> list:
    """Vocabulary Ensembl ID (or None) of each identifier, mapped one at a time."""
    tok, names = raw["token"], raw["names"]
    mapping = {k: v for k, v in raw["mapping"].items() if v in tok}
    out = []
    for ident in identifiers:
        ident = str(ident).strip()
        if ENSEMBL.match(ident):
            gid = re.sub(r"\.\d+$", "", ident)
        elif ident in names:
            gid = names[ident]
        else:
            out.append(mapping.get(ident.upper()))
            continue
        out.append(mapping.get(gid.upper()))
    return out


def reference_tokenize(X, obs_index, n_counts, gene_ids, raw: dict, *, max_len=None, filter_pass=None):
    """Per-cell encoding. Returns a list of (cell_id, input_ids, full ranking, its values), the last
    two before truncation.

    X: cells x genes (scipy sparse or ndarray). `gene_ids`: per column, vocabulary ID or None.
    """
    import scipy.sparse as sp

    version = raw["version"]
    max_len = max_len or (4096 if version == "V2" else 2048)
    n_genes_max = max_len - 2 if version == "V2" else max_len
    unique = sorted({g for g in gene_ids if g is not None})
    slot = {g: i for i, g in enumerate(unique)}
    col_slot = np.array([slot[g] if g is not None else -1 for g in gene_ids], dtype=np.int64)
    medians = np.array([raw["median"][g] for g in unique])
    tokens = np.array([raw["token"][g] for g in unique])
    X = sp.csr_matrix(X)
    out = []
    for i in range(X.shape[0]):
        if filter_pass is not None and filter_pass[i] != 1:
            continue
        a, b = X.indptr[i], X.indptr[i + 1]
        s = col_slot[X.indices[a:b]]
        mapped = s >= 0
        # duplicate IDs: counts of all columns of a gene added up
        summed = np.bincount(s[mapped], weights=X.data[a:b][mapped].astype(np.float64), minlength=len(unique))
        nz = np.nonzero(summed)[0]
        if nz.size == 0 or n_counts[i] <= 0:
            continue
        values = summed[nz] / n_counts[i] * 10_000 / medians[nz]
        order = np.argsort(-values, kind="stable")
        ranked = tokens[nz][order]
        ids = [int(t) for t in ranked[:n_genes_max]]
        if version == "V2":
            ids = [raw["token"]["<cls>"]] + ids + [raw["token"]["<eos>"]]
        out.append((str(obs_index[i]), ids, [int(t) for t in ranked], values[order]))
    return out


def assert_same_ranking(got, ref_ids, full, ref_values, version, rel=1e-9):
    """`got` equals the reference `ref_ids` except that genes of (nearly) equal value may be permuted,
    also across the truncation cut (`full`/`ref_values`: the untruncated ranking and its values)."""
    got = list(got)
    if got == list(ref_ids):
        return
    if version == "V2":
        assert got[0] == ref_ids[0] and got[-1] == ref_ids[-1], "missing <cls>/<eos>"
        got, ref_ids = got[1:-1], ref_ids[1:-1]
    assert len(got) == len(ref_ids), (len(got), len(ref_ids))
    n = len(ref_values)
    a = 0
    while a < min(n, len(got)):
        b = a + 1
        while b < n and abs(ref_values[b] - ref_values[a]) <= rel * abs(ref_values[a]):
            b += 1
        g = Counter(got[a : min(b, len(got))])
        r = Counter(full[a:b])
        if b <= len(got):
            assert g == r, f"ranks {a}..{b}: {sorted(g)} != {sorted(r)}"
        else:
            assert not (g - r), f"ranks {a}..: {sorted(g)} not within {sorted(r)}"
        a = b


def make_counts_adata(
    raw: dict,
    *,
    n_cells=48,
    n_vocab_genes=5000,
    n_dups=25,
    n_unmapped=150,
    n_versioned=400,
    long_cells=(2200, 3100, 4300, 4990),
    zero_cells=1,
    seed=0,
    filter_pass=True,
    dtype=np.float32,
    ties=False,
):
    """Sparse raw counts over vocabulary genes with versioned IDs, duplicates, unmapped IDs,
    cells longer than 2048/4096 genes, a zero-count cell and a `filter_pass` column."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    vocab = sorted(k for k in raw["token"] if not k.startswith("<"))
    genes = list(rng.choice(vocab, size=n_vocab_genes, replace=False))
    names = list(genes)
    for j in rng.choice(len(names), size=n_versioned, replace=False):
        names[j] = f"{names[j]}.{rng.integers(1, 20)}"
    dup_src = rng.choice(n_vocab_genes, size=n_dups, replace=False)
    names += [f"{genes[j]}.{rng.integers(20, 30)}" for j in dup_src]
    names += [f"ENSG9{rng.integers(10**9, 10**10 - 1):010d}" for _ in range(n_unmapped)]
    perm = rng.permutation(len(names))
    names = [names[j] for j in perm]
    n_vars = len(names)

    rows, cols, vals = [], [], []
    lengths = list(rng.integers(50, 900, size=n_cells - len(long_cells) - zero_cells)) + list(long_cells)
    for i, k in enumerate(lengths):
        k = min(int(k), n_vars)
        c = rng.choice(n_vars, size=k, replace=False)
        if ties:
            v = rng.integers(1, 4, size=k)
        else:
            v = np.minimum(rng.geometric(0.35, size=k), 400) + (rng.random(k) < 0.02) * rng.integers(20, 300, size=k)
        rows.append(np.full(k, i))
        cols.append(c)
        vals.append(v)
    X = sp.csr_matrix(
        (np.concatenate(vals).astype(dtype), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_cells, n_vars),
    )
    order = rng.permutation(n_cells)
    X = X[order]
    totals = np.asarray(X.sum(axis=1)).ravel()
    n_counts = totals + rng.integers(0, 3000, size=n_cells) * (totals > 0)
    obs = pd.DataFrame(
        {
            "n_counts": n_counts.astype(np.float64),
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], size=n_cells)),
            "dose": rng.choice([0.0, 10.0, 100.0], size=n_cells),
        },
        index=[f"cell{i:03d}" for i in range(n_cells)],
    )
    if filter_pass:
        fp = (rng.random(n_cells) > 0.15).astype(int)
        obs["filter_pass"] = fp
    var = pd.DataFrame(index=pd.Index(names, name="gene"))
    var["gene_symbol"] = [f"SYM{j}" for j in range(n_vars)]
    return ad.AnnData(X=X, obs=obs, var=var)


def reference_for_adata(adata, raw, *, max_len=None, n_counts_column="n_counts", gene_id_column=None):
    ids = adata.var_names if gene_id_column is None else adata.var[gene_id_column]
    gene_ids = reference_gene_ids(list(ids), raw)
    fp = adata.obs["filter_pass"].to_numpy() if "filter_pass" in adata.obs else None
    return reference_tokenize(
        adata.X,
        list(adata.obs_names),
        adata.obs[n_counts_column].to_numpy(),
        gene_ids,
        raw,
        max_len=max_len,
        filter_pass=fp,
    )


def tiny_vocabulary(n_genes=40, *, version="V1", seed=0, symbols=True):
    """A small Geneformer-style dictionary set: Ensembl IDs, tokens, medians, symbols, identity mapping."""
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{500_000 + i:011d}" for i in range(n_genes)]
    tok = {"<pad>": 0, "<mask>": 1}
    if version == "V2":
        tok.update({"<cls>": 2, "<eos>": 3})
    tok.update({g: len(tok) + i for i, g in enumerate(genes)})
    med = {g: float(m) for g, m in zip(genes, rng.lognormal(0.3, 0.7, size=n_genes))}
    names = {f"GENE{i}": g for i, g in enumerate(genes)} if symbols else {}
    return {"version": version, "token": tok, "median": med, "names": names, "mapping": {g: g for g in genes}}


def write_vocabulary(raw: dict, directory) -> dict:
    """Pickle a vocabulary as plain dicts; returns the file paths by kind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, key in (
        ("token_dictionary", "token"),
        ("gene_median_dictionary", "median"),
        ("gene_name_id_dict", "names"),
        ("ensembl_mapping_dict", "mapping"),
    ):
        p = directory / f"{kind}.pkl"
        with open(p, "wb") as fh:
            pickle.dump(raw[key], fh)
        paths[kind] = p
    return paths


def tiny_counts_adata(raw: dict, *, n_cells=30, seed=0, detected=(3, 30), dtype=np.float32, n_counts=True):
    """Random raw counts over a tiny vocabulary's genes (var index: Ensembl IDs)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = [g for g in raw["token"] if not g.startswith("<")]
    n = len(genes)
    rows, cols, vals = [], [], []
    for i in range(n_cells):
        k = int(rng.integers(detected[0], min(detected[1], n) + 1))
        c = rng.choice(n, size=k, replace=False)
        rows += [i] * k
        cols += list(c)
        vals += list(rng.integers(1, 40, size=k))
    X = sp.csr_matrix((np.array(vals, dtype=dtype), (rows, cols)), shape=(n_cells, n))
    obs = pd.DataFrame(
        {"label": pd.Categorical(rng.choice(["a", "b"], size=n_cells)), "dose": rng.choice([1.0, 10.0], size=n_cells)},
        index=[f"c{i}" for i in range(n_cells)],
    )
    if n_counts:
        obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel() + rng.integers(0, 100, size=n_cells)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))


def datlinger_anndata(shared):
    """The DatlingerBock2021 subset as AnnData: MatrixMarket genes x cells, transposed."""
    import anndata as ad
    import pandas as pd
    import pytest
    import scipy.io
    import scipy.sparse as sp

    base = shared / "data" / "datlingerbock2021"
    if not (base / "matrix.mtx").exists():
        pytest.skip(f"no DatlingerBock2021 subset under {base}")
    X = sp.csr_matrix(scipy.io.mmread(base / "matrix.mtx").T)
    genes = pd.read_csv(base / "genes.csv")["x"].astype(str).tolist()
    barcodes = pd.read_csv(base / "barcodes.csv")["x"].astype(str).tolist()
    meta = pd.read_csv(base / "seurat_metadata.csv", index_col=0).loc[barcodes]
    return ad.AnnData(X=X.astype(np.float32), obs=meta, var=pd.DataFrame(index=genes))
