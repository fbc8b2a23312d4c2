"""Reading single-cell raw counts for tokenization (thesis section 2.1, "Data").

Geneformer's tokenizer expects raw counts of every detected gene, Ensembl gene IDs and each cell's
total count `n_counts` (Theodoris et al. 2023). This module turns an `.h5ad` file (or an in-memory
AnnData) into exactly that, without loading a large matrix into memory:

- `open_counts` gives row-chunk access to raw counts in `X` or a named layer, reading straight from
  the HDF5 file so a million cells never sit in memory at once;
- `map_genes` resolves `var` identifiers (Ensembl IDs with version suffixes, or gene symbols) to
  vocabulary genes through Geneformer's name and Ensembl-mapping dictionaries;
- `resolve_n_counts` finds the per-cell total in `obs` (or says it must be computed from X);
- `check_raw_counts` refuses log-normalised or otherwise non-count data.

Every problem a user can fix is an `InputError` with a one-line message.

One module: everything that reads a user's count matrix (formats, layers, gene identifiers, validation in row
chunks, the UMAP recipe) shares its readers; split, each part would reopen the same file handles.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import scipy.sparse as sp

    from pipeline.data.dictionaries import GeneDictionaries

# obs columns accepted as the per-cell total count, in order of preference.
N_COUNTS_COLUMNS = ("n_counts", "ncounts", "n.umi", "total_counts")

# var columns that commonly hold gene identifiers, tried when none is named.
GENE_ID_COLUMNS = (
    "ensembl_id",
    "ensembl_ids",
    "gene_id",
    "gene_ids",
    "ensembl",
    "feature_id",
    "gene_symbols",
    "gene_symbol",
    "symbol",
    "gene_name",
    "gene_names",
    "feature_name",
    "features",
)

MIN_MAPPED_FRACTION = 0.5
_FULL_CHECK = 1 << 16  # values checked for integrality one by one before sampling

# An Ensembl gene ID, optionally with a version suffix (group 1: the ID without it), in upper case.
_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G[0-9]{6,})(?:\.[0-9]+)?$")
_ENSEMBL_UPPER = _ENSEMBL_RE.match


# ------------------------------------------------------------------------------------------------
# Row-chunk access to raw counts
# ------------------------------------------------------------------------------------------------
class LazyFrame:
    """The columns of an on-disk AnnData dataframe (obs or var), read one at a time when asked for.

    Supports what tokenization needs of a DataFrame: `columns`, `index`, `len()`, `frame[name]`
    (a Series) and `name in frame.columns`. A million-cell obs with many columns costs only the
    columns actually used.
    """

    def __init__(self, group):
        self._g = group
        order = group.attrs.get("column-order", [])
        self.columns = [c.decode() if isinstance(c, bytes) else str(c) for c in list(order)]
        self._index = None
        self._cache: dict[str, Any] = {}

    @property
    def index(self):
        if self._index is None:
            import pandas as pd

            key = _attr(self._g, "_index", "_index")
            self._index = pd.Index(read_h5_elem(self._g[key]))
        return self._index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, name: str):
        import pandas as pd

        if name not in self.columns:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = pd.Series(read_h5_elem(self._g[name]), index=self.index, name=name)
        return self._cache[name]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({c: self[c] for c in self.columns}, index=self.index)


def read_h5_elem(elem):
    """One obs/var column (or index) of an .h5ad file, read with h5py alone.

    Covers the AnnData encodings columns use (arrays, string arrays, categoricals, nullable
    integers/booleans/strings); anything else is handed to anndata's own reader.
    """
    import h5py

    enc = _attr(elem, "encoding-type")
    if isinstance(elem, h5py.Dataset):
        if enc in ("array", "string-array", "") and elem.ndim == 1:
            if h5py.check_string_dtype(elem.dtype) is not None:
                return np.asarray(elem.asstr()[...], dtype=object)
            if elem.dtype.kind in "biuf":
                return elem[...]
    elif enc == "categorical":
        import pandas as pd

        categories = read_h5_elem(elem["categories"])
        return pd.Categorical.from_codes(
            elem["codes"][...], categories=categories, ordered=bool(elem.attrs.get("ordered", False))
        )
    elif enc in ("nullable-integer", "nullable-boolean"):
        import pandas as pd

        values, mask = elem["values"][...], elem["mask"][...].astype(bool)
        return (pd.arrays.IntegerArray if enc == "nullable-integer" else pd.arrays.BooleanArray)(values, mask)
    import anndata.io as aio

    return aio.read_elem(elem)


class _H5CSRRows:
    """Row slices of an on-disk CSR matrix, read straight from its HDF5 datasets."""

    def __init__(self, group, shape):
        self._data = group["data"]
        self._indices = group["indices"]
        self._indptr = group["indptr"][:].astype(np.int64)
        self.indptr = self._indptr
        self.shape = tuple(int(x) for x in shape)
        self.dtype = self._data.dtype

    def __getitem__(self, sl: slice):
        import scipy.sparse as sp

        a, b = sl.start, sl.stop
        lo, hi = int(self._indptr[a]), int(self._indptr[b])
        data = np.empty(hi - lo, dtype=self._data.dtype)
        indices = np.empty(hi - lo, dtype=self._indices.dtype)
        if hi > lo:
            self._data.read_direct(data, np.s_[lo:hi])
            self._indices.read_direct(indices, np.s_[lo:hi])
        return sp.csr_matrix((data, indices, self._indptr[a : b + 1] - lo), shape=(b - a, self.shape[1]))


class CountMatrix:
    """Cells x genes raw counts read in row chunks, with `obs` and `var` read as needed.

    `is_sparse` records how the counts are stored: Geneformer's arithmetic (and hence the last bit of
    each normalised value) differs between sparse and dense input, and the tokenizer mirrors it.
    """

    def __init__(self, obs, var, matrix, *, source: str, where: str, is_sparse: bool, closer=None):
        self.obs = obs
        self.var = var
        self._m = matrix
        self.source = source
        self.where = where  # "X" or "layer 'counts'"
        self.is_sparse = is_sparse
        self._closer = closer
        self.shape = tuple(int(x) for x in matrix.shape)
        if self.shape[0] != len(obs) or self.shape[1] != len(var):
            raise InputError(f"{source}: {where} has shape {self.shape} but obs/var have {len(obs)}/{len(var)} rows")

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    def chunks(self, max_rows: int, max_entries: int = 1 << 22):
        """(start, stop) row ranges with at most `max_rows` rows and, where the stored entries per row
        are known, at most `max_entries` entries (a single longer row stays whole)."""
        indptr = getattr(self._m, "indptr", None)
        if indptr is None or not self.is_sparse:
            per_row = self.n_vars if not self.is_sparse else 1
            step = max(1, min(max_rows, max_entries // max(1, per_row)))
            yield from ((a, min(self.n_obs, a + step)) for a in range(0, self.n_obs, step))
            return
        indptr = np.asarray(indptr, dtype=np.int64)
        a = 0
        while a < self.n_obs:
            b = int(np.searchsorted(indptr, indptr[a] + max_entries, side="right")) - 1
            b = min(self.n_obs, a + max_rows, max(b, a + 1))
            yield a, b
            a = b

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as a canonical CSR matrix in the stored dtype."""
        import scipy.sparse as sp

        block = self._m[start:stop]
        if sp.issparse(block):
            block = block if isinstance(block, sp.csr_matrix) else sp.csr_matrix(block)
            if not block.has_canonical_format:
                block = block.copy()
                block.sum_duplicates()
        else:
            block = sp.csr_matrix(np.asarray(block))
        return block

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_counts(adata_or_path: Any, layer: str | None = None) -> CountMatrix:
    """Open raw counts from an `.h5ad` path (read lazily) or an AnnData object."""
    if isinstance(adata_or_path, (str, os.PathLike)):
        return _open_h5ad(Path(adata_or_path), layer)
    return _from_anndata(adata_or_path, layer, source="AnnData")


