"""`--storage`: where a sweep's study lives, parsed once and the same way everywhere.

The rule: anything that starts like a URL (`scheme:` or `scheme://`) is a URL, never a path, so
`postgres://alice:s3cret@host/db` can never become a folder named after its password. Only the
schemes cnnlab can run a sweep on are accepted (PostgreSQL for workers on many machines; an SQLite
database file or a journal file on one), each checked for its driver before anything is opened; a
journal path that holds a ':' is written `./name:with:colons`. A URL's password (and its query, where
drivers take passwords too) is never printed: messages show `Storage.shown`, and drivers' own messages
pass through `scrub` first.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from cnnlab.sweep.spec import SweepError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")  # RFC 3986's scheme, then a colon
POSTGRES_DRIVERS = {"psycopg2": "psycopg2", "psycopg": "psycopg"}  # SQLAlchemy's driver name -> its module
POSTGRES_HINT = "pip install 'cnnlab[postgres]'"
EXPECTED = ("expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (workers on many machines), "
            "sqlite:///FILE.db, file:///PATH/TO/JOURNAL or a journal file path (one with ':' in it as ./NAME)")


@dataclass(frozen=True)
class Storage:
    """A parsed --storage: a journal file, an SQLite database file, or a PostgreSQL database."""

    kind: str  # "journal", "sqlite" or "postgresql"
    path: Path | None  # the journal or the SQLite database file; None for PostgreSQL
    url: str | None  # the SQLAlchemy URL, with its driver and password; None for a journal: never print it
    shown: str  # how messages name it: without the password or the query

    @property
    def is_rdb(self) -> bool:
        return self.kind != "journal"

    @property
    def lock_file(self) -> Path | None:
        """The file whose flock guards claiming trials (None: PostgreSQL uses an advisory lock)."""
        return None if self.path is None else self.path.with_name(f"{self.path.name}.claim-lock")


def parse_storage(text: str) -> Storage:
    """The storage `text` names; a SweepError (one line, no password) for one a sweep cannot use."""
    if not text or not text.strip():
        raise SweepError(f"--storage is empty; {EXPECTED}")
    if text != text.strip():  # ' postgres://u:pw@h/db' is a URL typed with a space, not a folder named after it
        raise SweepError(f"--storage {masked(text.strip())!r}: starts or ends with a space; {EXPECTED}")
    first = text.split("/")[0] if not text.startswith("//") else text[2:].split("/")[0]
    if "@" in first and ":" in first and SCHEME.match(text) is None or text.startswith("//"):
        # '//user:pw@host/db' is a URL without its scheme: never a folder, and never echoed (it may hold a password)
        raise SweepError(f"--storage: looks like a database URL without its scheme (not shown: it may hold a "
                         f"password); {EXPECTED}")
    if re.search(r"://[^/]*@[^/]*@", text):  # a driver would take what follows the first '@' for a host, and say so
        raise SweepError(f"--storage {masked(text)}: its password holds an '@': write it %40; {EXPECTED}")
    match = SCHEME.match(text)
    if match is None:
        return Storage("journal", Path(text), None, text)
    scheme = match.group(1).lower()
    base, _, driver = scheme.partition("+")
    shown = masked(text)
    if base in ("postgresql", "postgres"):
        return postgresql(text, driver, shown)
    if base == "sqlite":
        return sqlite(text, driver, shown)
    if base == "file":
        return journal_url(text, shown)
    if base in ("mysql", "mariadb"):
        raise SweepError(f"--storage {shown}: MySQL is not supported: workers claim trials under a lock cnnlab "
                         "takes in PostgreSQL (an advisory lock) or in a local file, not in MySQL; use "
                         "postgresql://... for workers on many machines, or sqlite:///FILE.db on one")
    raise SweepError(f"--storage {shown}: unknown storage scheme {base + ':'!r}; {EXPECTED}")


def postgresql(text: str, driver: str, shown: str) -> Storage:
    url = sqlalchemy_url(text, shown)
    if driver and driver not in POSTGRES_DRIVERS:
        raise SweepError(f"--storage {shown}: unknown PostgreSQL driver {driver!r}; expected postgresql:// "
                         f"(psycopg2, {POSTGRES_HINT}) or postgresql+psycopg://")
    installed = [d for d in ([driver] if driver else list(POSTGRES_DRIVERS)) if has_module(POSTGRES_DRIVERS[d])]
    if not installed:
        raise SweepError(f"--storage {shown}: its database driver ({driver or 'psycopg2'}) is not installed: "
                         f"{POSTGRES_HINT}")
    # `postgres://` is what Heroku and many tutorials write; SQLAlchemy only reads `postgresql://`. Its default
    # driver is psycopg 3 from 2.1 on, while cnnlab[postgres] installs psycopg2: name the installed one.
    return Storage("postgresql", None, url.set(drivername=f"postgresql+{installed[0]}").render_as_string(
        hide_password=False), shown)


def sqlite(text: str, driver: str, shown: str) -> Storage:
    if driver:
        raise SweepError(f"--storage {shown}: expected sqlite:///FILE.db without a driver")
    url = sqlalchemy_url(text, shown)
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise SweepError(f"--storage {shown}: an in-memory SQLite study lives only as long as one connection: each "
                         "worker, and `sweep status` or `best` afterwards, would find its own empty study; give a "
                         "database file, sqlite:///FILE.db")
    return Storage("sqlite", Path(database), url.render_as_string(hide_password=False), shown)


def journal_url(text: str, shown: str) -> Storage:
    """file:///path/to/journal (or file:relative): the journal file at that path."""
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise SweepError(f"--storage {shown}: expected file:///PATH/TO/JOURNAL (a file on this machine, no host, "
                         "query or fragment)")
    path = unquote(parts.path)
    if not path:
        raise SweepError(f"--storage {shown}: the file URL names no file; expected file:///PATH/TO/JOURNAL")
    return Storage("journal", Path(path), None, path)


