"""Geneformer's gene dictionaries: token ids, gene medians, symbol and Ensembl-alias maps.

The rank-value encoding of Theodoris et al. (2023), used throughout the thesis (section 3.1, "The
underlying architecture of the Geneformer model"), needs four pickled dictionaries that ship with Geneformer:

- `token_dictionary*.pkl`: Ensembl ID -> token id, plus `<pad>`, `<mask>` (and `<cls>`, `<eos>` in V2);
- `gene_median_dictionary*.pkl`: Ensembl ID -> nonzero median of the normalised expression;
- `gene_name_id_dict*.pkl`: gene symbol -> Ensembl ID;
- `ensembl_mapping_dict*.pkl`: (upper-case) alias or old ID -> current Ensembl ID.

A Geneformer checkout holds the V2 (gc104M) files in its package folder and the V1 (gc30M) files in
`gene_dictionaries_30m/`. A gfattn-built model directory holds the same layout without suffixes.

Pickles from a user's disk can execute code when loaded, so they are only ever read through
`load_pickle_restricted`, which reconstructs plain containers, strings, numbers and numpy scalars
and refuses everything else.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import InputError
from pipeline.io import atomic_write_bytes, atomic_write_text

Version = Literal["V1", "V2"]

# Suffixes used by upstream Geneformer for the two model series.
_SERIES_SUFFIX = {"V2": "gc104M", "V1": "gc30M"}
_V1_SUBDIR = "gene_dictionaries_30m"
_KINDS = ("token_dictionary", "gene_median_dictionary", "gene_name_id_dict", "ensembl_mapping_dict")

# Model input size of each series, special tokens included.
MODEL_INPUT_SIZE = {"V1": 2048, "V2": 4096}

_BUILTINS_ALLOWED = {
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "str",
    "bytes",
    "bytearray",
    "int",
    "float",
    "bool",
    "complex",
}
# numpy pickles scalars as `scalar(dtype, raw_bytes)`; the module moved between numpy 1 and 2.
_NUMPY_ALLOWED = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "dtype"),
    ("numpy._core.multiarray", "dtype"),
}
# Object dtypes could smuggle arbitrary objects through `scalar`; only numeric/bool/str dtypes pass.
_NUMPY_DTYPE_KINDS = set("biufcUS?")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _BUILTINS_ALLOWED:
            import builtins

            return getattr(builtins, name)
        if (module, name) in _NUMPY_ALLOWED:
            return _checked_dtype if name == "dtype" else _checked_scalar
        raise InputError(
            f"{self._path}: refusing to unpickle {module}.{name}; dictionary pickles may hold only "
            "dicts, lists, strings, numbers and numpy scalars (is this really a Geneformer dictionary?)"
        )


@functools.lru_cache(maxsize=1)
def _numpy_scalar_function():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


def _require_plain_dtype(dt) -> None:
    if dt.kind not in _NUMPY_DTYPE_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise pickle.UnpicklingError(f"numpy dtype {dt} is not a plain scalar type")


def _checked_dtype(*args, **kwargs):
    import numpy as np

    dt = np.dtype(*args, **kwargs)
    _require_plain_dtype(dt)
    return dt


def _checked_scalar(dtype, *args):
    # The dtype may have been altered by a BUILD opcode after construction: check it again here.
    try:
        plain = dtype.kind in _NUMPY_DTYPE_KINDS and not dtype.hasobject and dtype.fields is None
    except AttributeError:
        plain = False
    if not plain or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"numpy scalar of type {dtype!r} is not a plain number or string")
    return _numpy_scalar_function()(dtype, *args)


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """Unpickle `path` allowing only plain containers, strings, numbers and numpy scalars."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path).load()
    except InputError:
        raise
    except Exception as exc:  # any malformed or hostile stream
        raise InputError(f"{path}: not a readable dictionary pickle ({type(exc).__name__}: {exc})") from None


