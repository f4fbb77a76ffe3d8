"""One split of an image folder as a `Source`: its files held as compact paths, decoded by cnnlab's one image
reader in DataLoader worker processes a batch at a time (streamed, bounded memory), or decoded once and held in
memory (`FolderSource.hold_in_memory`). Unreadable files are dropped from their batch and reported in `skipped`.
`cnnlab.data.folder` finds the files and splits them.

Files are read by `cnnlab.files.read_bytes`, which refuses anything but a regular file of at most
MAX_IMAGE_FILE_BYTES without blocking, so a FIFO or a device is skipped and reported like an unreadable image
and never stalls a DataLoader worker.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnlab.data.workers import WorkerLoader
from cnnlab.errors import UserError
from cnnlab.files import MiB
from cnnlab.files import read_bytes as read_regular
from cnnlab.heap import trim_heap
from cnnlab.images import ImageTooLarge, read_pixels

PREFETCH_FACTOR = 2  # batches each worker decodes ahead: memory is workers x this x batch images
# An image file larger than this is skipped unread: a 50-megapixel picture (images.MAX_PIXELS) is 150 MB
# even as uncompressed 8-bit RGB; each decoding process holds one file at a time.
MAX_IMAGE_FILE_BYTES = 256 * MiB


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
def decode_image(path: str | Path, image_size: tuple[int, int], channels: int, resize: str = "crop") -> np.ndarray:
    """One image file -> uint8 (C, H, W), read by cnnlab's one image reader (`cnnlab.images.read_pixels`):
    the same pixels `cnnlab predict` gives the file. Raises on anything unreadable; `FolderSource` catches it.

    The file's bytes are read first (`cnnlab.files`): a FIFO, a device or
    a link to one is refused without blocking, and a file over MAX_IMAGE_FILE_BYTES is refused unread."""
    data = read_regular(path, MAX_IMAGE_FILE_BYTES, "dataset image")
    pixels = read_pixels(data, image_size, channels, name=str(path), resize=resize)  # (H, W) or (H, W, 3)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()


def _short_reason(path: str, error: BaseException) -> str:
    """A one-line reason for `skipped` (which is keyed by the path): what went wrong, at most ~200 characters."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:  # stat only: nothing is opened
        return "empty file"
    text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    text = text.removeprefix(f"{path}: ").replace("\n", " ")
    return (f"too large: {text}" if isinstance(error, ImageTooLarge) else text)[:200]


# ---------------------------------------------------------------------------- one split
class _Decoded(Dataset):
    """What a DataLoader worker reads: position -> (uint8 (C, H, W) or None, label, position, path, reason)."""

    def __init__(self, root: str, paths: PathTable, labels: np.ndarray, image_size: tuple[int, int], channels: int,
                 resize: str):
        self.root, self.paths, self.labels = root, paths, labels
        self.image_size, self.channels, self.resize = image_size, channels, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int, int, str, str | None]:
        i = int(i)
        path = os.path.join(self.root, self.paths[i])
        try:
            return decode_image(path, self.image_size, self.channels, self.resize), int(self.labels[i]), i, path, None
        except Exception as error:  # noqa: BLE001 -- any decoder failure on one file must not end a training run
            return None, int(self.labels[i]), i, path, _short_reason(path, error)


_Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[str, str]]]  # images, labels, positions, bad


@dataclass(frozen=True)
class _Collate:
    """Stacks the readable images of a batch with their labels and positions in the split; carries the
    unreadable ones' (path, reason) to the main process."""

    shape: tuple[int, int, int]  # (C, H, W)

    def __call__(self, items: list) -> _Batch:
        good = [(image, label, i) for image, label, i, _, reason in items if reason is None]
        bad = [(path, reason) for _, _, _, path, reason in items if reason is not None]
        if not good:
            empty = torch.zeros(0, dtype=torch.int64)
            return torch.zeros((0, *self.shape), dtype=torch.uint8), empty, empty, bad
        images = torch.from_numpy(np.stack([image for image, _, _ in good]))  # (B, C, H, W) uint8
        labels = torch.tensor([label for _, label, _ in good], dtype=torch.int64)
        return images, labels, torch.tensor([i for _, _, i in good], dtype=torch.int64), bad


