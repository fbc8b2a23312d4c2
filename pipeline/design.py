"""The thesis's experimental design (sections 2.1-2.2): which cells, which labels, which splits.

sci-Plex 2's Nutlin-3a arm is reduced to five doses (0, 1.25, 2.5, 12.5, 25 uM; 0.25 uM and >= 50 uM
dropped) and two tasks: one class per dose, and low (0-2.5 uM) versus high (12.5-25 uM). Splits are
stratified by dose so that both tasks share one train / validation / test partition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.errors import InputError

_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def parse_doses(values: pd.Series, column: str) -> np.ndarray:
    """Doses as floats; text such as `2.5uM` or `2.5 µM` is parsed; unparseable values become NaN."""
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(dtype=float)
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values.astype(str)):
        m = _NUMBER.search(v)
        if m:
            out[i] = float(m.group())
    if np.isnan(out).all():
        examples = ", ".join(map(repr, pd.unique(values.astype(str))[:5]))
        raise InputError(f"obs column {column!r} holds no numeric doses (e.g. {examples}); set data.dose_column")
    return out


def format_dose(dose: float) -> str:
    return f"{dose:g} uM"


@dataclass
class Selection:
    """The selected cells (obs index positions) with their dose, dose class and low/high group."""

    index: np.ndarray  # positions into the original obs
    cell_ids: np.ndarray
    dose: np.ndarray
    doses: list[float]  # kept doses, ascending
    group: np.ndarray  # "low" / "high" / "" (neither)
    counts_before: dict[str, int] = field(default_factory=dict)
    counts_after: dict[str, int] = field(default_factory=dict)

    @property
    def dose_names(self) -> np.ndarray:
        return np.array([format_dose(d) for d in self.dose])

    def labels(self, task: str) -> tuple[np.ndarray, list[str]]:
        """Integer labels and label names of a task, names in dose order."""
        if task == "dose":
            names = [format_dose(d) for d in self.doses]
            lookup = {d: i for i, d in enumerate(self.doses)}
            return np.array([lookup[d] for d in self.dose], dtype=np.int64), names
        if task == "lowhigh":
            return (self.group == "high").astype(np.int64), ["low", "high"]
        raise InputError(f"unknown task {task!r}; use `dose` or `lowhigh`")


def select_cells(obs: pd.DataFrame, cfg: dict) -> Selection:
    """Cells of the configured perturbation (plus vehicle) at the configured doses."""
    data, labels = cfg["data"], cfg["labels"]
    for key in ("perturbation_column", "dose_column"):
        column = data[key]
        if column not in obs.columns:
            raise InputError(
                f"obs column {column!r} (data.{key}) does not exist; available: {', '.join(map(str, obs.columns[:20]))}"
            )
    pert = obs[data["perturbation_column"]].astype(str)
    dose = parse_doses(obs[data["dose_column"]], data["dose_column"]) * float(data["dose_multiplier"])
    controls = {c.lower() for c in data["control_values"]}
    is_control = pert.str.lower().isin(controls).to_numpy()
    wanted = data["perturbation"].lower()
    is_drug = pert.str.lower().str.startswith(wanted).to_numpy()
    if not is_drug.any():
        values = ", ".join(map(repr, pd.unique(pert)[:10]))
        raise InputError(
            f"no cells with {data['perturbation_column']} = {data['perturbation']!r}; values present: {values}"
            f" (set data.perturbation)"
        )
    dose = np.where(is_control, 0.0, dose)
    in_arm = is_drug | is_control

    def counts(mask):
        s = pd.Series(dose[mask]).round(6).value_counts().sort_index()
        return {format_dose(float(d)): int(n) for d, n in s.items() if not np.isnan(d)}

    before = counts(in_arm)
    keep_doses = sorted(float(d) for d in data["doses"])
    dose_r = np.round(dose, 6)
    keep = in_arm & np.isin(dose_r, np.round(keep_doses, 6))
    present = {d for d in keep_doses if np.any(keep & (dose_r == round(d, 6)))}
    missing = [d for d in keep_doses if d not in present]
    if missing:
        have = ", ".join(before) or "none"
        raise InputError(
            f"dose(s) {', '.join(format_dose(d) for d in missing)} select no {data['perturbation']} cells;"
            f" doses present: {have} (set data.doses or data.dose_multiplier)"
        )
    idx = np.flatnonzero(keep)
    if data["max_cells"] and len(idx) > data["max_cells"]:
        idx = _stratified_subsample(idx, dose_r[idx], int(data["max_cells"]), int(cfg["run"]["seed"]))
    d = dose_r[idx]
    low = np.isin(d, np.round(labels["low_doses"], 6))
    high = np.isin(d, np.round(labels["high_doses"], 6))
    group = np.where(high, "high", np.where(low, "low", ""))
    if "lowhigh" in labels["tasks"] and (group == "").any():
        stray = sorted({format_dose(x) for x in d[group == ""]})
        raise InputError(f"doses {', '.join(stray)} are neither in labels.low_doses nor labels.high_doses")
    sel = Selection(
        index=idx,
        cell_ids=obs.index.to_numpy()[idx].astype(str),
        dose=d,
        doses=keep_doses,
        group=group,
        counts_before=before,
    )
    sel.counts_after = counts(np.isin(np.arange(len(obs)), idx))
    return sel


def _stratified_subsample(idx: np.ndarray, strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for s in np.unique(strata):
        members = idx[strata == s]
        take = max(1, int(round(n * len(members) / len(idx))))
        keep.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def stratified_split(strata: np.ndarray, validation: float, test: float, seed: int) -> np.ndarray:
    """`train` / `validation` / `test` per cell, stratified by `strata`, seeded.

    Every stratum needs at least one cell in each split; a class too small for that is refused.
    """
    rng = np.random.default_rng(seed)
    out = np.empty(len(strata), dtype=object)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        if len(members) < 3:
            raise InputError(
                f"class {s} has {len(members)} cells; the train/validation/test split needs at least 3"
                f" (lower split fractions, add cells or drop the dose)"
            )
        members = rng.permutation(members)
        n_test = max(1, int(round(test * len(members))))
        n_val = max(1, int(round(validation * len(members))))
        out[members[:n_test]] = "test"
        out[members[n_test : n_test + n_val]] = "validation"
        out[members[n_test + n_val :]] = "train"
    return out.astype(str)
