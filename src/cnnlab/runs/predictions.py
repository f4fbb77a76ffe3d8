"""predictions.csv: every test image of a run, by file, with its true and predicted class, the model's
confidence and the image's loss; unreadable images keep their row, with the reason (no torch at import).

`file` is the image's path relative to the dataset folder for an image folder, and its index in the test
set for a named dataset (MNIST's test image 8 is "8"), so a mistake can be opened, moved or relabelled.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.files import FileRefused, MiB, MissingFile, read_text, write_text
from cnnlab.runs.layout import RunError, path

if TYPE_CHECKING:
    from cnnlab.data.sources import Source
    from cnnlab.training.evaluate import PerImage

COLUMNS = ("file", "true", "predicted", "confidence", "loss", "problem")
MAX_PREDICTIONS_BYTES = 512 * MiB  # ~60 bytes a row: millions of test images


@dataclass(frozen=True)
class Row:
    """One test image: the model's answer, or (`problem`) why the image could not be read."""

    file: str
    true: str
    predicted: str | None  # None: the image was not read
    confidence: float | None  # the probability given to `predicted`, 0-1
    loss: float | None  # cross-entropy, nats
    problem: str | None = None

    @property
    def wrong(self) -> bool:
        return self.predicted is not None and self.predicted != self.true


def file_names(source: Source) -> list[str]:
    """What names each image of a split: its path relative to an image folder, else its position ("0", "1", ...)."""
    from cnnlab.data.folder import FolderSource  # torch, only once a split is named

    if not isinstance(source, FolderSource):
        return [str(i) for i in range(len(source))]
    return [source.path(i).relative_to(source.root).as_posix() for i in range(len(source))]


def skip_reason(source: Source, position: int) -> str:
    """Why an image of a split was not read, as its source recorded it (keyed by path)."""
    locate = getattr(source, "path", None)
    return source.skipped.get(str(locate(position)), "unreadable") if locate is not None else "unreadable"


def rows_of(per_image: PerImage, source: Source, classes: tuple[str, ...]) -> list[Row]:
    """One Row per image of the split, in split order, read or not."""
    names = file_names(source)
    labels = source.labels.numpy()
    probabilities, losses = per_image.probabilities, per_image.losses
    predicted = probabilities.argmax(axis=1)
    found: dict[int, Row] = {}
    for k, position in enumerate(per_image.positions.tolist()):
        found[position] = Row(names[position], classes[labels[position]], classes[predicted[k]],
                              float(probabilities[k, predicted[k]]), float(losses[k]))
    for position in per_image.missing.tolist():
        found[position] = Row(names[position], classes[labels[position]], None, None, None,
                              skip_reason(source, position))
    return [found[i] for i in range(len(source))]


def write_predictions(run: str | Path, rows: list[Row]) -> Path:
    """predictions.csv, written atomically (never half a file)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r.file, r.true, "" if r.predicted is None else r.predicted,
                         "" if r.confidence is None else f"{r.confidence:.6f}",
                         "" if r.loss is None else f"{r.loss:.6f}", r.problem or ""])
    return write_text(path(run, "predictions"), buffer.getvalue())


def read_predictions(run: str | Path) -> list[Row] | None:
    """The rows of a run's predictions.csv; None for a run made before cnnlab wrote one."""
    file = path(run, "predictions")
    try:
        text = read_text(file, MAX_PREDICTIONS_BYTES, "predictions file")
    except MissingFile:
        return None
    except FileRefused as exc:
        raise RunError(str(exc)) from None
    reader = csv.reader(io.StringIO(text))
    if next(reader, None) != list(COLUMNS):
        raise RunError(f"{file}: expected the header {','.join(COLUMNS)}; not a predictions file cnnlab wrote")
    rows = []
    for number, cells in enumerate(reader, 2):
        if len(cells) != len(COLUMNS):
            raise RunError(f"{file}: line {number} has {len(cells)} fields, expected {len(COLUMNS)}")
        try:
            rows.append(Row(cells[0], cells[1], cells[2] or None, _number(cells[3]), _number(cells[4]),
                            cells[5] or None))
        except ValueError:
            raise RunError(f"{file}: line {number}: confidence and loss must be numbers") from None
    return rows


def _number(cell: str) -> float | None:
    return float(cell) if cell else None


def as_records(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts (None where an image was not read)."""
    return [dict(file=r.file, true=r.true, predicted=r.predicted, confidence=r.confidence, loss=r.loss,
                 problem=r.problem) for r in rows]