class _Batches:
    """Index batches as lists for the DataLoader's batch_sampler, converted one batch at a time."""

    def __init__(self, index_batches: Sequence[torch.Tensor]):
        self.index_batches = index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __iter__(self) -> Iterator[list[int]]:
        return (torch.as_tensor(index).tolist() for index in self.index_batches)


HEAP_SLACK_BYTES = 64 << 20  # resident growth while streaming before the C heap is trimmed
HOLD_BATCH = 64  # files per decoding task when a split is read into memory


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere, where nothing is trimmed anyway)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class FolderSource:
    """One split of an image folder, decoded a batch at a time in `workers` processes (the `Source` protocol).

    Streaming, memory holds at most workers x PREFETCH_FACTOR batches of decoded images, whatever the split's
    size; after `hold_in_memory`, every image is decoded once and batches are read from memory.
    """

    def __init__(self, root: Path, paths: PathTable, labels: np.ndarray, image_size: tuple[int, int],
                 channels: int, workers: int, resize: str = "crop"):
        self.root, self.paths, self.image_size, self.channels = root, paths, image_size, channels
        self.workers, self.resize = workers, resize  # decoding processes (0: the calling process); data.resize
        self.labels = torch.from_numpy(labels.astype(np.int64))  # (N,)
        self.skipped: dict[str, str] = {}  # path -> reason, for unreadable files met so far
        self.pixels: torch.Tensor | None = None  # uint8 (N, C, H, W) once held in memory (unreadable ones: zeros)
        self.readable: torch.Tensor | None = None  # bool (N,) once held in memory

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole split decoded: N x C x H x W."""
        return len(self) * self.channels * self.image_size[0] * self.image_size[1]

    def path(self, i: int) -> Path:
        """The file behind position `i` of this split."""
        return self.root / self.paths[i]

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For each 1-D int64 index batch: uint8 images (B, C, H, W) and int64 labels (B,), unreadable ones dropped."""
        if self.pixels is not None and self.readable is not None:
            for index in index_batches:
                index = torch.as_tensor(index)
                kept = index[self.readable[index]]  # as streaming drops an unreadable file from its batch
                yield self.pixels[kept], self.labels[kept]
            return
        for images, labels, _, _ in self.decoded(index_batches):
            yield images, labels

    def hold_in_memory(self) -> None:
        """Decode every file of the split once (in `workers` processes) and keep the pixels; unreadable files are
        recorded in `skipped` now, not when an epoch meets them."""
        c, (h, w) = self.channels, self.image_size
        pixels = torch.zeros((len(self), c, h, w), dtype=torch.uint8)
        readable = torch.zeros(len(self), dtype=torch.bool)
        for images, _, positions, _ in self.decoded(torch.arange(len(self)).split(HOLD_BATCH)):
            pixels[positions] = images
            readable[positions] = True
        self.pixels, self.readable = pixels, readable

    def decoded(self, index_batches: Sequence[torch.Tensor]) -> Iterator[_Batch]:
        """Each index batch decoded from disk: images, labels, their positions in the split, unreadable files."""
        loader = WorkerLoader(  # its workers leave Ctrl-C and SIGTERM to this process
            _Decoded(str(self.root), self.paths, self.labels.numpy(), self.image_size, self.channels, self.resize),
            batch_sampler=_Batches(index_batches), num_workers=self.workers,
            collate_fn=_Collate((self.channels, *self.image_size)),
            prefetch_factor=PREFETCH_FACTOR if self.workers > 0 else None, persistent_workers=False,
            # Its own generator: by default a DataLoader draws its workers' seed from the global one,
            # which dropout and augmentation use, and a resumed epoch would draw once more.
            generator=torch.Generator().manual_seed(0))
        limit = resident_bytes() + HEAP_SLACK_BYTES
        for batch in loader:
            self.skipped.update(batch[3])
            yield batch
            if resident_bytes() > limit:  # trimming every batch would cost page faults on every batch
                trim_heap()
                limit = resident_bytes() + HEAP_SLACK_BYTES
