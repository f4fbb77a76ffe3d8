"""The decoded-data cache: the decompressed bytes of large gzip IDX files, so a second run skips gunzip.

An entry is one file, $XDG_CACHE_HOME/cnnlab/decoded/<name>.<key>.idx (default ~/.cache/cnnlab/...):
  a magic line, a 4-byte big-endian header length, a JSON header, then the IDX payload exactly as
  gunzip gives it (header and items), so the usual parser and the usual checksum run on it unchanged.
The header names the source (its real path) and its identity when it was decoded (device, inode,
size, modification and change times in ns) and the SHA-256 of the payload. An entry is used only
when the source's identity is the same now, the entry's length is the one its header declares, and
the SHA-256 of its payload, computed again on every read, is the recorded one: anything else (a
changed source, a truncated, corrupt or unreadable entry) is a miss, and the source is decoded again.

The cache only saves the decompression: the payload's SHA-256 is compared with the registry on every
run, from the bytes read, so a checksum mismatch is refused (or, with --allow-checksum-mismatch,
recorded) exactly as without the cache. Entries are written atomically (`cnnlab.files.write_atomic`):
two runs writing the same entry each rename a whole file into place. A cache that cannot be written
(read-only, full disk) costs one line on stderr, never the run. CNNLAB_DATA_CACHE=off turns it off.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import BinaryIO

from cnnlab.data.idx import GZIP_MAGIC, MAX_PAYLOAD_BYTES
from cnnlab.files import FileRefused, MissingFile, open_regular, reason, remove_stale_temps, write_atomic

ENV = "CNNLAB_DATA_CACHE"  # "off" (or 0, no, false) turns the cache off
OFF_VALUES = ("0", "off", "no", "false")
FOLDER = "decoded"  # under cnnlab's user cache folder, beside the downloaded datasets
MAGIC = b"cnnlab decoded IDX v1\n"
LENGTH = struct.Struct(">I")  # the JSON header's length in bytes
MAX_HEADER_BYTES = 1 << 16  # a real header is ~300 bytes; more is not an entry of ours
# Below this (payload bytes) gunzip takes a few milliseconds: an entry would cost more than it saves.
# MNIST's training images hold 47 MB, its labels 60 kB; tests lower it to cache tiny files.
MIN_PAYLOAD_BYTES = 1 << 20
ENTRY_LIMIT = MAX_PAYLOAD_BYTES + len(MAGIC) + LENGTH.size + MAX_HEADER_BYTES  # bytes an entry may hold


class BadEntry(Exception):
    """A cache entry that cannot be trusted; the message says why (never reaches the user as an error)."""


class StaleEntry(BadEntry):
    """An entry of a source that has changed since: replaced without a word."""


@dataclass(frozen=True)
class Hit:
    """A source's decompressed IDX bytes read from the cache, and their SHA-256 (computed on this read)."""

    payload: bytes
    sha256: str


def identity(path: Path) -> list[int] | None:
    """What tells a file apart from a changed one: [device, inode, size, mtime ns, ctime ns]; None if unreadable.

    The change time moves on every write and cannot be set back (as `touch -d` sets mtime), so a file rewritten
    to the same size and modification time still counts as changed.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


@dataclass
class DecodedCache:
    """The decoded-data cache in `folder` (None: turned off); `problems` collects why it could not be used."""

    folder: Path | None
    problems: list[str] = field(default_factory=list)

    def load(self, source: Path) -> Hit | None:
        """The source's payload from the cache, or None: off, no entry, a changed source, or an entry not trusted."""
        now = identity(source)
        if self.folder is None or now is None or not self.folder.is_dir():  # no folder: said when saving fails
            return None
        path = entry_path(self.folder, source)
        try:
            with open_regular(path, ENTRY_LIMIT, "decoded-data cache entry") as handle:
                return read_entry(handle, os.path.realpath(source), now)
        except (MissingFile, StaleEntry):
            return None
        except FileRefused as exc:  # a folder or a FIFO in its place, an unreadable or oversized entry
            self.problems.append(str(exc))
        except BadEntry as exc:
            self.problems.append(f"{path}: {exc}")
        except OSError as exc:  # a read error part-way
            self.problems.append(f"{path}: cannot read it: {reason(exc)}")
        return None

    def save(self, source: Path, before: list[int] | None, raw: bytes, payload: bytes, payload_sha: str) -> None:
        """Keep a freshly decoded payload, when worth it: a gzip source big enough, unchanged while it was read.

        `before` is the source's identity taken before it was read; a failed write is noted in `problems`.
        """
        worth = len(payload) >= MIN_PAYLOAD_BYTES and raw.startswith(GZIP_MAGIC)  # raw IDX: nothing to save
        # a source that changed while read: its identity may not describe these bytes
        if self.folder is None or before is None or not worth or identity(source) != before:
            return
        head = json.dumps({"source": os.path.realpath(source), "identity": before, "payload_bytes": len(payload),
                           "payload_sha256": payload_sha}).encode("utf-8", "surrogateescape")
        path = entry_path(self.folder, source)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.folder, [path.name])  # a killed writer's leftovers (only dead writers')
            write_atomic(path, lambda tmp: write_entry(tmp, head, payload))
        except FileRefused as exc:  # a folder or a FIFO where the entry goes
            self.problems.append(f"cannot write {exc}")
        except OSError as exc:  # read-only, full disk, no such parent
            self.problems.append(f"cannot write {path}: {reason(exc)}")

    def notice(self) -> str | None:
        """One line for stderr about the first problem, or None."""
        if not self.problems:
            return None
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return (f"decoded-data cache not used: {' '.join(self.problems[0].split())}{more}; the dataset's own files "
                f"were read instead ({ENV}=off turns the cache off)")


