"""CIFAR-10's binary batches, read straight from the downloaded tar.gz: nothing is extracted to disk.

The binary version (never the python one, a pickle) holds one file per batch. Each record is 3073 bytes:
  byte 0         the label, 0..9
  bytes 1-1024   the red plane, 32x32, row-major
  then 1024 green and 1024 blue bytes
The archive is read as a stream (one pass over the gzip) and only regular files with the expected names
are accepted: a link, a device, or a member with any other path (../evil, /etc/passwd) is an error.
Nothing is inflated past what the spec's record counts allow: a member declaring more is refused from
its tar header, and the whole stream stops at the expected size plus SLACK_BYTES (a gzip bomb). The archive
itself must be a regular file of at most MAX_ARCHIVE_BYTES: a FIFO or a device is refused without blocking.
"""
from __future__ import annotations

import gzip
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np

from cnnlab.data.registry import Archive
from cnnlab.errors import UserError
from cnnlab.files import GiB, open_regular

SIDE = 32  # pixels per image side
CHANNELS = 3  # red, green, blue planes, in that order
RECORD_BYTES = 1 + CHANNELS * SIDE * SIDE  # 3073: the label byte, then the planes
SMALL_MEMBER_BYTES = 1 << 20  # the meta and extra members (class names, a readme): 61 and 88 bytes in CIFAR-10
SLACK_BYTES = 16 << 20  # tar headers, padding, meta and extras on top of the records, in the inflated stream
MAX_ARCHIVE_BYTES = 4 * GiB  # on disk; CIFAR-10's is 170 MB. A larger file is refused unread


class CifarError(UserError, ValueError):
    """An archive that does not hold CIFAR binary batches as its spec says; the message names the archive and member."""


