"""Where a dataset's files live: lookup order, verification, and downloads into the cache.

Lookup order for a named dataset (four IDX files, or one archive, under their standard names):
  1. --data-dir DIR, else $CNNLAB_DATA     (DIR/<name>/<standard file names>)
  2. the user cache                         ($XDG_CACHE_HOME/cnnlab/<name>, ~/.cache/cnnlab/<name>)
  3. system copies                          (/usr/share/datasets/<name>, where Debian's packages put them)
  4. a download from the dataset's mirrors into the cache, verified, renamed into place atomically

The first copy whose every file is a regular file that reads and verifies against the registry is used.
A copy that fails (a truncated or corrupt file, a checksum that differs, a FIFO in place of a file) is passed
over, with one line saying which copy and why (`Location.passed_over`); when no copy verifies and the dataset
has mirrors, the files that do not verify are downloaded again into the cache. With allow_mismatch (the
user's --allow-checksum-mismatch) a copy whose checksums differ is used, and its mismatch recorded, rather
than passed over; a copy that cannot be read at all is passed over either way.

Every file is read by `cnnlab.files`: regular files only (a FIFO or a
device is refused without blocking), never more than a stated number of bytes. A download that stalls, or
trickles in slower than LOW_SPEED_BYTES_PER_S over LOW_SPEED_WINDOW_S, is cut off and the next mirror tried.

Over 400 lines on purpose: the lookup order, verification and downloads are one decision (which copy is used,
or what to fetch); each step is a small function, and splitting them would scatter that decision."""
from __future__ import annotations

import hashlib
import http.client
import os
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import IO

from cnnlab.data.cifar import MAX_ARCHIVE_BYTES
from cnnlab.data.idx import GZIP_MAGIC, MAX_PAYLOAD_BYTES, decompress, read_raw
from cnnlab.data.registry import DataFile, DatasetSpec
from cnnlab.errors import UserError
from cnnlab.files import current_umask, kind_of, open_regular, read_chunks, reason
from cnnlab.text import command

SYSTEM_ROOT = Path("/usr/share/datasets")
DOWNLOAD_TIMEOUT_S = 30.0  # per connection attempt and per read; a dead mirror must not hang a run
CHUNK_BYTES = 1 << 16
# A mirror that sends more than this (or announces it) is cut off: CIFAR-10's archive, the largest
# download, is 170 MB; an IDX file is refused above MAX_PAYLOAD_BYTES anyway.
MAX_DOWNLOAD_BYTES = MAX_PAYLOAD_BYTES
# A mirror that sends less than LOW_SPEED_BYTES_PER_S on average over any LOW_SPEED_WINDOW_S is cut off
# (curl's --speed-limit and --speed-time): a server trickling a byte every few seconds never trips the
# per-read timeout, and would otherwise hold a run for ever.
LOW_SPEED_BYTES_PER_S = 1024
LOW_SPEED_WINDOW_S = 60.0


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
    passed_over: tuple[str, ...] = ()  # one line per copy looked at before this one and not used: where, why

    def path(self, file: DataFile) -> Path:
        return self.directory / file.name


@dataclass(frozen=True)
class FileCheck:
    """The result of checking one file against the registry."""

    name: str
    path: Path
    sha256: str  # of the decompressed payload; of the file as downloaded for an archive; "" when unreadable
    ok: bool
    expected: str | None
    problem: str | None = None  # why the file could not be read (corrupt, truncated, not a regular file)


def cache_root() -> Path:
    """cnnlab's user cache folder ($XDG_CACHE_HOME/cnnlab, default ~/.cache/cnnlab)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnlab"


def package_dir(spec: DatasetSpec) -> Path:
    return Path(str(resources.files("cnnlab.data") / "samples" / spec.name))


def search_places(spec: DatasetSpec, data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The folders looked in, in order, each with the name of the rule that put it there.

    A --data-dir (or $CNNLAB_DATA) that exists but is not a folder is an error, not a place with nothing in it.
    """
    if spec.packaged:
        return [("package", package_dir(spec))]
    places = []
    if data_dir is not None:
        places.append(("data-dir", checked_base(Path(data_dir), "--data-dir", spec) / spec.name))
    elif os.environ.get("CNNLAB_DATA"):
        places.append(("CNNLAB_DATA", checked_base(Path(os.environ["CNNLAB_DATA"]), "CNNLAB_DATA=", spec) / spec.name))
    places.append(("cache", cache_root() / spec.name))
    places.append(("system", SYSTEM_ROOT / spec.name))
    return places


