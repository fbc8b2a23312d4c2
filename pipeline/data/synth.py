"""Synthetic sci-Plex 2-like data with planted biology, and a pretraining corpus (healthy, or atlas-like).

Implements the data of the thesis (section 2.1-2.2): sci-Plex 2 (Srivatsan et al. 2020, Science
367:45), A549 lung adenocarcinoma cells 24 h after Nutlin-3a at 0, 0.25, 1.25, 2.5, 12.5, 25, 125 and
250 uM, with the obs columns scPerturb (Peidli et al. 2024) gives them. So that the experiment runs
without the real data and every analysis can be scored, the generator plants what the thesis looks
for and records it as ground truth:

- counts: gamma-Poisson (negative binomial) with gene-wise means and dispersions (Svensson 2020,
  Nat Biotechnol 38:147 shows droplet UMI counts are not zero-inflated beyond this);
- Nutlin-3a response: a Hill curve of dose (EC50 ~2 uM, coefficient ~1.5) with a per-cell EC50, driving
  p53 targets up (Fischer 2017 census) and E2F / G2-M cell-cycle genes down;
- the length confound the thesis suspects (section 4.4, 5.1): loss of viability with dose lowers the
  number of detected genes; `length_effect` scales it and 0 removes any dose dependence of the
  expected number of detected genes.

Each cell's library size is solved so that its *expected* number of detected genes equals a target
drawn from a log-normal (times the dose's viability factor), which is how the presets hit their
medians and maxima of detected genes exactly and how `length_effect=0` stays free of dose
information. The background genes' expression spread is calibrated per preset so that the median
UMI count is hit as well.

`make_corpus` builds the stand-in for Genecorpus-30M (Theodoris et al. 2023, Nature 618:616): healthy
cell types made of co-expressed gene programs plus cell states shared across types (cycling, p53
response, interferon, ...) over the same gene universe, so that masked-gene pretraining has gene-gene
structure to learn and its vocabulary covers the sci-Plex-like data. Like a real atlas, which holds
stressed, arrested and proliferating cells, it spans the states the sci-Plex-like data varies, without
any dose: a p53 response of graded strength on the planted targets that also arrests the cycle,
cycling and resting cells, and a wide spread of library sizes.

One module: the generator's cell types, p53 response, dose and length effects are drawn from one seeded
stream, in order; split, the draw order (and every stored number) would be at risk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import synth_genes as genes
from pipeline.errors import InputError
from store.jsonsafe import plain

# sci-Plex 2, Nutlin-3a arm: doses (uM) and cells per dose after QC
DOSES_UM: tuple[float, ...] = (0.0, 0.25, 1.25, 2.5, 12.5, 25.0, 125.0, 250.0)
CELLS_PER_DOSE: tuple[int, ...] = (1002, 849, 792, 892, 829, 1096, 410, 86)
# Viability relative to vehicle; drives the detected-genes confound
VIABILITY: tuple[float, ...] = (1.0, 0.95, 0.85, 0.81, 0.69, 0.67, 0.60, 0.55)

EC50_UM = 2.0
HILL_COEFFICIENT = 1.5
EC50_LOG_SD = 0.5  # cell-to-cell spread of log EC50: partial responders at 2.5-12.5 uM

VEHICLE = "control"
DRUG = "Nutlin"
CELL_LINE = "A549"
TRUTH_KEY = "gfattn_truth"

# Fixed, so that the gene universe depends only on preset / vocabulary / n_genes, never on the seed:
# a corpus and a sci-Plex-like data set made with different seeds still share their genes.
_UNIVERSE_SEED = 20_200_104
_SYNTHETIC_ID_PREFIX = "ENSG9"  # real human gene IDs are ENSG0..., so these can never clash

# Vehicle cell-cycle phase proportions and the phase genes' fold change in their phase
_PHASES = ("G1", "S", "G2M")
_PHASE_P = (0.5, 0.28, 0.22)
_PHASE_LOG2_UP = {"S": 1.0, "G2M": 1.5}

# The atlas-like corpus (`make_corpus(atlas=True)`): fraction of cells with an active p53 response (its
# strength uniform on 0-1) and the spread of log detected genes per cell
ATLAS_P53_FRACTION = 0.25
ATLAS_GENES_LOG_SD = 0.35
# `make_corpus(lineage_cells=N)`: the dosed cell line's seed is the corpus's plus this offset, and its type name
LINEAGE_SEED_OFFSET = 7919
LINEAGE_TYPE = "cell line"

_CHUNK_ENTRIES = 4_000_000  # cells x genes per sampling chunk (~16 MB per float32 matrix)
_SMALL_MEAN = 4.0  # below: inverse-CDF sampling of nonzero counts; above: rejection
_LOG_L_GRID = np.linspace(math.log(5.0), math.log(5e6), 224)


@dataclass(frozen=True)
class Preset:
    """Targets of a preset: gene universe size, median UMIs, median and maximum detected genes."""

    n_genes: int
    median_umis: float
    median_genes: float
    max_genes: float | None
    genes_log_sd: float  # spread of log detected genes within a dose


PRESETS: dict[str, Preset] = {
    # whole transcriptome as scPerturb ships it: ~4,200 UMIs and ~2,300 genes per cell (median)
    "raw": Preset(n_genes=12_000, median_umis=4200.0, median_genes=2300.0, max_genes=None, genes_log_sd=0.22),
    # the thesis's ~5,000-gene matrix: median 683, maximum 1,430 detected genes per cell
    "thesis": Preset(n_genes=5_000, median_umis=1200.0, median_genes=680.0, max_genes=1400.0, genes_log_sd=0.22),
}


# --------------------------------------------------------------------------------------------------
# gene universe


def _named_symbols() -> list[str]:
    return list(genes.GENE_IDS)


def _load_pickle(path: Path) -> Any:
    from pipeline.data.dictionaries import load_pickle_restricted

    return load_pickle_restricted(path)


def _dictionary_files(geneformer_dir: Path, stem: str) -> list[Path]:
    """`stem*.pkl` in a Geneformer checkout (repo root, its `geneformer/` package or a model dir)."""
    roots = [geneformer_dir, geneformer_dir / "geneformer"]
    found: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for pattern in (f"{stem}*.pkl", f"*/{stem}*.pkl"):
            found += sorted(root.glob(pattern))
    return list(dict.fromkeys(found))


def vocabulary_genes(geneformer_dir: str | Path) -> tuple[list[str], dict[str, str]]:
    """Ensembl IDs present in every token dictionary under `geneformer_dir`, and their symbols.

    Intersecting the V1 and V2 dictionaries of a checkout keeps the data usable with either model.
    """
    d = Path(geneformer_dir).expanduser()
    if not d.is_dir():
        raise InputError(f"--geneformer-dir {d}: not a directory; pass a Geneformer checkout or its geneformer/ folder")
    token_files = _dictionary_files(d, "token_dictionary")
    if not token_files:
        raise InputError(f"--geneformer-dir {d}: no token_dictionary*.pkl found (looked in it and in geneformer/)")
    name_files = _dictionary_files(d, "gene_name_id_dict")
    key = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in token_files + name_files)
    if key not in _VOCABULARY_CACHE:
        _VOCABULARY_CACHE.clear()  # one checkout at a time is all a session uses
        _VOCABULARY_CACHE[key] = _read_vocabulary(token_files, name_files)
    vocab, symbols = _VOCABULARY_CACHE[key]
    return list(vocab), dict(symbols)


_VOCABULARY_CACHE: dict[tuple, tuple[list[str], dict[str, str]]] = {}


def _read_vocabulary(token_files: list[Path], name_files: list[Path]) -> tuple[list[str], dict[str, str]]:
    vocab: set[str] | None = None
    for f in token_files:
        ids = {str(k) for k in _load_pickle(f) if str(k).startswith("ENS")}
        vocab = ids if vocab is None else vocab & ids
    symbols: dict[str, str] = {}
    for f in name_files:
        for sym, eid in _load_pickle(f).items():
            symbols.setdefault(str(eid), str(sym))
    return sorted(vocab or ()), symbols


def gene_universe(preset: str = "raw", geneformer_dir: str | Path | None = None, n_genes: int | None = None):
    """The genes (var) of `make_sciplex_like` and `make_corpus`: index Ensembl ID, `ensembl_id`, `gene_symbol`.

    All named genes (p53 targets, cell-cycle, housekeeping, markers) with their real IDs, then background
    genes drawn from the Geneformer vocabulary when `geneformer_dir` is given, else synthetic IDs
    (`ENSG9...`, symbols `SYN00001`...). Sorted by Ensembl ID; independent of any seed.
    """
    import pandas as pd

    p = _preset(preset)
    n_total = int(n_genes) if n_genes is not None else p.n_genes
    named = _named_symbols()
    named_ids = [genes.GENE_IDS[s] for s in named]
    n_min = len(named) + 200
    if n_total < n_min:
        raise InputError(
            f"n_genes {n_total} is too small: the named genes alone are {len(named)}; use at least {n_min}"
        )
    n_bg = n_total - len(named)
    rng = np.random.default_rng(_UNIVERSE_SEED)
    if geneformer_dir is not None:
        vocab, sym_of = vocabulary_genes(geneformer_dir)
        named_set = set(named_ids)
        candidates = [g for g in vocab if g not in named_set]
        if len(candidates) < n_bg:
            raise InputError(
                f"--geneformer-dir {geneformer_dir}: its vocabulary has only {len(candidates) + len(named)} usable "
                f"genes; use n_genes <= {len(candidates) + len(named)}"
            )
        pick = np.sort(rng.choice(len(candidates), size=n_bg, replace=False))
        bg_ids = [candidates[i] for i in pick]
        bg_sym = [sym_of.get(g, g) for g in bg_ids]
    else:
        bg_ids = [f"{_SYNTHETIC_ID_PREFIX}{i:010d}" for i in range(1, n_bg + 1)]
        bg_sym = [f"SYN{i:05d}" for i in range(1, n_bg + 1)]
    var = pd.DataFrame({"ensembl_id": named_ids + bg_ids, "gene_symbol": named + bg_sym})
    var = var.sort_values("ensembl_id", kind="stable").reset_index(drop=True)
    var.index = pd.Index(var["ensembl_id"].to_numpy(), dtype=object)
    var.index.name = None
    return var


def _check_universe_size(n_genes: int, p: Preset, preset: str) -> None:
    """Detection targets stay the preset's whatever the universe; a universe too small cannot meet them."""
    need = int(math.ceil(2.5 * p.median_genes))
    if n_genes < need:
        raise InputError(
            f"n_genes {n_genes} is too small for preset {preset!r} (~{p.median_genes:,.0f} detected genes per cell); "
            f"use at least {need}, or the thesis preset"
        )


