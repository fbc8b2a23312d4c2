"""Tokenized cells as the training loop and the attention engine read them (one adapter for both).

A `datasets.Dataset`, a dict of columns or a plain list of token sequences, seen through one interface:
lengths for length-grouped batching, cell IDs, group codes for per-group sums, integer labels for
training, and token ids read on demand or all at once.
"""

from __future__ import annotations

import numpy as np


class Cells:
    """Uniform access to a tokenized dataset: a `datasets.Dataset`, a dict of columns, or a list of ids.

    `lengths`, `cell_ids`, `groups` (integer codes of `group_column`, -1 without one) with `group_names`,
    `labels` (the integer `label_column`, or None), and `input_ids(idx)` read on demand, or `ids` (every
    cell's tokens as int64 arrays, read once). A missing column raises `KeyError(name)`.
    """

    def __init__(
        self, dataset, group_column: str | None = None, *, label_column: str | None = None, name: str = "cells"
    ):
        self.name = name
        self._ids = None
        if isinstance(dataset, dict):
            columns = dataset
            self._get_ids = lambda idx: [list(columns["input_ids"][i]) for i in idx]
            ids_all = columns["input_ids"]
            given = columns.get("length")
            self.lengths = np.asarray([len(s) for s in ids_all] if given is None else given, dtype=np.int64)
            self.cell_ids = np.asarray(
                [str(c) for c in columns["cell_id"]] if "cell_id" in columns else [str(i) for i in range(len(ids_all))]
            )
            group_values = columns.get(group_column) if group_column else None
            if group_column and group_values is None:
                raise KeyError(group_column)
        elif hasattr(dataset, "column_names"):
            names = dataset.column_names
            if "input_ids" not in names:
                raise KeyError("input_ids")
            tokens = dataset.select_columns(["input_ids"]) if hasattr(dataset, "select_columns") else dataset
            self._get_ids = lambda idx: list(tokens[[int(i) for i in idx]]["input_ids"])
            self.lengths = np.asarray(
                dataset["length"] if "length" in names else [len(s) for s in dataset["input_ids"]], dtype=np.int64
            )
            self.cell_ids = np.asarray(
                [str(c) for c in dataset["cell_id"]] if "cell_id" in names else [str(i) for i in range(len(dataset))]
            )
            if group_column and group_column not in names:
                raise KeyError(group_column)
            group_values = dataset[group_column] if group_column else None
        else:
            seqs = list(dataset)
            self._get_ids = lambda idx: [list(seqs[i]) for i in idx]
            self.lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
            self.cell_ids = np.asarray([str(i) for i in range(len(seqs))])
            group_values = None
            if group_column:
                raise KeyError(group_column)
        if group_values is not None:
            values = np.asarray(list(group_values), dtype=object)
            uniq = sorted(set(values.tolist()), key=_natural_key)
            lookup = {v: i for i, v in enumerate(uniq)}
            self.groups = np.asarray([lookup[v] for v in values], dtype=np.int64)
            self.group_names = tuple(str(v) for v in uniq)
        else:
            self.groups = np.full(len(self.lengths), -1, dtype=np.int64)
            self.group_names = ()

        self.labels = None
        if label_column is not None:
            if isinstance(dataset, dict):
                values = dataset.get(label_column)
            elif hasattr(dataset, "column_names") and label_column in dataset.column_names:
                values = dataset[label_column]
            else:
                values = None
            if values is None:
                raise KeyError(label_column)
            self.labels = np.asarray(list(values), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def input_ids(self, idx) -> list[list[int]]:
        return self._get_ids(idx)

    @property
    def ids(self) -> list[np.ndarray]:
        """Every cell's token ids (int64 arrays), read once."""
        if self._ids is None:
            self._ids = [np.asarray(x, dtype=np.int64) for x in self._get_ids(range(len(self)))]
        return self._ids

    def truncate(self, max_len: int | None) -> Cells:
        """Keep each cell's first `max_len` tokens (its top ranks); lengths follow."""
        if max_len is not None:
            self._ids = [x[: int(max_len)] for x in self.ids]
            self.lengths = np.array([len(x) for x in self._ids], dtype=np.int64)
        return self


def _natural_key(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def subsample(dataset, max_cells: int, seed: int):
    """At most `max_cells` cells of a `datasets.Dataset`, drawn without replacement with `seed` and kept in
    their order (every cell when `max_cells` is 0 or not smaller): the analysed test cells of the
    pipeline (`analysis.max_cells`) and of `gfattn analyze --max-cells`."""
    if not max_cells or len(dataset) <= int(max_cells):
        return dataset
    rng = np.random.default_rng(int(seed))
    return dataset.select(sorted(rng.choice(len(dataset), int(max_cells), replace=False).tolist()))