def checked_base(base: Path, given: str, spec: DatasetSpec) -> Path:
    """`base` unless it exists and is not a folder (a file, a FIFO): then DatasetUnavailable, one line."""
    try:
        mode = os.stat(base).st_mode
    except OSError:
        return base  # missing (or unreadable): reported with the other places when nothing is found
    if not stat.S_ISDIR(mode):
        sep = "" if given.endswith("=") else " "
        raise DatasetUnavailable(f"{given}{sep}{base}: {kind_of(mode) if not stat.S_ISREG(mode) else 'a file'}, "
                                 f"not a directory; expected the folder that holds {spec.name}/")
    return base


def file_state(path: Path) -> str | None:
    """None for a regular file (links followed), else what is there: 'missing', 'a FIFO (named pipe)', ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({reason(exc)})"
    return None if stat.S_ISREG(mode) else kind_of(mode)


def missing_files(spec: DatasetSpec, directory: Path) -> list[str]:
    """The dataset's file names that are not regular files in `directory`."""
    return [f.name for f in spec.all_files() if file_state(directory / f.name) is not None]


def candidates(spec: DatasetSpec, data_dir: str | Path | None = None) -> list[Location]:
    """Every folder, in lookup order, holding a regular file under each of the dataset's names (not verified)."""
    return [Location(spec, directory, origin) for origin, directory in search_places(spec, data_dir)
            if not missing_files(spec, directory)]


def passed_over_line(location: Location, problem: str) -> str:
    """'skipped the cache copy DIR: FILE: why': one line for a copy that was looked at and not used."""
    return f"skipped the {location.origin} copy {location.directory}: {one_line(problem)}"


def one_line(text: str) -> str:
    return " ".join(text.split())


def copy_problem(location: Location, allow_mismatch: bool = False) -> str | None:
    """Why a copy cannot be used, as 'FILE: reason' for its first failing file; None when every file verifies
    (or, with allow_mismatch, reads: a checksum that differs is then the user's choice, recorded elsewhere)."""
    for file in location.spec.all_files():
        check = check_file(location.path(file), file)
        if check.problem is not None:
            return f"{file.name}: {check.problem}"
        if not check.ok and not allow_mismatch:
            return (f"{file.name}: checksum mismatch (SHA-256 {check.sha256}, the registry expects {check.expected}); "
                    "pass --allow-checksum-mismatch to use this copy anyway")
    return None


def find(spec: DatasetSpec, data_dir: str | Path | None = None,
         allow_mismatch: bool = False) -> tuple[Location | None, list[str]]:
    """The first copy that verifies (its `passed_over` says what came before), and one line per copy passed over."""
    passed: list[str] = []
    for location in candidates(spec, data_dir):
        problem = copy_problem(location, allow_mismatch)
        if problem is None:
            return replace(location, passed_over=tuple(passed)), passed
        passed.append(passed_over_line(location, problem))
    return None, passed


def locate(spec: DatasetSpec, data_dir: str | Path | None = None, allow_mismatch: bool = False) -> Location | None:
    """The first folder whose files are all present and verify, or None (nothing is downloaded).

    Every file is hashed: a copy with a truncated, corrupt or changed file is passed over for the next one.
    """
    return find(spec, data_dir, allow_mismatch)[0]


def digest_matches(file: DataFile, raw: bytes, payload: bytes) -> tuple[bool, str, str | None]:
    """(ok, payload sha256, expected digest): payload digest if the registry has one, else the raw .gz's."""
    return verdict(file, hashlib.sha256(payload).hexdigest(), lambda: raw)


def verdict(file: DataFile, payload_sha: str, raw: Callable[[], bytes]) -> tuple[bool, str, str | None]:
    """digest_matches for a payload whose SHA-256 is known: `raw` gives the file as stored, asked for only when
    the registry knows the digest of the .gz alone (a decoded-cache hit then reads the small .gz, not gunzip)."""
    if file.sha256 is not None:
        return payload_sha == file.sha256, payload_sha, file.sha256
    if file.gz_sha256 is not None:
        return hashlib.sha256(raw()).hexdigest() == file.gz_sha256, payload_sha, f"{file.gz_sha256} (of the .gz)"
    return True, payload_sha, None


