"""Turn cnnlab's own errors into one clear line on stderr and a non-zero exit, not a traceback.

Every error a user can fix subclasses `cnnlab.errors.UserError`, so nothing here imports the library
(or torch) just to know what to catch.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from cnnlab.errors import UserError
from cnnlab.files import reason

F = TypeVar("F", bound=Callable[..., Any])
OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print 'error: message' and return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def friendly_errors(command: F) -> F:
    """Decorator for commands: a UserError, or a file the system refuses, prints 'error: ...', exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise fail(str(exc)) from None
        except OS_ERRORS as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}") from None
        except OSError as exc:  # a named file the system would not write or read (a full disk, an I/O error)
            if not exc.filename:
                raise
            raise fail(f"{exc.filename}: {reason(exc)}") from None

    return wrapper  # type: ignore[return-value]