def _from_anndata(adata, layer: str | None, source: str, closer=None) -> CountMatrix:
    import scipy.sparse as sp

    if layer is None:
        matrix, where = adata.X, "X"
    else:
        if layer not in adata.layers:
            avail = ", ".join(adata.layers.keys()) or "none"
            raise InputError(f"{source}: no layer {layer!r} (layers: {avail}); drop --layer to use X")
        matrix, where = adata.layers[layer], f"layer {layer!r}"
    if matrix is None:
        raise InputError(f"{source}: {where} is empty; store raw counts in X or name their layer with --layer")
    is_sparse = sp.issparse(matrix) or getattr(matrix, "format", None) in ("csr", "csc")
    if sp.issparse(matrix) and not isinstance(matrix, (sp.csr_matrix, sp.csr_array)):
        matrix = sp.csr_matrix(matrix)
    elif getattr(matrix, "format", None) == "csc":  # backed CSC: row chunks would rescan the file
        matrix = matrix.to_memory().tocsr()
    return CountMatrix(adata.obs, adata.var, matrix, source=source, where=where, is_sparse=is_sparse, closer=closer)


def _open_h5ad(path: Path, layer: str | None) -> CountMatrix:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .h5ad file")
    try:
        import h5py

        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: cannot read as .h5ad (not an HDF5 file or unreadable: {exc})") from None
    try:
        return _open_h5ad_lazily(path, f, layer)
    except InputError:
        f.close()
        raise
    except Exception:
        f.close()
    # Files older than the current on-disk spec: let anndata read them (X stays on disk).
    import anndata as ad

    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as exc:
        raise InputError(f"{path}: cannot read as AnnData ({type(exc).__name__}: {exc})") from None
    return _from_anndata(adata, layer, source=str(path), closer=lambda: adata.file.close())


