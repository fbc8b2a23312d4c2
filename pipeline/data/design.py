"""The experimental design: which cells, which labels, which splits, for any obs column.

A task (`[[tasks]]` in the config) names an obs `column` and, optionally, `classes` (a subset of its
values, in order) or `groups` (new class -> list of values, e.g. `low = [0, 1.25, 2.5]`); without either,
every value is a class (numbers in numeric order, text in natural order). `unit` (e.g. "uM") names a
numeric column's unit in class names ("12.5 uM"); `scale` multiplies numeric values first (the
scPerturb copies of sci-Plex 2 store doses at 1 / 2.5 of their value). Numeric columns also accept
text such as "2.5uM".

A cell is selected when it passes `data.filter` (column -> accepted values, `*` wildcards allowed;
several columns combine with AND) and has a class in every task. `data.max_cells` subsamples
stratified by the joint class of all tasks, and the train / validation / test split is stratified the
same way, so every task shares one partition (thesis 2.2-2.3: sci-Plex 2's Nutlin-3a arm at five doses,
one class per dose, and low 0-2.5 uM vs high 12.5-25 uM, are the presets `dose` and `lowhigh`).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.errors import InputError

_NUMBER_WITH_UNIT = re.compile(r"\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*[a-zA-Zµμ/%]*\s*")  # "2.5", "2.5uM"


@dataclass(frozen=True)
class Task:
    """One classification task of the config (see the module docstring)."""

    name: str
    column: str
    classes: tuple = ()
    groups: tuple[tuple[str, tuple], ...] = ()
    unit: str = ""
    scale: float = 1.0

    @classmethod
    def from_config(cls, d: dict) -> Task:
        groups = tuple((str(k), tuple(v)) for k, v in (d.get("groups") or {}).items())
        return cls(
            name=str(d["name"]),
            column=str(d["column"]),
            classes=tuple(d.get("classes") or ()),
            groups=groups,
            unit=str(d.get("unit") or ""),
            scale=float(d.get("scale", 1.0)),
        )


def tasks_of(cfg: dict) -> list[Task]:
    return [Task.from_config(t) for t in cfg["tasks"]]


def parse_numbers(values: pd.Series) -> np.ndarray | None:
    """Floats of a column, parsing text such as `2.5uM`; None when the column is not numeric."""
    if pd.api.types.is_bool_dtype(values):
        return None
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(dtype=float)
    text = values.astype(str).to_numpy()
    out = np.full(len(text), np.nan)
    for i, v in enumerate(text):
        m = _NUMBER_WITH_UNIT.fullmatch(v)
        if m:
            out[i] = float(m.group(1))
    missing = pd.isna(values).to_numpy()
    if np.isnan(out[~missing]).any() or missing.all():
        return None
    return out


def _format_number(x: float, unit: str) -> str:
    return f"{x:g} {unit}" if unit else f"{x:g}"


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


@dataclass
class TaskLabels:
    """A task's labels over all obs rows: class index per row (-1: no class) and the class names."""

    task: Task
    codes: np.ndarray
    names: list[str]
    values_present: list[str]  # every value of the column (formatted), to name in errors


