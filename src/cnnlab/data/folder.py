"""Image-folder datasets (one sub-folder per class), streamed from disk with bounded memory.

Two layouts: `root/<class>/...` (train / val / test are carved out by a hash of each file's path), or
`root/train/<class>/...` with `root/test/<class>/...` and an optional `root/val/<class>/...`. A split
is a `FolderSource` (the trainer's `Source` protocol): labels are known up front, images are decoded
in DataLoader worker processes a batch at a time, and unreadable files are dropped and reported.

Memory. A folder whose decoded pixels fit `data.memory_mb` is decoded once, all splits up front
(`ImageFolder.hold_in_memory`), and every epoch after reads memory: the same pixels and batches as
streaming (training is bitwise the same), without decoding a file twice. A larger folder streams from
disk every epoch, holding only workers x PREFETCH_FACTOR batches.

Symbolic links. A class folder (and `train/`, `val/`, `test/`) may be a link to a folder: datasets are often
assembled that way. Inside a class folder, links to folders are not followed: they are left out and reported
(`ImageFolder.links_not_followed`, `describe()` in the run manifest, one line on stderr when training), so a
link that points back up cannot count other classes' images under the wrong label. A link to an image file
is followed (curated datasets link files into class folders); the image is read from wherever it points.
Every folder is walked at most once: two class (or split) folders that are one folder, or a class folder
that holds the dataset itself, are refused before anything is read.

Files. Anything with an image's name counts (a regular file, a link to one, a FIFO, a broken link); each is
read by `cnnlab.files.read_bytes`, which refuses anything but a regular file of at most
MAX_IMAGE_FILE_BYTES without blocking, so a FIFO or a device is skipped and reported like an unreadable image
and never stalls a DataLoader worker. Class folder names become labels in reports and plots: they must be
printable UTF-8.

Over 400 lines on purpose: finding the files is one walk whose rules (links, layouts, splits, digests) depend
on each other; decoding (`folder_source`) and the layout read without opening images (`folder_layout`) are apart."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlab.data.folder_layout import FolderError, split_folders
from cnnlab.data.folder_source import MAX_IMAGE_FILE_BYTES, FolderSource, PathTable, decode_image  # noqa: F401
from cnnlab.files import reason
from cnnlab.text import utf8_text

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_FOLDERS = ("train", "val", "test")
MAX_IMAGE_SIDE = 1024  # pixels per side of a decoded image: a typo (image_size 40960) would be gigabytes a batch
MAX_WORKERS = 64  # decoding processes per split read
LINKS_LISTED = 100  # directory links named in describe() (all are counted)


# ---------------------------------------------------------------------------- finding files
@dataclass
class _Scan:
    """The image files found under one folder of class folders (paths relative to the dataset root)."""

    classes: tuple[str, ...]
    paths: list[bytes]  # os.fsencode of the relative posix path, sorted within each class
    labels: list[int]
    stats: list[tuple[int, int]]  # (size in bytes, mtime in ns) per file, for the digest
    ignored: int


_Key = tuple[int, int]  # (st_dev, st_ino): one folder, whatever the path or link it was reached by


class _Walker:
    """Walks the class folders of one dataset: every folder at most once, directory links inside them left out."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.owner: dict[_Key, Path] = {_folder_key(root): root}  # folder -> the dataset folder that claimed it
        self.links: list[str] = []  # relative posix paths of directory links (and repeated folders) left out

    def claim(self, folder: Path) -> None:
        """Take `folder` (links followed) as a class or split folder; FolderError if another one is the same."""
        key = _folder_key(folder)
        real = os.path.realpath(folder)
        if key == _folder_key(self.root) or os.path.commonpath([real, self.real_root]) == real:
            raise FolderError(f"{folder}: a link to {real}, which holds the dataset itself; each class needs a "
                              "folder of its own")
        if key in self.owner:
            raise FolderError(f"{folder}: the same folder as {self.owner[key]} (a link?); each class and split "
                              "needs a folder of its own")
        self.owner[key] = folder

    def images(self, folder: Path) -> tuple[list[tuple[Path, tuple[int, int]]], int]:
        """Files with an image's name under `folder`, recursively, with (size, mtime ns), and how many others.

        Hidden entries are skipped. A link to a folder is not followed, nor is a folder met before (a bind
        mount, a class folder reached again): both are recorded in `links`. Anything else with an image's name
        counts, whatever it is; reading it decides (a FIFO or a broken link is reported as unreadable).
        """
        found: list[tuple[Path, tuple[int, int]]] = []
        ignored = 0
        for entry in _visible_entries(folder):
            path = Path(entry.path)
            if _is_dir(entry, follow=False):
                key = _folder_key(path)
                if key in self.owner:
                    self.links.append(path.relative_to(self.root).as_posix())
                    continue
                self.owner[key] = path
                more, more_ignored = self.images(path)
                found += more
                ignored += more_ignored
            elif entry.is_symlink() and _is_dir(entry, follow=True):
                self.links.append(path.relative_to(self.root).as_posix())
            elif _is_image(entry.name):
                found.append((path, _file_stat(entry)))
            else:
                ignored += 1
        return found, ignored


