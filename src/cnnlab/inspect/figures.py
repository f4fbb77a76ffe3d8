"""Pictures of how a run did: confusion matrix, training curves, misclassified images.

PNG files via matplotlib's `Figure` and the Agg backend (no pyplot, no display needed). Every
`plot_*` function takes `out`, a path or a binary file object (the HTML report draws into memory).
Pictures of what a network learned live in `cnnlab.inspect.activations` and `cnnlab.inspect.saliency`.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from cnnlab.text import real_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

Output = str | Path | IO[bytes]


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A matplotlib Figure (inches) with constrained layout, not attached to any GUI."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def save_figure(fig: Figure, out: Output) -> Output:
    """Write a figure as PNG to a path or a binary file object."""
    printable_text(fig)
    fig.savefig(out, format="png")
    return out


def printable_text(fig: Figure) -> None:
    """Every text in `fig` as valid UTF-8 and literal: a run or file name the locale could not decode holds
    escaped bytes (`cnnlab.text`), which matplotlib's font code refuses with a TypeError, and a class named
    `$x` would be read as TeX math (a ParseException for an unmatched `$`)."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_text(real_text(text.get_text()))
        text.set_parse_math(False)


def draw_image(ax: Axes, image: np.ndarray) -> AxesImage:
    """Draw a uint8 image: grey (H, W) on a fixed 0..255 grey scale, colour (H, W, 3) as RGB."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    return ax.imshow(image)


def plot_confusion(confusion: np.ndarray, classes: tuple[str, ...], out: Output, title: str = "") -> Output:
    """The confusion matrix as a PNG: rows true classes, columns predictions, counts in the cells.

    Past 30 classes, the 30 most confused ones (`training.confusion.shown_matrix`), and the title says
    so: the figure's size is bounded whatever the class count.
    """
    from cnnlab.training.confusion import abbreviate, shown_matrix

    shown = shown_matrix(confusion, classes)
    n = len(shown.classes)
    fig = new_figure(1.0 + 0.6 * n, 0.8 + 0.6 * n)
    ax = fig.add_subplot()
    # row-normalised colours (over the full row), so small classes show their mistakes as clearly as big ones
    rows = np.asarray(confusion).sum(axis=1)[list(shown.indices)]
    rates = shown.counts / np.maximum(rows[:, None], 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (t, p), count in np.ndenumerate(shown.counts):
        if count:
            ax.text(p, t, str(count), ha="center", va="center", fontsize=8,
                    color="white" if rates[t, p] > 0.5 else "black")
    names = [abbreviate(name, 24) for name in shown.classes]  # a long folder name would squeeze the cells
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    heading = "\n".join(part for part in (title, shown.caption) if part)
    if heading:  # wrapped to the figure's width: with 2 or 3 classes the figure is narrower than a one-line title
        width = max(16, int(11 * fig.get_figwidth()))
        ax.set_title("\n".join(textwrap.fill(line, width=width) for line in heading.splitlines()), fontsize=10)
    return save_figure(fig, out)


# ---------------------------------------------------------------------------------- curves
def plot_curves(histories: Mapping[str, Sequence[dict]], out: Output, title: str = "") -> Output:
    """Loss and accuracy per epoch, train (solid, circles) and validation (dashed, squares).

    `histories` maps a label (the run's name) to its metrics.jsonl rows. One run: train and
    validation in two colours; several runs overlay, one colour per run.
    """
    fig = new_figure(10, 4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    several = len(histories) > 1
    most_epochs = 1
    for i, (label, history) in enumerate(histories.items()):
        epochs = [m["epoch"] for m in history]
        most_epochs = max([most_epochs, *epochs])
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            for j, (split, style, marker) in enumerate((("train", "-", "o"), ("val", "--", "s"))):
                # epochs without a number (train.val_every, no validation split) are left out, not gaps
                kept = [(e, v) for e, v in zip(epochs, (m.get(f"{split}_{metric}", math.nan) for m in history))
                        if math.isfinite(v)]
                if not kept:  # no validation split, or none made yet: no legend entry for an empty line
                    continue
                xs, values = [e for e, _ in kept], [v for _, v in kept]
                name = "validation" if split == "val" else split
                ax.plot(xs, values, style, marker=marker, color=f"C{(i if several else j) % 10}",
                        label=f"{label}: {name}" if several else name)
    for ax, metric in ((loss_ax, "loss (cross-entropy)"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_xlim(0.5, most_epochs + 0.5)
        ax.set_xticks(range(1, most_epochs + 1, max(1, most_epochs // 10)))  # whole epochs only
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    from matplotlib.ticker import PercentFormatter

    acc_ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
    loss_ax.set_title("loss per epoch (lower is better)")
    acc_ax.set_title("accuracy per epoch (higher is better)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


# -------------------------------------------------------------------------------- mistakes
@dataclass(frozen=True)
class Mistake:
    """One misclassified test image: its index in the test set, the classes and the model's confidence."""

    index: int
    true_label: int
    predicted_label: int
    confidence: float  # the probability the model gave its (wrong) prediction, 0-1
    file: str = ""  # the image's path in its folder, or its test index ("8"); "" when unknown

    @property
    def name(self) -> str:
        """How the image is named in titles and lists: its file, else "#index"."""
        return self.file if self.file and not self.file.isdigit() else f"#{self.file or self.index}"


def find_mistakes(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray,
                  limit: int = 25, files: Sequence[str] | None = None) -> list[Mistake]:
    """The misclassified images, worst first: the most confident wrong predictions; `files` names each image."""
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:limit]
    return [Mistake(int(i), int(labels[i]), int(predictions[i]), float(probabilities[i, predictions[i]]),
                    files[i] if files is not None else "") for i in order]


def short_name(name: str, width: int = 22) -> str:
    """A file name cut to `width` characters from the left ("...cat/IMG_0042.jpg"): the end tells files apart."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def grid_shape(count: int, max_columns: int) -> tuple[int, int]:
    """(rows, columns) of a grid holding `count` panels, at most `max_columns` wide."""
    columns = max(1, min(count, max_columns))
    return max(1, math.ceil(count / columns)), columns


def plot_mistakes(pictures: Sequence[np.ndarray], mistakes: Sequence[Mistake], classes: Sequence[str], out: Output,
                  title: str = "", max_columns: int = 6) -> tuple[int, int]:
    """A grid of misclassified images, one uint8 (H, W) or (H, W, 3) picture per mistake, titled
    true/predicted/confidence; returns (rows, cols)."""
    rows, columns = grid_shape(len(mistakes), max_columns)
    fig = new_figure(1.9 * columns, 2.1 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, mistake, picture in zip(axes, mistakes, pictures):
        draw_image(ax, picture)
        ax.set_title(f"{short_name(mistake.name)}\ntrue: {classes[mistake.true_label]}\n"
                     f"said: {classes[mistake.predicted_label]} ({mistake.confidence:.0%})",
                     fontsize=8, color="firebrick")
    if not mistakes:
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title or "misclassified test images, most confident first")
    save_figure(fig, out)
    return rows, columns
