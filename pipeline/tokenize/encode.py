"""Rank-value encoding of cells, exactly as Geneformer's `TranscriptomeTokenizer` (thesis section 3.1).

For each cell, counts of vocabulary genes (IDs mapped through the Ensembl mapping dictionary,
duplicate IDs summed) are divided by the cell's `n_counts`, multiplied by 10,000 and divided by the
gene's nonzero median over the pretraining corpus; the nonzero genes are ranked by that value in
descending order and the ranking is the cell's token sequence (Theodoris et al. 2023). V1 models
take the first 2,048 genes; V2 models the first 4,094 between `<cls>` and `<eos>`. Cells with
`filter_pass != 1` are skipped when that column exists, and so are cells with no counts in the
vocabulary. Genes with exactly equal normalised values may come in either order.

The encoding runs over a CSR matrix in chunks of cells with no Python loop over genes: each
chunk's normalised values (computed with Geneformer's own arithmetic, so near-equal values order
the same way) become sortable 64-bit keys that carry the entry's index in their low bits, and each
row is sorted in place, which is several times faster than an arg-sort (see `rank_rows`). Output is
written as Arrow record batches, spilled to disk past a size limit, so memory stays bounded for any
number of cells.

Differences from Geneformer, on purpose: duplicate Ensembl IDs are always summed (Geneformer skips
that when its mapping dictionary is one-to-one, so a gene listed twice appears twice); explicit
zeros stored in a sparse matrix are not tokens; cells without any vocabulary gene are counted.

One module: Geneformer's tokenizer, reproduced token for token (medians, ranking, special tokens, truncation,
datasets output), is one unit that the parity tests check as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from pipeline.data.counts import (
    MIN_MAPPED_FRACTION,
    check_obs_columns,
    check_raw_counts,
    filter_pass_mask,
    looks_like_ensembl,
    map_genes,
    open_counts,
    resolve_n_counts,
    strip_version,
    var_identifiers,
)
from pipeline.errors import InputError
from pipeline.io import MANIFEST, dumps, sha256_file, staging_dir, verify_manifest, write_manifest

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import scipy.sparse as sp

    from pipeline.data.dictionaries import GeneDictionaries

TARGET_SUM = 10_000
# Bumped whenever the encoding changes, so cached tokenizations are rebuilt.
TOKENIZER_FORMAT = 1
# The tokenization report beside a saved dataset (`save_tokenized`); `datasets` and Geneformer ignore it.
REPORT_FILE = "gfattn_tokenize_report.json"
_LEGACY_REPORT_FILE = "tokenize_report.json"  # written by earlier `gfattn tokenize`; still read

_DEFAULT_CHUNK = 4096
_FLOAT_INF_BITS = np.uint64(0x7FF0_0000_0000_0000)
_MAX_RANK_ENTRIES = 1 << 23  # index bits in a sort key; the other 41 hold the value
_SPILL_TOKENS = 50_000_000  # keep at most this many output tokens in memory before spilling


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
@dataclass
class TokenizeReport:
    source: str
    model_version: str
    max_len: int
    cells_in: int = 0
    cells_out: int = 0
    filter_pass_dropped: int = 0
    skipped_zero_count: int = 0
    skipped_no_genes: int = 0
    genes_total: int = 0
    genes_mapped: int = 0
    genes_unique: int = 0
    duplicates_summed: int = 0
    gene_ids: str = ""  # where the IDs came from, and their kind
    unmapped_examples: list[str] = field(default_factory=list)
    n_counts_source: str = ""
    n_counts_computed: bool = False
    truncated_cells: int = 0
    length_median: float = 0.0
    length_max: int = 0
    length_min: int = 0
    obs_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TokenizeReport:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def lines(self) -> list[str]:
        out = [
            f"cells: {self.cells_in:,} in, {self.cells_out:,} tokenized"
            + (f"; {self.filter_pass_dropped:,} dropped by filter_pass" if self.filter_pass_dropped else "")
            + (f"; {self.skipped_zero_count:,} zero-count cells skipped" if self.skipped_zero_count else "")
            + (f"; {self.skipped_no_genes:,} cells without vocabulary genes skipped" if self.skipped_no_genes else ""),
            f"genes: {self.genes_mapped:,} of {self.genes_total:,} mapped to the {self.model_version} vocabulary "
            f"({self.gene_ids})"
            + (f"; {self.duplicates_summed:,} duplicate IDs summed" if self.duplicates_summed else "")
            + (
                f"; unmapped e.g. {', '.join(self.unmapped_examples[:3])}"
                if self.unmapped_examples and self.genes_mapped < self.genes_total
                else ""
            ),
            f"n_counts: {self.n_counts_source}",
            f"length: median {self.length_median:g}, max {self.length_max:,} (limit {self.max_len:,}"
            + (f", {self.truncated_cells:,} cells truncated)" if self.truncated_cells else ")"),
        ]
        return out


# ------------------------------------------------------------------------------------------------
# The encoding
# ------------------------------------------------------------------------------------------------
def normalise_counts(
    data: np.ndarray,
    genes: np.ndarray,
    indptr: np.ndarray,
    n_counts: np.ndarray,
    gene_median: np.ndarray,
    *,
    sparse_arithmetic: bool = True,
    recip_median: np.ndarray | None = None,
) -> np.ndarray:
    """x / n_counts * 10,000 / median for the entries of a CSR matrix (`genes` index `gene_median`,
    rows index `n_counts`).

    Geneformer writes `X / n_counts * target_sum / medians`. On a sparse X scipy evaluates each
    division as a multiplication by the reciprocal, in the promoted dtype of the operands; on a dense
    X numpy divides. The same operations in the same dtypes give the same bits, so near-equal values
    rank in the same order as Geneformer's. (`recip_median`: 1 / gene_median, precomputed.)
    """
    per_row = np.diff(indptr)
    genes = np.asarray(genes, dtype=np.int64)
    if sparse_arithmetic:
        v = np.repeat(np.divide(1, n_counts), per_row)
        v = np.multiply(data, v, out=v if v.dtype == np.result_type(data, v) else None)
        v *= TARGET_SUM
        m = np.take(np.divide(1, gene_median) if recip_median is None else recip_median, genes)
        return np.multiply(v, m, out=m)
    v = np.true_divide(data, np.repeat(n_counts, per_row))
    v *= TARGET_SUM
    return np.true_divide(v, np.take(gene_median, genes))


def _bits_for(n: int) -> int:
    return max(1, int(n - 1).bit_length())


def rank_rows(
    values: np.ndarray, indptr: np.ndarray, keep: np.ndarray, *, check: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a CSR layout, the positions of the `keep[r]` largest values, in descending order.

    Returns (out_indptr, positions): positions index `values`; row r's ranking is
    positions[out_indptr[r]:out_indptr[r+1]]. Values must be positive and finite.

    No arg-sort: a positive finite float's bit pattern orders like the float, so `inf_bits - bits`
    orders descending; its low bits are replaced by the entry's index, the result (still a positive
    finite float) is sorted in place row by row with numpy's vectorised sort, and the low bits are
    read back. Only values agreeing in all remaining high bits (exact ties, or a relative difference
    below ~1e-9) can come out in index order instead of value order; rows where that happened are
    ranked again exactly, so the result is exact (exactly equal values keep their column order).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    lengths = np.diff(indptr)
    keep = np.minimum(np.asarray(keep, dtype=np.int64), lengths)
    out_indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(keep, out=out_indptr[1:])
    nnz = int(indptr[-1] - indptr[0])
    if nnz == 0:
        return out_indptr, np.zeros(0, dtype=np.int64)
    values = values[indptr[0] : indptr[-1]]
    if indptr[0] != 0:
        indptr = indptr - indptr[0]
    if values.dtype != np.float64:
        values = values.astype(np.float64)
    if check and not (values.min() > 0 and np.isfinite(values).all()):
        raise ValueError("rank_rows needs positive finite values")
    if nnz > _MAX_RANK_ENTRIES and lengths.size > 1:  # keep enough value bits beside the index
        cut = _row_groups(indptr, _MAX_RANK_ENTRIES)
        parts = [
            indptr[a] + rank_rows(values, indptr[a : b + 1], keep[a:b], check=False)[1]
            for a, b in zip(cut[:-1], cut[1:])
        ]
        return out_indptr, np.concatenate(parts)
    low = np.uint64((1 << _bits_for(nnz)) - 1)

    keys = np.subtract(_FLOAT_INF_BITS, values.view(np.uint64))
    keys &= ~low
    keys |= np.arange(nnz, dtype=np.uint64)
    as_float = keys.view(np.float64)
    bounds = indptr.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > 1:
            as_float[a:b].sort()

    # Neighbours sharing the high bits were ordered by index, not by value: check them.
    same = np.flatnonzero(np.bitwise_xor(keys[1:], keys[:-1]) <= low)
    if same.size:
        row = np.searchsorted(indptr, same, side="right") - 1
        within = same + 1 < indptr[row + 1]
        same, row = same[within], row[within]
        wrong = values[(keys[same] & low).astype(np.int64)] < values[(keys[same + 1] & low).astype(np.int64)]
        for r in np.unique(row[wrong]):
            a, b = int(indptr[r]), int(indptr[r + 1])
            keys[a:b] = a + np.argsort(-values[a:b], kind="stable")

    keys &= low
    positions = keys.view(np.int64)
    if (keep < lengths).any():
        in_row = np.arange(nnz, dtype=np.int64) - np.repeat(indptr[:-1], lengths)
        positions = positions[in_row < np.repeat(keep, lengths)]
    return out_indptr, positions


def _row_groups(indptr: np.ndarray, max_entries: int) -> list[int]:
    """Row boundaries splitting a CSR layout into groups of at most `max_entries` entries (or one row)."""
    cuts = [0]
    n = indptr.size - 1
    while cuts[-1] < n:
        a = cuts[-1]
        b = int(np.searchsorted(indptr, indptr[a] + max_entries, side="right")) - 1
        cuts.append(min(n, max(b, a + 1)))
    return cuts


def _encode(
    data, idx, indptr, n_counts, token_of, median_of, recip_median_of, *, max_genes, cls_id, eos_id, sparse_arithmetic
):
    """Rank-value encode CSR entries (`idx` indexes the per-gene tables); no empty rows."""
    vals = normalise_counts(
        data, idx, indptr, n_counts, median_of, sparse_arithmetic=sparse_arithmetic, recip_median=recip_median_of
    )
    n_cells = indptr.size - 1
    keep = np.full(n_cells, max_genes, dtype=np.int64)
    gene_indptr, pos = rank_rows(vals, indptr, keep, check=False)
    del vals
    genes = np.take(token_of, np.take(idx, pos))
    if cls_id is None and eos_id is None:
        return gene_indptr, genes
    # One pass: <cls> before each cell's genes and <eos> after (eos of a cell before cls of the next).
    where, what = [], []
    if cls_id is not None:
        where.append(gene_indptr[:-1])
        what.append(np.full(n_cells, cls_id, dtype=genes.dtype))
    if eos_id is not None:
        where.append(gene_indptr[1:])
        what.append(np.full(n_cells, eos_id, dtype=genes.dtype))
    tokens = np.insert(genes, np.stack(where, axis=1).ravel(), np.stack(what, axis=1).ravel())
    offsets = gene_indptr + len(where) * np.arange(n_cells + 1, dtype=np.int64)
    return offsets, tokens


class _GeneTables:
    """Where each stored count goes: per var column (no duplicate IDs) or per unique gene (slots).

    Without duplicates the tables are indexed by the var column itself, so a chunk's column indices
    are used as they are; with duplicates, columns are first folded onto their gene and summed.
    """

    def __init__(self, gm, dicts, token_dtype):
        tok = np.array([dicts.token_dict[g] for g in gm.genes], dtype=token_dtype)
        med = np.array([dicts.gene_median[g] for g in gm.genes], dtype=np.float64)
        self.col_slot = gm.slots
        self.n_slots = len(gm.genes)
        self.has_dups = gm.n_duplicates > 0
        self.all_mapped = bool((gm.slots >= 0).all())
        if self.has_dups:
            self.token, self.median = tok, med
        else:
            mapped = gm.slots >= 0
            self.token = np.zeros(gm.slots.size, dtype=token_dtype)
            self.median = np.ones(gm.slots.size, dtype=np.float64)
            self.token[mapped] = tok[gm.slots[mapped]]
            self.median[mapped] = med[gm.slots[mapped]]
        self.recip_median = np.divide(1, self.median)

    def entries(self, block: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data, idx, indptr) of a chunk: unmapped columns and explicit zeros dropped, duplicates summed."""
        import scipy.sparse as sp

        data, indices, indptr = block.data, block.indices.astype(np.int64), block.indptr.astype(np.int64)
        if self.has_dups:
            slots = np.take(self.col_slot, indices)
            keep = slots >= 0
            keep &= data != 0
            kept_before = np.zeros(keep.size + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            m = sp.csr_matrix((data[keep], slots[keep], kept_before[indptr]), shape=(block.shape[0], self.n_slots))
            m.sum_duplicates()
            return m.data, m.indices.astype(np.int64), m.indptr.astype(np.int64)
        if self.all_mapped and data.all():
            return data, indices, indptr
        keep = data != 0
        if not self.all_mapped:
            keep &= np.take(self.col_slot, indices) >= 0
        kept_before = np.zeros(keep.size + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        return data[keep], indices[keep], kept_before[indptr]


def _obs_arrow_column(series):
    import pandas as pd
    import pyarrow as pa

    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(series.cat.categories.dtype if not series.isna().any() else object)
    try:
        return pa.array(series.to_numpy() if series.dtype != object else series.tolist(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if pd.isna(v) else str(v) for v in series.tolist()], type=pa.string())


class _BatchSink:
    """Collects Arrow record batches in memory, spilling to an Arrow stream file past a size limit."""

    def __init__(self, spill_dir: str | os.PathLike | None, spill_tokens: int):
        self.batches = []
        self.tokens = 0
        self.spill_dir = spill_dir
        self.spill_tokens = spill_tokens
        self.writer = None
        self.path: Path | None = None
        self.schema = None

    def add(self, batch, n_tokens: int) -> None:
        import pyarrow as pa

        if self.schema is None:
            self.schema = batch.schema
        self.tokens += n_tokens
        if self.writer is None and self.tokens > self.spill_tokens:
            base = Path(self.spill_dir) if self.spill_dir is not None else Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="gfattn-tokens-", suffix=".arrow", dir=base)
            os.close(fd)
            self.path = Path(name)
            self.writer = pa.ipc.new_stream(str(self.path), self.schema)
            for b in self.batches:
                self.writer.write_batch(b)
            self.batches = []
        if self.writer is not None:
            self.writer.write_batch(batch)
        else:
            self.batches.append(batch)

    def dataset(self, empty_schema):
        import uuid

        import datasets
        import pyarrow as pa
        from datasets.table import InMemoryTable

        if self.writer is not None:
            self.writer.close()
            return datasets.Dataset.from_file(str(self.path), in_memory=False)
        schema = self.schema or empty_schema
        table = pa.Table.from_batches(self.batches, schema=schema)
        # A fresh fingerprint: hashing the whole table would cost as much as tokenizing it.
        return datasets.Dataset(InMemoryTable(table), fingerprint=uuid.uuid4().hex)

    def discard(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        if self.path is not None and self.path.exists():
            self.path.unlink()


class _Tokenization:
    """One pass over a count matrix: validation and the report up front, then Arrow record batches."""

    def __init__(
        self,
        adata_or_path,
        dicts,
        *,
        max_len,
        obs_columns,
        n_counts_column,
        gene_id_column,
        layer,
        chunk_size,
        progress,
        min_mapped_fraction=MIN_MAPPED_FRACTION,
    ):
        self.dicts = dicts
        self.min_mapped_fraction = float(min_mapped_fraction)
        self.max_len = int(max_len) if max_len is not None else dicts.model_input_size
        self.special = dicts.uses_special_tokens
        self.max_genes = self.max_len - 2 if self.special else self.max_len
        if self.max_genes < 1:
            raise InputError(f"--max-len {self.max_len} leaves no room for genes")
        self.chunk_size = max(1, int(chunk_size))
        self.progress = progress
        self.cm = open_counts(adata_or_path, layer)
        try:
            self._prepare(list(obs_columns), n_counts_column, gene_id_column)
        except BaseException:
            self.cm.close()
            raise

    def _prepare(self, obs_columns, n_counts_column, gene_id_column):
        import pyarrow as pa

        cm, dicts = self.cm, self.dicts
        src = cm.source
        self.obs_columns = check_obs_columns(cm.obs, obs_columns, source=src)
        gm = map_genes(cm.var, dicts, gene_id_column, source=src, min_fraction=self.min_mapped_fraction)
        self.nc = resolve_n_counts(cm.obs, n_counts_column, source=src)
        self.fp = filter_pass_mask(cm.obs)
        self.report = TokenizeReport(
            source=src,
            model_version=dicts.version,
            max_len=self.max_len,
            cells_in=cm.n_obs,
            genes_total=gm.n_total,
            genes_mapped=gm.n_mapped,
            genes_unique=gm.n_unique,
            duplicates_summed=gm.n_duplicates,
            gene_ids=f"{gm.kind} in {gm.where}",
            unmapped_examples=gm.unmapped_examples,
            n_counts_source=self.nc.source,
            n_counts_computed=self.nc.computed,
            obs_columns=list(self.obs_columns),
        )
        self.tables = _GeneTables(gm, dicts, _token_dtype(dicts))
        self.cell_ids = pa.array(cm.obs.index.astype(str).tolist(), type=pa.string())
        self.obs_arrays = {c: _obs_arrow_column(cm.obs[c]) for c in self.obs_columns}
        self.schema = pa.schema(
            [
                ("input_ids", pa.list_(pa.from_numpy_dtype(self.tables.token.dtype))),
                ("length", pa.int64()),
                ("cell_id", pa.string()),
            ]
            + [(c, a.type) for c, a in self.obs_arrays.items()]
        )
        self._lengths = []

    def close(self) -> None:
        self.cm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def batches(self):
        """Record batches of tokenized cells, one per chunk that keeps any cell."""
        import pyarrow as pa

        cm, report, tables, nc, fp = self.cm, self.report, self.tables, self.nc, self.fp
        cls_id = self.dicts.cls_id if self.special else None
        eos_id = self.dicts.eos_id if self.special else None
        for start, stop in cm.chunks(self.chunk_size):
            block = cm.rows(start, stop)
            # Negatives are looked for everywhere, non-integers on a sample of each chunk.
            check_raw_counts(
                block.data, source=cm.source, where=cm.where, first_row=start, indptr=block.indptr, sample_step=61
            )
            n_counts = _row_totals(block) if nc.values is None else nc.values[start:stop]
            data, idx, indptr = tables.entries(block)
            del block
            n_genes = np.diff(indptr)
            zero = n_counts <= 0
            sel = (n_genes > 0) & ~zero
            passing = np.ones(stop - start, dtype=bool) if fp is None else fp[start:stop]
            report.filter_pass_dropped += int((~passing).sum())
            report.skipped_zero_count += int((zero & passing).sum())
            report.skipped_no_genes += int(((n_genes == 0) & ~zero & passing).sum())
            sel &= passing
            cells = np.flatnonzero(sel)
            if cells.size:
                if cells.size < sel.size:
                    data, idx, indptr = _select_rows(data, idx, indptr, cells)
                offsets, tokens = _encode(
                    data,
                    idx,
                    indptr,
                    n_counts[cells],
                    tables.token,
                    tables.median,
                    tables.recip_median,
                    max_genes=self.max_genes,
                    cls_id=cls_id,
                    eos_id=eos_id,
                    sparse_arithmetic=cm.is_sparse,
                )
                lengths = np.diff(offsets)
                report.truncated_cells += int((n_genes[cells] > self.max_genes).sum())
                self._lengths.append(lengths)
                rows = pa.array(cells + start)
                cols = [
                    pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens)),
                    pa.array(lengths),
                    self.cell_ids.take(rows),
                ] + [self.obs_arrays[c].take(rows) for c in self.obs_columns]
                yield pa.RecordBatch.from_arrays(cols, schema=self.schema)
            if self.progress is not None:
                self.progress(stop, cm.n_obs)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        report.cells_out = int(lengths.size)
        if lengths.size:
            report.length_median = float(np.median(lengths))
            report.length_max = int(lengths.max())
            report.length_min = int(lengths.min())


