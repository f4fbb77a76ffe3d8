"""Image-folder datasets (one sub-folder per class), streamed from disk with bounded memory.

Two layouts: `root/<class>/...` (train / val / test are carved out by a hash of each file's path), or
`root/train/<class>/...` with `root/test/<class>/...` and an optional `root/val/<class>/...`. A split
is a `FolderSource` (the trainer's `Source` protocol): labels are known up front, images are decoded
in DataLoader worker processes a batch at a time, and unreadable files are dropped and reported.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cnnlab.errors import UserError
from cnnlab.images import ImageReadError, ImageTooLarge, read_pixels

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_FOLDERS = ("train", "val", "test")
PREFETCH_FACTOR = 2  # batches each worker decodes ahead: memory is workers x this x batch images


class FolderError(UserError, ValueError):
    """An image folder that cannot be used as a dataset (missing, wrong layout, empty class or split)."""


# ---------------------------------------------------------------------------- compact path storage
class PathTable:
    """Relative paths held as one byte blob plus offsets (two NumPy arrays, not N Python objects).

    Forked DataLoader workers share these pages; a list of str would be copied page by page as the
    workers touch the objects' reference counts, growing memory with the dataset size.
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets  # uint8 (total bytes,), int64 (N + 1,)

    @classmethod
    def from_paths(cls, paths: Sequence[bytes]) -> PathTable:
        lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(np.frombuffer(b"".join(paths), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def take(self, indices: np.ndarray) -> PathTable:
        return PathTable.from_paths([self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes() for i in indices])


# ---------------------------------------------------------------------------- decoding one image
def decode_image(path: str | Path, image_size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file -> uint8 (C, H, W), read by cnnlab's one image reader (`cnnlab.images.read_pixels`):
    the same pixels `cnnlab predict` gives the file. Raises on anything unreadable; `FolderSource` catches it."""
    pixels = read_pixels(path, image_size, channels)  # (H, W) or (H, W, 3)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()


def _short_reason(path: str, error: BaseException) -> str:
    """A one-line reason for `skipped`: what went wrong, at most ~200 characters."""
    if os.path.exists(path) and os.path.getsize(path) == 0:
        return "empty file"
    if isinstance(error, ImageTooLarge):
        return f"too large: {error}"[:200]
    return (str(error) if isinstance(error, ImageReadError) else f"{type(error).__name__}: {error}")[:200]


# ---------------------------------------------------------------------------- one split
class _Decoded(Dataset):
    """What a DataLoader worker reads: position -> (uint8 (C, H, W) or None, label, path, reason)."""

    def __init__(self, root: str, paths: PathTable, labels: np.ndarray, image_size: tuple[int, int], channels: int):
        self.root, self.paths, self.labels = root, paths, labels
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int, str, str | None]:
        i = int(i)
        path = os.path.join(self.root, self.paths[i])
        try:
            return decode_image(path, self.image_size, self.channels), int(self.labels[i]), path, None
        except Exception as error:  # noqa: BLE001 -- any decoder failure on one file must not end a training run
            return None, int(self.labels[i]), path, _short_reason(path, error)


@dataclass(frozen=True)
class _Collate:
    """Stacks the readable images of a batch; carries the unreadable ones' (path, reason) to the main process."""

    shape: tuple[int, int, int]  # (C, H, W)

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        good = [(image, label) for image, label, _, reason in items if reason is None]
        bad = [(path, reason) for _, _, path, reason in items if reason is not None]
        if not good:
            return torch.zeros((0, *self.shape), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), bad
        images = torch.from_numpy(np.stack([image for image, _ in good]))  # (B, C, H, W) uint8
        return images, torch.tensor([label for _, label in good], dtype=torch.int64), bad


class _Batches:
    """Index batches as lists for the DataLoader's batch_sampler, converted one batch at a time."""

    def __init__(self, index_batches: Sequence[torch.Tensor]):
        self.index_batches = index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __iter__(self) -> Iterator[list[int]]:
        return (torch.as_tensor(index).tolist() for index in self.index_batches)


HEAP_SLACK_BYTES = 128 << 20  # resident growth while streaming before the C heap is trimmed


def trim_heap() -> None:
    """Give the freed parts of the C heap back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), after which
    per-batch tensors of a few MB come from the heap, which fragments and grows with the number of
    batches: one epoch over 16,000 96x96 images peaked at 639 MiB against 350 MiB for 1,500. Trimming
    whenever the process has grown by HEAP_SLACK_BYTES keeps the peak flat. Trimming after every batch,
    or fixing the threshold (mallopt), bounds it too but makes each batch fault its pages in again:
    20-30% slower steps for deep-color (bench/folder_memory.py, BENCHMARKS.md).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere, where nothing is trimmed anyway)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 -- musl and others have no malloc_trim
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


class FolderSource:
    """One split of an image folder, decoded a batch at a time in `workers` processes (the `Source` protocol).

    Memory holds at most workers x PREFETCH_FACTOR batches of decoded images, whatever the split's size.
    """

    def __init__(self, root: Path, paths: PathTable, labels: np.ndarray, image_size: tuple[int, int],
                 channels: int, workers: int):
        self.root, self.paths, self.image_size, self.channels = root, paths, image_size, channels
        self.workers = workers  # decoding processes; 0 decodes in the calling process
        self.labels = torch.from_numpy(labels.astype(np.int64))  # (N,)
        self.skipped: dict[str, str] = {}  # path -> reason, for unreadable files met so far

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        """The file behind position `i` of this split."""
        return self.root / self.paths[i]

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For each 1-D int64 index batch: uint8 images (B, C, H, W) and int64 labels (B,), unreadable ones dropped."""
        loader = DataLoader(
            _Decoded(str(self.root), self.paths, self.labels.numpy(), self.image_size, self.channels),
            batch_sampler=_Batches(index_batches), num_workers=self.workers,
            collate_fn=_Collate((self.channels, *self.image_size)),
            prefetch_factor=PREFETCH_FACTOR if self.workers > 0 else None, persistent_workers=False,
            # Its own generator: by default a DataLoader draws its workers' seed from the global one,
            # which dropout and augmentation use, and a resumed epoch would draw once more.
            generator=torch.Generator().manual_seed(0))
        limit = resident_bytes() + HEAP_SLACK_BYTES
        for images, labels, bad in loader:
            self.skipped.update(bad)
            yield images, labels
            if resident_bytes() > limit:  # trimming every batch would cost page faults on every batch
                trim_heap()
                limit = resident_bytes() + HEAP_SLACK_BYTES


# ---------------------------------------------------------------------------- finding files
@dataclass
class _Scan:
    """The image files found under one folder of class folders (paths relative to the dataset root)."""

    classes: tuple[str, ...]
    paths: list[bytes]  # os.fsencode of the relative posix path, sorted within each class
    labels: list[int]
    stats: list[tuple[int, int]]  # (size in bytes, mtime in ns) per file, for the digest
    ignored: int


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    """The entries of a folder that are not hidden, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _is_image(name: str) -> bool:
    """Whether a file name has an image extension (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path, seen: set[tuple[int, int]]) -> tuple[list[tuple[Path, os.stat_result]], int]:
    """Image files under `folder`, recursively (hidden entries skipped, symlink loops cut), and how many others."""
    found, ignored = [], 0
    for entry in _visible_entries(folder):
        if entry.is_dir():
            key = (entry.stat().st_dev, entry.stat().st_ino)  # follows symlinks; `seen` cuts loops
            if key not in seen:
                seen.add(key)
                more, more_ignored = _walk_images(Path(entry.path), seen)
                found += more
                ignored += more_ignored
        elif entry.is_file() and _is_image(entry.name):
            found.append((Path(entry.path), entry.stat()))
        elif entry.is_file():
            ignored += 1
    return found, ignored


def _scan_classes(root: Path, folder: Path) -> _Scan:
    """Every class folder under `folder` and its images; errors name the folder and what was expected."""
    entries = _visible_entries(folder)
    classes = tuple(e.name for e in entries if e.is_dir())
    loose = [e.name for e in entries if e.is_file()]
    if len(classes) < 2:
        hint = f"; it holds {len(loose)} loose files" if loose else ""
        raise FolderError(f"{folder}: expected one sub-folder per class (at least 2), found {len(classes)}"
                          f"{' (' + ', '.join(classes) + ')' if classes else ''}{hint}")
    scan = _Scan(classes, [], [], [], ignored=len(loose))
    for label, name in enumerate(classes):
        top = (folder / name).stat()
        files, ignored = _walk_images(folder / name, {(top.st_dev, top.st_ino)})
        scan.ignored += ignored
        if not files:
            raise FolderError(f"{folder / name}: class folder '{name}' holds no images "
                              f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}; {ignored} other files)")
        rel = sorted((os.fsencode(p.relative_to(root).as_posix()), (st.st_size, st.st_mtime_ns)) for p, st in files)
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
    fractions: dict[str, float]  # the fractions that carved splits out (those not given as folders)

    def describe(self) -> dict:
        """What the run manifest records: root, layout, counts per split and per class, the file-list digest."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {
            "root": str(self.root), "layout": self.layout, "classes": list(self.classes),
            "image_shape": list(self.image_shape), "ignored": self.ignored, "fractions": self.fractions,
            "counts": {name: len(s) for name, s in splits.items()},
            "per_class": {name: dict(zip(self.classes, np.bincount(s.labels.numpy(), minlength=len(self.classes))
                                         .tolist())) for name, s in splits.items()},
            "digest": self.digest,
        }


def open_image_folder(root: str | Path, image_size: tuple[int, int] = (32, 32), channels: int = 3,
                      val_fraction: float = 0.1, test_fraction: float = 0.1,
                      workers: int | None = None) -> ImageFolder:
    """Find the images under `root` and split them; nothing is decoded yet.

    `image_size` is (H, W) in pixels, `channels` 1 (grey) or 3 (RGB); fractions are of the images in
    `root/<class>/` (or, with `root/train/` and `root/test/` but no `root/val/`, `val_fraction` is of
    train). `workers` decoding processes per split read (default min(4, CPUs); 0: the calling process).
    """
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"{root}: {'not a directory' if root.exists() else 'no such folder'}; expected a "
                          "folder with one sub-folder of images per class (or train/ and test/ folders of those)")
    if channels not in (1, 3) or len(image_size) != 2 or min(image_size) < 1:
        raise FolderError(f"{root}: need channels 1 or 3 and a positive (H, W) image_size; "
                          f"got channels={channels}, image_size={image_size}")
    _check_fractions(val_fraction, test_fraction)
    names = {e.name for e in _visible_entries(root) if e.is_dir()}
    present = [s for s in SPLIT_FOLDERS if s in names]
    if present and not {"train", "test"} <= names:
        raise FolderError(f"{root}: found {', '.join(s + '/' for s in present)} but the split layout needs both "
                          f"{root / 'train'} and {root / 'test'} (each with one sub-folder per class)")
    scans, assign, fractions, layout = _split_layout(root, val_fraction) if present else \
        _class_layout(root, val_fraction, test_fraction)
    return _assemble(root, scans, assign, fractions, layout, (int(image_size[0]), int(image_size[1])), channels,
                     min(4, os.cpu_count() or 1) if workers is None else workers)


_Layout = tuple[list[_Scan], list[np.ndarray], dict[str, float], str]  # scans, split per file (0/1/2), fractions, name


def _class_layout(root: Path, val_fraction: float, test_fraction: float) -> _Layout:
    """root/<class>/: test, then val, carved out of all the files by their path hashes."""
    scan = _scan_classes(root, root)
    test = _in_split(scan.paths, "test", test_fraction)
    val = ~test & _in_split(scan.paths, "val", val_fraction / (1 - test_fraction))
    assign = np.where(test, 2, np.where(val, 1, 0))  # 0 train, 1 val, 2 test
    return [scan], [assign], {"val": val_fraction, "test": test_fraction}, "classes"


def _split_layout(root: Path, val_fraction: float) -> _Layout:
    """root/train/, root/test/ (and root/val/, else val is carved out of train); class folders must agree."""
    names = [s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    scans = [_scan_classes(root, root / s) for s in names]
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
              image_size: tuple[int, int], channels: int, workers: int) -> ImageFolder:
    paths = PathTable.from_paths([p for scan in scans for p in scan.paths])
    labels = np.array([label for scan in scans for label in scan.labels], dtype=np.int64)
    where = np.concatenate(assign)
    sources = []
    for split, name in enumerate(SPLIT_FOLDERS):
        chosen = np.flatnonzero(where == split)
        if len(chosen) == 0 and not (name == "val" and fractions.get("val") == 0):
            raise FolderError(f"{root}: the {name} split is empty ({len(labels)} images, fractions {fractions}); "
                              "add images or raise the fraction")
        sources.append(FolderSource(root, paths.take(chosen), labels[chosen], image_size, channels, workers))
    train, val, test = sources  # one per SPLIT_FOLDERS entry, in that order
    return ImageFolder(root, scans[0].classes, (*image_size, channels), train, val, test,
                       ignored=sum(s.ignored for s in scans), layout=layout, digest=_file_digest(scans),
                       fractions=fractions)


def _file_digest(scans: list[_Scan]) -> str:
    """sha256 over the sorted relative paths with each file's size and mtime (ns)."""
    digest = hashlib.sha256()
    for path, (size, mtime) in sorted((p, s) for scan in scans for p, s in zip(scan.paths, scan.stats)):
        digest.update(path + b"\0" + f"{size} {mtime}\n".encode())
    return "sha256:" + digest.hexdigest()