def sqlalchemy_url(text: str, shown: str) -> URL:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError):  # its message quotes the whole URL, password included: not shown
        raise SweepError(f"--storage {shown}: not a database URL SQLAlchemy can read; {EXPECTED}") from None
    if url.drivername.startswith("postgres") and not url.drivername.startswith("postgresql"):
        url = url.set(drivername="postgresql" + url.drivername.removeprefix("postgres"))
    return url


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def masked(text: str) -> str:
    """A URL as it may be printed: its password replaced by ***, its query (drivers take passwords there too)
    by ?..., its fragment dropped."""
    match = SCHEME.match(text)
    if match is None:
        return text
    rest = text[match.end():]
    if not rest.startswith("//"):  # scheme:path: a file's path is shown; anything else may hold a secret anywhere
        if match.group(1).lower() == "file":
            return text.split("?", 1)[0].split("#", 1)[0] + ("?..." if "?" in text else "")
        return f"{match.group(0)}..."
    authority, tail = split_authority(rest[2:])
    userinfo, at, host = authority.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    authority = f"{user}:***@{host}" if colon else f"{userinfo}{at}{host}"
    path, question, _ = tail.split("#", 1)[0].partition("?")
    return f"{match.group(0)}//{authority}{path}{'?...' if question else ''}"


def shown_storage(text: str) -> str:
    """--storage as messages show it: a URL without its password or query; a path as it is."""
    return masked(text)


def split_authority(rest: str) -> tuple[str, str]:
    """(user:password@host:port, /path?query) of what follows `//`; the password may hold '/' or '?'."""
    at = rest.rfind("@")
    cut = next((i for i, c in enumerate(rest) if c in "/?#" and i > at), len(rest))
    return rest[:cut], rest[cut:]


def scrub(message: str, text: str) -> str:
    """A driver's message with the URL's password (raw and %-encoded) and the URL itself replaced."""
    message = message.replace(text, masked(text))
    match = SCHEME.match(text)
    if match is None or "@" not in text:
        return message
    authority, _ = split_authority(text[match.end():].removeprefix("//"))
    userinfo = authority.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    for secret in {password, unquote(password), quote(unquote(password), safe="")} - {""}:
        message = message.replace(secret, "***")
    return message