def _options(kwargs: dict) -> dict:
    opts = dict(
        max_len=None,
        obs_columns=(),
        n_counts_column=None,
        gene_id_column=None,
        layer=None,
        chunk_size=_DEFAULT_CHUNK,
        progress=None,
        min_mapped_fraction=MIN_MAPPED_FRACTION,
    )
    unknown = set(kwargs) - set(opts)
    if unknown:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
    opts.update(kwargs)
    return opts


def tokenize_anndata(
    adata_or_path: Any,
    dicts: GeneDictionaries,
    *,
    max_len: int | None = None,
    obs_columns: Iterable[str] = (),
    n_counts_column: str | None = None,
    gene_id_column: str | None = None,
    layer: str | None = None,
    chunk_size: int = _DEFAULT_CHUNK,
    spill_dir: str | os.PathLike | None = None,
    spill_tokens: int = _SPILL_TOKENS,
    progress: Callable[[int, int], None] | None = None,
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
) -> tuple[datasets.Dataset, TokenizeReport]:
    """Rank-value encode every cell of an `.h5ad` path or AnnData with `dicts`.

    `min_mapped_fraction` of the var genes must map to the vocabulary (the pipeline passes 0: its
    preflight has checked the genes detected in the selected cells, `data.validate_counts`).

    Returns a `datasets.Dataset` with `input_ids`, `length`, `cell_id` (the obs index) and the
    requested obs columns, and a `TokenizeReport`. `max_len` defaults to the model series' input size
    (2048 for V1, 4096 for V2, special tokens included). Large outputs are memory-mapped from an Arrow
    file in `spill_dir` (default: the system temporary directory); `tokenize_to_disk` streams
    straight into a dataset directory instead.
    """
    with _Tokenization(
        adata_or_path,
        dicts,
        **_options(
            dict(
                max_len=max_len,
                obs_columns=obs_columns,
                n_counts_column=n_counts_column,
                gene_id_column=gene_id_column,
                layer=layer,
                chunk_size=chunk_size,
                progress=progress,
                min_mapped_fraction=min_mapped_fraction,
            )
        ),
    ) as t:
        sink = _BatchSink(spill_dir, spill_tokens)
        try:
            for batch in t.batches():
                sink.add(batch, len(batch.column(0).values))
            ds = sink.dataset(t.schema)
        except BaseException:
            sink.discard()
            raise
        return ds, t.report