def open_cache(root: Path) -> DecodedCache:
    """The decoded-data cache under cnnlab's cache folder `root`, or one turned off by CNNLAB_DATA_CACHE=off."""
    if os.environ.get(ENV, "").strip().lower() in OFF_VALUES:
        return DecodedCache(None)
    return DecodedCache(root / FOLDER)


def entry_path(folder: Path, source: Path) -> Path:
    """A source's entry: its file name (for people) and a digest of its real path (one entry per file)."""
    key = sha256(os.path.realpath(source).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return folder / f"{source.name.removesuffix('.gz')}.{key}.idx"


def write_entry(tmp: Path, head: bytes, payload: bytes) -> None:
    with open(tmp, "wb") as out:
        out.write(MAGIC + LENGTH.pack(len(head)) + head)
        out.write(payload)


def read_entry(handle: BinaryIO, source: str, now: list[int]) -> Hit:
    """Read and check an open entry against its source (real path and identity now); BadEntry when it fails."""
    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(len(MAGIC) + LENGTH.size)
    if len(prefix) < len(MAGIC) + LENGTH.size or not prefix.startswith(MAGIC):
        raise BadEntry("not a decoded-data cache entry (bad magic line)")
    (head_len,) = LENGTH.unpack(prefix[len(MAGIC):])
    if head_len > MAX_HEADER_BYTES:
        raise BadEntry(f"header of {head_len:,} bytes declared (at most {MAX_HEADER_BYTES:,})")
    head = parse_header(handle.read(head_len))
    if head["source"] != source or head["identity"] != now:
        raise StaleEntry("the source file changed since it was cached")
    expected = len(prefix) + head_len + head["payload_bytes"]
    if size != expected:
        raise BadEntry(f"{size:,} bytes, its header declares {expected:,} (truncated or padded)")
    payload = handle.read(head["payload_bytes"])
    if len(payload) != head["payload_bytes"]:
        raise BadEntry(f"read {len(payload):,} payload bytes of {head['payload_bytes']:,} (truncated while read)")
    digest = sha256(payload).hexdigest()
    if digest != head["payload_sha256"]:
        raise BadEntry("the SHA-256 of its payload is not the one recorded (a corrupt entry)")
    return Hit(payload, digest)


def parse_header(data: bytes) -> dict:
    """The entry's JSON header with every field of the right type; BadEntry otherwise."""
    try:
        head = json.loads(data.decode("utf-8", "surrogateescape"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadEntry("its header is not valid JSON (a corrupt entry)") from None
    ok = (isinstance(head, dict) and isinstance(head.get("source"), str)
          and isinstance(head.get("identity"), list) and len(head["identity"]) == 5
          and all(type(v) is int for v in head["identity"])
          and type(head.get("payload_bytes")) is int and 0 <= head["payload_bytes"] <= MAX_PAYLOAD_BYTES
          and isinstance(head.get("payload_sha256"), str) and len(head["payload_sha256"]) == 64)
    if not ok:
        raise BadEntry("its header lacks a field or has one of the wrong type (a corrupt entry)")
    return head
