"""The New run form's design on the user's own data: label column, classes or groups, a filter, and
the class sizes they give.

The sizes come from the pipeline's own `pipeline.data.design` functions (`task_labels`, `filter_mask`), so
they are the cells `gfattn pipeline` selects (before `data.max_cells` subsampling and the split). The
obs table is first reduced to its distinct rows over the columns in play, each with its number of
cells, so the form stays responsive on a million cells. Problems come back one line each; the form
refuses to start while there are any.

Filter and groups are typed as `NAME=V1,V2; NAME2=V3`: for the filter NAME is an obs column (several
columns combine with AND, `*` wildcards match as in `--filter`), for groups NAME is a new class made of
the listed values (written into a `[[tasks]]` table of a generated config, the only way to pass groups).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


def parse_assignments(text: str, what: str) -> tuple[dict[str, list[str]], list[str]]:
    """`A=v1,v2; B=v3` -> {A: [v1, v2], B: [v3]} and problems (one line each); a repeated name extends."""
    out: dict[str, list[str]] = {}
    problems: list[str] = []
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, values = item.partition("=")
        name = name.strip()
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name or not listed:
            problems.append(f"{what} {item!r}: write NAME=VALUE1,VALUE2 (several separated by ;)")
            continue
        out.setdefault(name, []).extend(v for v in listed if v not in out.get(name, []))
    return out, problems


def filter_flags(filters: dict[str, list[str]]) -> list[str]:
    """The `--filter COL=V1,V2` values of a parsed filter, one per column."""
    return [f"{column}={','.join(values)}" for column, values in filters.items()]


@dataclass
class Design:
    """What the form picked: a label column and its classes (in order) or groups, and a filter."""

    column: str = ""
    classes: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    filters: dict[str, list[str]] = field(default_factory=dict)

    def task(self) -> dict:
        """The `[[tasks]]` table of a grouped design (named after its column, like `--label-column`)."""
        return {"name": self.column, "column": self.column, "groups": {g: list(v) for g, v in self.groups.items()}}


@dataclass
class Sizes:
    """Cells per class (the pipeline's class names, in class order) and the problems, one line each."""

    classes: dict[str, int] = field(default_factory=dict)
    cells: int = 0  # cells passing the filter (with a class, when there is a label column)
    problems: list[str] = field(default_factory=list)


def distinct_rows(obs, columns: list[str]):
    """The distinct rows of `obs[columns]` (dtypes kept) and how many cells each stands for."""
    import numpy as np

    columns = list(dict.fromkeys(columns))
    sub = obs[columns]
    if not len(sub):
        return sub, np.zeros(0, dtype=np.int64)
    ids = sub.groupby(columns, dropna=False, observed=True, sort=False).ngroup().to_numpy()
    first = np.unique(ids, return_index=True)[1]
    return sub.iloc[first], np.bincount(ids).astype(np.int64)


def class_sizes(obs, design: Design, *, min_cells: int | None = None, cache: dict | None = None) -> Sizes:
    """Cells per class after the filter, as `gfattn pipeline` selects them, and what blocks the design.

    `cache` (any dict kept by the caller) remembers the distinct rows per set of columns, so only the
    first computation over new columns scans every cell.
    """
    import numpy as np

    from pipeline.data.design import Task, filter_mask, task_labels
    from pipeline.errors import InputError

    if min_cells is None:  # the pipeline's own minimum at the default split (`design.min_class_cells`)
        from pipeline import config
        from pipeline.data.design import min_class_cells

        split = config.defaults()["split"]
        min_cells = min_class_cells(split["validation"], split["test"])
    out = Sizes()
    present = set(map(str, obs.columns))
    column = design.column
    if column and column not in present:
        out.problems.append(f"label column {column!r} is not an obs column")
        column = ""
    filters = {}
    for col, values in design.filters.items():
        if col in present:
            filters[col] = values
        else:
            out.problems.append(f"filter: {col!r} is not an obs column")
    columns = ([column] if column else []) + list(filters)
    if not columns:
        out.cells = len(obs)
        return out
    key = tuple(dict.fromkeys(columns))
    if cache is not None and key in cache:
        rows, weights = cache[key]
    else:
        rows, weights = distinct_rows(obs, list(key))
        if cache is not None:
            cache[key] = (rows, weights)

    keep = np.ones(len(rows), dtype=bool)
    empty_part = False
    for col, values in filters.items():
        try:
            keep &= filter_mask(rows, {col: values})
        except InputError:
            empty_part = True
            out.problems.append(f"filter {col}={','.join(values)} keeps no cell")
    if filters and not empty_part and not keep.any():
        out.problems.append("the filter keeps no cell: each part keeps some, all together none")
    if empty_part:
        keep[:] = False
    nothing_kept = bool(filters) and not keep.any()
    if not column:
        out.cells = int(weights[keep].sum())
        return out

    if design.groups:
        if design.classes:
            out.problems.append("pick classes or write groups, not both")
        if len(design.groups) < 2:
            out.problems.append("groups: name at least two groups")
        missing = False
        for group, values in design.groups.items():
            for v in values:
                try:
                    task_labels(rows, Task(name=column, column=column, classes=(v,)))
                except InputError:
                    missing = True
                    out.problems.append(f"group {group}: {v!r} does not occur in {column}")
        if missing:
            return out
        task = Task(name=column, column=column, groups=tuple((g, tuple(v)) for g, v in design.groups.items()))
    else:
        if len(design.classes) == 1:
            out.problems.append(f"pick at least two classes of {column} (none: every value is a class)")
        task = Task(name=column, column=column, classes=tuple(design.classes))
    try:
        labels = task_labels(rows, task)
    except InputError as exc:
        out.problems.append(str(exc).replace(f"task {column!r}: ", ""))
        return out
    if len(labels.names) < 2:
        out.problems.append(f"{column} has only one value here; a classifier needs at least two classes")
    for i, name in enumerate(labels.names):
        n = int(weights[keep & (labels.codes == i)].sum())
        out.classes[name] = n
        if nothing_kept:
            continue
        if n == 0:
            out.problems.append(f"class {name} has no cell" + (" after the filter" if filters else ""))
        elif n < min_cells:
            out.problems.append(
                f"class {name} has {n} cell{'s' if n > 1 else ''}; the split needs at least {min_cells}"
            )
    out.cells = int(weights[keep & (labels.codes >= 0)].sum())
    return out


def preset_task_columns(preset: str) -> list[str]:
    """The obs columns the preset's own tasks read (used when the form names no label column)."""
    try:
        from pipeline import config

        return list(dict.fromkeys(t["column"] for t in config.resolve(preset)["tasks"]))
    except Exception:
        return []


def form_config_text(design: Design, base_config: str = "") -> str:
    """The generated config: the user's config file (if any) with the form's grouped task as `[[tasks]]`."""
    from pipeline import config

    doc = config.load_toml(Path(base_config).expanduser()) if base_config else {}
    doc["tasks"] = [design.task()]
    header = "# written by the gfattn New run form: the groups of a label column as a task\n"
    if base_config:
        header += f"# settings from {Path(base_config).expanduser()}\n"
    return header + config.dumps_toml(doc)


def form_config_path(store_path: str | os.PathLike) -> Path:
    """`<store folder>/.gfattn-cache/forms/<time>.toml`, a name not taken yet."""
    from pipeline.paths import cache_dir_for_store

    folder = cache_dir_for_store(store_path) / "forms"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{stamp}.toml"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{n}.toml"
    return path


def suggest_path(value: str, suffixes: tuple[str, ...] = (".h5ad", ".loom"), *, dirs_only: bool = False) -> str | None:
    """A completion of a partly typed path: folders (ending in /) and files with one of `suffixes`.

    One match completes fully; several complete to their longest common start, or to the first in
    order when they share nothing more. The suggestion starts with `value` as typed (`~` stays).
    """
    if not value:
        return None
    expanded = os.path.expanduser(value)
    folder, sep, stem = expanded.rpartition(os.sep)
    base = Path(folder + sep if sep else ".")
    try:
        entries = list(os.scandir(base))
    except OSError:
        return None
    names = []
    for entry in entries:
        if not entry.name.startswith(stem) or (entry.name.startswith(".") and not stem.startswith(".")):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if is_dir:
            names.append(entry.name + os.sep)
        elif not dirs_only and entry.name.endswith(suffixes):
            names.append(entry.name)
    if not names:
        return None
    names.sort()
    common = os.path.commonprefix(names)
    completion = names[0] if len(names) == 1 or len(common) <= len(stem) else common
    return value + completion[len(stem) :] if len(completion) > len(stem) else None


def input_problems(
    preset: str, data: str = "", model: str = "", geneformer_dir: str = "", config_file: str = ""
) -> list[str]:
    """What the pipeline's preflight (`pipeline.run.driver.preflight`) refuses about the data's gene naming,
    the model directory and the dictionaries, in its own words: its light checks, run here (in a worker)
    before Start so that a launch does not fail on them. Device, counts and the design are checked
    elsewhere (the design by `class_sizes`, the rest by the run itself)."""
    from pipeline import config
    from pipeline.errors import InputError
    from pipeline.run.stages import model as ex

    try:
        cfg = config.resolve(preset, Path(config_file).expanduser() if config_file else None)
    except (InputError, OSError, ValueError) as exc:
        return [str(exc)]
    cfg["model"]["path"] = model
    cfg["model"]["geneformer_dir"] = geneformer_dir
    problems: list[str] = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except InputError as exc:
            problems.append(str(exc))
        except Exception as exc:  # an unreadable file: the pipeline would refuse it too
            problems.append(f"{args[0]}: {exc}")

    if geneformer_dir and not Path(geneformer_dir).expanduser().is_dir():
        return problems  # already a problem of the request
    if model:
        m = Path(model).expanduser()
        if m.is_dir():
            from pipeline.models.load import check_model_dir

            check(check_model_dir, m)
            if not problems:
                check(ex._dictionaries_for, m, cfg)
    elif data:
        p = Path(data).expanduser()
        if p.is_file() and p.suffix == ".h5ad":
            check(ex._check_embedded_genes, str(p), cfg)
    return problems
