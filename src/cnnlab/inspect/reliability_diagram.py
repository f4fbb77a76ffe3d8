"""The reliability diagram: each confidence bin's accuracy against the diagonal of honest probabilities,
with how many test images fell in each bin below (`cnnlab show calibration`, the report). Drawing only: the
numbers are computed in `training.calibration`, with the evaluation."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cnnlab.inspect.figures import Output, new_figure, save_figure
from cnnlab.training.calibration import Calibration

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_reliability(cal: Calibration, out: Output, title: str = "") -> Output:
    """Accuracy per confidence bin as bars over the diagonal (gaps hatched red), image counts per bin below."""
    return save_figure(reliability_figure(cal, title), out)


def reliability_figure(cal: Calibration, title: str = "") -> Figure:
    """The reliability diagram as a Figure: accuracy per bin over the diagonal, image counts per bin below."""
    fig = new_figure(6, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    edges = cal.edges
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    counts = np.asarray(cal.counts)
    filled = counts > 0
    accuracy = np.asarray(cal.accuracy, dtype=float)
    confidence = np.asarray(cal.confidence, dtype=float)
    top.plot([0, 1], [0, 1], "--", color="0.4", lw=1, label="honest (accuracy = confidence)")
    top.bar(centres[filled], accuracy[filled], width=width * 0.95, color="tab:blue", edgecolor="white",
            label="accuracy of the bin")
    # the gap from the bin's accuracy up (or down) to its mean confidence: what ECE averages
    low, high = np.minimum(accuracy, confidence)[filled], np.maximum(accuracy, confidence)[filled]
    top.bar(centres[filled], high - low, bottom=low, width=width * 0.95, fill=False, hatch="///",
            edgecolor="tab:red", lw=0.8, label="gap to its mean confidence")  # hatched: reads over the bar too
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.text(0.97, 0.05, f"ECE {cal.ece:.4f}\nMCE {cal.mce:.4f}\n{cal.verdict}", transform=top.transAxes,
             ha="right", va="bottom", fontsize=9, bbox={"facecolor": "white", "edgecolor": "0.7"})
    top.grid(alpha=0.3)
    top.set_title(title or "reliability diagram", fontsize=10)
    bottom.bar(centres, counts, width=width * 0.95, color="0.5")
    if counts.max() > 0:
        log_counts(bottom)  # a good model puts most images in the last bin
    bottom.set_ylabel("images")
    bottom.set_xlabel(f"confidence: the top class's probability, {cal.bins} bins")
    return fig


def log_counts(ax: Axes) -> None:
    """A log count axis labelled in plain numbers at 1, 2, 5, 10, 20, ... ("4×10⁰" is no way to write 4)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0.7)  # a bin of 1 image shows as a bar, and the axis starts at a labelled 1