def _attr(obj, key, default=""):
    v = obj.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _open_h5ad_lazily(path: Path, f, layer: str | None) -> CountMatrix:
    import h5py

    for key in ("obs", "var"):
        if key not in f:
            raise InputError(f"{path}: no {key} in the file; is this an .h5ad written by anndata?")
        if _attr(f[key], "encoding-type") != "dataframe":
            raise ValueError("pre-0.7 dataframe encoding")
    obs, var = LazyFrame(f["obs"]), LazyFrame(f["var"])
    if layer is None:
        if "X" not in f:
            raise InputError(f"{path}: no X in the file; name the layer holding raw counts with --layer")
        elem, where = f["X"], "X"
    else:
        layers = f.get("layers")
        if layers is None or layer not in layers:
            avail = ", ".join(layers.keys()) if layers is not None else ""
            raise InputError(f"{path}: no layer {layer!r} (layers: {avail or 'none'}); drop --layer to use X")
        elem, where = layers[layer], f"layer {layer!r}"
    if isinstance(elem, h5py.Group):
        enc = _attr(elem, "encoding-type")
        shape = tuple(elem.attrs["shape"])
        if enc == "csr_matrix":
            matrix = _H5CSRRows(elem, shape)
        elif enc == "csc_matrix":
            # Row chunks of a CSC matrix would each scan the whole file; convert once.
            import anndata.io as aio

            matrix = aio.sparse_dataset(elem).to_memory().tocsr()
        else:
            raise InputError(f"{path}: {where} has encoding {enc!r}; expected a sparse or dense count matrix")
        is_sparse = True
    else:
        if elem.ndim != 2:
            raise InputError(f"{path}: {where} is not a 2-D matrix")
        matrix = elem
        is_sparse = False
    return CountMatrix(obs, var, matrix, source=str(path), where=where, is_sparse=is_sparse, closer=f.close)


