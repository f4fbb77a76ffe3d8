"""The one base class of the errors a user can fix: bad input, a missing file, a run in the wrong state.

Every such error in cnnlab subclasses `UserError` (and, where callers expect it, ValueError or
RuntimeError as well), and its message is one line that names the file, key or field and says what
was expected. The command line prints it as `error: ...` with exit status 2, never a traceback;
anything else reaching the top is a bug.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or a state the user can fix; `str(error)` is one line naming what is wrong."""
