"""Where a dataset's files live: lookup order, verification, and downloads into the cache.

Lookup order for a named dataset (the first folder holding all its files wins: four IDX files, or one archive):
  1. --data-dir DIR, else $CNNLAB_DATA     (DIR/<name>/<standard file names>)
  2. the user cache                         ($XDG_CACHE_HOME/cnnlab/<name>, ~/.cache/cnnlab/<name>)
  3. system copies                          (/usr/share/datasets/<name>, where Debian's packages put them)
  4. a download from the dataset's mirrors into the cache, verified, renamed into place atomically
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

from cnnlab.data.idx import GZIP_MAGIC, MAX_PAYLOAD_BYTES, decompress, read_raw
from cnnlab.data.registry import DataFile, DatasetSpec
from cnnlab.errors import UserError

SYSTEM_ROOT = Path("/usr/share/datasets")
DOWNLOAD_TIMEOUT_S = 30.0  # per connection attempt and per read; a dead mirror must not hang a run
CHUNK_BYTES = 1 << 16
# A mirror that sends more than this (or announces it) is cut off: CIFAR-10's archive, the largest
# download, is 170 MB; an IDX file is refused above MAX_PAYLOAD_BYTES anyway.
MAX_DOWNLOAD_BYTES = MAX_PAYLOAD_BYTES


class DatasetUnavailable(UserError, RuntimeError):
    """No copy of a dataset could be found or downloaded; the message lists every place tried."""


class ChecksumMismatch(UserError, ValueError):
    """A file's checksum is not the one the registry records for it."""


@dataclass(frozen=True)
class Location:
    """A folder holding all files of a dataset, and how it was found."""

    spec: DatasetSpec
    directory: Path
    origin: str  # "data-dir", "CNNLAB_DATA", "cache", "system", "package" or "download"

    def path(self, file: DataFile) -> Path:
        return self.directory / file.name


@dataclass(frozen=True)
class FileCheck:
    """The result of checking one file against the registry."""

    name: str
    path: Path
    sha256: str  # of the decompressed payload; of the file as downloaded for an archive
    ok: bool
    expected: str | None


def cache_root() -> Path:
    """cnnlab's user cache folder ($XDG_CACHE_HOME/cnnlab, default ~/.cache/cnnlab)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnlab"


def package_dir(spec: DatasetSpec) -> Path:
    return Path(str(resources.files("cnnlab.data") / "samples" / spec.name))


def search_places(spec: DatasetSpec, data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The folders looked in, in order, each with the name of the rule that put it there."""
    if spec.packaged:
        return [("package", package_dir(spec))]
    places = []
    if data_dir is not None:
        places.append(("data-dir", Path(data_dir) / spec.name))
    elif os.environ.get("CNNLAB_DATA"):
        places.append(("CNNLAB_DATA", Path(os.environ["CNNLAB_DATA"]) / spec.name))
    places.append(("cache", cache_root() / spec.name))
    places.append(("system", SYSTEM_ROOT / spec.name))
    return places


def locate(spec: DatasetSpec, data_dir: str | Path | None = None) -> Location | None:
    """The first folder that holds every file of the dataset, or None (nothing is downloaded)."""
    for origin, directory in search_places(spec, data_dir):
        if all((directory / f.name).is_file() for f in spec.all_files()):
            return Location(spec, directory, origin)
    return None


def digest_matches(file: DataFile, raw: bytes, payload: bytes) -> tuple[bool, str, str | None]:
    """(ok, payload sha256, expected digest): payload digest if the registry has one, else the raw .gz's."""
    payload_sha = hashlib.sha256(payload).hexdigest()
    if file.sha256 is not None:
        return payload_sha == file.sha256, payload_sha, file.sha256
    if file.gz_sha256 is not None:
        return hashlib.sha256(raw).hexdigest() == file.gz_sha256, payload_sha, f"{file.gz_sha256} (of the .gz)"
    return True, payload_sha, None