# ------------------------------------------------------------------------------------------------
# Raw-count validation
# ------------------------------------------------------------------------------------------------
def check_raw_counts(
    values: np.ndarray, *, source: str, where: str, first_row: int = 0, indptr=None, sample_step: int = 1
) -> None:
    """Refuse negative or non-integer values (log-normalised or scaled data).

    Negative values are looked for everywhere; integrality on the first values and then on every
    `sample_step`-th value.
    """
    if values.size == 0:
        return
    kind = values.dtype.kind
    if kind not in "iufb":
        raise InputError(f"{source}: {where} has dtype {values.dtype}; expected raw integer counts")
    bad = None
    if kind in "if" and not values.min() >= 0:  # also catches NaN
        neg = ~(values >= 0)
        bad = ("negative" if (values[neg] < 0).any() else "non-integer", int(np.flatnonzero(neg)[0]))
    elif kind == "f":
        # The head in full, the rest on a stride: normalised data is fractional nearly everywhere.
        head = values[:_FULL_CHECK]
        rest = values[_FULL_CHECK::sample_step]
        for offset, step, sample in ((0, 1, head), (_FULL_CHECK, sample_step, rest)):
            frac = sample != np.floor(sample)
            if frac.any():
                bad = ("non-integer", offset + int(np.flatnonzero(frac)[0]) * step)
                break
    if bad is None:
        return
    what, pos = bad
    cell = first_row + (int(np.searchsorted(indptr, pos, side="right")) - 1 if indptr is not None else 0)
    hint = "it looks log-normalised or scaled" if what == "non-integer" else "counts cannot be negative"
    raise InputError(
        f"{source}: {where} holds {what} values (e.g. {values[pos]!r} in cell {cell}); {hint}: tokenization "
        "needs raw counts, so store them in X or name their layer with --layer"
    )


# ------------------------------------------------------------------------------------------------
# n_counts
# ------------------------------------------------------------------------------------------------
@dataclass
class NCounts:
    values: np.ndarray | None  # None: sum each cell's row of X while reading it
    source: str  # e.g. "obs['ncounts']" or "computed from X (...)"

    @property
    def computed(self) -> bool:
        return self.values is None


def resolve_n_counts(obs: pd.DataFrame, column: str | None = None, *, source: str = "data") -> NCounts:
    """The per-cell total count from obs, or a note that it must be computed from X."""
    import pandas as pd

    if column is not None:
        if column not in obs.columns:
            raise InputError(
                f"{source}: no obs column {column!r} for n_counts (obs columns: {_list_cols(obs.columns)}); "
                "drop --n-counts-column to compute totals from X"
            )
        chosen = column
    else:
        chosen = next((c for c in N_COUNTS_COLUMNS if c in obs.columns), None)
        if chosen is None:
            return NCounts(None, f"computed from X (no {'/'.join(N_COUNTS_COLUMNS)} column in obs)")
    col = obs[chosen]
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(col.cat.categories.dtype)
    if col.dtype.kind not in "iuf":
        try:
            col = pd.to_numeric(col)
        except (TypeError, ValueError):
            raise InputError(
                f"{source}: obs column {chosen!r} is not numeric; pass --n-counts-column with cell totals"
            ) from None
    if col.isna().any():
        raise InputError(f"{source}: obs column {chosen!r} has missing values; fill them or drop the column")
    # Keep the stored precision: Geneformer divides by the column as it is (float32 stays float32).
    if col.dtype.kind in "iu":
        values = col.to_numpy(dtype=np.int64)
    else:
        values = col.to_numpy(dtype=np.float32 if col.dtype == np.float32 else np.float64)
    if (values < 0).any():
        raise InputError(f"{source}: obs column {chosen!r} has negative totals; it cannot be n_counts")
    return NCounts(values, f"obs[{chosen!r}]")


def _list_cols(cols, limit: int = 12) -> str:
    cols = [str(c) for c in cols]
    if not cols:
        return "none"
    more = f", ... ({len(cols)} in all)" if len(cols) > limit else ""
    return ", ".join(cols[:limit]) + more


