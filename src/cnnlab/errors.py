"""The one base class of the errors a user can fix: bad input, a missing file, a run in the wrong state.

Every such error in cnnlab subclasses `UserError` (and, where callers expect it, ValueError or
RuntimeError as well), and its message is one line that names the file, key or field and says what
was expected. The command line prints it as `error: ...` with exit status 2, never a traceback;
anything else reaching the top is a bug.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or a state the user can fix; `str(error)` is one line naming what is wrong."""


def interrupted(error: BaseException | None) -> bool:
    """Whether a Ctrl-C (KeyboardInterrupt) lies in `error` or the errors it was raised from or during.

    Some libraries catch the KeyboardInterrupt they meet and raise an error of their own in its place (torch's
    ONNX exporter: "Failed to export the model with torch.export"), which an `except Exception` that falls
    back to something else would take for an ordinary failure and carry on. Such handlers ask this first and
    raise KeyboardInterrupt again: Ctrl-C stops the command, whoever saw it first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
