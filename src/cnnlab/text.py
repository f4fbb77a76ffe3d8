"""Text other programs read: strict JSON, valid UTF-8, and commands a user can paste into a shell.

- JSON: `to_json` is the one way cnnlab writes JSON (files, `--json` output, the explorer page). NaN and
  infinities, which Python writes as bare `NaN` and strict readers refuse, become `null`: a value that is
  missing (an epoch that was not validated), as cnnlab's own readers take it back.
- UTF-8: a name that came from the system (a file name, argv) as bytes that are not valid UTF-8 in the
  current locale holds lone surrogates (Python's surrogateescape), which no UTF-8 writer can encode. Under
  the C locale even valid UTF-8 (`ñ`) arrives so. `real_text` decodes those bytes as UTF-8 and writes what
  is not UTF-8 as `\\xNN`; `utf8_text` says whether a name is UTF-8 at all.
- Printing: the script's stdout and stderr write any text (`OUTPUT_ERRORS`): Python's own handlers stop with
  a UnicodeEncodeError on a file name that is no UTF-8, or on `ñ` under the C locale.
- Commands: `command("evaluate", run)` is `cnnlab evaluate <run>` quoted for a POSIX shell, so a run named
  `my run` or `it's` pastes as one argument.
"""
from __future__ import annotations

import codecs
import json
import math
import shlex
from pathlib import PurePath
from typing import Any

SURROGATES = range(0xDC80, 0xDD00)  # what surrogateescape makes of the bytes 0x80-0xFF it could not decode


def has_escaped_bytes(text: str) -> bool:
    return any(ord(c) in SURROGATES for c in text)


def real_text(text: str) -> str:
    """`text` with its escaped bytes decoded as UTF-8; bytes that are no UTF-8 are written `\\xNN`."""
    if not has_escaped_bytes(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_text(text: str) -> str | None:
    """The text a system-given name means in UTF-8 (whatever the locale), or None when its bytes are not UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:  # a surrogate that did not come from escaping, or bytes that are not UTF-8
        return None


def plain(value: Any) -> Any:
    """`value` with non-finite floats as None and every string as valid UTF-8 (for `json.dumps`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return real_text(value)
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def to_json(data: Any, **options: Any) -> str:
    """Strict JSON text (RFC 8259): NaN and infinities as null, names that are no UTF-8 with `\\xNN` escapes.
    `options` go to json.dumps (indent, separators, sort_keys)."""
    return json.dumps(plain(data), allow_nan=False, **options)


def from_null(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as read back: a null number (non-finite when written) is NaN again, i.e. missing."""
    return {key: math.nan if value is None else value for key, value in row.items()}


def command(*words: str | int | float | PurePath) -> str:
    """`cnnlab <words>` quoted for a POSIX shell, to print for a user to copy (a name's escaped bytes are
    printed as the bytes they were, by OUTPUT_ERRORS, so the command names the same file)."""
    return shlex.join(["cnnlab", *(str(word) for word in words)])


OUTPUT_ERRORS = "cnnlab-bytes"  # the errors handler of the script's stdout and stderr


def _as_bytes(error: UnicodeError) -> tuple[bytes, int]:
    """What the terminal's encoding cannot write: escaped bytes as the bytes they were (the file's own name),
    other text as UTF-8 (an ASCII locale's terminal shows it as most programs write it)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    piece = error.object[error.start:error.end]
    return piece.encode("utf-8", "surrogateescape"), error.end


codecs.register_error(OUTPUT_ERRORS, _as_bytes)