def check_obs_columns(obs: pd.DataFrame, columns, *, source: str = "data") -> list[str]:
    reserved = {"input_ids", "length", "cell_id"}
    out = []
    for c in columns:
        if c in reserved:
            raise InputError(f"obs column {c!r} would clash with the tokenized dataset's own {c!r} column; rename it")
        if c not in obs.columns:
            raise InputError(f"{source}: no obs column {c!r} (obs columns: {_list_cols(obs.columns)})")
        if c not in out:
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------------
# Gene identifiers -> vocabulary
# ------------------------------------------------------------------------------------------------
@dataclass
class GeneMapping:
    """How each var column maps onto the vocabulary."""

    column: str | None  # None: var index
    ensembl_ids: np.ndarray  # per var column: mapped Ensembl ID, or None
    slots: np.ndarray  # per var column: index into `genes`, -1 when unmapped
    genes: list[str]  # unique mapped Ensembl IDs, in order of first appearance
    n_ensembl_like: int
    unmapped_examples: list[str] = field(default_factory=list)

    @property
    def n_total(self) -> int:
        return int(self.slots.size)

    @property
    def n_mapped(self) -> int:
        return int((self.slots >= 0).sum())

    @property
    def n_unique(self) -> int:
        return len(self.genes)

    @property
    def n_duplicates(self) -> int:
        """var columns whose counts are summed into another column of the same Ensembl ID."""
        return self.n_mapped - self.n_unique

    @property
    def kind(self) -> str:
        return "Ensembl IDs" if self.n_ensembl_like * 2 >= self.n_total else "gene symbols"

    @property
    def where(self) -> str:
        return "var index" if self.column is None else f"var[{self.column!r}]"


def looks_like_ensembl(ids) -> np.ndarray:
    return np.array([_ensembl_base(str(s).strip().upper()) is not None for s in ids], dtype=bool)


def strip_version(gene_id: str) -> str:
    """ENSG00000141510.16 -> ENSG00000141510; anything that is not an Ensembl gene ID is returned as is."""
    base = _ensembl_base(gene_id.strip().upper())
    return base if base is not None else gene_id


def _ensembl_base(up: str) -> str | None:
    """The version-less ID if `up` (upper case) is an Ensembl gene ID, else None."""
    m = _ENSEMBL_UPPER(up)
    return m.group(1) if m is not None else None


def map_identifiers(ids, dicts: GeneDictionaries) -> tuple[list[str | None], int]:
    """Map identifiers (Ensembl IDs or symbols, mixed) to vocabulary Ensembl IDs.

    Ensembl IDs lose their version suffix; symbols go through `gene_name_id_dict`, and symbols it
    lacks are tried as aliases in the Ensembl mapping dictionary. Every ID then goes through the
    Ensembl mapping dictionary (keys upper case, restricted to vocabulary targets) exactly as
    Geneformer collapses gene IDs; without a mapping dictionary IDs must be tokens themselves.
    Returns the mapped IDs (None where unmapped) and how many identifiers looked like Ensembl IDs.
    """
    vocab = dicts.token_dict
    mapping = dicts.ensembl_mapping
    if mapping is None:  # IDs must be tokens themselves
        mapping = {g: g for g in vocab if not g.startswith("<")}

    def to_vocab(key: str) -> str | None:
        # Only targets in the vocabulary count, as Geneformer filters its mapping dictionary.
        gid = mapping.get(key)
        return gid if gid is not None and gid in vocab and not gid.startswith("<") else None

    by_name = (dicts.name_to_id or {}).get
    out: list[str | None] = []
    n_ens = 0
    for raw in ids:
        s = str(raw).strip()
        up = s.upper()
        base = _ensembl_base(up)
        if base is not None:
            n_ens += 1
            out.append(to_vocab(base))
            continue
        gid = by_name(s)
        # Not a known symbol: the V2 mapping dictionary also maps aliases and old symbols.
        out.append(to_vocab(up) if gid is None else to_vocab(gid.upper()))
    return out, n_ens


