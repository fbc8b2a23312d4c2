"""One confusion matrix: counts, cells shaded by their fraction of the true-class row, labels in dose
order, accuracy and macro-F1 above (thesis figure 3)."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.widgets import Static

from gfattn_tui.format import fraction_style


def render_confusion(
    title: str, labels: list[str], matrix: np.ndarray, accuracy: float | None, f1: float | None
) -> Text:
    m = np.asarray(matrix, dtype=float)
    counts = [[int(round(v)) for v in row] for row in m]
    width = max([len(str(lbl)) for lbl in labels] + [len(str(c)) for row in counts for c in row] + [3]) + 1
    label_w = max(len(str(lbl)) for lbl in labels) if labels else 4
    label_w = max(label_w, 4)
    text = Text()
    text.append(title + "\n", style="bold")
    scores = []
    if accuracy is not None:
        scores.append(f"acc {accuracy:.3f}")
    if f1 is not None:
        scores.append(f"macro-F1 {f1:.3f}")
    # one score per line where the matrix is narrower than both on one line
    matrix_w = label_w + 1 + width * len(labels)
    joiner = "  " if len("  ".join(scores)) <= max(matrix_w, len(title)) else "\n"
    text.append((joiner.join(scores) or "no test scores") + "\n", style="italic")
    text.append(" " * (label_w + 1))
    text.append("".join(f"{lbl:>{width}}" for lbl in labels) + "\n", style="bold")
    for i, label in enumerate(labels):
        text.append(f"{label:>{label_w}} ", style="bold")
        row_total = m[i].sum()
        for j, count in enumerate(counts[i]):
            frac = m[i, j] / row_total if row_total else 0.0
            style = fraction_style(frac)
            if i == j:
                style = (style + " bold").strip()
            text.append(f"{count:>{width}}", style=style)
        text.append("\n")
    text.rstrip()
    return text


class ConfusionMatrix(Static):
    def __init__(
        self, title: str, labels: list[str], matrix: np.ndarray, accuracy: float | None, f1: float | None, **kwargs
    ) -> None:
        super().__init__(render_confusion(title, labels, matrix, accuracy, f1), **kwargs)
        self.labels = labels
        self.matrix = np.asarray(matrix)
        self.accuracy = accuracy
        self.f1 = f1