def archive_digest_matches(file: DataFile, path: Path) -> tuple[bool, str, str | None]:
    """(ok, sha256 of the file as downloaded, expected digest) for an archive, hashed in chunks."""
    digest = hashlib.sha256()
    with open_regular(path, MAX_ARCHIVE_BYTES, "dataset archive") as handle:
        for chunk in read_chunks(handle, MAX_ARCHIVE_BYTES, path, "dataset archive"):
            digest.update(chunk)
    sha = digest.hexdigest()
    if file.gz_sha256 is None:
        return True, sha, None
    return sha == file.gz_sha256, sha, f"{file.gz_sha256} (of the download)"


def expected_digest(file: DataFile) -> str | None:
    if file.sha256 is not None:
        return file.sha256
    if file.gz_sha256 is not None:
        return f"{file.gz_sha256} ({'of the download' if file.archive else 'of the .gz'})"
    return None


def check_file(path: Path, file: DataFile) -> FileCheck:
    """Hash one file (an IDX file's payload, an archive as downloaded) and compare it with the registry.

    A file that cannot be read (not a regular file, too large, a corrupt or truncated gzip stream) gives a
    FileCheck with ok False and the reason in `problem` (the path left out: the check names the file).
    """
    try:
        if file.archive:
            ok, sha, expected = archive_digest_matches(file, path)
        else:
            raw = read_raw(path)
            ok, sha, expected = digest_matches(file, raw, decompress(raw, str(path)))
    except UserError as exc:
        return FileCheck(file.name, path, "", False, expected_digest(file), str(exc).removeprefix(f"{path}: "))
    return FileCheck(file.name, path, sha, ok, expected)


def verify(location: Location) -> list[FileCheck]:
    """Check every file of a located dataset."""
    return [check_file(location.path(f), f) for f in location.spec.all_files()]