def _folder_key(folder: Path) -> _Key:
    try:
        info = os.stat(folder)
    except OSError as exc:
        raise FolderError(f"{folder}: cannot read this folder: {reason(exc)}") from None
    return info.st_dev, info.st_ino


def _is_dir(entry: os.DirEntry, follow: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:  # a link into a folder that cannot be read
        return False


def _file_stat(entry: os.DirEntry) -> tuple[int, int]:
    """(size, mtime ns) of what an entry names, links followed; (0, 0) for a broken link (reported when read)."""
    try:
        info = entry.stat()
    except OSError:
        return 0, 0
    return info.st_size, info.st_mtime_ns


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    """The entries of a folder that are not hidden, sorted by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise FolderError(f"{folder}: cannot list this folder: {reason(exc)}") from None


def _is_image(name: str) -> bool:
    """Whether a file name has an image extension (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _printable(name: str) -> bool:
    """Printable UTF-8, whatever the locale decoded (`cnnlab.text.utf8_text`)."""
    text = utf8_text(name)
    return text is not None and text.isprintable()


def _shown(name: str) -> str:
    """A name as it may appear in a one-line message: itself, or its bytes' repr (b'caf\\xff' -> 'caf\\xff')."""
    return name if _printable(name) else repr(os.fsencode(name))[1:]


def _check_class_name(folder: Path, name: str) -> None:
    """A class folder's name becomes a label in test.json, plots and tables: printable UTF-8, or FolderError."""
    if not _printable(name):
        raise FolderError(f"{folder}: class folder {_shown(name)} is not printable text (UTF-8 without control "
                          "characters); its name becomes the class label in reports: rename it")


def _scan_classes(walker: _Walker, folder: Path) -> _Scan:
    """Every class folder under `folder` and its images; errors name the folder and what was expected."""
    root = walker.root
    entries = _visible_entries(folder)
    classes = tuple(e.name for e in entries if _is_dir(e, follow=True))  # a class folder may be a link
    loose = [e.name for e in entries if not _is_dir(e, follow=True)]
    if len(classes) < 2:
        hint = f"; it holds {len(loose)} loose files" if loose else ""
        raise FolderError(f"{folder}: expected one sub-folder per class (at least 2), found {len(classes)}"
                          f"{' (' + ', '.join(map(_shown, classes)) + ')' if classes else ''}{hint}")
    for name in classes:
        _check_class_name(folder, name)
        walker.claim(folder / name)
    scan = _Scan(classes, [], [], [], ignored=len(loose))
    for label, name in enumerate(classes):
        files, ignored = walker.images(folder / name)
        scan.ignored += ignored
        if not files:
            raise FolderError(f"{folder / name}: class folder '{name}' holds no images "
                              f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}; {ignored} other files)")
        rel = sorted((os.fsencode(p.relative_to(root).as_posix()), st) for p, st in files)
        scan.paths += [r for r, _ in rel]
        scan.stats += [s for _, s in rel]
        scan.labels += [label] * len(rel)
    return scan


# ---------------------------------------------------------------------------- stable splits
def _unit_hash(salt: str, relative: bytes) -> float:
    """A number in [0, 1) fixed by the file's relative path and a per-split salt (sha1)."""
    digest = hashlib.sha1(salt.encode() + b"\0" + relative).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _in_split(paths: Sequence[bytes], salt: str, fraction: float) -> np.ndarray:
    """Boolean (N,): which files fall in a split taking `fraction` of them; a file's answer never changes."""
    return np.fromiter((_unit_hash(salt, p) < fraction for p in paths), dtype=bool, count=len(paths))


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Fractions of all images: val may be 0 (an empty validation split), test may not."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise FolderError(f"need 0 <= val_fraction, 0 < test_fraction and val_fraction + test_fraction < 1; "
                          f"got val_fraction={val_fraction}, test_fraction={test_fraction}")


