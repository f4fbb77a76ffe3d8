"""Turn cnnlab's own errors into one clear line on stderr and a non-zero exit, not a traceback."""
from __future__ import annotations

import functools
import sys

import typer

from cnnlab.config import ConfigError
from cnnlab.data import ChecksumMismatch, CifarError, DataError, DatasetUnavailable, IDXError, UnknownDataset
from cnnlab.data.folder import FolderError
from cnnlab.runs import RunError
from cnnlab.training.engine import TrainingDiverged

USER_ERRORS = (ConfigError, UnknownDataset, DatasetUnavailable, ChecksumMismatch, IDXError, CifarError, DataError,
               FolderError, RunError, TrainingDiverged, FileNotFoundError, IsADirectoryError, PermissionError)


def fail(message: str, code: int = 2) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def friendly_errors(command=None, *, also: tuple[type[Exception], ...] = ()):
    """Decorator for commands: cnnlab's known errors, and those in `also`, print 'error: ...' and exit
    with status 2. Use as @friendly_errors or @friendly_errors(also=(SomeError,))."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except (*USER_ERRORS, *also) as exc:
                raise fail(str(exc)) from None

        return wrapper

    return decorate(command) if command is not None else decorate
