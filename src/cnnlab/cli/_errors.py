"""Turn cnnlab's own errors into one clear line on stderr and a non-zero exit, not a traceback."""
from __future__ import annotations

import functools
import sys

import typer

from cnnlab.config import ConfigError
from cnnlab.data import ChecksumMismatch, DataError, DatasetUnavailable, IDXError, UnknownDataset
from cnnlab.runs import RunError
from cnnlab.trainer import TrainingDiverged

USER_ERRORS = (ConfigError, UnknownDataset, DatasetUnavailable, ChecksumMismatch, IDXError, DataError, RunError,
               TrainingDiverged, FileNotFoundError, IsADirectoryError, PermissionError)


def fail(message: str, code: int = 2) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def friendly_errors(command):
    """Decorator for commands: known errors print 'error: ...' and exit with status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise fail(str(exc)) from None

    return wrapper
