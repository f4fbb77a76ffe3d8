"""What stands between a caller and the demo's handlers: the host a request names, the size and the end
of its body, and every error as one line of JSON in words.

The server trusts no caller: a web page elsewhere can make a browser send requests to 127.0.0.1 under a
name its own DNS points there (DNS rebinding), so a request must name, in its Host header, one of the
hosts the server was started for (`served_hosts`), or it gets 421 before any handler runs.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # what a browser on this machine calls it
WILDCARDS = ("", "0.0.0.0", "::")  # bound to every address: no one name to add
BODY_TAIL_BYTES = 512  # the end of a body kept to check a multipart body's closing boundary (plus an epilogue)
PAGES = "/ (the demo), GET /api/model and POST /api/predict"
PYTHON_TYPES = {"str": "text", "bytes": "bytes", "int": "a whole number", "float": "a number", "bool": "true or false",
                "NoneType": "nothing", "dict": "an object", "list": "a list"}


# ------------------------------------------------------------------------------------------ hosts
def normal_host(name: str) -> str:
    """A host name as compared: lower case, no trailing dot, an IPv6 address without brackets."""
    return name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def served_hosts(bound: str = "127.0.0.1", extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The hosts requests may name: the loopback names, the bound host unless it is a wildcard, and `extra`."""
    names = [*LOOPBACK_NAMES, *([] if normal_host(bound) in WILDCARDS else [bound]), *extra]
    return tuple(dict.fromkeys(normal_host(n) for n in names if normal_host(n)))


def host_of(header: str) -> str | None:
    """The host of a Host header (`name`, `name:port`, `[v6]:port`), normalised; None when it is malformed."""
    text = header.strip()
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return None
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return None
        return normal_host(address)
    name, colon, port = text.partition(":")
    if (colon and not re.fullmatch(r"\d{1,5}", port)) or not re.fullmatch(r"[A-Za-z0-9._-]+", name or "-"):
        return None
    return normal_host(name) or None


class HostCheck:
    """ASGI middleware: 421 for a request whose Host is not one of `allowed`, 400 for none or a malformed one."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app, self.allowed = app, tuple(normal_host(a) for a in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host")
        host = host_of(header.decode("latin-1")) if header is not None else None
        if host in self.allowed:
            return await self.app(scope, receive, send)
        if header is None or host is None:
            status, message = 400, ("the request has no Host header" if header is None else
                                    f"the Host header {header.decode('latin-1')[:80]!r} is not a host name")
            message += f"; expected one of: {', '.join(self.allowed)}"
        else:
            status, message = 421, (f"this server does not answer to host {host[:80]!r}; it serves "
                                    f"{', '.join(self.allowed)} (start it with --allowed-host {host[:80]} to add "
                                    "this name)")
        await JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})(
            scope, receive, send)


# ------------------------------------------------------------------------------------------ bodies
class BodyTooLarge(HTTPException):
    """Raised while the body streams in, once it passes the limit (the client may send no Content-Length)."""

    def __init__(self, limit: int):
        super().__init__(413, f"upload too large: the limit is {limit / 1024 / 1024:g} MB")


@dataclass
class BodySeen:
    """What UploadLimit saw of a request's body: its size and its last BODY_TAIL_BYTES."""

    size: int = 0
    tail: bytes = b""

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.tail = (self.tail + chunk[-BODY_TAIL_BYTES:])[-BODY_TAIL_BYTES:]


BODY_SEEN = "cnnlab.body"  # the scope key of a request's BodySeen


class UploadLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, by Content-Length or while it streams.

    The rest of an over-limit body is read and dropped (up to `drain` bytes) before answering: a client still
    sending when the server closes gets a reset connection instead of the 413 and its message. What streams
    through is noted in the scope (BODY_SEEN), so a handler can tell a multipart body cut short.
    """

    def __init__(self, app: ASGIApp, limit: int, drain: int | None = None):
        self.app, self.limit = app, limit
        self.drain = 4 * limit if drain is None else drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            drained = int(declared) <= self.drain and await self.discard_rest(receive, 0)
            response = JSONResponse({"error": BodyTooLarge(self.limit).detail}, status_code=413,
                                    headers=None if drained else {"Connection": "close"})
            return await response(scope, receive, send)
        seen = scope[BODY_SEEN] = BodySeen()

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen.add(message.get("body", b""))
                if seen.size > self.limit:
                    if message.get("more_body", False):
                        await self.discard_rest(receive, seen.size)
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)

    async def discard_rest(self, receive: Receive, already: int) -> bool:
        """Read the body to its end and drop it; False when it runs past `drain` bytes (then the connection closes)."""
        while already <= self.drain:
            message = await receive()
            if message["type"] != "http.request":
                return False
            already += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False


# ------------------------------------------------------------------------------------------ errors
def in_words(message: str) -> str:
    """A message as a person reads it: Python's `<class 'str'>` becomes `text`, and so on."""
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", lambda m: PYTHON_TYPES.get(m.group(1), m.group(1)), message)


def error(message: object, status: int, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": in_words(str(message))}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI, log: logging.Logger) -> None:
    """Every error is JSON {"error": "one line in words"}: no stack traces, no framework internals."""
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException is one too
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = request.url.path[:80]
        if exc.status_code == 404 and exc.detail == "Not Found":  # the router's or the static files' own
            return error(f"nothing at {where!r}; this server has {PAGES}", 404)
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return error(f"{request.method} is not accepted at {where!r}; use {allowed or 'another method'} "
                         f"(this server has {PAGES})", 405, exc.headers)
        return error(exc.detail, exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{' '.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return error(f"the request does not fit {request.url.path[:80]!r}: {'; '.join(problems)}", 400)

    @app.exception_handler(ClientDisconnect)  # here, not under Exception, whose handler uvicorn logs as a crash
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        log.info("%s: the client went away before its request was complete", request.url.path[:80])
        return error("the request ended before its body was complete", 400)  # nobody is left to read it

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)  # the trace goes to the server log only
        return error("internal error: see the server log", 500)
