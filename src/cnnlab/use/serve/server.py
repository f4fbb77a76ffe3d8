"""The server `cnnlab serve` runs: uvicorn with a deadline for receiving each request and a limit on open
connections (the app itself is `app.create_app`)."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

# Slow or idle clients: uvicorn has no deadline for receiving a request (its keep-alive timeout restarts with
# every byte), so a client trickling a byte at a time could hold a connection for ever, and a few hundred such
# clients every connection there is (Slowloris). A request must arrive whole, headers and body, within
# REQUEST_SECONDS of its connection opening (or of the previous answer on a kept-alive connection); at most
# MAX_CONNECTIONS are open at once (far below the process's file limit), and one more gets 503 at once.
REQUEST_SECONDS = 30.0  # a 5 MB upload at 200 kB/s fits
MAX_CONNECTIONS = 512
KEEP_ALIVE_SECONDS = 5  # uvicorn's own default: idle kept-alive connections close after this


def request_deadline_protocol(seconds: float = REQUEST_SECONDS) -> type:
    """uvicorn's h11 HTTP protocol with a deadline for receiving each request, headers and body."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RequestDeadline(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn narrows it to Transport
            self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm()  # the next request on this kept-alive connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(seconds, self.expire)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def expire(self) -> None:
            # a request received whole and being answered is not the client's to hurry
            answering = self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete
            if not answering and not self.transport.is_closing():
                self.transport.close()

    return RequestDeadline


def server_config(application: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                  request_seconds: float = REQUEST_SECONDS, max_connections: int = MAX_CONNECTIONS,
                  **options: Any) -> Any:
    """The uvicorn configuration `cnnlab serve` runs: the request deadline and the connection limit above."""
    import uvicorn

    return uvicorn.Config(application, host=host, port=port, log_level="warning",
                          http=request_deadline_protocol(request_seconds), limit_concurrency=max_connections,
                          timeout_keep_alive=KEEP_ALIVE_SECONDS, **options)
