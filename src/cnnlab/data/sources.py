"""A dataset ready to train on: `Data`, whose three splits are `Source`s the trainer, the evaluator
and the pictures all read the same way, a batch of uint8 images at a time.

Two kinds of Source: `TensorSource` holds a split in memory (the named datasets), `FolderSource`
(`cnnlab.data.folder`) streams an image folder's split from disk. Images travel as uint8 tensors
(N, C, H, W) from the files to the model; pictures turn the few they draw into (H, W, C) at the end.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from cnnlab.config import Config, ConfigError
from cnnlab.data.loading import Dataset, load_dataset, split_train_val
from cnnlab.data.pixels import images_tensor
from cnnlab.data.registry import is_image_folder

LOAD_ALL_BATCH = 256  # images per batch when a whole split is read into memory
MB = 1_000_000  # data.memory_mb's unit


class Source(Protocol):
    """One split of the data, read a batch at a time: in memory (`TensorSource`) or streamed from disk.

    `labels` are known up front (the data order is drawn from them); `batches` yields, for each index
    batch asked for, uint8 images (B, C, H, W) and int64 labels (B,). A streamed source may drop an
    unreadable image from its batch (B shrinks) and report it in `skipped` (path -> reason).
    """

    labels: torch.Tensor  # (N,) int64
    skipped: dict[str, str]

    def __len__(self) -> int: ...
    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TensorSource:
    """A split held in memory as uint8 images (N, C, H, W) and int64 labels (N,): no per-image Python."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in index_batches:
            yield self.images[index], self.labels[index]


class Subset:
    """The images of `source` at `indices` (N,), read through it: one fold of a split, as a Source."""

    def __init__(self, source: Source, indices: torch.Tensor):
        self.source, self.indices = source, indices
        self.labels = source.labels[indices]
        self.skipped = source.skipped

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.source.batches([self.indices[b] for b in index_batches])


def deal_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """`folds` disjoint, sorted position sets covering labels (N,): each class's positions shuffled (seeded)
    and dealt in turn, so every fold holds about 1/folds of every class."""
    generator = torch.Generator().manual_seed(seed)
    dealt: list[list[torch.Tensor]] = [[] for _ in range(folds)]
    for k in torch.unique(labels).tolist():
        members = torch.nonzero(labels == k).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        for fold in range(folds):
            dealt[fold].append(members[fold::folds])
    return [torch.sort(torch.cat(parts)).values for parts in dealt]


