"""Load a named dataset into memory, verified, and split it into train / validation / test.

The copies of a dataset are tried in lookup order (`cnnlab.data.store`): each is read once, its checksums
compared as it is read; the first that reads, verifies (or, with allow_mismatch, merely reads) and holds
consistent arrays is used, and each copy passed over is named with its reason, in one line, on stderr and
in `Dataset.passed_over` (the run manifest). When none can be used and the dataset has mirrors, the files
that do not verify are downloaded again into the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cnnlab.data.cifar import CifarError, read_archive
from cnnlab.data.decoded import DecodedCache, identity, open_cache
from cnnlab.data.idx import decompress, parse_idx, read_raw
from cnnlab.data.registry import DataFile, DatasetSpec, get_dataset
from cnnlab.data.store import (
    DOWNLOAD_TIMEOUT_S,
    ChecksumMismatch,
    Location,
    cache_root,
    candidates,
    check_file,
    digest_matches,
    download_missing,
    notify,
    passed_over_line,
    unavailable,
    verdict,
)
from cnnlab.errors import UserError


class DataError(UserError, ValueError):
    """Dataset files that are readable but inconsistent (counts, labels, image size)."""


@dataclass
class Dataset:
    """A dataset in memory: uint8 images, grey (N, H, W) or colour (N, H, W, C), int64 labels (N,), and their origin."""

    spec: DatasetSpec
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    location: Location
    files: list[dict] = field(default_factory=list)  # name, path, sha256, verified: the run manifest's record

    @property
    def passed_over(self) -> tuple[str, ...]:
        """One line per copy looked at before this one and not used: where it was and why."""
        return self.location.passed_over

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes


@dataclass
class Splits:
    """Index arrays into the training set: the validation part is never trained on."""

    train: np.ndarray
    val: np.ndarray


def load_dataset(name: str | DatasetSpec, data_dir: str | Path | None = None, allow_mismatch: bool = False,
                 download: bool = True, progress: bool = True) -> Dataset:
    """Find (or download) a dataset, verify every file's checksum, and load it into memory.

    A file whose checksum differs is an error unless `allow_mismatch` is set; either way the
    digest and the verdict are recorded in `Dataset.files` for the run's manifest. A copy that cannot be
    used is passed over for the next (said on stderr when `progress`); when no copy can be used, the error
    of the only copy found, or one listing every copy and why.
    """
    spec = get_dataset(name) if isinstance(name, str) else name
    passed: list[str] = []
    errors: list[UserError] = []
    cache = open_cache(cache_root())
    for location in candidates(spec, data_dir):
        try:
            dataset = read_copy(spec, location, allow_mismatch, cache)
        except UserError as exc:  # unreadable, corrupt, changed (without the flag) or inconsistent: try the next
            passed.append(passed_over_line(location, str(exc).removeprefix(f"{location.directory}/")))
            errors.append(exc)
            continue
        return arrived(dataset, passed, progress, cache)
    if download and spec.mirrors:
        fetched = download_missing(spec, data_dir, None, progress, DOWNLOAD_TIMEOUT_S, passed)
        return arrived(read_copy(spec, fetched, allow_mismatch, cache), passed, progress, cache)
    if len(errors) == 1:
        raise errors[0]  # the one copy there is: its own error (a mismatch says how to use it anyway)
    raise unavailable(spec, data_dir, passed=passed)


def arrived(dataset: Dataset, passed: list[str], progress: bool, cache: DecodedCache | None = None) -> Dataset:
    """The dataset with the copies passed over before it recorded (and said, when `progress`, with one line
    when the decoded-data cache could not be used)."""
    dataset.location = replace(dataset.location, passed_over=tuple(passed))
    notice = cache.notice() if cache is not None else None
    if progress:
        for line in passed + ([notice] if notice else []):
            notify(line)
    return dataset


def read_copy(spec: DatasetSpec, location: Location, allow_mismatch: bool,
              cache: DecodedCache | None = None) -> Dataset:
    """One copy read, verified and checked; a UserError when it cannot be used."""
    if spec.format == "cifar-binary":
        return load_archive(spec, location, allow_mismatch)
    arrays, records = {}, []
    for file in spec.all_files():
        array, record = read_verified(location.path(file), file, allow_mismatch, cache)
        arrays[file.name] = array
        records.append(record)
    (tr_img, tr_lab), (te_img, te_lab) = spec.files["train"], spec.files["test"]
    train = check_pair(spec, arrays[tr_img.name], arrays[tr_lab.name], location.path(tr_img), location.path(tr_lab))
    test = check_pair(spec, arrays[te_img.name], arrays[te_lab.name], location.path(te_img), location.path(te_lab))
    return Dataset(spec, *train, *test, location=location, files=records)


def load_archive(spec: DatasetSpec, location: Location, allow_mismatch: bool) -> Dataset:
    """A dataset held in one archive (CIFAR-10's binary batches): verify the download, read its members."""
    archive = spec.archive
    if archive is None:  # DatasetSpec refuses format cifar-binary without one
        raise ValueError(f"dataset {spec.name!r}: format {spec.format} needs an archive")
    file = archive.file
    path = location.path(file)
    check = check_file(path, file)
    if check.problem is not None:
        raise CifarError(f"{path}: {check.problem}")
    refuse_mismatch(path, check.ok, check.sha256, check.expected, "the file's", allow_mismatch)
    splits = read_archive(path, archive, spec.classes)
    train = check_pair(spec, *splits["train"], path, path)
    test = check_pair(spec, *splits["test"], path, path)
    record = {"name": file.name, "path": str(path), "sha256": check.sha256, "verified": check.ok}
    return Dataset(spec, *train, *test, location=location, files=[record])


def read_verified(path: Path, file: DataFile, allow_mismatch: bool,
                  cache: DecodedCache | None = None) -> tuple[np.ndarray, dict]:
    """Read one IDX file once: hash its payload, compare with the registry, parse it.

    With a `cache`, the decompressed payload may come from it (`cnnlab.data.decoded`), and a freshly decoded
    one is kept there; the digest is compared with the registry from the bytes read either way.
    """
    hit = cache.load(path) if cache is not None else None
    if hit is not None:
        payload = hit.payload
        ok, sha, expected = verdict(file, hit.sha256, lambda: read_raw(path))
    else:
        before = identity(path)
        raw = read_raw(path)
        payload = decompress(raw, str(path))
        ok, sha, expected = digest_matches(file, raw, payload)
    refuse_mismatch(path, ok, sha, expected, "the payload's", allow_mismatch)
    array = parse_idx(payload, source=str(path))
    if hit is None and cache is not None:
        cache.save(path, before, raw, payload, sha)  # only bytes that parsed (and passed the check) are kept
    record = {"name": file.name, "path": str(path), "sha256": sha, "verified": ok}
    return array, record


def refuse_mismatch(path: Path, ok: bool, sha: str, expected: str | None, what: str, allow_mismatch: bool) -> None:
    if not ok and not allow_mismatch:
        raise ChecksumMismatch(
            f"{path}: checksum mismatch: {what} SHA-256 is {sha}, the registry expects {expected}. "
            "If you trust this copy, pass --allow-checksum-mismatch (recorded in the run's manifest).")


def check_pair(spec: DatasetSpec, images: np.ndarray, labels: np.ndarray, images_path: Path,
               labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check that images and labels belong together and fit the dataset's definition."""
    h, w, c = spec.image_shape
    shape = (h, w) if c == 1 else (h, w, c)  # grey (N, H, W), colour channels-last (N, H, W, C)
    if images.dtype != np.uint8 or images.shape[1:] != shape:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, {', '.join(map(str, shape))}), "
                        f"found {images.dtype} of shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D array of labels, found shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        bad = labels[(labels < 0) | (labels >= spec.num_classes)][0]
        raise DataError(f"{labels_path}: label {bad} is outside 0..{spec.num_classes - 1} "
                        f"({spec.num_classes} classes)")
    return images, labels.astype(np.int64)


def split_train_val(n: int, val_size: int, seed: int, dataset: str = "the dataset") -> Splits:
    """A seeded random split of n training examples into train and validation indices.

    DataError naming data.val_size unless 0 <= val_size < n: at least one image must be left to train on.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n:
        raise DataError(f"data.val_size: expected 0 to {n - 1:,} images held out for validation ({dataset} has "
                        f"{n:,} images in its training set), got {val_size!r}")
    order = np.random.default_rng(seed).permutation(n)
    return Splits(train=np.sort(order[val_size:]), val=np.sort(order[:val_size]))