def _token_dtype(dicts: GeneDictionaries):
    # int32 halves the dataset on disk; torch and Geneformer's collators take any integer type.
    return np.int32 if dicts.vocab_size < 2**31 else np.int64


def _row_totals(block: sp.csr_matrix) -> np.ndarray:
    """Each cell's total over all genes (float64 sums of integer counts are exact below 2**53)."""
    return np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()


def _fold_columns(block: sp.csr_matrix, col_slot: np.ndarray, n_slots: int) -> sp.csr_matrix:
    """Cells x genes: unmapped columns and explicit zeros dropped, columns of one gene summed."""
    import scipy.sparse as sp

    slots = np.take(col_slot, block.indices)
    keep = (slots >= 0) & (block.data != 0)
    kept_before = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    m = sp.csr_matrix(
        (block.data[keep], slots[keep], kept_before[block.indptr]), shape=(block.shape[0], max(1, n_slots))
    )
    m.sum_duplicates()
    return m


def _select_rows(data, idx, indptr, rows):
    """Rows `rows` (sorted) of a CSR layout given as arrays."""
    lengths = np.diff(indptr)[rows]
    new_indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    take = np.repeat(indptr[rows] - new_indptr[:-1], lengths) + np.arange(int(new_indptr[-1]), dtype=np.int64)
    return data[take], idx[take], new_indptr


