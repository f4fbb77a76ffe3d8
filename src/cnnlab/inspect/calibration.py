"""The reliability diagram: each confidence bin's accuracy against the diagonal of honest probabilities,
with how many test images fell in each bin below (`cnnlab show calibration`, the report)."""
from __future__ import annotations

import numpy as np

from cnnlab.inspect.figures import Output, new_figure, save_figure
from cnnlab.training.calibration import Calibration


def plot_reliability(cal: Calibration, out: Output, title: str = "") -> Output:
    """Accuracy per confidence bin as bars over the diagonal (gaps hatched red), image counts per bin below."""
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
        bottom.set_yscale("log")  # a good model puts most images in the last bin
    bottom.set_ylabel("images")
    bottom.set_xlabel(f"confidence: the top class's probability, {cal.bins} bins")
    return save_figure(fig, out)