# ---------------------------------------------------------------------------- the dataset
@dataclass
class ImageFolder:
    """An image-folder dataset: class names, the decoded image shape, and three streamed splits."""

    root: Path
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (H, W, C) of every decoded image
    train: FolderSource
    val: FolderSource
    test: FolderSource
    ignored: int  # non-image files found and left out
    layout: str  # "classes" (root/<class>/) or "splits" (root/train/<class>/, root/test/<class>/)
    digest: str  # sha256 of the sorted relative paths with sizes and mtimes
    class_digests: dict[str, str]  # the same per class (over every split): a changed file is traced to its class
    fractions: dict[str, float]  # the fractions that carved splits out (those not given as folders)
    links_not_followed: list[str] = field(default_factory=list)  # directory links in class folders, left out

    @property
    def splits(self) -> dict[str, FolderSource]:
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def nbytes(self) -> int:
        """Bytes of every split decoded."""
        return sum(source.nbytes for source in self.splits.values())

    def hold_in_memory(self, budget_bytes: int) -> bool:
        """Decode every split once and keep it in memory when all of it fits `budget_bytes`; False (streaming
        stays) when it does not."""
        if self.nbytes > budget_bytes:
            return False
        for source in self.splits.values():
            source.hold_in_memory()
        return True

    @property
    def in_memory(self) -> bool:
        return all(source.pixels is not None for source in self.splits.values())

    def describe(self) -> dict:
        """What the run manifest records: root, layout, counts per split and per class, the file-list digest."""
        splits = self.splits
        return {
            "root": str(self.root), "layout": self.layout, "classes": list(self.classes),
            "resize": self.train.resize,
            "image_shape": list(self.image_shape), "ignored": self.ignored, "fractions": self.fractions,
            "counts": {name: len(s) for name, s in splits.items()},
            "per_class": {name: dict(zip(self.classes, np.bincount(s.labels.numpy(), minlength=len(self.classes))
                                         .tolist())) for name, s in splits.items()},
            "digest": self.digest, "class_digests": self.class_digests,
            "links_not_followed": {"count": len(self.links_not_followed),
                                   "paths": self.links_not_followed[:LINKS_LISTED]},
        }

    def notice(self) -> str | None:
        """One line for the user about directory links left out, or None when there were none."""
        links = self.links_not_followed
        if not links:
            return None
        shown = ", ".join(_shown(link) for link in links[:3]) + (f" and {len(links) - 3} more" if links[3:] else "")
        one = len(links) == 1
        return (f"{self.root}: {len(links)} directory link{'' if one else 's'} inside class folders "
                f"{'was' if one else 'were'} not followed ({shown}); link the class folders themselves, "
                "or copy the images in")


def open_image_folder(root: str | Path, image_size: tuple[int, int] = (32, 32), channels: int = 3,
                      val_fraction: float = 0.1, test_fraction: float = 0.1,
                      workers: int | None = None, resize: str = "crop") -> ImageFolder:
    """Find the images under `root` and split them; nothing is decoded yet.

    `image_size` is (H, W) in pixels, `channels` 1 (grey) or 3 (RGB); fractions are of the images in
    `root/<class>/` (or, with `root/train/` and `root/test/` but no `root/val/`, `val_fraction` is of
    train). `workers` decoding processes per split read (default min(4, CPUs); 0: the calling process);
    `resize` how a picture meets the size (`cnnlab.images.fitted`).
    """
    root = Path(root)
    size, channels, workers = check_numbers(image_size, channels, workers, root)
    if not root.is_dir():
        raise FolderError(f"{root}: {'not a directory' if root.exists() else 'no such folder'}; expected a "
                          "folder with one sub-folder of images per class (or train/ and test/ folders of those)")
    _check_fractions(val_fraction, test_fraction)
    names = {e.name for e in _visible_entries(root) if _is_dir(e, follow=True)}
    present = split_folders(root, names)
    walker = _Walker(root)
    scans, assign, fractions, layout = _split_layout(walker, present, val_fraction) if present else \
        _class_layout(walker, val_fraction, test_fraction)
    folder = _assemble(root, scans, assign, fractions, layout, size, channels, workers, sorted(walker.links))
    for source in folder.splits.values():
        source.resize = resize
    return folder


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_numbers(image_size: Sequence[int], channels: int, workers: int | None,
                  root: Path) -> tuple[tuple[int, int], int, int]:
    """(H, W), channels and workers, range-checked before anything is scanned or allocated; FolderError naming
    the config key otherwise. workers None: min(4, CPUs)."""
    try:
        sides = tuple(image_size)
    except TypeError:
        sides = ()
    if len(sides) != 2 or not all(_is_int(side) and 1 <= side <= MAX_IMAGE_SIDE for side in sides):
        raise FolderError(f"data.image_size: expected (H, W) of whole numbers from 1 to {MAX_IMAGE_SIDE:,} pixels, "
                          f"got {image_size!r} (image folder {root})")
    if not _is_int(channels) or channels not in (1, 3):
        raise FolderError(f"data.channels: expected 1 (grey) or 3 (RGB), got {channels!r} (image folder {root})")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if not _is_int(workers) or not 0 <= workers <= MAX_WORKERS:
        raise FolderError(f"data.workers: expected a whole number from 0 to {MAX_WORKERS} decoding processes, "
                          f"got {workers!r} (image folder {root})")
    return (int(sides[0]), int(sides[1])), int(channels), int(workers)