def task_labels(obs: pd.DataFrame, task: Task) -> TaskLabels:
    """Class index of every obs row for one task (-1 where the row has none of its classes)."""
    if task.column not in obs.columns:
        raise InputError(
            f"task {task.name!r}: obs column {task.column!r} does not exist; obs columns: "
            f"{', '.join(map(str, list(obs.columns)[:20]))}"
        )
    col = obs[task.column]
    numbers = parse_numbers(col)
    if numbers is not None:
        keys = np.round(numbers * task.scale, 6)
        present = sorted({float(k) for k in keys if not np.isnan(k)})
        fmt = {k: _format_number(k, task.unit) for k in present}

        def key_of(v) -> float:
            try:
                return round(float(v) * 1.0, 6)
            except (TypeError, ValueError):
                parsed = parse_numbers(pd.Series([str(v)]))
                if parsed is None:
                    raise InputError(
                        f"task {task.name!r}: {v!r} is not a number, but column {task.column!r} is numeric"
                    ) from None
                return round(float(parsed[0]), 6)

        row_key = keys
        shown = [fmt[k] for k in present]
    else:
        text = col.astype(str).where(~pd.isna(col), "").to_numpy().astype(object)
        present = sorted({t for t in text if t != ""}, key=_natural_key)
        fmt = {k: k for k in present}

        def key_of(v) -> str:
            return str(v)

        row_key = text
        shown = list(present)
    codes = np.full(len(obs), -1, dtype=np.int64)
    if task.groups:
        names = [g for g, _ in task.groups]
        seen: dict = {}
        for i, (g, values) in enumerate(task.groups):
            for v in values:
                k = key_of(v)
                if k not in fmt:
                    raise InputError(
                        f"task {task.name!r}: group {g!r} names value {v!r}, which does not occur in obs column "
                        f"{task.column!r} (values: {', '.join(shown[:12])})"
                    )
                if k in seen and seen[k] != g:
                    raise InputError(f"task {task.name!r}: value {v!r} is in groups {seen[k]!r} and {g!r}")
                seen[k] = g
                codes[row_key == k] = i
    else:
        wanted = [key_of(v) for v in task.classes] if task.classes else list(present)
        for v, k in zip(task.classes or present, wanted):
            if k not in fmt:
                raise InputError(
                    f"task {task.name!r}: class {v!r} does not occur in obs column {task.column!r} "
                    f"(values: {', '.join(shown[:12])})"
                )
        names = [fmt[k] for k in wanted]
        for i, k in enumerate(wanted):
            codes[row_key == k] = i
    return TaskLabels(task, codes, names, shown)


def filter_mask(obs: pd.DataFrame, filters: dict) -> np.ndarray:
    """Rows whose value in every filtered column matches one of its accepted values (`*` wildcards)."""
    keep = np.ones(len(obs), dtype=bool)
    for column, accepted in (filters or {}).items():
        if column not in obs.columns:
            raise InputError(
                f"data.filter: obs column {column!r} does not exist; obs columns: {', '.join(map(str, list(obs.columns)[:20]))}"
            )
        if not isinstance(accepted, list):
            accepted = [accepted]
        text = obs[column].astype(str).to_numpy()
        numbers = parse_numbers(obs[column])
        match = np.zeros(len(obs), dtype=bool)
        for a in accepted:
            if isinstance(a, (int, float)) and not isinstance(a, bool) and numbers is not None:
                match |= np.isclose(numbers, float(a))
            else:
                match |= np.array([fnmatch.fnmatchcase(t, str(a)) for t in text], dtype=bool)
        if not match.any():
            values = ", ".join(map(repr, pd.unique(text)[:10]))
            raise InputError(f"data.filter {column} = {accepted} keeps no cell; values present: {values}")
        keep &= match
    return keep


@dataclass
class Selection:
    """The selected cells (obs positions), with every task's labels and the joint strata."""

    index: np.ndarray  # positions into the original obs
    cell_ids: np.ndarray
    tasks: list[Task]
    codes: dict[str, np.ndarray]  # task name -> class index per selected cell
    names: dict[str, list[str]]  # task name -> class names
    counts_before: dict[str, int] = field(default_factory=dict)  # first task's classes, after the filter only
    counts_after: dict[str, int] = field(default_factory=dict)
    no_label: int = 0  # cells passing the filter dropped for a missing (NaN) label

    def labels(self, task: str) -> tuple[np.ndarray, list[str]]:
        """Integer labels and class names of a task."""
        if task not in self.codes:
            raise InputError(f"unknown task {task!r}; tasks: {', '.join(self.codes)}")
        return self.codes[task], self.names[task]

    def class_names(self, task: str) -> np.ndarray:
        codes, names = self.labels(task)
        return np.asarray(names, dtype=object)[codes].astype(str)

    @property
    def strata(self) -> np.ndarray:
        """The joint class of every task per cell ("25 uM / high"), what splits are stratified by."""
        parts = [self.class_names(t.name) for t in self.tasks]
        out = []
        for row in zip(*parts):
            uniq = list(dict.fromkeys(row))
            out.append(" / ".join(uniq))
        return np.asarray(out, dtype=str)

    def subset(self, keep: np.ndarray) -> Selection:
        return Selection(
            index=self.index[keep],
            cell_ids=self.cell_ids[keep],
            tasks=self.tasks,
            codes={k: v[keep] for k, v in self.codes.items()},
            names=self.names,
            counts_before=self.counts_before,
            counts_after=self.counts_after,
            no_label=self.no_label,
        )