def var_identifiers(var: pd.DataFrame, column: str | None) -> list[str]:
    """Gene identifiers of var (index or a column) as strings; missing values become ''."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    values = var.index if column is None else var[column]
    obj = np.asarray(values, dtype=object)
    try:
        arr = pa.array(obj, from_pandas=True)
        if not pa.types.is_string(arr.type):
            arr = pc.cast(arr, pa.string())
        return pc.fill_null(arr, "").to_pylist()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return ["" if pd.isna(v) else str(v) for v in obj]


def _build_mapping(var, column, dicts) -> GeneMapping:
    import pandas as pd

    ids = var_identifiers(var, column)
    mapped, n_ens = map_identifiers(ids, dicts)
    codes, uniques = pd.factorize(np.array(mapped, dtype=object), use_na_sentinel=True)
    slots = codes.astype(np.int64)
    examples = [ids[j] for j in np.flatnonzero(slots < 0)[:5]]
    return GeneMapping(
        column=column,
        ensembl_ids=np.array(mapped, dtype=object),
        slots=slots,
        genes=[str(g) for g in uniques],
        n_ensembl_like=n_ens,
        unmapped_examples=examples,
    )


def map_genes(
    var: pd.DataFrame,
    dicts: GeneDictionaries,
    gene_id_column: str | None = None,
    *,
    source: str = "data",
    min_fraction: float = MIN_MAPPED_FRACTION,
    detected: np.ndarray | None = None,
) -> GeneMapping:
    """Resolve `var` gene identifiers to vocabulary genes; refuse when too few map.

    With no column named, the var index is used when it maps well, otherwise the common identifier
    columns are tried and the best-mapping one wins. With `detected` (a mask over var), only the genes
    detected in the cells at hand count: an unfiltered matrix lists many genes no cell expresses.
    """
    n = len(var)
    if n == 0:
        raise InputError(f"{source}: var is empty (no genes)")
    if detected is not None and detected.any():
        detected = np.asarray(detected, dtype=bool)
        return _map_detected(var, dicts, gene_id_column, source, min_fraction, detected)
    label = f"the {dicts.version} vocabulary"
    if gene_id_column is not None:
        if gene_id_column not in var.columns:
            raise InputError(
                f"{source}: no var column {gene_id_column!r} with gene IDs (var columns: {_list_cols(var.columns)}); "
                "omit --gene-id-column to use the var index"
            )
        best = _build_mapping(var, gene_id_column, dicts)
    else:
        best = _build_mapping(var, None, dicts)
        if best.n_mapped < min_fraction * n:
            lowered = {str(c).lower(): c for c in var.columns}
            for name in GENE_ID_COLUMNS:
                col = lowered.get(name)
                if col is None or var[col].dtype.kind in "iufb":
                    continue
                cand = _build_mapping(var, col, dicts)
                if cand.n_mapped > best.n_mapped:
                    best = cand
        if best.n_mapped == 0 and _looks_like_row_numbers(var.index):
            raise InputError(
                f"{source}: no gene-ID column: the var index holds row numbers and no var column holds Ensembl IDs "
                f"or gene symbols (var columns: {_list_cols(var.columns)}); name one with --gene-id-column"
            )
    if best.n_mapped < min_fraction * n:
        pct = 100.0 * best.n_mapped / n
        examples = ", ".join(repr(e) for e in best.unmapped_examples[:3])
        raise InputError(
            f"{source}: only {best.n_mapped:,} of {n:,} genes ({pct:.1f}%) in {best.where} map to {label} "
            f"(unmapped e.g. {examples}); wrong species or ID type? Use human Ensembl IDs or symbols, "
            "or name the right var column with --gene-id-column"
        )
    return best


def _map_detected(var, dicts, gene_id_column, source, min_fraction, detected) -> GeneMapping:
    """`map_genes` counting only the detected genes (best column by detected genes mapped)."""
    n = int(detected.sum())
    candidates = [gene_id_column] if gene_id_column is not None else [None]
    if gene_id_column is None:
        lowered = {str(c).lower(): c for c in var.columns}
        candidates += [lowered[c] for c in GENE_ID_COLUMNS if c in lowered and var[lowered[c]].dtype.kind not in "iufb"]
    best, best_n = None, -1
    for col in candidates:
        if col is not None and col not in var.columns:
            map_genes(var, dicts, col, source=source, min_fraction=0.0)  # the missing-column message
        cand = _build_mapping(var, col, dicts)
        mapped = int(((cand.slots >= 0) & detected).sum())
        if mapped > best_n:
            best, best_n = cand, mapped
    if best_n < min_fraction * n:
        pct = 100.0 * best_n / n
        unmapped = [str(x) for x in np.asarray(var_identifiers(var, best.column))[(best.slots < 0) & detected][:3]]
        raise InputError(
            f"{source}: only {best_n:,} of the {n:,} genes detected in the selected cells ({pct:.1f}%) in {best.where} "
            f"map to the {dicts.version} vocabulary (unmapped e.g. {', '.join(map(repr, unmapped))}); wrong species "
            "or ID type? Use human Ensembl IDs or symbols, or name the right var column with --gene-id-column"
        )
    return best


def _looks_like_row_numbers(index) -> bool:
    sample = [str(v) for v in list(index[:50])]
    return all(s.isdigit() for s in sample)


def filter_pass_mask(obs: pd.DataFrame) -> np.ndarray | None:
    """Geneformer's optional QC column: only cells with filter_pass == 1 are tokenized."""
    if "filter_pass" not in obs.columns:
        return None
    col = obs["filter_pass"]
    values = col.astype(object).to_numpy() if hasattr(col, "cat") else col.to_numpy()
    return np.array([v == 1 for v in values], dtype=bool) if values.dtype == object else (values == 1)


