"""How cnnlab reads and writes files: one policy for every command (no torch).

Reading: only regular files (a FIFO, a device or a socket, or a link to one, is refused before it
is opened for reading, so nothing blocks or reads forever), never more than a stated number of bytes.

Writing: to a temporary file in the target's folder, flushed to disk, then renamed over the target,
so a reader sees the old file or the new one, never half of one. An existing target must be a
regular file: `--out /dev/null` or a FIFO is refused rather than replaced. A symbolic link is
followed: the file it names is replaced and the link kept (as shell redirection and `cp` do); a
link to anything but a regular file (or to nowhere in a missing folder) is refused.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cnnlab.errors import UserError
from cnnlab.text import to_json

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class FileRefused(UserError, ValueError):
    """A file cnnlab will not read or write: missing, not a regular file, too large, or not text."""


class MissingFile(FileRefused):
    """The file does not exist."""


def kind_of(mode: int) -> str:
    """'a FIFO', 'a directory', ... for a file mode that is not a regular file's."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def reason(exc: OSError) -> str:
    """'No space left on device (ENOSPC)': the system's words and the error's name."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


# ------------------------------------------------------------------------------------ reading
def check_regular(path: str | Path, what: str = "file") -> Path:
    """`path` if it names a regular file (links followed), else FileRefused saying what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingFile(f"{path}: no such {what}") from None
    except OSError as exc:
        raise FileRefused(f"{path}: cannot read this {what}: {reason(exc)}") from None
    if not stat.S_ISREG(mode):
        raise FileRefused(f"{path}: {kind_of(mode)}, not a regular file")
    return path


READ_CHUNK_BYTES = 1 << 20


def open_regular(path: str | Path, limit: int, what: str = "file") -> BinaryIO:
    """A regular file of at most `limit` bytes, opened for reading; FileRefused (MissingFile) otherwise.

    Opened without blocking and checked again on the open descriptor: a FIFO swapped in after the
    first check cannot make the read hang.
    """
    path = check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MissingFile(f"{path}: no such {what}") from None
    except OSError as exc:
        raise FileRefused(f"{path}: cannot read this {what}: {reason(exc)}") from None
    handle = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        handle.close()
        raise FileRefused(f"{path}: {kind_of(info.st_mode)}, not a regular file")
    if info.st_size > limit:
        handle.close()
        raise FileRefused(f"{path}: {info.st_size:,} bytes is more than a {what} may hold ({limit:,})")
    return handle


def read_chunks(handle: BinaryIO, limit: int, path: str | Path, what: str = "file") -> Iterator[bytes]:
    """An open file's bytes in pieces of at most READ_CHUNK_BYTES; FileRefused past `limit` (it grew)."""
    given = 0
    while chunk := handle.read(READ_CHUNK_BYTES):
        given += len(chunk)
        if given > limit:
            raise FileRefused(f"{path}: more than the {limit:,} bytes a {what} may hold")
        yield chunk


def read_bytes(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The contents of a regular file of at most `limit` bytes; FileRefused (MissingFile) otherwise.

    Memory follows the file's size, not the limit: the file is asked for its size plus one byte (to
    see it grow while read), and only a growing file is read further, still bounded.
    """
    with open_regular(path, limit, what) as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            data = handle.read(size + 1)
            if len(data) > size:
                data += b"".join(read_chunks(handle, limit - len(data), path, what))
        except OSError as exc:
            raise FileRefused(f"{path}: cannot read this {what}: {reason(exc)}") from None
    if len(data) > limit:
        raise FileRefused(f"{path}: more than the {limit:,} bytes a {what} may hold")
    return data


def read_text(path: str | Path, limit: int, what: str = "file") -> str:
    """A regular UTF-8 text file of at most `limit` bytes."""
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRefused(f"{path}: not a UTF-8 text {what} (byte {exc.start} is {data[exc.start]:#04x})") from None


def read_json(path: str | Path, limit: int, what: str = "JSON file", expect: type = dict) -> Any:
    """A JSON value of type `expect` from a regular file; one-line FileRefused for anything else."""
    text = read_text(path, limit, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileRefused(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(value, expect):
        raise FileRefused(f"{path}: expected a JSON {json_kind(expect)}, found {json_kind(type(value))}")
    return value


def json_kind(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)


# ------------------------------------------------------------------------------------ writing
def output_target(path: str | Path) -> Path:
    """The file a write to `path` replaces: `path`, or the file a symbolic link at `path` names.

    FileRefused when that is anything but a regular file or nothing yet, or its folder is missing.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise FileRefused(f"{path}: cannot write here: {reason(exc)}") from None
    if mode is not None and not stat.S_ISREG(mode):
        via = f" (a link to {target})" if target != path else ""
        raise FileRefused(f"{path}{via}: {kind_of(mode)}; cnnlab only replaces regular files: give a file name")
    if not target.parent.is_dir():
        raise FileRefused(f"{path}: the folder {target.parent} does not exist")
    return target