def read_archive(path: str | Path, archive: Archive, classes: tuple[str, ...]
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 images (N, 32, 32, 3) channels-last, int64 labels (N,)), checked against `archive`."""
    blobs, meta = read_members(Path(path), archive)
    if archive.meta is not None:
        check_class_names(path, archive.meta, meta, classes)
    splits = {}
    for split, members in archive.members.items():
        decoded = [decode(path, member, blobs[member], len(classes)) for member in members]
        found = sum(len(labels) for _, labels in decoded)
        if found != archive.counts[split]:
            raise CifarError(f"{path}: the {split} members ({', '.join(members)}) hold {found:,} records; "
                             f"expected {archive.counts[split]:,}")
        images = np.concatenate([images for images, _ in decoded]) if len(decoded) > 1 else decoded[0][0]
        labels = np.concatenate([labels for _, labels in decoded]) if len(decoded) > 1 else decoded[0][1]
        splits[split] = (np.ascontiguousarray(images), labels)
    return splits


def read_members(path: Path, archive: Archive) -> tuple[dict[str, bytes], str | None]:
    """The bytes of every record member and the text of the meta member, in one pass over the archive."""
    records = {member for members in archive.members.values() for member in members}
    allowed = records | set(archive.extras) | ({archive.meta} if archive.meta else set())
    folders = {str(parent) for name in allowed for parent in PurePosixPath(name).parents if str(parent) != "."}
    blobs: dict[str, bytes] = {}
    meta = None
    seen: set[str] = set()
    limit = sum(archive.counts.values()) * RECORD_BYTES + SLACK_BYTES
    try:
        with open_regular(path, MAX_ARCHIVE_BYTES, "dataset archive") as raw, \
                gzip.GzipFile(fileobj=raw, mode="rb") as inflated:
            if raw.read(2) != b"\x1f\x8b":
                raise tarfile.ReadError("not a gzip file")
            raw.seek(0)
            # One pass, in order. typeshed asks a fileobj for write/seek/tell/close too: mode "r|" only calls read().
            with tarfile.open(fileobj=Capped(inflated, limit, path), mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    name = member.name
                    if member.isdir() and name.rstrip("/") in folders:
                        continue
                    if name not in allowed:
                        raise CifarError(f"{path}: unexpected member {name!r} ({member_kind(member)}); expected only "
                                         f"{', '.join(sorted(allowed))} (and their folder)")
                    if not member.isfile():
                        raise CifarError(f"{path}: member {name}: expected a regular file, "
                                         f"found a {member_kind(member)}")
                    if name in seen:
                        raise CifarError(f"{path}: member {name} appears twice; expected it once")
                    seen.add(name)
                    check_size(path, archive, member, records)
                    if name in records:
                        if member.size % RECORD_BYTES:
                            raise CifarError(f"{path}: member {name}: expected a whole number of {RECORD_BYTES}-byte "
                                             f"records, found {member.size:,} bytes ({member.size // RECORD_BYTES:,} "
                                             f"records and {member.size % RECORD_BYTES} bytes over)")
                        blobs[name] = read_member(path, tar, member)
                    elif name == archive.meta:
                        meta = read_member(path, tar, member).decode("utf-8", errors="replace")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CifarError(f"{path}: not a readable tar.gz archive ({exc})") from None
    missing = sorted(allowed - seen - set(archive.extras))
    if missing:
        raise CifarError(f"{path}: member(s) missing: {', '.join(missing)}; the archive holds "
                         f"{', '.join(sorted(seen)) or 'none of the expected members'}")
    return blobs, meta


class Capped:
    """A read-only stream that raises CifarError instead of giving more than `limit` bytes in all."""

    def __init__(self, stream: IO[bytes] | gzip.GzipFile, limit: int, path: Path):
        self.stream, self.limit, self.path, self.given = stream, limit, path, 0

    def read(self, size: int = -1) -> bytes:
        want = self.limit + 1 - self.given if size is None or size < 0 else min(size, self.limit + 1 - self.given)
        data = self.stream.read(want)
        self.given += len(data)
        if self.given > self.limit:
            raise CifarError(f"{self.path}: the archive inflates to more than {self.limit:,} bytes; expected its "
                             f"records and small members only (a decompression bomb?); stopped reading there")
        return data


def check_size(path: Path, archive: Archive, member: tarfile.TarInfo, records: set[str]) -> None:
    """Refuse a member whose tar header declares more bytes than the spec allows, before reading it."""
    if member.name in records:
        split = next(split for split, names in archive.members.items() if member.name in names)
        most = archive.counts[split] * RECORD_BYTES
        what = f"the {archive.counts[split]:,} records of the {split} split"
    else:
        most, what = SMALL_MEMBER_BYTES, "a small text member"
    if member.size > most:
        raise CifarError(f"{path}: member {member.name}: its header declares {member.size:,} bytes; expected at most "
                         f"{most:,} ({what})")


def read_member(path: Path, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:  # only a regular file has bytes to extract; read_members checked member.isfile()
        raise CifarError(f"{path}: member {member.name}: expected a regular file, found a {member_kind(member)}")
    data = handle.read()
    if len(data) != member.size:
        raise CifarError(f"{path}: member {member.name}: expected {member.size:,} bytes, found {len(data):,} "
                         "(the archive is truncated)")
    return data


def member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    return {tarfile.DIRTYPE: "folder", tarfile.FIFOTYPE: "FIFO", tarfile.CHRTYPE: "character device",
            tarfile.BLKTYPE: "block device"}.get(member.type, "regular file" if member.isfile() else "special member")


def decode(path: str | Path, member: str, data: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's records -> uint8 images (N, 32, 32, 3) and int64 labels (N,)."""
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise CifarError(f"{path}: member {member}: record {int(bad[0])} has label {int(labels[bad[0]])}; "
                         f"expected 0..{num_classes - 1} ({num_classes} classes)")
    planes = records[:, 1:].reshape(-1, CHANNELS, SIDE, SIDE)  # (N, C, H, W) as stored
    return planes.transpose(0, 2, 3, 1), labels  # (N, H, W, C): the Dataset convention for colour


def check_class_names(path: str | Path, member: str, text: str | None, classes: tuple[str, ...]) -> None:
    """The meta member lists the class names one per line (blank lines ignored): they must be the spec's."""
    names = tuple(line.strip() for line in (text or "").splitlines() if line.strip())
    if names != tuple(classes):
        raise CifarError(f"{path}: member {member}: expected the class names {', '.join(classes)}; "
                         f"found {', '.join(names) or 'none'}")


def encode(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The binary batch bytes of uint8 images (N, 32, 32, 3) and labels (N,): the inverse of `decode`."""
    planes = np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], planes], axis=1).tobytes()
