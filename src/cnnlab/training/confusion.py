"""Which part of a confusion matrix to show, so a picture or a table of it stays readable and bounded
whatever the class count (NumPy only; the full matrix stays in test.json and `cnnlab evaluate --json`).

Past `MAX_SHOWN_CLASSES` classes a matrix shows the classes that take part in the most mistakes (made as
the true class plus received as the prediction), in class order, and says so: a 1,000-class folder
draws a 30x30 figure, not a 1,000x1,000 one of ~600 inches a side.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SHOWN_CLASSES = 30  # rows and columns a drawn or printed matrix shows; 30 cells of 0.6 in: an 18-inch figure
HEADER_NAME_WIDTH = 7  # characters: class names up to this long head a text matrix's columns, else numbers do


@dataclass(frozen=True)
class ShownMatrix:
    """The part of a confusion matrix to show: its counts, the classes' names and their indices."""

    counts: np.ndarray  # (k, k): true class (rows) by predicted class (columns)
    classes: tuple[str, ...]
    indices: tuple[int, ...]  # the shown classes' positions in the full class list
    total: int  # classes in the full matrix

    @property
    def partial(self) -> bool:
        return len(self.indices) < self.total

    @property
    def caption(self) -> str:
        """'' for the whole matrix, else what was left out (for a title or a heading)."""
        if not self.partial:
            return ""
        return (f"showing the {len(self.indices)} most confused of {self.total} classes "
                f"(most mistakes made plus received); every count is in test.json")


def mistakes_per_class(confusion: np.ndarray) -> np.ndarray:
    """(C,) off-diagonal counts per class: images of it taken for another, plus others taken for it."""
    off = confusion - np.diag(np.diag(confusion))
    return off.sum(axis=1) + off.sum(axis=0)


def shown_matrix(confusion: np.ndarray, classes: tuple[str, ...] | list[str],
                 limit: int = MAX_SHOWN_CLASSES) -> ShownMatrix:
    """The whole matrix for `limit` classes or fewer; else the `limit` most confused classes (those with a
    mistake, if fewer), in class order; ties go to the earlier class, so the same counts give the same choice."""
    total = len(classes)
    if total <= limit:
        return ShownMatrix(np.asarray(confusion), tuple(classes), tuple(range(total)), total)
    mistakes = mistakes_per_class(np.asarray(confusion))
    order = np.argsort(-mistakes, kind="stable")[:limit]
    confused = order[mistakes[order] > 0]  # a class without a mistake says nothing here
    keep = np.sort(confused if len(confused) else order)
    return ShownMatrix(np.asarray(confusion)[np.ix_(keep, keep)], tuple(classes[i] for i in keep),
                       tuple(int(i) for i in keep), total)


def abbreviate(name: str, width: int) -> str:
    """`name` cut to `width` characters, an ellipsis marking the cut."""
    return name if len(name) <= width else name[:width - 1] + "…"


def format_matrix(shown: ShownMatrix, name_width: int = 32) -> list[str]:
    """A text table of the shown matrix: a heading line, then a header and a row per true class.

    Short class names head the columns; longer ones number the rows and the columns carry the numbers,
    so every name is read whole once, on its row (cut with an ellipsis past `name_width`).
    """
    names = [abbreviate(n, name_width) for n in shown.classes]
    by_name = all(len(n) <= HEADER_NAME_WIDTH for n in shown.classes)
    keys = list(shown.classes) if by_name else [str(i + 1) for i in range(len(names))]
    labels = names if by_name else [f"{key:>{len(keys[-1])}} {name}" for key, name in zip(keys, names)]
    cell = max([3, *(len(k) for k in keys), *(len(str(int(c))) for c in shown.counts.flat)])
    width = max(len(label) for label in labels)
    columns = "columns: predicted" if by_name else "columns: predicted, numbered as the rows"
    lines = [f"confusion matrix (rows: true class, {columns})", *([shown.caption] if shown.partial else []),
             " " * (width + 1) + " ".join(f"{k:>{cell}}" for k in keys)]
    lines += [f"{label:{width}} " + " ".join(f"{int(c):{cell}d}" for c in row)
              for label, row in zip(labels, shown.counts)]
    return lines