def temp_prefix(target: Path) -> str:
    """The prefix of write_atomic's temporary files for `target` (a killed writer can leave one behind)."""
    return f".{target.name}."


def temp_pid(path: Path) -> int | None:
    """The id of the process that made one of write_atomic's temporary files (in its name), if it has one."""
    middle = path.name.split(".tmp")[0].rsplit(".", 2)
    return int(middle[-2]) if len(middle) == 3 and middle[-2].isdigit() else None


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def write_atomic(path: str | Path, write: Callable[[Path], object],
                 before_rename: Callable[[], object] | None = None) -> Path:
    """Call write(tmp), flush tmp to disk, run before_rename(), then rename tmp over the target.

    Returns the file written (a link's target). Nothing is left behind when `write` fails.
    """
    target = output_target(path)
    tmp: str | None = None
    try:
        # The name first, then the file, inside the `try` that removes it: a Ctrl-C or SIGTERM (a KeyboardInterrupt,
        # `cnnlab.cli`) the instant the file exists finds its name known (between mkstemp's return and a `try`
        # it left the file behind)
        for _ in range(100):
            # .<name>.<pid>.<random>.tmp<suffix>: the pid lets a later writer tell a dead writer's leftovers from a
            # live one's; the suffix keeps libraries that choose a format by extension (Pillow, ONNX) happy
            tmp = str(target.parent / f"{temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}.tmp{target.suffix}")
            try:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                break
            except FileExistsError:
                continue
            except OSError as exc:  # name the file the user asked for, not the hidden temporary one
                tmp = None
                raise type(exc)(exc.errno, exc.strerror, str(target)) from None
        else:  # a hundred names taken: never write into (or remove) another writer's file
            tmp = None
            raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(target))
        # The file is made private (0600); give it the mode a plain open() would: the old file's, or the umask's.
        # Set after `write`: a writer may replace the file it is handed (safetensors' save_file writes a new 0600
        # one).
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~current_umask()
        write(Path(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, target)
    except OSError as exc:  # a full disk while writing: name the file the user asked for (a handle's error names none)
        if exc.errno is None or exc.filename not in (None, tmp):
            raise
        raise type(exc)(exc.errno, exc.strerror, str(target)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target


def current_umask() -> int:
    """The process's file-creation mask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, to_json(data, indent=2) + "\n")


def remove_stale_temps(folder: Path, names: list[str], dead_only: bool = True) -> list[Path]:
    """Delete the temporary files a killed write_atomic left beside any of `names` in `folder`.

    `dead_only`: only those whose writer is no longer running (another process may be writing the same
    file right now); False when the caller holds a lock that excludes other writers.
    """
    stale = []
    for name in names:
        for file in folder.glob(f"{temp_prefix(Path(name))}*.tmp*"):
            pid = temp_pid(file)
            if file.is_file() and not (dead_only and pid is not None and process_alive(pid)):
                file.unlink(missing_ok=True)
                stale.append(file)
    return stale