def _preset(preset: str) -> Preset:
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[preset]


# --------------------------------------------------------------------------------------------------
# negative binomial machinery


def _p_detected(mu: np.ndarray, r: np.ndarray) -> np.ndarray:
    """P(count > 0) under NB(mean mu, size r)."""
    return -np.expm1(-r * np.log1p(mu / r))


def _expected_detected_grid(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Expected detected genes on `_LOG_L_GRID` library sizes for weights `w` (rows: groups)."""
    w2 = np.atleast_2d(w)
    out = np.empty((w2.shape[0], _LOG_L_GRID.size))
    lib = np.exp(_LOG_L_GRID)
    for k, wk in enumerate(w2):
        for i in range(0, lib.size, 32):
            mu = lib[i : i + 32, None] * wk[None, :]
            out[k, i : i + 32] = _p_detected(mu, r[None, :]).sum(axis=1)
    return out


def _calibrate_background(
    fixed_w: np.ndarray,
    fixed_r: np.ndarray,
    bg_z: np.ndarray,
    bg_r: np.ndarray,
    fixed_mass: float,
    umis: float,
    n_detected: float,
) -> float:
    """Log-normal spread of the background genes such that a cell of `umis` UMIs detects `n_detected` genes.

    A wider spread concentrates the background's UMIs on fewer genes, so detection falls monotonically
    with it; bisection on that spread.
    """
    fixed_det = _p_detected(umis * fixed_w, fixed_r).sum()

    def detected(sd: float) -> float:
        e = np.exp(sd * bg_z)
        wb = (1.0 - fixed_mass) * e / e.sum()
        return fixed_det + _p_detected(umis * wb, bg_r).sum()

    lo, hi = 0.02, 6.0
    if detected(lo) < n_detected:
        return lo  # the universe is too small to reach the target; detect as many as it can
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if detected(mid) > n_detected:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _solve_library(
    target: np.ndarray, group: np.ndarray, w: np.ndarray, r: np.ndarray, v_idx: np.ndarray, f: np.ndarray
) -> np.ndarray:
    """Library sizes L such that each cell's expected number of detected genes equals `target`.

    Genes outside `v_idx` share one composition per group (a precomputed curve, inverted by
    interpolation); genes in `v_idx` carry per-cell factors `f` and are evaluated exactly. The
    fixed-point iteration converges in a few steps because the per-cell genes are a small part.
    """
    w2 = np.atleast_2d(w)
    rest = np.ones(w2.shape[1], dtype=bool)
    rest[v_idx] = False
    curves = _expected_detected_grid(w2[:, rest], r[rest])
    r_v = r[v_idx]
    w_v = w2[:, v_idx][group] * f
    log_l = np.zeros(target.size)
    e_v = np.zeros(target.size)
    for _ in range(12):
        prev = log_l.copy()
        for k in range(w2.shape[0]):
            sel = group == k
            curve = curves[k]
            t = np.clip(target[sel] - e_v[sel], curve[0] + 1e-6, curve[-1] * 0.999)
            log_l[sel] = np.interp(t, curve, _LOG_L_GRID)
        if np.max(np.abs(log_l - prev)) < 1e-4:
            break
        mu_v = np.exp(log_l)[:, None] * w_v
        e_v = _p_detected(mu_v, r_v[None, :]).sum(axis=1)
    return np.exp(log_l)


def _nonzero_counts(
    mu: np.ndarray, r: np.ndarray, p0: np.ndarray, u: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """NB counts of entries known to be > 0: entry i has mean mu, size r, P(0) = p0 and uniform u > p0.

    Small means: inverse CDF with the same uniform that decided "nonzero" (exact; most entries stop
    at 1 after one vectorised step). Large means: rejection from the gamma-Poisson (acceptance >= 2/3
    for size >= 0.5).
    """
    out = np.ones(mu.size, dtype=np.int32)
    small = mu < _SMALL_MEAN
    q = mu / (mu + r)
    pk = p0 * r * q  # P(1)
    more = small & (u > p0 + pk)
    idx = np.flatnonzero(more)
    rr, uu, qq, pk = r[idx], u[idx], q[idx], pk[idx]
    cdf = p0[idx] + pk
    k = 1
    while idx.size:
        k += 1
        pk *= (k - 1 + rr) / k * qq
        cdf += pk
        done = (uu <= cdf) | (k >= 1000)
        out[idx[done]] = k
        keep = ~done
        idx, rr, uu, qq, pk, cdf = idx[keep], rr[keep], uu[keep], qq[keep], pk[keep], cdf[keep]
    idx = np.flatnonzero(~small)
    while idx.size:
        m, rr = mu[idx], r[idx]
        x = rng.poisson(m * rng.standard_gamma(rr) / rr)
        ok = x > 0
        out[idx[ok]] = x[ok]
        idx = idx[~ok]
    return out


def _sample_counts(
    lib: np.ndarray,
    group: np.ndarray,
    w: np.ndarray,
    r: np.ndarray,
    v_idx: np.ndarray,
    f: np.ndarray,
    rng: np.random.Generator,
):
    """CSR int32 counts: cell c, gene g ~ NB(lib_c * w[group_c, g] * f_cg, r_g), f = 1 outside v_idx.

    Chunks of cells are drawn densely only up to the zero / nonzero decision (one uniform per entry);
    the nonzero entries then come out in row-major order, which is already CSR order.
    """
    import scipy.sparse as sp

    w2 = np.atleast_2d(w).astype(np.float32)
    n_cells, n_genes = lib.size, w2.shape[1]
    lib32 = lib.astype(np.float32)
    f32 = f.astype(np.float32)
    step = max(1, _CHUNK_ENTRIES // n_genes)
    data, indices, row_counts = [], [], []
    for s in range(0, n_cells, step):
        sl = slice(s, min(n_cells, s + step))
        if w2.shape[0] == 1:
            mu = np.multiply.outer(lib32[sl], w2[0])
        else:
            mu = w2[group[sl]]
            mu *= lib32[sl, None]
        mu[:, v_idx] *= f32[sl]
        u = rng.random(mu.shape, dtype=np.float32)
        # P(count > 0) <= mean, so P(0) >= 1 - mean: only entries with u > 1 - mean can be nonzero,
        # and the exact test below runs on those few (the slack covers float32 rounding)
        flat = np.flatnonzero(u > np.subtract(1.000001, mu, dtype=np.float32))
        m = mu.ravel().take(flat).astype(np.float64)
        uu = u.ravel().take(flat).astype(np.float64)
        cols = (flat % n_genes).astype(np.int32)
        rr = r.take(cols)
        p0 = np.exp(-rr * np.log1p(m / rr))
        nz = uu > p0
        flat, cols = flat[nz], cols[nz]
        data.append(_nonzero_counts(m[nz], rr[nz], p0[nz], uu[nz], rng))
        rows = flat // n_genes
        indices.append(cols)
        row_counts.append(np.bincount(rows, minlength=sl.stop - sl.start))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_counts))]).astype(np.int64)
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    x = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(n_cells, n_genes))
    x.has_sorted_indices = True
    return x


def _truncated_normal(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    from scipy.special import ndtr, ndtri

    return ndtri(rng.uniform(ndtr(lo), ndtr(hi), size=n))


def _dispersions(rng: np.random.Generator, n: int) -> np.ndarray:
    """NB size parameters r = 1/phi, phi log-normal around 0.25 (a typical UMI-count overdispersion)."""
    phi = np.clip(np.exp(rng.normal(math.log(0.25), 0.5, size=n)), 0.03, 2.0)
    return 1.0 / phi


def _qc_obs(x, var) -> dict[str, np.ndarray]:
    n_counts = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    ngenes = np.diff(x.indptr).astype(np.int64)
    sym = var["gene_symbol"].astype(str)
    mito = sym.str.startswith("MT-").to_numpy()
    ribo = sym.str.match(r"^(RP[SL]\d+[A-Z]?|RP[SL]A|RPLP\d)$").to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        pm = 100.0 * np.asarray(x[:, mito].sum(axis=1)).ravel() / n_counts
        pr = 100.0 * np.asarray(x[:, ribo].sum(axis=1)).ravel() / n_counts
    return {
        "n_counts": n_counts,
        "ngenes": ngenes,
        "percent_mito": np.nan_to_num(pm),
        "percent_ribo": np.nan_to_num(pr),
    }


# --------------------------------------------------------------------------------------------------
# gene-level parameters


@dataclass
class _Profile:
    w: np.ndarray  # (G,) expression weights summing to 1
    r: np.ndarray  # (G,) NB size
    bg_sd: float


def _base_profile(var, preset: Preset, rng: np.random.Generator, levels: dict[str, float]) -> _Profile:
    """Named genes at `levels` (CP10K), background log-normal with a spread calibrated to the preset."""
    pos = {s: i for i, s in enumerate(var["gene_symbol"].astype(str))}
    n = len(var)
    fixed = np.zeros(n, dtype=bool)
    w = np.zeros(n)
    for sym, cp10k in levels.items():
        fixed[pos[sym]] = True
        w[pos[sym]] = cp10k / 1e4
    r = _dispersions(rng, n)
    bg = np.flatnonzero(~fixed)
    bg_z = rng.standard_normal(bg.size)
    mass = float(w.sum())
    sd = _calibrate_background(w[fixed], r[fixed], bg_z, r[bg], mass, preset.median_umis, preset.median_genes)
    e = np.exp(sd * bg_z)
    w[bg] = (1.0 - mass) * e / e.sum()
    return _Profile(w=w, r=r, bg_sd=sd)


def _a549_levels(rng: np.random.Generator) -> dict[str, float]:
    levels: dict[str, float] = {}
    levels.update(genes.MITO_CP10K)
    levels.update({s: float(genes.RIBOSOMAL_CP10K * np.exp(rng.normal(0.0, 0.35))) for s in genes.RIBOSOMAL})
    levels.update(genes.HOUSEKEEPING_CP10K)
    levels.update(genes.A549_CP10K)
    levels.update({s: base for s, (_, _, base) in genes.P53_TARGETS_UP.items()})
    levels.update({s: base for s, (_, base) in genes.CELL_CYCLE_DOWN.items()})
    # other cell types' markers and state programs: barely expressed in A549
    for syms in list(genes.CELL_TYPE_MARKERS.values()) + list(genes.STATE_PROGRAMS.values()):
        for s in syms:
            levels.setdefault(s, float(0.05 * np.exp(rng.normal(0.0, 1.0))))
    return levels


def hill_response(dose_um, ec50_um=EC50_UM, hill=HILL_COEFFICIENT):
    """Fraction of the maximal Nutlin-3a response at `dose_um` (0 at vehicle, -> 1 at saturation)."""
    d = np.asarray(dose_um, dtype=np.float64)
    dn = np.power(np.maximum(d, 0.0), hill)
    return dn / (dn + np.power(ec50_um, hill))


def _dose_gene_factors(length_effect: float, counts: np.ndarray) -> np.ndarray:
    """Per-dose multiplier of the detected-genes target: viability ** length_effect, geometric mean 1.

    Normalising by the cell-weighted geometric mean keeps the data set's median of detected genes at
    the preset's target whatever the strength of the confound.
    """
    logv = length_effect * np.log(np.asarray(VIABILITY))
    logv -= np.sum(counts * logv) / max(1, counts.sum())
    return np.exp(logv)


# --------------------------------------------------------------------------------------------------
# public API


def make_sciplex_like(
    scale: float = 1.0,
    preset: str = "raw",
    length_effect: float = 1.0,
    seed: int = 0,
    geneformer_dir: str | Path | None = None,
    n_genes: int | None = None,
):
    """A sci-Plex 2 Nutlin-3a-like AnnData of raw counts (A549, 8 doses), with its ground truth.

    scale: cells relative to sci-Plex 2 (1002/849/792/892/829/1096/410/86 cells per dose at 1).
    preset: "raw" (12,000 genes; median ~4,200 UMIs, ~2,300 detected genes) or "thesis" (5,000 genes;
    median ~1,200 UMIs, ~680 detected genes, maximum ~1,400).
    length_effect: exponent on the viability factors that scale detected genes per dose (1: about
    0.67 of vehicle at 25 uM; 0: no dose dependence). The overall median stays at the preset's.
    geneformer_dir: draw background genes from that checkout's vocabulary (else synthetic IDs).
    n_genes: universe size (default: the preset's); detection targets stay the preset's.

    obs: `perturbation` ("control" for vehicle, "Nutlin"), `dose_value` (uM, float), `dose_unit` ("uM"),
    `cell_line` ("A549"), `n_counts` (= X row sums), `ngenes`, `percent_mito`, `percent_ribo`; var:
    index Ensembl ID, `ensembl_id`, `gene_symbol`; X: CSR int32 counts; `uns["gfattn_truth"]` (read it
    with `ground_truth(adata)`): responding genes with log2FC at saturation and direction, Hill
    parameters, per-dose viability and mean response, per-cell response, seed, preset. Deterministic
    for its arguments.
    """
    import anndata as ad
    import pandas as pd

    p = _preset(preset)
    scale = float(scale)
    length_effect = float(length_effect)
    if not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"scale {scale!r} must be a positive number (1 = sci-Plex 2's ~6,000 Nutlin-3a cells)")
    if not (length_effect >= 0 and math.isfinite(length_effect)):
        raise InputError(f"length_effect {length_effect!r} must be >= 0 (0 = no dose -> detected genes confound)")
    seed = int(seed)
    var = gene_universe(preset, geneformer_dir, n_genes)
    _check_universe_size(len(var), p, preset)
    rng = np.random.default_rng([seed, 4])
    prof = _base_profile(var, p, rng, _a549_levels(rng))
    pos = {s: i for i, s in enumerate(var["gene_symbol"].astype(str))}

    # planted response: p53 targets up, cell-cycle genes down, fold changes at saturation
    resp_sym = list(genes.P53_TARGETS_UP) + list(genes.CELL_CYCLE_DOWN)
    lfc = np.array(
        [rng.uniform(lo, hi) for lo, hi, _ in genes.P53_TARGETS_UP.values()]
        + list(rng.uniform(*genes.CELL_CYCLE_LOG2FC, size=len(genes.CELL_CYCLE_DOWN)))
    )
    resp_idx = np.array([pos[s] for s in resp_sym])

    # dose-independent heterogeneity: gene modules of background genes with per-cell activity
    named = set(genes.GENE_IDS.values())
    bg_pool = np.array([i for i, g in enumerate(var["ensembl_id"]) if g not in named])
    n_mod, mod_size, mod_sd = 6, 40, 0.5
    mod_genes = rng.choice(bg_pool, size=(n_mod, mod_size), replace=False)
    mod_load = rng.uniform(0.5, 1.5, size=(n_mod, mod_size))

    # cells
    counts = np.array([max(1, int(round(n * scale))) for n in CELLS_PER_DOSE])
    dose_of = np.repeat(np.arange(len(DOSES_UM)), counts)
    dose_of = dose_of[rng.permutation(dose_of.size)]
    n_cells = dose_of.size
    dose = np.asarray(DOSES_UM)[dose_of]
    ec50 = EC50_UM * np.exp(rng.normal(0.0, EC50_LOG_SD, size=n_cells))
    response = hill_response(dose, ec50, HILL_COEFFICIENT)
    phase = rng.choice(len(_PHASES), size=n_cells, p=_PHASE_P)
    mod_act = rng.normal(0.0, mod_sd, size=(n_cells, n_mod))

    # per-cell factors on the genes that vary within the population
    v_idx = np.concatenate([resp_idx, mod_genes.ravel()])
    log2f = np.zeros((n_cells, v_idx.size))
    log2f[:, : resp_idx.size] = response[:, None] * lfc[None, :]
    for j, s in enumerate(resp_sym):
        if s in genes.CELL_CYCLE_DOWN:
            ph = genes.CELL_CYCLE_DOWN[s][0]
            up = _PHASE_LOG2_UP[ph]
            p_in = _PHASE_P[_PHASES.index(ph)]
            # in-phase cells higher; normalised so the population mean stays at the gene's level
            norm = math.log2(p_in * 2.0**up + (1.0 - p_in))
            log2f[:, j] += np.where(phase == _PHASES.index(ph), up, 0.0) - norm
    ln2 = math.log(2.0)
    act = (mod_act[:, :, None] * mod_load[None, :, :]).reshape(n_cells, -1)
    log2f[:, resp_idx.size :] = act - (ln2 * (mod_sd * mod_load.ravel()) ** 2 / 2.0)[None, :]
    f = np.exp2(log2f)

    # detected-genes targets: log-normal, times the dose's viability factor, median pinned to the preset
    gf = _dose_gene_factors(length_effect, counts)
    z_hi = 2.5
    if p.max_genes is not None:
        z_hi = float(
            np.clip((math.log(0.975 * p.max_genes / p.median_genes) - math.log(gf.max())) / p.genes_log_sd, 1.0, 4.0)
        )
    z = _truncated_normal(rng, n_cells, -3.0, z_hi)
    target = p.median_genes * np.exp(p.genes_log_sd * z) * gf[dose_of]
    target *= p.median_genes / np.median(target)
    lib = _solve_library(target, np.zeros(n_cells, dtype=np.int64), prof.w, prof.r, v_idx, f)

    x = _sample_counts(lib, np.zeros(n_cells, dtype=np.int64), prof.w, prof.r, v_idx, f, rng)

    obs = pd.DataFrame(index=pd.Index([f"cell_{i:06d}" for i in range(n_cells)], dtype=object))
    obs["perturbation"] = pd.Categorical(np.where(dose > 0, DRUG, VEHICLE), categories=[VEHICLE, DRUG])
    obs["dose_value"] = dose.astype(np.float64)
    obs["dose_unit"] = pd.Categorical(["uM"] * n_cells)
    obs["cell_line"] = pd.Categorical([CELL_LINE] * n_cells)
    for k, v in _qc_obs(x, var).items():
        obs[k] = v

    mean_resp = [
        float(response[dose_of == i].mean()) if np.any(dose_of == i) else float(hill_response(d))
        for i, d in enumerate(DOSES_UM)
    ]
    truth = {
        "kind": "sciplex_like",
        "preset": preset,
        "seed": seed,
        "scale": scale,
        "length_effect": length_effect,
        "n_genes": int(len(var)),
        "vocabulary": "geneformer" if geneformer_dir is not None else "synthetic",
        "hill": {"ec50_um": EC50_UM, "hill_coefficient": HILL_COEFFICIENT, "ec50_log_sd": EC50_LOG_SD},
        "doses": {
            "dose_um": [float(d) for d in DOSES_UM],
            "n_cells": [int(c) for c in counts],
            "viability": [float(v) for v in VIABILITY],
            "detected_genes_factor": [float(v) for v in gf],
            "mean_response": mean_resp,
        },
        "responding": {
            "ensembl_id": [genes.GENE_IDS[s] for s in resp_sym],
            "gene_symbol": resp_sym,
            "log2fc": [float(v) for v in lfc],
            "direction": ["up" if v > 0 else "down" for v in lfc],
            "program": ["p53_target"] * len(genes.P53_TARGETS_UP)
            + ["cell_cycle_" + genes.CELL_CYCLE_DOWN[s][0] for s in genes.CELL_CYCLE_DOWN],
            "vehicle_cp10k": [float(prof.w[pos[s]] * 1e4) for s in resp_sym],
        },
        "housekeeping": {
            "gene_symbol": list(genes.MITO_CP10K) + list(genes.RIBOSOMAL) + list(genes.HOUSEKEEPING_CP10K),
        },
        "targets": {
            "median_umis": p.median_umis,
            "median_genes": p.median_genes,
            **({"max_genes": float(p.max_genes)} if p.max_genes is not None else {}),
        },
        # per cell, keyed by obs name (uns is not subset with the AnnData)
        "cells": {
            "cell_id": [str(c) for c in obs.index],
            "response": [float(v) for v in response],
            "phase": [_PHASES[i] for i in phase],
        },
    }
    adata = ad.AnnData(X=x, obs=obs, var=var.copy())
    adata.uns[TRUTH_KEY] = truth
    return adata


def make_corpus(
    n_cells: int = 4000,
    seed: int = 0,
    geneformer_dir: str | Path | None = None,
    preset: str = "raw",
    n_genes: int | None = None,
    n_types: int = 8,
    atlas: bool = False,
    lineage_cells: int = 0,
):
    """A healthy pretraining corpus over the same genes as `make_sciplex_like(preset, geneformer_dir, n_genes)`.

    `n_types` cell types (epithelial, fibroblast, endothelial, T cell, B cell, monocyte, hepatocyte,
    neuron), each a profile with its marker genes and a co-expressed program of background genes,
    plus cell states shared across types (cycling S / G2-M, p53 response, interferon, heat shock,
    immediate-early, hypoxia, oxidative stress) switched on in a fraction of cells; the p53 response at
    the midpoints of the planted targets' Nutlin fold changes in 12% of the cells.

    `atlas=True` makes it span the states the sci-Plex-like data varies, as a real atlas holds stressed,
    arrested and proliferating cells: the p53 response is active in `ATLAS_P53_FRACTION` of the cells at
    a strength uniform on 0-1 (fold changes at saturation drawn from the Nutlin ranges), represses the
    cell-cycle genes and takes cycling cells out of S and G2/M in proportion, and detected genes per cell
    spread wider (`ATLAS_GENES_LOG_SD`). Without it the corpus is the one earlier versions made, draw for
    draw. `lineage_cells` > 0 adds that many cells of a sci-Plex-like cell line in a Nutlin-3a-like
    stress series (`make_sciplex_like` with its own seed, so its own draw of the A549-like profile and of
    the fold changes; doses in the experiment's proportions, the doses themselves dropped), as an atlas
    holds cell lines stressed in other experiments; their `cell_type` is "cell line" and their p53 strength
    the Hill response. obs: `cell_type`, `n_counts`, `ngenes`,
    `percent_mito`, `percent_ribo`; `uns["gfattn_truth"]` lists types and programs, and per cell the p53
    strength and the cycle phase.
    """
    import anndata as ad
    import pandas as pd

    p = _preset(preset)
    n_cells = int(n_cells)
    type_names = list(genes.CELL_TYPE_MARKERS)
    if n_cells < 1:
        raise InputError(f"n_cells {n_cells} must be >= 1")
    if not 1 <= int(n_types) <= len(type_names):
        raise InputError(f"n_types {n_types} must be between 1 and {len(type_names)}")
    if int(lineage_cells) < 0:
        raise InputError(f"lineage_cells {lineage_cells} must be >= 0")
    type_names = type_names[: int(n_types)]
    n_t = len(type_names)
    seed = int(seed)
    var = gene_universe(preset, geneformer_dir, n_genes)
    _check_universe_size(len(var), p, preset)
    rng = np.random.default_rng([seed, 7])
    pos = {s: i for i, s in enumerate(var["gene_symbol"].astype(str))}
    n_g = len(var)

    # tissue-average profile: housekeeping at A549-like levels, the rest calibrated to the preset
    levels: dict[str, float] = {}
    levels.update(genes.MITO_CP10K)
    levels.update({s: float(genes.RIBOSOMAL_CP10K * np.exp(rng.normal(0.0, 0.35))) for s in genes.RIBOSOMAL})
    levels.update(genes.HOUSEKEEPING_CP10K)
    hk = np.array([pos[s] for s in levels])
    # state-program genes at moderate baselines, so that a program switching on is visible at low depth
    for syms in genes.STATE_PROGRAMS.values():
        for s in syms:
            levels.setdefault(s, float(rng.uniform(1.0, 8.0)))
    prof = _base_profile(var, p, rng, levels)

    # type profiles: log-normal deviation of every gene, a private co-expressed program, markers
    named = set(genes.GENE_IDS.values())
    bg_pool = np.array([i for i, g in enumerate(var["ensembl_id"]) if g not in named])
    prog_size = min(150, bg_pool.size // (2 * n_t))
    type_prog = rng.choice(bg_pool, size=(n_t, prog_size), replace=False)
    all_markers = {s for syms in genes.CELL_TYPE_MARKERS.values() for s in syms}
    logw = np.log(prof.w)[None, :] + rng.normal(0.0, 0.6, size=(n_t, n_g))
    logw[:, hk] = np.log(prof.w[hk])[None, :] + rng.normal(0.0, 0.25, size=(n_t, hk.size))
    marker_level = {}
    for k, name in enumerate(type_names):
        logw[k, type_prog[k]] += math.log(2.0) * rng.uniform(2.0, 4.0, size=prog_size)
        for s in sorted(all_markers):  # sorted: set order varies with PYTHONHASHSEED
            if s not in genes.CELL_TYPE_MARKERS[name] and s not in levels:
                logw[k, pos[s]] = math.log(0.03e-4) + rng.normal(0.0, 0.5)
        for s in genes.CELL_TYPE_MARKERS[name]:
            lvl = float(rng.uniform(15.0, 120.0))
            logw[k, pos[s]] = math.log(lvl * 1e-4)
            marker_level.setdefault(name, {})[s] = lvl
    w = np.exp(logw)
    w /= w.sum(axis=1, keepdims=True)

    # cell states: programs over named genes switched on per cell. Healthy: the p53 targets at their Nutlin
    # fold changes (range midpoints) in a few cells. Atlas: the p53 response graded like an atlas's stressed
    # cells (strength 0-1 on fold changes drawn from Nutlin's ranges) and arresting the cycle: it represses
    # the cell-cycle genes and moves cycling cells out of S and G2/M.
    prog_names = list(genes.STATE_PROGRAMS)
    prog_load: dict[str, np.ndarray] = {}
    for name, syms in genes.STATE_PROGRAMS.items():
        if name == "p53_response" and atlas:
            prog_load[name] = np.array([rng.uniform(lo, hi) for lo, hi, _ in genes.P53_TARGETS_UP.values()])
        elif name == "p53_response":
            prog_load[name] = np.array([0.5 * (lo + hi) for lo, hi, _ in genes.P53_TARGETS_UP.values()])
        elif name.startswith("cycling"):
            prog_load[name] = np.full(len(syms), 2.5)
        else:
            prog_load[name] = rng.uniform(2.0, 4.0, size=len(syms))
    if atlas:
        arrest_load = rng.uniform(*genes.CELL_CYCLE_LOG2FC, size=len(genes.CELL_CYCLE_DOWN))
    v_sym = list(dict.fromkeys(s for syms in genes.STATE_PROGRAMS.values() for s in syms))
    v_col = {s: j for j, s in enumerate(v_sym)}
    v_idx = np.array([pos[s] for s in v_sym])
    frac = {
        "p53_response": ATLAS_P53_FRACTION if atlas else 0.12,
        "interferon": 0.12,
        "heat_shock": 0.10,
        "immediate_early": 0.15,
        "hypoxia": 0.10,
        "oxidative_stress": 0.10,
    }

    props = rng.dirichlet(np.full(n_t, 6.0))
    cell_type = rng.choice(n_t, size=n_cells, p=props)
    if n_cells >= n_t:
        cell_type[:n_t] = np.arange(n_t)  # every type present
        cell_type = cell_type[rng.permutation(n_cells)]
    cycling_frac = rng.uniform(0.05, 0.5 if atlas else 0.4, size=n_t)
    p53 = (rng.random(n_cells) < frac["p53_response"]) * rng.random(n_cells) if atlas else None
    log2f = np.zeros((n_cells, len(v_sym)))
    activity = {}
    u_cyc = rng.random(n_cells)
    if atlas:
        u_cyc = u_cyc / np.maximum(1.0 - p53, 1e-3)  # arrested cells leave the cycle
    in_s = u_cyc < cycling_frac[cell_type] * 0.55
    in_g2m = (u_cyc >= cycling_frac[cell_type] * 0.55) & (u_cyc < cycling_frac[cell_type])
    for name in prog_names:
        if name == "cycling_S":
            a = in_s * rng.uniform(0.6, 1.0, size=n_cells)
        elif name == "cycling_G2M":
            a = in_g2m * rng.uniform(0.6, 1.0, size=n_cells)
        elif name == "p53_response" and atlas:
            a = p53
        else:
            a = (rng.random(n_cells) < frac[name]) * rng.uniform(0.5, 1.0, size=n_cells)
        activity[name] = a
        cols = np.array([v_col[s] for s in genes.STATE_PROGRAMS[name]])
        np.add.at(log2f, (slice(None), cols), a[:, None] * prog_load[name][None, :])
    if atlas:
        cc_cols = np.array([v_col[s] for s in genes.CELL_CYCLE_DOWN])
        log2f[:, cc_cols] += p53[:, None] * arrest_load[None, :]
    f = np.exp2(log2f)

    # library sizes: a type's depth times a per-cell spread (atlas: wider, shallow and deep cells of every state)
    type_depth = rng.uniform(0.7, 1.3, size=n_t) if atlas else rng.uniform(0.75, 1.3, size=n_t)
    z = _truncated_normal(rng, n_cells, -3.0, 2.5)
    target = p.median_genes * type_depth[cell_type] * np.exp((ATLAS_GENES_LOG_SD if atlas else 0.25) * z)
    lib = _solve_library(target, cell_type, w, prof.r, v_idx, f)
    x = _sample_counts(lib, cell_type, w, prof.r, v_idx, f, rng)

    obs = pd.DataFrame(index=pd.Index([f"corpus_{i:06d}" for i in range(n_cells)], dtype=object))
    obs["cell_type"] = pd.Categorical(np.asarray(type_names, dtype=object)[cell_type], categories=type_names)
    for k, v in _qc_obs(x, var).items():
        obs[k] = v
    truth = {
        "kind": "corpus",
        "preset": preset,
        "seed": seed,
        "n_genes": int(n_g),
        "vocabulary": "geneformer" if geneformer_dir is not None else "synthetic",
        "cell_types": {
            "name": type_names,
            "proportion": [float(v) for v in props],
            "cycling_fraction": [float(v) for v in cycling_frac],
        },
        "markers": {name: list(genes.CELL_TYPE_MARKERS[name]) for name in type_names},
        "type_programs": {
            name: [str(var["ensembl_id"].iat[i]) for i in type_prog[k]] for k, name in enumerate(type_names)
        },
        "state_programs": {name: list(syms) for name, syms in genes.STATE_PROGRAMS.items()},
        "state_fraction": {name: float(np.mean(activity[name] > 0)) for name in prog_names},
        # per cell, keyed by obs name: the p53 response's strength (0: inactive) and the cycle phase
        "cells": {
            "cell_id": [str(c) for c in obs.index],
            "p53_activity": [float(v) for v in activity["p53_response"]],
            "phase": [("S" if s_ else "G2M" if g_ else "G1") for s_, g_ in zip(in_s, in_g2m)],
        },
    }
    adata = ad.AnnData(X=x, obs=obs, var=var.copy())
    if lineage_cells:
        adata = _with_lineage(adata, truth, int(lineage_cells), seed, preset, geneformer_dir, n_genes)
    adata.uns[TRUTH_KEY] = truth
    return adata


def _with_lineage(adata, truth: dict, n: int, seed: int, preset: str, geneformer_dir, n_genes):
    """`adata` followed by `n` cells of a dosed sci-Plex-like cell line (its own seed), doses dropped."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    scale = 1.02 * n / sum(CELLS_PER_DOSE)  # a little over n cells; the first n are a random subset
    line = make_sciplex_like(
        scale=scale, preset=preset, seed=seed + LINEAGE_SEED_OFFSET, geneformer_dir=geneformer_dir, n_genes=n_genes
    )
    while line.n_obs < n:  # rounding per dose can fall short on tiny n
        scale *= 1.2
        line = make_sciplex_like(
            scale=scale, preset=preset, seed=seed + LINEAGE_SEED_OFFSET, geneformer_dir=geneformer_dir, n_genes=n_genes
        )
    line_truth = line.uns[TRUTH_KEY]["cells"]
    line = line[:n]
    types = list(adata.obs["cell_type"].cat.categories) + [LINEAGE_TYPE]
    obs = pd.DataFrame(index=pd.Index([f"corpus_line_{i:06d}" for i in range(n)], dtype=object))
    obs["cell_type"] = pd.Categorical([LINEAGE_TYPE] * n, categories=types)
    for k in adata.obs.columns:
        if k != "cell_type":
            obs[k] = line.obs[k].to_numpy()
    first = adata.obs.copy()
    first["cell_type"] = pd.Categorical(first["cell_type"].astype(str), categories=types)
    x = sp.vstack([adata.X, sp.csr_matrix(line.X)], format="csr")
    cells = truth["cells"]
    cells["cell_id"] += [str(c) for c in obs.index]
    cells["p53_activity"] += [float(v) for v in line_truth["response"][:n]]
    cells["phase"] += list(line_truth["phase"][:n])
    truth["lineage"] = {"cells": n, "seed": seed + LINEAGE_SEED_OFFSET, "name": LINEAGE_TYPE}
    return ad.AnnData(X=x, obs=pd.concat([first, obs]), var=adata.var.copy())


def ground_truth(adata) -> dict:
    """`uns["gfattn_truth"]` as plain Python (lists, str, float), also after an h5ad round trip."""
    if TRUTH_KEY not in adata.uns:
        raise InputError(f"uns[{TRUTH_KEY!r}] is missing: this AnnData was not made by gfattn synth")
    raw = adata.uns[TRUTH_KEY]
    if isinstance(raw, (str, bytes)):
        return json.loads(raw)
    return plain(raw)


def describe(adata) -> dict:
    """Summary statistics of a synthetic data set: cells per dose (or cell type), UMIs, detected genes."""
    obs = adata.obs
    out: dict[str, Any] = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "median_umis": float(np.median(obs["n_counts"])),
        "median_genes": float(np.median(obs["ngenes"])),
        "max_genes": int(np.max(obs["ngenes"])),
        "median_percent_mito": float(np.median(obs["percent_mito"])),
        "median_percent_ribo": float(np.median(obs["percent_ribo"])),
    }
    if "dose_value" in obs:
        groups = obs.groupby("dose_value", observed=True)
        out["per_dose"] = {
            float(d): {
                "cells": int(len(g)),
                "median_umis": float(np.median(g["n_counts"])),
                "median_genes": float(np.median(g["ngenes"])),
            }
            for d, g in groups
        }
    if "cell_type" in obs:
        out["per_type"] = {str(t): int(n) for t, n in obs["cell_type"].value_counts(sort=False).items()}
    return out
