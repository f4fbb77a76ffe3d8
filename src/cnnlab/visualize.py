"""Pictures from models and runs (PNG files via matplotlib's Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_confusion(confusion: np.ndarray, classes: tuple[str, ...], out: str | Path, title: str = "") -> Path:
    """The confusion matrix as a PNG: rows true classes, columns predictions, counts in the cells."""
    from matplotlib.figure import Figure

    n = len(classes)
    fig = Figure(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    # row-normalised colours, so small classes show their mistakes as clearly as big ones
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (t, p), count in np.ndenumerate(confusion):
        if count:
            ax.text(p, t, str(count), ha="center", va="center", fontsize=8,
                    color="white" if rates[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.savefig(out)
    return Path(out)