def archive_digest_matches(file: DataFile, path: Path) -> tuple[bool, str, str | None]:
    """(ok, sha256 of the file as downloaded, expected digest) for an archive, hashed in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    sha = digest.hexdigest()
    if file.gz_sha256 is None:
        return True, sha, None
    return sha == file.gz_sha256, sha, f"{file.gz_sha256} (of the download)"


def check_file(path: Path, file: DataFile) -> FileCheck:
    """Hash one file (an IDX file's payload, an archive as downloaded) and compare it with the registry."""
    if file.archive:
        ok, sha, expected = archive_digest_matches(file, path)
    else:
        raw = read_raw(path)
        ok, sha, expected = digest_matches(file, raw, decompress(raw, str(path)))
    return FileCheck(file.name, path, sha, ok, expected)


def verify(location: Location) -> list[FileCheck]:
    """Check every file of a located dataset."""
    return [check_file(location.path(f), f) for f in location.spec.all_files()]


def how_to_get(spec: DatasetSpec) -> str:
    hints = [f"put the files in DIR/{spec.name}/ and pass --data-dir DIR (or set CNNLAB_DATA=DIR)"]
    if spec.apt_package:
        hints.insert(0, f"on Debian/Ubuntu: apt-get install {spec.apt_package}")
    if spec.mirrors:
        hints.append(f"or run `cnnlab datasets fetch {spec.name}` when online")
    return "; ".join(hints)


def fetch(spec: DatasetSpec, data_dir: str | Path | None = None, mirrors: tuple[str, ...] | None = None,
          progress: bool = True, timeout: float = DOWNLOAD_TIMEOUT_S) -> Location:
    """Locate a dataset, downloading the missing files into the cache if no folder holds them all."""
    found = locate(spec, data_dir)
    if found is not None:
        return found
    mirrors = spec.mirrors if mirrors is None else mirrors
    if not mirrors:
        raise unavailable(spec, data_dir)
    target = cache_root() / spec.name
    for file in spec.all_files():
        if (target / file.name).is_file():
            continue
        failures = download_file(file, mirrors, target, progress, timeout)
        if failures:
            tried = "Tried:\n" + "\n".join(f"  {url}: {why}" for url, why in failures)
            raise unavailable(spec, data_dir, f"{file.name} could not be downloaded. {tried}")
    return Location(spec, target, "download")


def unavailable(spec: DatasetSpec, data_dir: str | Path | None, detail: str = "") -> DatasetUnavailable:
    """The error for a dataset that is nowhere: every place looked in, and how to get it."""
    looked = "\n".join(f"  {origin}: {directory} (missing {', '.join(missing_files(spec, directory))})"
                       for origin, directory in search_places(spec, data_dir))
    detail = f"\n{detail}" if detail else ""
    if data_dir is not None and all((Path(data_dir) / f.name).is_file() for f in spec.all_files()):
        detail += (f"\nThe files are directly in {data_dir}: --data-dir takes the folder that holds "
                   f"{spec.name}/, here {Path(data_dir).parent}")
    return DatasetUnavailable(f"dataset {spec.name!r} not found. Looked in:\n{looked}{detail}\n"
                              f"To get it: {how_to_get(spec)}")


def missing_files(spec: DatasetSpec, directory: Path) -> list[str]:
    return [f.name for f in spec.all_files() if not (directory / f.name).is_file()]


def download_file(file: DataFile, mirrors: tuple[str, ...], target: Path, progress: bool,
                  timeout: float) -> list[tuple[str, str]]:
    """Try each mirror until one gives a verified file at target/name; return the failures if none did.

    The file is streamed into a temporary file in the same folder and renamed over the final name only
    once verified, so a crash or a bad mirror never leaves a partial or corrupt file in the cache.
    """
    target.mkdir(parents=True, exist_ok=True)
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + file.name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=target)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                stream_url(url, out, timeout, progress, label=file.name)
            check_gzip(tmp)
            if file.archive:  # checked by the download's digest: a 170 MB archive is not decompressed to hash it
                ok, sha, expected = archive_digest_matches(file, tmp)
            else:
                raw = read_raw(tmp)
                ok, sha, expected = digest_matches(file, raw, decompress(raw, "the download"))
            if not ok:
                raise ChecksumMismatch(f"checksum mismatch: got {sha}, expected {expected}")
            os.replace(tmp, target / file.name)
            return []
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            failures.append((url, describe(exc)))
        finally:
            tmp.unlink(missing_ok=True)
    return failures


def check_gzip(path: Path) -> None:
    """Refuse a body that is not gzip (an HTML page served with status 200, say) before hashing it."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head.startswith(GZIP_MAGIC):
        kind = "an HTML page" if head.lstrip()[:1] == b"<" else "not a gzip file"
        raise ChecksumMismatch(f"served {kind} instead of the file")


def describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed early ({len(exc.partial)} bytes received)"
    return str(exc)


def stream_url(url: str, out: IO[bytes], timeout: float, progress: bool, label: str) -> None:
    """Copy a URL's body into an open file, with a progress bar; HTML responses are refused early."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with urllib.request.urlopen(url, timeout=timeout) as response:
        if "text/html" in response.headers.get("Content-Type", ""):
            raise ChecksumMismatch("served an HTML page instead of the file")
        total = int(response.headers.get("Content-Length") or 0) or None
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            raise ChecksumMismatch(f"announced {total:,} bytes; expected at most {MAX_DOWNLOAD_BYTES:,}")
        with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task(f"downloading {label}", total=total)
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                if out.tell() > MAX_DOWNLOAD_BYTES:
                    raise ChecksumMismatch(f"sent more than {MAX_DOWNLOAD_BYTES:,} bytes; stopped there")
                bar.update(task, advance=len(chunk))
        if total is not None and out.tell() != total:
            raise ChecksumMismatch(f"connection closed after {out.tell()} of {total} bytes")
