"""Data tab: the selected cells (thesis section 2.2, fig. 1): UMAP coloured by dose or by low/high group, cells
per class, the distribution of cell lengths (genes per cell, the confound of thesis section 4.4) and
the QC report of the selection."""

from __future__ import annotations

import numpy as np
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static
from textual_plotext import PlotextPlot

from gfattn_tui.format import label_sort_key
from gfattn_tui.json_render import render_json
from gfattn_tui.messages import Loaded
from gfattn_tui.results import histogram_axis
from gfattn_tui.widgets.store_view import RunView
from store import results as R

MAX_POINTS = 5000


def _fmt_label(value) -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{f:g}"


def read_data(st, run_id: int) -> dict:
    runs = R.collect_scope(st, run_id).data_runs
    out: dict = {"run": None, "cells": None, "labels": {}, "qc": None, "hist": None, "hist_meta": {}}
    if not runs:
        return out
    record = R.read_data_record(st, runs[0])
    out["run"] = {"id": record.run_id, "name": runs[0].get("name")}
    cells = record.cells
    if len(cells):
        if len(cells) > MAX_POINTS:  # a scatter of more points than the terminal has cells shows nothing more
            cells = cells.sample(MAX_POINTS, random_state=0)
        out["cells"] = {c: cells[c].tolist() for c in cells.columns if c != R.CELL_ID}
    out["labels"] = record.labels
    out["qc"] = record.qc
    if record.length_hist is not None:
        out["hist"] = record.length_hist.counts.tolist()
        out["hist_meta"] = record.length_hist.meta
    return out


class DataView(RunView, VerticalScroll):
    BINDINGS = [Binding("c", "colour_by", "Colour by the next task", id="data.colour_by")]

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.colour_by = ""  # a task column; the first one until `c` cycles
        self.data: dict | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="data-plots"):
            yield PlotextPlot(id="data-umap", classes="plot")
            with Vertical(id="data-side"):
                yield PlotextPlot(id="data-classes", classes="plot")
                yield PlotextPlot(id="data-lengths", classes="plot")
        yield Static("", id="data-qc")
        yield Static("No data run (yet) under this run.", id="data-empty", classes="empty")

    def on_mount(self) -> None:
        self.query_one("#data-empty").display = False

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="data", name="cells")
    def load(self) -> None:
        run_id = self.run_id
        self.post_message(Loaded("data", self.client.call(lambda st: read_data(st, run_id))))

    def on_loaded(self, message: Loaded) -> None:
        data = self.data = message.data
        has = data["run"] is not None
        self.query_one("#data-empty").display = not has
        self.query_one("#data-plots").display = has
        self.query_one("#data-qc").display = has
        if not has:
            return
        self._draw_umap()
        self._draw_classes()
        self._draw_lengths()
        qc = data["qc"]
        self.query_one("#data-qc", Static).update(
            render_json(qc, f"QC report (data run {data['run']['id']})") if qc else "no QC report stored"
        )

    def _groups(self, key: str) -> dict[str, list[int]]:
        cells = (self.data or {}).get("cells") or {}
        values = cells.get(key) or []
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(_fmt_label(v), []).append(i)
        return dict(sorted(groups.items(), key=lambda kv: label_sort_key(kv[0])))

    def _draw_umap(self) -> None:
        plot = self.query_one("#data-umap", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        cells = (self.data or {}).get("cells") or {}
        columns = self._task_columns()
        key = self.colour_by if self.colour_by in columns else (columns[0] if columns else "")
        others = [c for c in columns if c != key]
        plt.title(f"UMAP by {key}" + (f"  (c: by {others[0]})" if others else ""))
        if R.CELL_UMAP1 in cells and R.CELL_UMAP2 in cells:
            x, y = cells[R.CELL_UMAP1], cells[R.CELL_UMAP2]
            for label, idx in self._groups(key).items():
                plt.scatter([x[i] for i in idx], [y[i] for i in idx], label=f"{key} {label}", marker="dot")
        else:
            plt.text("no UMAP coordinates stored", 0, 0)
        plot.refresh()

    def _draw_classes(self) -> None:
        plot = self.query_one("#data-classes", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        cells = (self.data or {}).get("cells") or {}
        columns = self._task_columns()
        key = columns[0] if columns else (R.CELL_CLASS if R.CELL_CLASS in cells else None)
        plt.title(f"cells per class of {key}" if key else "cells per class")
        if key:
            groups = self._groups(key)
            order = [str(c) for c in ((self.data or {}).get("labels") or {}).get(key, [])]
            names = [n for n in order if n in groups] + [n for n in groups if n not in order]
            plt.bar(names, [len(groups[n]) for n in names], width=0.5)
        plot.refresh()

    def _draw_lengths(self) -> None:
        plot = self.query_one("#data-lengths", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        data = self.data or {}
        cells = data.get("cells") or {}
        meta = data.get("hist_meta") or {}
        median = meta.get("median")
        if data.get("hist"):
            hist = data["hist"]
            plt.bar(histogram_axis(meta, len(hist)), hist, width=0.9)
        elif R.CELL_LENGTH in cells:
            lengths = [float(v) for v in cells[R.CELL_LENGTH] if v is not None]
            plt.hist(lengths, bins=20)
            median = float(np.median(lengths)) if lengths else None
        if median is not None:
            plt.vline(float(median), "red")
        plt.title("genes per cell" + (f"  (median {float(median):.0f})" if median is not None else ""))
        plot.refresh()

    def _task_columns(self) -> list[str]:
        """The cells columns holding a task's classes, in task order (stores of the first version: dose, group)."""
        cells = (self.data or {}).get("cells") or {}
        labels = (self.data or {}).get("labels") or {}
        columns = [t for t in labels if t in cells]
        return columns + [c for c in (R.CELL_DOSE, R.CELL_GROUP) if c in cells and c not in columns]

    def action_colour_by(self) -> None:
        columns = self._task_columns()
        if columns:
            current = self.colour_by if self.colour_by in columns else columns[0]
            self.colour_by = columns[(columns.index(current) + 1) % len(columns)]
        self._draw_umap()