# ------------------------------------------------------------------------------------------------
# The pipeline's reads: checks before a run is recorded, the selected cells, their UMAP and DE matrix
# ------------------------------------------------------------------------------------------------
def validate_counts(
    path: str | os.PathLike,
    rows,
    dicts: GeneDictionaries | None = None,
    *,
    layer: str | None = None,
    gene_id_column: str | None = None,
    chunk_rows: int = 4096,
    gene_totals: bool = False,
):
    """Check the counts of the selected `rows` before anything is recorded; returns how many have counts.

    Streams the matrix in row chunks (only chunks holding a selected row): raw integer counts as the
    tokenizer checks them (negative, NaN and non-integer values refused), at least one selected cell
    with counts, and, with `dicts`, enough of the genes detected in the selected cells mapping to the
    vocabulary (`map_genes`). With `gene_totals`, returns (cells with counts, each var gene's counts summed
    over the selected cells).
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    with open_counts(path, layer) as cm:
        with_counts = 0
        totals_per_gene = np.zeros(len(cm.var), dtype=np.float64)
        for start, stop in cm.chunks(chunk_rows):
            lo, hi = np.searchsorted(rows, [start, stop])
            if lo == hi:
                continue
            block = cm.rows(start, stop)
            check_raw_counts(
                block.data, source=cm.source, where=cm.where, first_row=start, indptr=block.indptr, sample_step=61
            )
            selected = block[rows[lo:hi] - start]
            totals = np.asarray(selected.sum(axis=1)).ravel()
            with_counts += int((totals > 0).sum())
            totals_per_gene += np.asarray(selected.sum(axis=0), dtype=np.float64).ravel()
        if len(rows) and with_counts == 0:
            raise InputError(
                f"{path}: all {len(rows):,} selected cells have zero counts in {cm.where}; store raw counts in X "
                "or name their layer with data.layer"
            )
        if dicts is not None:
            map_genes(cm.var, dicts, gene_id_column, source=str(path), detected=totals_per_gene > 0)
    return (with_counts, totals_per_gene) if gene_totals else with_counts


def loom_as_h5ad(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A .loom file as an .h5ad, converted once (anndata's `read_loom`, with loompy) and cached by content
    with a manifest checked on reuse (`io.cached_h5ad`): every later read is the same lazy, backed .h5ad
    read as for any other input."""
    from pipeline.io import cached_h5ad, sha256_file

    path = Path(path)
    return cached_h5ad(
        Path(folder) / f"loom-{sha256_file(path)[:16]}", lambda: _read_loom(path), what="converted .loom"
    )