_Layout = tuple[list[_Scan], list[np.ndarray], dict[str, float], str]  # scans, split per file (0/1/2), fractions, name


def _class_layout(walker: _Walker, val_fraction: float, test_fraction: float) -> _Layout:
    """root/<class>/: test, then val, carved out of all the files by their path hashes."""
    scan = _scan_classes(walker, walker.root)
    test = _in_split(scan.paths, "test", test_fraction)
    val = ~test & _in_split(scan.paths, "val", val_fraction / (1 - test_fraction))
    assign = np.where(test, 2, np.where(val, 1, 0))  # 0 train, 1 val, 2 test
    return [scan], [assign], {"val": val_fraction, "test": test_fraction}, "classes"


def _split_layout(walker: _Walker, names: list[str], val_fraction: float) -> _Layout:
    """root/train/, root/test/ (and root/val/, else val is carved out of train); class folders must agree."""
    root = walker.root
    for name in names:
        walker.claim(root / name)
    scans = [_scan_classes(walker, root / s) for s in names]
    for name, scan in zip(names, scans):
        if scan.classes != scans[0].classes:
            only_here = sorted(set(scan.classes) - set(scans[0].classes))
            missing = sorted(set(scans[0].classes) - set(scan.classes))
            raise FolderError(f"{root / name}: its class folders differ from {root / 'train'}'s "
                              f"(only here: {only_here or 'none'}; missing here: {missing or 'none'})")
    assign = []
    for name, scan in zip(names, scans):
        if name == "train" and "val" not in names:
            assign.append(np.where(_in_split(scan.paths, "val", val_fraction), 1, 0))
        else:
            assign.append(np.full(len(scan.paths), SPLIT_FOLDERS.index(name)))
    fractions = {} if "val" in names else {"val": val_fraction}
    return scans, assign, fractions, "splits"


def _assemble(root: Path, scans: list[_Scan], assign: list[np.ndarray], fractions: dict[str, float], layout: str,
              image_size: tuple[int, int], channels: int, workers: int, links: list[str]) -> ImageFolder:
    paths = PathTable.from_paths([p for scan in scans for p in scan.paths])
    labels = np.array([label for scan in scans for label in scan.labels], dtype=np.int64)
    where = np.concatenate(assign)
    sources = []
    for split, name in enumerate(SPLIT_FOLDERS):
        chosen = np.flatnonzero(where == split)
        if len(chosen) == 0 and not (name == "val" and fractions.get("val") == 0):
            drawn = ", ".join(f"{split} {fraction:.0%}" for split, fraction in fractions.items())
            drawn = f"; drawn: {drawn} of each class" if drawn else ""
            raise FolderError(f"{root}: the {name} split is empty ({len(labels)} images{drawn}); add images, or "
                              f"give it its own folder beside train/ ({name}/, with the same class folders)")
        sources.append(FolderSource(root, paths.take(chosen), labels[chosen], image_size, channels, workers))
    train, val, test = sources  # one per SPLIT_FOLDERS entry, in that order
    every_file = ((p, st) for scan in scans for p, st in zip(scan.paths, scan.stats))
    return ImageFolder(root, scans[0].classes, (*image_size, channels), train, val, test,
                       ignored=sum(s.ignored for s in scans), layout=layout, digest=_file_digest(every_file),
                       class_digests=_class_digests(scans),
                       fractions=fractions, links_not_followed=links)


def _file_digest(files: Iterable[tuple[bytes, tuple[int, int]]]) -> str:
    """sha256 over the sorted relative paths with each file's (size, mtime ns)."""
    digest = hashlib.sha256()
    for path, (size, mtime) in sorted(files):
        digest.update(path + b"\0" + f"{size} {mtime}\n".encode())
    return "sha256:" + digest.hexdigest()


def _class_digests(scans: list[_Scan]) -> dict[str, str]:
    """`_file_digest` of each class's files over every split."""
    per_class: list[list[tuple[bytes, tuple[int, int]]]] = [[] for _ in scans[0].classes]
    for scan in scans:
        for path, stat, label in zip(scan.paths, scan.stats, scan.labels):
            per_class[label].append((path, stat))
    return {name: _file_digest(files) for name, files in zip(scans[0].classes, per_class)}
