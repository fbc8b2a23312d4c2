"""What one analysis stores, as a value: the science code builds `Records` under the names `store.results`
owns (gene tables, vectors, grids, JSON documents), and the stage's recorder writes them into a run with
`Records.write(store, run_id)`. The analysis functions never hold a store; the readers use the same names.
"""

from __future__ import annotations

from typing import Any


class Records:
    """Named results in the order they were put; `put_*` mirror `store.Store`'s without the run id."""

    def __init__(self) -> None:
        self._items: list[tuple[str, str, tuple, dict]] = []
        self._json: dict[str, Any] = {}

    def put_gene_table(self, name: str, table) -> None:
        self._items.append(("put_gene_table", name, (table,), {}))

    def put_vector(self, name: str, values, *, meta: dict | None = None) -> None:
        self._items.append(("put_vector", name, (values,), {"meta": meta}))

    def put_grid(self, name: str, values, *, lower=None, upper=None) -> None:
        self._items.append(("put_grid", name, (values,), {"lower": lower, "upper": upper}))

    def put_json(self, name: str, doc) -> None:
        self._items.append(("put_json", name, (doc,), {}))
        self._json[name] = doc

    def json(self, name: str):
        """The JSON document put under `name`."""
        return self._json[name]

    def names(self, kind: str | None = None) -> list[str]:
        """The names put (of one kind: "gene_table", "vector", "grid", "json")."""
        return [n for k, n, _, _ in self._items if kind is None or k == f"put_{kind}"]

    def extend(self, other: Records) -> Records:
        for item in other._items:
            self._items.append(item)
        self._json.update(other._json)
        return self

    def write(self, store, run_id: int) -> None:
        """Write every result into run `run_id` of `store`, in the order put (each replaces its name)."""
        for method, name, args, kwargs in self._items:
            getattr(store, method)(run_id, name, *args, **kwargs)