def load_all(source: Source) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory: uint8 images (M, C, H, W) and int64 labels (M,); M < N when images were skipped."""
    if isinstance(source, TensorSource):
        return source.images, source.labels
    parts = list(source.batches(torch.arange(len(source)).split(LOAD_ALL_BATCH)))
    if not parts:
        return torch.zeros((0, 1, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


@dataclass
class Data:
    """A dataset ready to train on: its three splits as Sources, what it is, and where it came from."""

    name: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (H, W, C)
    train: Source
    val: Source
    test: Source
    files: list[dict] = field(default_factory=list)  # dataset files and checksums, for the manifest
    about: dict = field(default_factory=dict)  # where the data came from, for the manifest

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def prepare_data(dataset: Dataset, config: Config) -> Data:
    """A named dataset in memory: the training set split into train/validation (seeded), and the test set."""
    val_size = dataset.spec.val_size if config.data.val_size is None else config.data.val_size
    split = split_train_val(len(dataset.train_labels), val_size, config.train.seed, f"dataset {dataset.spec.name!r}")
    images, labels = images_tensor(dataset.train_images), torch.from_numpy(dataset.train_labels)
    return Data(dataset.spec.name, dataset.classes, dataset.spec.image_shape,
                train=TensorSource(images[split.train], labels[split.train]),
                val=TensorSource(images[split.val], labels[split.val]),
                test=TensorSource(images_tensor(dataset.test_images), torch.from_numpy(dataset.test_labels)),
                files=dataset.files,
                about=dict(dataset=dataset.spec.name, data_origin=dataset.location.origin,
                           data_dir=str(dataset.location.directory),
                           **({"skipped_copies": list(dataset.passed_over)} if dataset.passed_over else {})))


def folder_data(config: Config, workers: int | None = None, progress: bool = False, summary: bool = False,
                hold: bool = True) -> Data:
    """An image folder: 10% of the images held out for validation, 10% for test; decoded once into memory when
    its pixels fit data.memory_mb, streamed from disk every epoch otherwise.

    Directory links inside class folders are left out (`cnnlab.data.folder`): recorded in the manifest, and said
    in one line on stderr when `progress`. `summary`: the folder's summary (classes by split, sizes, skipped
    files) and its warnings are printed. A class with no readable training image is a FolderError. `hold`
    False: streamed whatever its size (a command that reads one split once).
    """
    from cnnlab.data.folder import FolderError, open_image_folder
    from cnnlab.data.store import notify
    from cnnlab.data.summary import readable_problem, summarize

    d = config.data
    if d.val_size is not None:
        raise ConfigError("data.val_size: image folders hold out 10% for validation and 10% for test "
                          "(or use their val/ and test/ sub-folders); remove data.val_size")
    folder = open_image_folder(d.dataset, (d.image_size, d.image_size), d.channels,
                               workers=d.workers if workers is None else workers, resize=d.resize)
    if hold:
        folder.hold_in_memory(d.memory_mb * MB)
    problem = readable_problem(folder)
    if problem is not None:
        raise FolderError(problem)
    notice = folder.notice()
    if progress and notice is not None:
        notify(notice)
    about = folder.describe()
    if summary:
        found = summarize(folder, config.train)
        print("\n".join(found.lines()))
        for warning in found.warnings:
            notify(warning)
        about["summary_warnings"] = found.warnings
    return Data(str(folder.root), folder.classes, folder.image_shape, folder.train, folder.val, folder.test,
                about=dict(dataset=str(folder.root), data_origin="image folder", image_folder=about))


def open_dataset(config: Config, progress: bool = True) -> Dataset:
    """The configured named dataset, found (or downloaded) and verified."""
    d = config.data
    return load_dataset(d.dataset, d.data_dir, allow_mismatch=d.allow_checksum_mismatch, progress=progress)


def load_data(config: Config, progress: bool = True, summary: bool = False, hold: bool = True,
              pinned: dict | None = None, run: str = "the run") -> Data:
    """The configured dataset (named or an image folder), ready to train on; `progress`: bars and warnings;
    `summary`: an image folder's summary printed (training does); `hold` False: an image folder streamed (a
    command that reads one split once has no use for every split decoded into memory).

    `pinned`: the image folder's record in `run`'s manifest, for a command that opens a run's folder again:
    FolderChanged when its classes are not the run's, a warning on stderr when its files changed
    (`cnnlab.data.pinning`)."""
    if is_image_folder(config.data.dataset):
        if pinned is not None:
            check_folder_there(config, run)
        data = folder_data(config, progress=progress, summary=summary, hold=hold)
        check_pinned(data, pinned, run)
        return data
    return prepare_data(open_dataset(config, progress), config)


def with_data_dir(config: Config, data_dir: str | Path | None) -> Config:
    """A run's config with --data-dir applied: where a named dataset's files are, or, for a run trained on an image
    folder, the folder's new place (it moved); the pin still checks that it is the same folder."""
    if data_dir is not None:
        if is_image_folder(config.data.dataset):
            config.data.dataset = str(Path(data_dir).resolve())
        else:
            config.data.data_dir = str(data_dir)
    return config


def check_folder_there(config: Config, run: str) -> None:
    """A one-line error when the image folder a run was trained on is gone, saying how to point the run at it."""
    folder = config.data.dataset
    if is_image_folder(folder) and not Path(folder).is_dir():
        raise ConfigError(f"{folder}: the folder {run} was trained on is not there (moved or deleted?); give its "
                          "new place with --data-dir FOLDER (--resume needs it back where it was)")


def check_pinned(data: Data, pinned: dict | None, run: str) -> None:
    """Compare an image folder opened for `run` with the record the run pinned (see load_data)."""
    from cnnlab.data.pinning import check_folder
    from cnnlab.data.store import notify

    for warning in check_folder(pinned, data.about["image_folder"], run):
        notify(warning)


def open_test_set(config: Config, pinned: dict | None = None, run: str = "the run"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's test images in memory, uint8 (N, C, H, W), and labels (N,), for pictures of mistakes and
    saliency (an image folder's test split is decoded; unreadable files are left out as in training).

    `pinned`: the image folder's record in the run's manifest, compared with the folder now
    (`cnnlab.data.pinning`): FolderChanged when its classes differ, a warning on stderr when its files do."""
    if is_image_folder(config.data.dataset):
        data = folder_data(config, hold=False)
        check_pinned(data, pinned, run)
        return load_all(data.test)
    dataset = open_dataset(config, progress=False)
    return images_tensor(dataset.test_images), torch.from_numpy(dataset.test_labels)