def _read_loom(path: Path):
    try:
        import anndata as ad

        read_loom = getattr(ad, "read_loom", None) or ad.io.read_loom
        adata = read_loom(path, sparse=True, cleanup=False)
    except ImportError:
        raise InputError(f"{path}: reading .loom files needs loompy (`pip install loompy`)") from None
    except Exception as exc:
        raise InputError(f"{path}: cannot read as .loom ({type(exc).__name__}: {exc})") from None
    # loom names rows and columns by attributes: CellID / Gene (loompy, velocyto) or obs_names / var_names
    for frame, keys in (
        (adata.obs, ("CellID", "obs_names", "cell_id")),
        (adata.var, ("Gene", "var_names", "gene_ids")),
    ):
        key = next((k for k in keys if k in frame.columns), None)
        if key is not None:
            frame.index = frame.pop(key).astype(str).to_numpy()
    return adata


def read_selected(path: str | os.PathLike, rows):
    """The selected cells of an .h5ad as an in-memory AnnData (one read serves tokenization, UMAP and DE)."""
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    try:
        return backed[np.asarray(rows, dtype=np.int64)].to_memory()
    finally:
        backed.file.close()


def umap_coordinates(adata, seed: int) -> np.ndarray:
    """UMAP of the cells with scanpy's standard recipe (normalise, log1p, HVG, PCA, kNN), seeded."""
    import scanpy as sc

    adata = adata.copy()
    sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_top = min(2000, adata.n_vars)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top, subset=True)
    sc.pp.pca(adata, n_comps=min(30, adata.n_obs - 1, adata.n_vars - 1), random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    return np.asarray(adata.obsm["X_umap"], dtype=np.float64)


SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "symbol", "gene_name", "gene_names", "feature_name", "gene")


def gene_symbols_of(adata, dicts: GeneDictionaries, gene_id_column: str | None = None) -> dict[str, str]:
    """Ensembl ID -> the data's own gene symbol (a var symbol column, or var identifiers that are symbols),
    for genes whose dictionaries name no symbol."""
    var = adata.var
    mapping = map_genes(var, dicts, gene_id_column, min_fraction=0.0)
    lowered = {str(c).lower(): c for c in var.columns}
    column = next((lowered[c] for c in SYMBOL_COLUMNS if c in lowered), None)
    names = var_identifiers(var, column) if column is not None else var_identifiers(var, gene_id_column)
    out: dict[str, str] = {}
    for gid, name in zip(mapping.ensembl_ids, names):
        if gid is not None and name and not looks_like_ensembl([name])[0] and gid not in out:
            out[gid] = name
    return out


def ensembl_indexed(adata, dicts: GeneDictionaries, gene_id_column: str | None = None, *, source: str = "data"):
    """A copy with var indexed by vocabulary Ensembl IDs (unmapped genes dropped, first of duplicates kept)."""
    import pandas as pd

    mapping = map_genes(adata.var, dicts, gene_id_column, source=source)
    ids = np.asarray([g if g is not None else "" for g in mapping.ensembl_ids], dtype=object)
    keep = (ids != "") & ~pd.Series(ids).duplicated().to_numpy()
    out = adata[:, keep].copy()
    out.var_names = ids[keep].astype(str)
    return out
