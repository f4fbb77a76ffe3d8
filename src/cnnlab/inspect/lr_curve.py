"""The learning-rate finder's picture: loss against rate on a log axis, the suggestion marked."""
from __future__ import annotations

from typing import TYPE_CHECKING

from cnnlab.inspect.figures import Output, new_figure, save_figure

if TYPE_CHECKING:
    from cnnlab.training.lr_find import Finding


def plot_lr_finding(finding: Finding, out: Output, title: str = "") -> Output:
    """Raw and smoothed loss per rate (log scale), with a dot and a line at the suggested rate."""
    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.plot(finding.lrs, finding.losses, color="0.75", linewidth=1, label="loss per step")
    ax.plot(finding.lrs, finding.smoothed, color="tab:blue", linewidth=2, label="smoothed")
    ax.set_xscale("log")
    lowest = min(finding.smoothed)
    # the exploding tail would squash the useful part of the curve
    ax.set_ylim(min(min(finding.losses), lowest) * 0.95, max(finding.smoothed[0], lowest) * 1.6)
    nearest = min(range(len(finding.lrs)), key=lambda i: abs(finding.lrs[i] - finding.suggestion))
    ax.axvline(finding.suggestion, color="tab:red", linestyle="--", linewidth=1)
    ax.plot([finding.suggestion], [finding.smoothed[nearest]], "o", color="tab:red",
            label=f"suggested {finding.suggestion:.2g} ({finding.rule})")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title or f"learning-rate finder: {len(finding.lrs)} steps, {finding.ended}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return save_figure(fig, out)
