"""An image folder's classes, found by listing folders only: no image is opened and torch is not imported, so
light commands (`cnnlab summary --dataset FOLDER`) can size a model for a folder in a fraction of a second.

The rules are `cnnlab.data.folder`'s: class folders are the visible sub-folders (links to folders count), sorted
by name; with `train/` and `test/` (and perhaps `val/`) the classes are those under `train/`. What only reading
the images can tell (an empty class, a split left empty) is found when the folder is opened to train on.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cnnlab.errors import UserError
from cnnlab.files import reason

SPLIT_FOLDERS = ("train", "val", "test")


class FolderError(UserError, ValueError):
    """An image folder that cannot be used as a dataset (missing, wrong layout, empty class or split)."""


def sub_folders(folder: Path) -> list[str]:
    """The names of the visible sub-folders of `folder` (links to folders included), sorted."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
    except OSError as exc:
        raise FolderError(f"{folder}: cannot list this folder: {reason(exc)}") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:  # a link into a folder that cannot be read
        return False


def _shown(name: str) -> str:
    """A folder name fit for a one-line message: itself, or its repr when it holds control characters."""
    return name if name.isprintable() else repr(name)


def split_folders(root: Path, names: Iterable[str]) -> list[str]:
    """The split folders (train/, val/, test/) of `root`, whose sub-folders are `names`: all of them when root is
    in the split layout, none when it is in the class layout (a class may be called train or test: its folder
    holds pictures, not class folders). FolderError for a split layout without both train/ and test/."""
    names = set(names)
    present = [s for s in SPLIT_FOLDERS if s in names]
    if not present or {"train", "test"} <= names:
        return present
    if not any(sub_folders(root / s) for s in present):
        return []  # classes that happen to be named like splits
    raise FolderError(f"{root}: found {', '.join(s + '/' for s in present)} but the split layout needs both "
                      f"{root / 'train'} and {root / 'test'} (each with one sub-folder per class)")


def class_names(root: str | Path) -> tuple[str, ...]:
    """The class names of the image folder `root`, from its folder names alone; FolderError saying what was
    expected when `root` is missing, not a folder, has train/ without test/, or fewer than 2 class folders."""
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"{root}: {'not a directory' if root.exists() else 'no such folder'}; expected a "
                          "folder with one sub-folder of images per class (or train/ and test/ folders of those)")
    names = sub_folders(root)
    present = split_folders(root, names)
    folder = root / "train" if present else root
    classes = sub_folders(folder) if present else names
    if len(classes) < 2:
        raise FolderError(f"{folder}: expected one sub-folder per class (at least 2), found {len(classes)}"
                          f"{' (' + ', '.join(map(_shown, classes)) + ')' if classes else ''}")
    return tuple(classes)
