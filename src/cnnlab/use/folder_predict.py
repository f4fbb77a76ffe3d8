"""`cnnlab predict RUN DIR`: the image files under folders (walked recursively), and the predictions written
as CSV or JSON, a row per file, unreadable files included with their reason.

Walking follows what training on an image folder counts as an image (`cnnlab.data.folder.IMAGE_EXTENSIONS`,
any case); hidden files and folders are skipped and links to folders are not followed (no loops).
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab.data.folder import IMAGE_EXTENSIONS
from cnnlab.errors import UserError
from cnnlab.text import to_json
from cnnlab.use.predict import FileError, Prediction

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}


class PredictInputError(UserError, ValueError):
    """A folder given to `cnnlab predict` that holds no image file, or output options that disagree."""


def walk_images(folder: Path, unreadable: list[FileError] | None = None) -> list[Path]:
    """The image files under `folder`, recursively, sorted by path; hidden entries and folder links skipped. A
    sub-folder that cannot be listed (no permission) is added to `unreadable`, when given, as a FileError."""
    def refused(error: OSError) -> None:
        if unreadable is not None:
            where = error.filename or folder
            unreadable.append(FileError(str(where), f"{where}: cannot list this folder: {error.strerror or error}"))

    found = []
    for top, folders, files in os.walk(folder, followlinks=False, onerror=refused):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found += [Path(top) / f for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def expand(paths: Sequence[Path]) -> tuple[list[Path], list[FileError]]:
    """Files as given, each folder replaced by the image files under it; and what could not be looked at: a
    folder with no image file, a sub-folder that cannot be listed. PredictInputError when nothing is left."""
    files: list[Path] = []
    problems: list[FileError] = []
    for path in paths:
        if path.is_dir():
            unreadable: list[FileError] = []
            inside = walk_images(path, unreadable)
            problems += unreadable
            if not inside and not unreadable:
                problems.append(FileError(str(path), f"{path}: no image files in this folder or below (looked for "
                                                     f"{', '.join(sorted(IMAGE_EXTENSIONS))})"))
            files += inside
        else:
            files.append(path)
    if not files:
        raise PredictInputError(problems[0].message if problems else "no image given")
    return files, problems


@dataclass
class Tally:
    """What a pass over the files gave: how many of each class, and the files that could not be read."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: list[FileError] = field(default_factory=list)

    def add(self, item: Prediction | FileError) -> None:
        if isinstance(item, FileError):
            self.errors.append(item)
        else:
            self.counts[item.classes[item.label]] += 1

    def summary(self) -> str:
        """One line: files predicted, unreadable, and the classes found, most frequent first."""
        predicted = sum(self.counts.values())
        classes = ", ".join(f"{name} {n}" for name, n in self.counts.most_common())
        bad = f"; {len(self.errors)} unreadable (listed above)" if self.errors else ""
        return f"predicted {predicted} file{'' if predicted == 1 else 's'}{bad}" + (f": {classes}" if classes else "")


def csv_header(classes: Sequence[str]) -> list[str]:
    """file, predicted class, its probability, the error (unreadable files), then p_<class> for every class."""
    return ["file", "predicted", "confidence", "error", *(f"p_{name}" for name in classes)]


def csv_row(item: Prediction | FileError, classes: Sequence[str]) -> list[str]:
    if isinstance(item, FileError):
        return [item.file, "", "", item.message, *([""] * len(classes))]
    return [item.file, classes[item.label], f"{item.probabilities[item.label]:.6f}", "",
            *(f"{p:.6f}" for p in item.probabilities)]


def format_lines(items: Iterable[Prediction | FileError], kind: str, classes: Sequence[str]) -> Iterator[str]:
    """The rows as text lines (each ending in a newline) of a CSV, a JSON list, or JSON lines."""
    if kind == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(csv_header(classes))
        for item in items:
            writer.writerow(csv_row(item, classes))
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        yield buffer.getvalue()
        return
    first = True
    for item in items:
        text = to_json(item.to_dict())
        yield text + "\n" if kind == "jsonl" else ("[\n" if first else ",\n") + "  " + text
        first = False
    if kind == "json":
        yield "[]\n" if first else "\n]\n"


def output_format(out: Path | None, csv_: bool, json_: bool) -> str | None:
    """The format of --out (by its suffix) or of stdout (--csv, --json); a UserError when they disagree."""
    if csv_ and json_:
        raise PredictInputError("--csv and --json: choose one")
    flag = "csv" if csv_ else "jsonl" if json_ else None
    if out is None:
        return flag
    kind = FORMATS.get(out.suffix.lower())
    if kind is None:
        raise PredictInputError(f"--out {out}: expected a file name ending in {', '.join(FORMATS)}")
    if flag is not None and flag != kind and not (flag == "jsonl" and kind == "json"):
        raise PredictInputError(f"--out {out} is {kind.upper()}, but --{flag.removesuffix('l')} was given: drop one")
    return kind