def notify(line: str) -> None:
    """Tell the user something worth knowing that is not an error (a copy passed over), one line on stderr."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


def how_to_get(spec: DatasetSpec) -> str:
    hints = [f"put the files in DIR/{spec.name}/ and pass --data-dir DIR (or set CNNLAB_DATA=DIR)"]
    if spec.apt_package:
        hints.insert(0, f"on Debian/Ubuntu: apt-get install {spec.apt_package}")
    if spec.mirrors:
        hints.append(f"or run `{command('datasets', 'fetch', spec.name)}` when online")
    return "; ".join(hints)


def fetch(spec: DatasetSpec, data_dir: str | Path | None = None, mirrors: tuple[str, ...] | None = None,
          progress: bool = True, timeout: float = DOWNLOAD_TIMEOUT_S, allow_mismatch: bool = False) -> Location:
    """The first copy of a dataset that verifies; else its files downloaded (again) into the cache.

    A valid copy opens no socket. The copies passed over are in the result's `passed_over` (and, when no
    copy is found and nothing can be downloaded, in the error).
    """
    found, passed = find(spec, data_dir, allow_mismatch)
    if found is not None:
        return found
    return download_missing(spec, data_dir, mirrors, progress, timeout, passed)


def download_missing(spec: DatasetSpec, data_dir: str | Path | None, mirrors: tuple[str, ...] | None,
                     progress: bool, timeout: float, passed: list[str]) -> Location:
    """Download into the cache every file of the dataset that is not there already as a verified file."""
    mirrors = spec.mirrors if mirrors is None else mirrors
    if not mirrors:
        raise unavailable(spec, data_dir, passed=passed)
    target = cache_root() / spec.name
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unavailable(spec, data_dir, f"cannot create the cache folder {target}: {reason(exc)}", passed) from None
    for file in spec.all_files():
        if file_state(target / file.name) is None:
            check = check_file(target / file.name, file)
            if check.ok:
                continue  # a cached file that does not verify is downloaded again, and replaced once verified
        failures = download_file(file, mirrors, target, progress, timeout)
        if failures:
            tried = "Tried:\n" + "\n".join(f"  {url}: {why}" for url, why in failures)
            raise unavailable(spec, data_dir, f"{file.name} could not be downloaded. {tried}", passed)
    return Location(spec, target, "download", tuple(passed))


def unavailable(spec: DatasetSpec, data_dir: str | Path | None, detail: str = "",
                passed: list[str] | tuple[str, ...] = ()) -> DatasetUnavailable:
    """The error for a dataset that is nowhere usable: every place looked in, each copy passed over and why, and
    how to get it."""
    looked = "\n".join(f"  {origin}: {directory} ({place_state(spec, directory)})"
                        for origin, directory in search_places(spec, data_dir))
    skipped = "".join(f"\n{line}" for line in passed)
    detail = f"\n{detail}" if detail else ""
    if data_dir is not None and not missing_files(spec, Path(data_dir)):
        detail += (f"\nThe files are directly in {data_dir}: --data-dir takes the folder that holds "
                   f"{spec.name}/, here {Path(data_dir).parent}")
    what = "no copy of dataset {!r} could be used" if passed else "dataset {!r} not found"
    return DatasetUnavailable(f"{what.format(spec.name)}. Looked in:\n{looked}{skipped}{detail}\n"
                              f"To get it: {how_to_get(spec)}")


def place_state(spec: DatasetSpec, directory: Path) -> str:
    """'missing a, b; c is a FIFO (named pipe)', 'no such folder' or 'all files present' for one place looked in."""
    if file_state(directory) == "missing":
        return "no such folder"
    states = {f.name: file_state(directory / f.name) for f in spec.all_files()}
    missing = [name for name, state in states.items() if state == "missing"]
    others = [f"{name} is {state}" for name, state in states.items() if state not in (None, "missing")]
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + others
    return "; ".join(parts) or "all files present"


def download_file(file: DataFile, mirrors: tuple[str, ...], target: Path, progress: bool,
                  timeout: float) -> list[tuple[str, str]]:
    """Try each mirror until one gives a verified file at target/name; return the failures if none did.

    The file is streamed into a temporary file in the same folder and renamed over the final name only
    once verified, so a crash or a bad mirror never leaves a partial or corrupt file in the cache.
    """
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + file.name
        tmp: Path | None = None
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=target)
            tmp = Path(tmp_name)
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
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is private; a dataset is not
            os.replace(tmp, target / file.name)
            return []
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            failures.append((url, describe(exc)))
        finally:
            if tmp is not None:
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
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        return reason(exc)
    return one_line(str(exc))


class SlowDownload(UserError, OSError):
    """A mirror that sends too slowly to finish in any useful time."""


class SpeedFloor:
    """Raises SlowDownload when fewer than LOW_SPEED_BYTES_PER_S arrived on average over a LOW_SPEED_WINDOW_S."""

    def __init__(self) -> None:
        self.window, self.floor = LOW_SPEED_WINDOW_S, LOW_SPEED_BYTES_PER_S  # read now: tests shorten the window
        self.started, self.received = time.monotonic(), 0

    def add(self, size: int) -> None:
        self.received += size
        elapsed = time.monotonic() - self.started
        if elapsed < self.window:
            return
        if self.received < self.floor * elapsed:
            raise SlowDownload(f"sent {self.received:,} bytes in {elapsed:.0f} s ({self.received / elapsed:,.0f} "
                               f"bytes/s), slower than the {self.floor:,} bytes/s a download must keep up; stopped")
        self.started, self.received = time.monotonic(), 0


def stream_url(url: str, out: IO[bytes], timeout: float, progress: bool, label: str) -> None:
    """Copy a URL's body into an open file, with a progress bar; HTML responses are refused early.

    Bounded in size (MAX_DOWNLOAD_BYTES), in the wait for each piece (`timeout`) and in speed (SpeedFloor):
    each read returns what one receive gave, so a server trickling bytes is measured, not waited for.
    """
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with urllib.request.urlopen(url, timeout=timeout) as response:
        if "text/html" in response.headers.get("Content-Type", ""):
            raise ChecksumMismatch("served an HTML page instead of the file")
        announced = (response.headers.get("Content-Length") or "").strip()
        if announced and not announced.isdigit():
            raise ChecksumMismatch(f"announced a Content-Length of {announced[:40]!r}, not a number of bytes")
        total = int(announced or 0) or None
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            raise ChecksumMismatch(f"announced {total:,} bytes; expected at most {MAX_DOWNLOAD_BYTES:,}")
        speed = SpeedFloor()
        with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task(f"downloading {label}", total=total)
            while chunk := response.read1(CHUNK_BYTES):
                out.write(chunk)
                if out.tell() > MAX_DOWNLOAD_BYTES:
                    raise ChecksumMismatch(f"sent more than {MAX_DOWNLOAD_BYTES:,} bytes; stopped there")
                speed.add(len(chunk))
                bar.update(task, advance=len(chunk))
        if total is not None and out.tell() != total:
            raise ChecksumMismatch(f"connection closed after {out.tell()} of {total} bytes")