# ------------------------------------------------------------------------------------------------
# On disk
# ------------------------------------------------------------------------------------------------
def save_tokenized(
    ds: datasets.Dataset,
    out_dir: str | os.PathLike,
    report: TokenizeReport | None = None,
    *,
    overwrite: bool = False,
    cache: bool = False,
) -> Path:
    """Write a tokenized dataset (`save_to_disk`) and its report (`REPORT_FILE`) into `out_dir`, atomically.

    Everything is written into a temporary sibling that is renamed into place, so `out_dir` is complete or
    absent, never half-written. An existing non-empty `out_dir` is an error unless `overwrite` (replace it)
    or `cache`: `out_dir` is then a content-addressed cache entry (named by `tokenization_cache_key`), and
    a complete entry another process published first is kept, this copy dropped. Read it back with
    `load_tokenized` (the dataset) and `load_tokenize_report`, or both with `load_cached_tokenization`.
    """
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not (overwrite or cache):
        raise InputError(f"{out}: already exists; remove it or choose another --out")
    keep_existing = cache and load_tokenize_report(out) is not None
    with staging_dir(out, replace=not keep_existing) as tmp:
        ds.save_to_disk(str(tmp))
        _write_report(tmp, report)
        if cache:
            write_manifest(tmp)  # verified by `load_cached_tokenization` before reuse
    return out