def _load_dict(path: Path, what: str) -> dict:
    obj = load_pickle_restricted(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a pickled dict ({what}), found {type(obj).__name__}")
    return obj


def _as_token_dict(raw: dict, path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in raw.items():
        try:
            out[str(k)] = int(v)
        except (TypeError, ValueError):
            raise InputError(
                f"{path}: token id of {k!r} is {v!r}, not an integer; is this a token dictionary?"
            ) from None
    if "<pad>" not in out or "<mask>" not in out:
        raise InputError(f"{path}: token dictionary lacks <pad> or <mask>; is this a Geneformer token dictionary?")
    ids = list(out.values())
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: token dictionary maps several keys to the same id")
    return out


def _as_float_dict(raw: dict, path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in raw.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise InputError(
                f"{path}: median of {k!r} is {v!r}, not a number; is this a gene median dictionary?"
            ) from None
    return out


def _as_str_dict(raw: dict, path: Path, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(v, str):
            raise InputError(f"{path}: value of {k!r} is {type(v).__name__}, expected an Ensembl ID string ({what})")
        out[str(k)] = v
    return out


@dataclass
class GeneDictionaries:
    """The dictionaries one tokenization (and the model reading it) is built on."""

    token_dict: dict[str, int]
    gene_median: dict[str, float]
    name_to_id: dict[str, str] | None = None
    ensembl_mapping: dict[str, str] | None = None
    version: Version = "V2"
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if self.version not in ("V1", "V2"):
            raise InputError(f"model version {self.version!r} is not V1 or V2")
        if self.version == "V2" and (self.cls_id is None or self.eos_id is None):
            raise InputError(
                f"{self.source or 'token dictionary'}: V2 needs <cls> and <eos> tokens, which this token "
                "dictionary lacks; use --model-version V1 or the gc104M dictionaries"
            )
        missing = [g for g in self.gene_tokens() if g not in self.gene_median]
        if missing:
            raise InputError(
                f"{self.source or 'gene median dictionary'}: {len(missing)} token genes have no median "
                f"(e.g. {', '.join(missing[:3])}); the token and median dictionaries do not belong together"
            )

    # ---- special tokens -------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.token_dict["<pad>"]

    @property
    def mask_id(self) -> int:
        return self.token_dict["<mask>"]

    @property
    def cls_id(self) -> int | None:
        return self.token_dict.get("<cls>")

    @property
    def eos_id(self) -> int | None:
        return self.token_dict.get("<eos>")

    @property
    def special_ids(self) -> set[int]:
        return {v for k, v in self.token_dict.items() if _is_special(k)}

    @property
    def uses_special_tokens(self) -> bool:
        """V2 wraps every cell in <cls> ... <eos>; V1 and gfattn-built vocabularies do not."""
        return self.version == "V2"

    @property
    def model_input_size(self) -> int:
        return MODEL_INPUT_SIZE[self.version]

    @property
    def vocab_size(self) -> int:
        return max(self.token_dict.values()) + 1

    @property
    def id_to_gene(self) -> dict[int, str]:
        inv = self.__dict__.get("_id_to_gene")
        if inv is None:
            inv = {v: k for k, v in self.token_dict.items()}
            self.__dict__["_id_to_gene"] = inv
        return inv

    @property
    def id_to_symbol(self) -> dict[str, str]:
        """Ensembl ID -> gene symbol (first symbol in dictionary order), for display."""
        inv = self.__dict__.get("_id_to_symbol")
        if inv is None:
            inv = {}
            for sym, gid in (self.name_to_id or {}).items():
                inv.setdefault(gid, sym)
            self.__dict__["_id_to_symbol"] = inv
        return inv

    def gene_tokens(self) -> list[str]:
        """Ensembl IDs that are tokens (special tokens left out)."""
        return [k for k in self.token_dict if not _is_special(k)]

    def symbol(self, token_id: int) -> str:
        gid = self.id_to_gene.get(int(token_id), "")
        return self.id_to_symbol.get(gid, gid)

    def fingerprint(self) -> str:
        """Content hash of everything that changes a tokenization (for cache keys)."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            h = hashlib.sha256()
            h.update(self.version.encode())
            for name, d in (
                ("token", self.token_dict),
                ("median", {g: self.gene_median[g] for g in self.gene_tokens()}),
                ("names", self.name_to_id or {}),
                ("mapping", self.ensembl_mapping or {}),
            ):
                h.update(name.encode())
                h.update(json.dumps(sorted((k, repr(v)) for k, v in d.items())).encode())
            fp = h.hexdigest()
            self.__dict__["_fingerprint"] = fp
        return fp

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        token_dictionary: str | os.PathLike,
        gene_median: str | os.PathLike,
        gene_mapping: str | os.PathLike | None = None,
        gene_name_id: str | os.PathLike | None = None,
        version: Version | None = None,
    ) -> GeneDictionaries:
        """Load the dictionaries from explicit files; the version defaults to V2 when <cls>/<eos> exist."""
        tok_path = Path(token_dictionary)
        tok = _as_token_dict(_load_dict(tok_path, "token dictionary"), tok_path)
        med_path = Path(gene_median)
        med = _as_float_dict(_load_dict(med_path, "gene medians"), med_path)
        mapping = None
        if gene_mapping is not None:
            p = Path(gene_mapping)
            mapping = _as_str_dict(_load_dict(p, "Ensembl mapping"), p, "Ensembl mapping")
        names = None
        if gene_name_id is not None:
            p = Path(gene_name_id)
            names = _as_str_dict(_load_dict(p, "gene names"), p, "gene name -> ID")
        if version is None:
            version = "V2" if ("<cls>" in tok and "<eos>" in tok) else "V1"
        return cls(tok, med, names, mapping, version, source=str(tok_path))

    @classmethod
    def from_geneformer_dir(cls, directory: str | os.PathLike, version: Version = "V2") -> GeneDictionaries:
        """Find a model series' dictionaries in a Geneformer checkout (or its `geneformer/` package)."""
        if version not in ("V1", "V2"):
            raise InputError(f"model version {version!r} is not V1 or V2")
        files = find_geneformer_files(directory, version)
        return cls.from_files(
            files["token_dictionary"],
            files["gene_median_dictionary"],
            gene_mapping=files.get("ensembl_mapping_dict"),
            gene_name_id=files.get("gene_name_id_dict"),
            version=version,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> GeneDictionaries:
        """Dictionaries saved beside a model (`token_dictionary*.pkl`, `gene_median_dictionary*.pkl`, ...)."""
        d = Path(model_dir)
        if not d.is_dir():
            raise InputError(f"{d}: not a model directory")
        found: dict[str, Path] = {}
        for kind in _KINDS:
            hits = sorted(d.glob(f"{kind}*.pkl"))
            if len(hits) > 1:
                raise InputError(
                    f"{d}: several {kind}*.pkl files ({', '.join(h.name for h in hits)}); keep one per model directory"
                )
            if hits:
                found[kind] = hits[0]
        for kind in ("token_dictionary", "gene_median_dictionary"):
            if kind not in found:
                raise InputError(f"{d}: no {kind}*.pkl; a model directory carries the dictionaries it was trained with")
        version: Version | None = None
        meta = d / "gfattn_dictionaries.json"
        if meta.is_file():
            try:
                version = json.loads(meta.read_text()).get("version")
            except (OSError, ValueError):
                version = None
        return cls.from_files(
            found["token_dictionary"],
            found["gene_median_dictionary"],
            gene_mapping=found.get("ensembl_mapping_dict"),
            gene_name_id=found.get("gene_name_id_dict"),
            version=version,
        )

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the dictionaries in Geneformer's pickle layout (plain Python types only)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = []
        items = [
            ("token_dictionary.pkl", {k: int(v) for k, v in self.token_dict.items()}),
            ("gene_median_dictionary.pkl", {k: float(v) for k, v in self.gene_median.items()}),
        ]
        if self.name_to_id is not None:
            items.append(("gene_name_id_dict.pkl", dict(self.name_to_id)))
        if self.ensembl_mapping is not None:
            items.append(("ensembl_mapping_dict.pkl", dict(self.ensembl_mapping)))
        for name, obj in items:
            out.append(atomic_write_bytes(d / name, pickle.dumps(obj, protocol=4)))
        out.append(atomic_write_text(d / "gfattn_dictionaries.json", json.dumps({"version": self.version}) + "\n"))
        return out


def _is_special(key: str) -> bool:
    return key.startswith("<") and key.endswith(">")


def find_geneformer_files(directory: str | os.PathLike, version: Version) -> dict[str, Path]:
    """Locate a series' dictionary files in a Geneformer checkout.

    V2 (gc104M) files sit in the package folder, V1 (gc30M) files in its `gene_dictionaries_30m/`;
    the package folder is either `directory` itself or `directory/geneformer/` (a repository clone).
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root}: --geneformer-dir is not a directory")
    suffix = _SERIES_SUFFIX[version]
    candidates = [root, root / "geneformer"]
    if version == "V1":
        candidates = [c / _V1_SUBDIR for c in candidates] + candidates
    for c in candidates:
        tok = c / f"token_dictionary_{suffix}.pkl"
        med = c / f"gene_median_dictionary_{suffix}.pkl"
        if tok.is_file() and med.is_file():
            files = {"token_dictionary": tok, "gene_median_dictionary": med}
            for kind in ("gene_name_id_dict", "ensembl_mapping_dict"):
                p = c / f"{kind}_{suffix}.pkl"
                if p.is_file():
                    files[kind] = p
            return files
    where = "gene_dictionaries_30m/" if version == "V1" else ""
    raise InputError(
        f"{root}: no {version} dictionaries found (looked for {where}token_dictionary_{suffix}.pkl and "
        f"gene_median_dictionary_{suffix}.pkl here and under geneformer/); point --geneformer-dir at a "
        "Geneformer checkout or give --token-dictionary and --gene-median"
    )


def resolve_version(requested: str = "auto", model_dir: str | os.PathLike | None = None) -> str:
    """The Geneformer dictionary series of `model.version`: V1 or V2 as given; for `auto`, a checkpoint's
    input size decides (V1 models take 2048 tokens over the gc30M vocabulary, V2 4096 over gc104M; a
    config without `max_position_embeddings` has BERT's default, 512, so V1); without a checkpoint
    (gfattn's own model, the dictionaries only map symbols to IDs) the current series, V2."""
    if requested in MODEL_INPUT_SIZE:
        return requested
    if model_dir is None:
        return "V2"
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "V1" if int(config.get("max_position_embeddings", 512)) <= MODEL_INPUT_SIZE["V1"] else "V2"
