"""A layer x head grid as a coloured table of values (thesis figure 4), with the confidence interval of
the highlighted cell available to the view around it."""

from __future__ import annotations

import math

import numpy as np
from rich.text import Text
from textual.widgets import DataTable

from gfattn_tui.format import diverging_style, fmt_p, sequential_style


class HeadGrid(DataTable):
    """Rows are layers, columns heads; sequential colours, or diverging ones when values change sign."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="cell", **kwargs)
        self.values: np.ndarray = np.zeros((0, 0))
        self.lower: np.ndarray | None = None
        self.upper: np.ndarray | None = None
        self.grid_name = ""

    def show(self, name: str, values, lower=None, upper=None, *, digits: int = 3, p_values: bool = False) -> None:
        """`p_values`: the values are p-values: scientific notation, significant heads starred and
        coloured by -log10 p."""
        self.grid_name = name
        self.p_values = p_values
        v = np.asarray(values, dtype=float)
        self.values = v
        self.lower = None if lower is None else np.asarray(lower, dtype=float)
        self.upper = None if upper is None else np.asarray(upper, dtype=float)
        keep = self.cursor_coordinate
        self.clear(columns=True)
        if v.ndim != 2 or not v.size:
            return
        finite = v[np.isfinite(v)]
        if p_values:
            with np.errstate(divide="ignore"):
                scaled = -np.log10(np.clip(finite, 1e-300, 1.0))
            top = float(max(scaled.max(), 2.0)) if finite.size else 2.0
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        diverging = lo < 0 < hi
        vmax = max(abs(lo), abs(hi))
        self.add_column(Text("layer", style="bold"), key="layer")
        for h in range(v.shape[1]):
            self.add_column(Text(f"H{h}", justify="right"), key=f"h{h}")
        for layer in range(v.shape[0]):
            cells: list[Text] = [Text(f"L{layer}", style="bold")]
            for h in range(v.shape[1]):
                value = v[layer, h]
                if not math.isfinite(value):
                    cells.append(Text("—", style="dim", justify="right"))
                    continue
                if p_values:
                    style = sequential_style(-math.log10(min(max(value, 1e-300), 1.0)) / top)
                    text = fmt_p(value)
                    cells.append(Text(f" {text:<10}", style=style, justify="right"))
                    continue
                if diverging:
                    style = diverging_style(value, vmax)
                else:
                    style = sequential_style((value - lo) / (hi - lo) if hi > lo else 0.5)
                cells.append(Text(f" {value:.{digits}f} ", style=style, justify="right"))
            self.add_row(*cells, key=f"l{layer}")
        if keep.row < v.shape[0] and 1 <= keep.column <= v.shape[1]:
            self.move_cursor(row=keep.row, column=keep.column)
        else:
            self.move_cursor(row=0, column=1)

    def cell_at_cursor(self) -> tuple[int, int] | None:
        row, column = self.cursor_coordinate
        if column < 1 or row >= self.values.shape[0] or column - 1 >= self.values.shape[1]:
            return None
        return row, column - 1

    def describe(self, layer: int, head: int) -> str:
        value = self.values[layer, head]
        shown = fmt_p(value) if getattr(self, "p_values", False) else f"{value:.4f}"
        text = f"{self.grid_name}  layer {layer}  head {head}:  {shown}"
        if self.lower is not None and self.upper is not None:
            lo, hi = self.lower[layer, head], self.upper[layer, head]
            if math.isfinite(lo) and math.isfinite(hi):
                text += f"   interval [{lo:.4f}, {hi:.4f}]  (± {(hi - lo) / 2:.4f})"
        elif not getattr(self, "p_values", False):
            text += "   (no interval stored for this grid)"
        return text
