"""Metrics: loss, accuracy, per-class precision/recall/F1, confusion matrix, calibration. Returns data,
prints nothing."""
from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.pixels import to_inputs
from cnnlab.training.calibration import Calibration, calibration
from cnnlab.training.confusion import shown_matrix

if TYPE_CHECKING:
    from cnnlab.data.sources import Source


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images (N, C, H, W) moved dy pixels down and dx right, zeros (the datasets' background) filling in."""
    h, w = x.shape[2:]
    s = max(abs(dy), abs(dx))
    padded = F.pad(x, (s, s, s, s))
    return padded[:, :, s - dy:s - dy + h, s - dx:s - dx + w]


def views(x: torch.Tensor, flip: bool, shift: int) -> list[torch.Tensor]:
    """The test-time views of a batch: itself, its mirror (flip), and copies moved `shift` pixels each way."""
    out = [x, x.flip(-1)] if flip else [x]
    if shift:
        out += [shifted(v, dy, dx) for v in list(out) for dy, dx in ((shift, 0), (-shift, 0), (0, shift), (0, -shift))]
    return out


@torch.no_grad()
def infer(model: nn.Module, images: torch.Tensor, batch_size: int = 256, channels_last: bool = False,
          tta: bool = False, tta_shift: int = 0) -> torch.Tensor:
    """Logits (N, num_classes) for uint8 images, in eval mode, batch by batch.

    Test-time augmentation averages the logits over views of each image: with `tta` its mirror, with
    `tta_shift` the image (and its mirror) moved that many pixels up, down, left and right.
    """
    was_training = model.training
    model.eval()

    device = model_device(model)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        x = to_inputs(batch, channels_last, device)
        seen = views(x, tta, tta_shift)
        return (sum(model(v) for v in seen) / len(seen)).cpu()

    try:
        return torch.cat([forward(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_batches(model: nn.Module, source: Source, positions: torch.Tensor | None = None, batch_size: int = 256,
                    channels_last: bool = False, tta: bool = False, tta_shift: int = 0
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) batch by batch for the images of a `trainer.Source` at `positions` (default all).

    Works alike for in-memory and streamed splits; labels are those of the images actually read
    (a streamed split drops unreadable images).
    """
    positions = torch.arange(len(source)) if positions is None else positions
    was_training = model.training
    model.eval()
    try:
        for images, labels in source.batches(list(positions.split(batch_size))):
            if len(labels):
                yield infer(model, images, batch_size, channels_last, tta, tta_shift), labels
    finally:
        model.train(was_training)


def batches_with_positions(source: Source, index_batches: list[torch.Tensor]
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, positions) for each index batch: `positions` (B,) are the split positions of the
    images actually read, so a streamed split that drops an unreadable image keeps every row on its file.

    A batch that came back short is read again one image at a time (one reader for the whole batch) to
    learn which positions it dropped, rather than guessing from paths."""
    for index, (images, labels) in zip(index_batches, source.batches(index_batches)):
        if len(labels) == len(index):
            yield images, labels, index
            continue
        singles = list(index.split(1))
        kept = [(one, pair) for one, pair in zip(singles, source.batches(singles)) if len(pair[1])]
        if kept:
            yield (torch.cat([pair[0] for _, pair in kept]), torch.cat([pair[1] for _, pair in kept]),
                   torch.cat([one for one, _ in kept]))


@dataclass
class PerImage:
    """Each readable image's logits with its split position and true label; `missing` are the positions
    that could not be read (a streamed split's unreadable files)."""

    positions: np.ndarray  # (M,) int64 positions in the split, in reading order
    labels: np.ndarray  # (M,) int64
    logits: torch.Tensor  # (M, num_classes)
    missing: np.ndarray  # (N - M,) int64

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(self.logits, 1).numpy()  # (M, num_classes)

    @property
    def losses(self) -> np.ndarray:
        """Cross-entropy of each image, in nats (M,)."""
        return F.cross_entropy(self.logits, torch.from_numpy(self.labels), reduction="none").numpy()


@torch.no_grad()
def predict_per_image(model: nn.Module, source: Source, batch_size: int = 256, channels_last: bool = False,
                      tta: bool = False, tta_shift: int = 0) -> PerImage:
    """Logits for every image of a split, each tied to its position (`batches_with_positions`)."""
    was_training = model.training
    model.eval()
    logits, labels, positions = [], [], []
    try:
        for images, batch_labels, batch_positions in batches_with_positions(
                source, list(torch.arange(len(source)).split(batch_size))):
            logits.append(infer(model, images, batch_size, channels_last, tta, tta_shift))
            labels.append(batch_labels)
            positions.append(batch_positions)
    finally:
        model.train(was_training)
    if not positions:
        raise ValueError("no readable images to evaluate")
    read = torch.cat(positions).numpy().astype(np.int64)
    return PerImage(read, torch.cat(labels).numpy(), torch.cat(logits),
                    np.setdiff1d(np.arange(len(source)), read).astype(np.int64))


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and the fraction of correct top-1 predictions."""
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy


@dataclass
class Evaluation:
    """Test-set results of a model; `to_dict` gives the JSON of `cnnlab evaluate --json`."""

    classes: tuple[str, ...]
    loss: float
    accuracy: float
    confusion: np.ndarray  # (true class, predicted class) counts
    predictions: np.ndarray  # predicted class per image
    probabilities: np.ndarray  # (N, num_classes)
    labels: np.ndarray | None = None  # true class per image (None: only the counts are known)

    @property
    def per_class(self) -> list[dict]:
        """precision, recall, F1 and support for each class."""
        cm = self.confusion
        tp = np.diag(cm).astype(float)
        predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        return [dict(label=i, class_name=name, precision=float(precision[i]), recall=float(recall[i]),
                     f1=float(f1[i]), support=int(actual[i])) for i, name in enumerate(self.classes)]

    def most_confused(self, k: int = 5) -> list[dict]:
        """The k largest off-diagonal cells: which true class is most often taken for which."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(off, axis=None)[::-1][:k]
        pairs = []
        for flat in order:
            t, p = np.unravel_index(flat, off.shape)
            if off[t, p] == 0:
                break
            pairs.append(dict(true=self.classes[t], predicted=self.classes[p], count=int(off[t, p])))
        return pairs

    @cached_property
    def calibration(self) -> Calibration | None:
        """How honest the probabilities are (reliability bins, ECE); None without the labels."""
        return None if self.labels is None else calibration(self.probabilities, self.labels)

    def known_calibration(self) -> Calibration:
        """`calibration`, for callers that evaluated with labels (every run's test evaluation does)."""
        if self.calibration is None:
            raise ValueError("this evaluation was made without the true labels: no calibration to show")
        return self.calibration

    def _repr_html_(self) -> str:
        """Accuracy and loss, the per-class table, the confusion matrix and the most confused pairs (a notebook)."""
        def cells(row: list[object], tag: str = "td") -> str:
            return "<tr>" + "".join(f'<{tag} style="text-align:right">{html.escape(str(c))}</{tag}>' for c in row) \
                + "</tr>"

        per_class = "".join(cells([r["class_name"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                                   r["support"]]) for r in self.per_class)
        shown = shown_matrix(self.confusion, self.classes)  # past 30 classes, the most confused ones
        rows = self.confusion.sum(axis=1)[list(shown.indices)]
        rates = shown.counts / np.maximum(rows[:, None], 1)  # row-normalised shading
        matrix = "".join(
            f"<tr><th>{html.escape(name)}</th>" + "".join(
                f'<td style="text-align:right;background:rgba(31,119,180,{rate:.2f})">{count}</td>'
                for count, rate in zip(row, rate_row)) + "</tr>"
            for name, row, rate_row in zip(shown.classes, shown.counts, rates))
        which = f"{html.escape(shown.caption)}; " if shown.partial else ""
        pairs = ", ".join(f"{html.escape(p['true'])} &rarr; {html.escape(p['predicted'])}: {p['count']}"
                          for p in self.most_confused()) or "none"
        ece = f", ECE {self.calibration.ece:.4f}" if self.calibration is not None else ""
        return (f"<p><b>test accuracy {self.accuracy:.4f}</b> &nbsp; loss {self.loss:.4f} &nbsp; "
                f"({int(self.confusion.sum())} images{ece})</p>"
                f"<table>{cells(['class', 'precision', 'recall', 'f1', 'support'], 'th')}{per_class}</table>"
                f"<p>confusion matrix ({which}rows: true class, columns: predicted)</p>"
                f"<table>{cells(['', *shown.classes], 'th')}{matrix}</table><p>most confused: {pairs}</p>")

    def to_dict(self) -> dict:
        data = dict(accuracy=self.accuracy, loss=self.loss, num_images=int(self.confusion.sum()),
                    classes=list(self.classes), per_class=self.per_class,
                    confusion_matrix=self.confusion.tolist(), most_confused=self.most_confused())
        if self.calibration is not None:
            data.update(ece=self.calibration.ece, calibration=self.calibration.to_dict())
        return data


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are true classes, columns predicted ones."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
             batch_size: int = 256, channels_last: bool = False, tta: bool = False, tta_shift: int = 0
             ) -> Evaluation:
    """Evaluate a model on uint8 images and int64 labels."""
    logits = infer(model, images, batch_size, channels_last, tta, tta_shift)
    return evaluation_of(logits, labels, classes)


def evaluate_source(model: nn.Module, source: Source, classes: tuple[str, ...], batch_size: int = 256,
                    channels_last: bool = False, tta: bool = False, tta_shift: int = 0) -> Evaluation:
    """Evaluate a model on a whole `trainer.Source` (in memory or streamed from disk)."""
    pairs = list(predict_batches(model, source, None, batch_size, channels_last, tta, tta_shift))
    if not pairs:
        raise ValueError("no readable images to evaluate")
    return evaluation_of(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), classes)


def evaluation_of(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> Evaluation:
    loss, accuracy = loss_and_accuracy(logits, labels)
    predictions = logits.argmax(dim=1).numpy()
    cm = confusion_matrix(labels.numpy(), predictions, len(classes))
    return Evaluation(tuple(classes), loss, accuracy, cm, predictions, torch.softmax(logits, 1).numpy(),
                      labels.numpy())