def select_cells(obs: pd.DataFrame, cfg: dict) -> Selection:
    """The cells of the design: the filter, a class in every task, at most `data.max_cells` (stratified)."""
    tasks = tasks_of(cfg)
    if not tasks:
        raise InputError("no task: add a [[tasks]] table (name, column) or pass --label-column")
    keep = filter_mask(obs, cfg["data"]["filter"])
    labels = [task_labels(obs, t) for t in tasks]
    first = labels[0]

    def counts(mask):
        c = np.bincount(first.codes[mask & (first.codes >= 0)], minlength=len(first.names))
        return {name: int(n) for name, n in zip(first.names, c)}

    before = counts(keep)
    missing = keep.copy()
    for tl in labels:
        missing &= ~pd.isna(obs[tl.task.column]).to_numpy()
    no_label = int(keep.sum() - missing.sum())  # cells the filter keeps whose label is missing (NaN)
    for tl in labels:
        in_task = keep & (tl.codes >= 0)
        empty = [n for i, n in enumerate(tl.names) if not np.any(in_task & (tl.codes == i))]
        if empty:
            raise InputError(
                f"task {tl.task.name!r}: class(es) {', '.join(empty)} select no cell after data.filter; "
                f"values present: {', '.join(tl.values_present[:12])}"
            )
        keep &= tl.codes >= 0
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise InputError("no cell passes data.filter with a class in every task; check the filter and the classes")
    sel = Selection(
        index=idx,
        cell_ids=obs.index.to_numpy()[idx].astype(str),
        tasks=tasks,
        codes={tl.task.name: tl.codes[idx] for tl in labels},
        names={tl.task.name: tl.names for tl in labels},
        counts_before=before,
        no_label=no_label,
    )
    max_cells = int(cfg["data"]["max_cells"])
    if max_cells and len(idx) > max_cells:
        chosen = _stratified_subsample(np.arange(len(idx)), sel.strata, max_cells, int(cfg["run"]["seed"]))
        sel = sel.subset(chosen)
    full = np.zeros(len(obs), dtype=bool)
    full[sel.index] = True
    sel.counts_after = counts(full)
    return sel


def _stratified_subsample(idx: np.ndarray, strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for s in np.unique(strata):
        members = idx[strata == s]
        take = max(1, int(round(n * len(members) / len(idx))))
        keep.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


MIN_CLASS_CELLS = 10  # fewer cells of a class leave too few to train on and to judge the model by


def min_class_cells(validation: float, test: float) -> int:
    """The fewest cells a class may have: the validation and the test split each get at least 2 of them (early
    stopping and the gate's balanced accuracy read every class) and training at least `MIN_CLASS_CELLS` - 4."""
    return max(MIN_CLASS_CELLS, math.ceil(2 / min(float(validation), float(test)) - 1e-9))


def check_class_sizes(sel: Selection, validation: float, test: float) -> None:
    """One line naming a class too small for the split (and its count), with the minimum and why."""
    need = min_class_cells(validation, test)
    for t in sel.tasks:
        counts = np.bincount(sel.codes[t.name], minlength=len(sel.names[t.name]))
        for name, n in zip(sel.names[t.name], counts):
            if n < need:
                raise InputError(
                    f"task {t.name!r}: class {name!r} has {int(n)} cells; each class needs at least {need} so that "
                    f"validation ({validation:.0%}) and test ({test:.0%}) hold 2 or more of them and training the "
                    f"rest: drop it (--classes with the other classes) or add cells"
                )


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
                f" (lower split fractions, add cells or drop the class)"
            )
        members = rng.permutation(members)
        n_test = max(1, int(round(test * len(members))))
        n_val = max(1, int(round(validation * len(members))))
        out[members[:n_test]] = "test"
        out[members[n_test : n_test + n_val]] = "validation"
        out[members[n_test + n_val :]] = "train"
    return out.astype(str)