def load_cached_tokenization(path: str | os.PathLike) -> tuple[datasets.Dataset, TokenizeReport] | None:
    """The dataset and report of a cache entry written by `save_tokenized`; None when `path` holds none.

    The dataset is memory-mapped from `path` (as `load_tokenized` returns it). An entry without a readable
    report counts as absent, so the caller tokenizes again and `save_tokenized(..., cache=True)` replaces it.
    """
    report = load_tokenize_report(path)
    if report is None:
        return None
    if (Path(path) / MANIFEST).is_file():
        verify_manifest(path, what="cached tokenization")
    return load_tokenized(path), report


def load_tokenized(path: str | os.PathLike) -> datasets.Dataset:
    """Load a tokenized dataset written by gfattn or by Geneformer's own tokenizer.

    Geneformer's datasets have `input_ids` and `length` but no `cell_id`; one is added (the row number).
    """
    import datasets

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: no tokenized dataset here (expected a directory written by `gfattn tokenize`)")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:
        raise InputError(f"{p}: not a readable Hugging Face dataset directory ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise InputError(f"{p}: holds splits {', '.join(ds)}; point at one split's directory")
        ds = next(iter(ds.values()))
    if "input_ids" not in ds.column_names:
        raise InputError(f"{p}: dataset has no input_ids column (columns: {', '.join(ds.column_names)})")
    if "length" not in ds.column_names:
        ds = ds.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
    if "cell_id" not in ds.column_names:
        ds = ds.add_column("cell_id", [str(i) for i in range(len(ds))])
    return ds


def load_tokenize_report(path: str | os.PathLike) -> TokenizeReport | None:
    """The report saved beside a tokenized dataset, or None (Geneformer's datasets carry none)."""
    for name in (REPORT_FILE, _LEGACY_REPORT_FILE):
        f = Path(path) / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
            return TokenizeReport.from_dict(d.get("report", d))  # the legacy file nests it under "report"
        except (OSError, ValueError, TypeError, AttributeError):
            return None
    return None


def _write_report(directory: Path, report: TokenizeReport | None) -> None:
    """The report's fields, flat, plus the tokenizer format (the layout the pipeline's cache has used)."""
    meta = {"format": TOKENIZER_FORMAT, **(report.to_dict() if report is not None else {})}
    (directory / REPORT_FILE).write_text(dumps(meta, indent=1) + "\n")


def tokenize_to_disk(
    adata_or_path: Any,
    dicts: GeneDictionaries,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    shard_bytes: int = 500 * 2**20,
    **kwargs,
) -> TokenizeReport:
    """Tokenize straight into a `datasets` directory at `out_dir`, streaming: record batches go to
    Arrow shards as they are made, so neither the cells nor the tokens are ever all in memory.

    Written into a temporary sibling and renamed into place, so an error leaves nothing behind.
    Keyword arguments are those of `tokenize_anndata`.
    """
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: already exists; remove it or choose another --out")
    with _Tokenization(adata_or_path, dicts, **_options(kwargs)) as t:
        with staging_dir(out) as tmp:
            shards = _write_shards(t.batches(), t.schema, tmp, shard_bytes)
            _write_dataset_metadata(tmp, t.schema, shards)
            _write_report(tmp, t.report)
        return t.report


def _write_shards(batches, schema, directory: Path, shard_bytes: int) -> list[str]:
    """Arrow stream files (the format `datasets` memory-maps), a new one past `shard_bytes`."""
    import pyarrow as pa

    paths: list[Path] = []
    writer, written = None, 0
    try:
        for batch in batches:
            if writer is None or written >= shard_bytes:
                if writer is not None:
                    writer.close()
                paths.append(directory / f"shard-{len(paths):05d}.arrow")
                writer, written = pa.ipc.new_stream(str(paths[-1]), schema), 0
            writer.write_batch(batch)
            written += batch.nbytes
        if writer is None:  # no cell kept: one empty shard carries the schema
            paths.append(directory / "shard-00000.arrow")
            writer = pa.ipc.new_stream(str(paths[-1]), schema)
    finally:
        if writer is not None:
            writer.close()
    names = []
    for i, p in enumerate(paths):
        name = f"data-{i:05d}-of-{len(paths):05d}.arrow"
        p.rename(directory / name)
        names.append(name)
    return names


def _write_dataset_metadata(directory: Path, schema, shard_names: list[str]) -> None:
    """`state.json` and `dataset_info.json` as `save_to_disk` writes them, for the given shards.

    They are taken from saving an empty dataset of the same schema, so they follow the installed
    `datasets` version; only the list of data files differs.
    """
    import uuid

    import datasets
    from datasets.table import InMemoryTable

    probe = directory / ".probe"
    empty = datasets.Dataset(InMemoryTable(schema.empty_table()), fingerprint=uuid.uuid4().hex)
    empty.save_to_disk(str(probe))
    try:
        state = json.loads((probe / "state.json").read_text())
        state["_data_files"] = [{"filename": name} for name in shard_names]
        (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        shutil.copyfile(probe / "dataset_info.json", directory / "dataset_info.json")
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Vocabulary for gfattn-built models
# ------------------------------------------------------------------------------------------------
def build_vocabulary(
    adata_or_path: Any,
    *,
    gene_id_column: str | None = None,
    n_counts_column: str | None = None,
    layer: str | None = None,
    symbol_column: str | None = None,
    name_to_id: dict[str, str] | None = None,
    min_cells: int = 1,
    chunk_size: int = _DEFAULT_CHUNK,
    max_values_in_memory: int = 100_000_000,
    special_tokens: bool = False,
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
) -> GeneDictionaries:
    """Token dictionary and gene medians of a corpus, for models pretrained by gfattn.

    Tokens: `<pad>`=0, `<mask>`=1, then the corpus genes (Ensembl IDs, sorted) detected in at least
    `min_cells` cells. Medians: the exact median over cells of each gene's nonzero normalised
    expression x / n_counts * 10,000, as Geneformer's gene medians are defined. Memory is bounded by
    `max_values_in_memory`: beyond it genes are processed in blocks, one pass over the data per block.
    The result is V1-style (no `<cls>`/`<eos>`), or with `special_tokens` V2-style: `<cls>`=2 and
    `<eos>`=3 before the genes, as in Geneformer's gc104M dictionary, so that every cell is wrapped in
    `<cls>` ... `<eos>` and the first position is a cell token. `save()` writes it in Geneformer's pickle
    layout.
    """
    from pipeline.data.dictionaries import GeneDictionaries

    with open_counts(adata_or_path, layer) as cm:
        src = cm.source
        var = cm.var
        if gene_id_column is not None and gene_id_column not in var.columns:
            raise InputError(f"{src}: no var column {gene_id_column!r} with gene IDs")
        ids = var_identifiers(var, gene_id_column)
        ens = looks_like_ensembl(ids)
        gene_of_col: list[str | None] = []
        for s, is_ens in zip(ids, ens):
            if is_ens:
                gene_of_col.append(strip_version(s))
            elif name_to_id is not None:
                gene_of_col.append(name_to_id.get(s))
            else:
                gene_of_col.append(None)
        n_ok = sum(g is not None for g in gene_of_col)
        if n_ok < min_mapped_fraction * len(ids):
            raise InputError(
                f"{src}: only {n_ok:,} of {len(ids):,} var identifiers are Ensembl IDs "
                f"(e.g. {', '.join(repr(i) for i in ids[:3])}); pass a gene-name map or --gene-id-column"
            )
        genes_sorted = sorted({g for g in gene_of_col if g is not None})
        slot_of = {g: i for i, g in enumerate(genes_sorted)}
        col_slot = np.array([slot_of[g] if g is not None else -1 for g in gene_of_col], dtype=np.int64)
        n_slots = len(genes_sorted)
        nc = resolve_n_counts(cm.obs, n_counts_column, source=src)

        symbols: dict[str, str] = {}
        sym_col = symbol_column
        if sym_col is None:
            lowered = {str(c).lower(): c for c in var.columns}
            sym_col = next(
                (
                    lowered[c]
                    for c in ("gene_symbol", "gene_symbols", "symbol", "gene_name", "feature_name")
                    if c in lowered
                ),
                None,
            )
        if sym_col is not None:
            for s, g in zip(var[sym_col].astype(str), gene_of_col):
                if g is not None:
                    symbols.setdefault(g, s)
        elif name_to_id is not None:
            wanted = set(genes_sorted)
            for s, g in name_to_id.items():
                if g in wanted:
                    symbols.setdefault(g, s)

        # First pass: nonzero cells per gene, to plan gene blocks within the memory bound.
        nnz_per_gene = np.zeros(n_slots, dtype=np.int64)
        for start, stop in cm.chunks(chunk_size):
            block = cm.rows(start, stop)
            check_raw_counts(block.data, source=src, where=cm.where, first_row=start, indptr=block.indptr)
            counts = _fold_columns(block, col_slot, n_slots)
            nnz_per_gene += np.bincount(counts.indices, minlength=n_slots)
        blocks = []
        lo, acc = 0, 0
        for g in range(n_slots):
            if acc + nnz_per_gene[g] > max_values_in_memory and g > lo:
                blocks.append((lo, g))
                lo, acc = g, 0
            acc += int(nnz_per_gene[g])
        blocks.append((lo, n_slots))

        medians = np.full(n_slots, np.nan)
        for lo, hi in blocks:
            vals_parts, gene_parts = [], []
            for start, stop in cm.chunks(chunk_size):
                block = cm.rows(start, stop)
                n_counts = _row_totals(block) if nc.values is None else nc.values[start:stop]
                counts = _fold_columns(block, col_slot, n_slots)
                rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
                m = (counts.indices >= lo) & (counts.indices < hi) & (n_counts[rows] > 0)
                v = np.multiply(counts.data[m], np.divide(1, n_counts.astype(np.float64))[rows[m]]) * TARGET_SUM
                vals_parts.append(v)
                gene_parts.append(counts.indices[m])
            medians[lo:hi] = _median_by_group(
                np.concatenate(vals_parts) if vals_parts else np.zeros(0),
                np.concatenate(gene_parts) if gene_parts else np.zeros(0, dtype=np.int64),
                lo,
                hi,
            )

    token_dict: dict[str, int] = {"<pad>": 0, "<mask>": 1}
    if special_tokens:
        token_dict.update({"<cls>": 2, "<eos>": 3})
    n_special = len(token_dict)
    gene_median: dict[str, float] = {}
    cells_per_gene = nnz_per_gene
    for g, gid in enumerate(genes_sorted):
        if cells_per_gene[g] >= max(1, min_cells) and np.isfinite(medians[g]):
            token_dict[gid] = len(token_dict)
            gene_median[gid] = float(medians[g])
    if len(token_dict) == n_special:
        raise InputError(f"{src}: no gene is detected in at least {min_cells} cells; cannot build a vocabulary")
    names = {symbols[g]: g for g in gene_median if g in symbols}
    mapping = {g: g for g in gene_median}
    version = "V2" if special_tokens else "V1"
    return GeneDictionaries(token_dict, gene_median, names or None, mapping, version, source=f"vocabulary of {src}")


def _median_by_group(values: np.ndarray, groups: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Exact median of `values` per group id in [lo, hi) (NaN for empty groups), like np.median."""
    out = np.full(hi - lo, np.nan)
    if values.size == 0:
        return out
    order = np.lexsort((values, groups))
    v = values[order]
    counts = np.bincount(groups - lo, minlength=hi - lo)
    starts = np.zeros(hi - lo + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    has = counts > 0
    s = starts[:-1][has]
    c = counts[has]
    lower = v[s + (c - 1) // 2]
    upper = v[s + c // 2]
    out[has] = (lower + upper) / 2.0
    return out


# ------------------------------------------------------------------------------------------------
# Caching
# ------------------------------------------------------------------------------------------------
def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex); a missing file is an `InputError`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    return sha256_file(p)


def tokenization_cache_key(data_hash: str, dicts: GeneDictionaries, options: dict | None = None) -> str:
    """Key of one tokenization: the data, the dictionaries and every option that changes the output."""
    payload = {
        "format": TOKENIZER_FORMAT,
        "data": data_hash,
        "dictionaries": dicts.fingerprint(),
        "version": dicts.version,
        "options": _canonical(options or {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _canonical(obj):
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
