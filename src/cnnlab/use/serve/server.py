"""The server `cnnlab serve` runs: uvicorn with a deadline for receiving each request and a limit on open
connections (the app itself is `app.create_app`), in one process or in several worker processes sharing one
listening socket."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from cnnlab.errors import UserError
from cnnlab.use.serve.batching import BatchSettings
from cnnlab.use.serve.guards import LOOPBACK_NAMES

# Slow or idle clients: uvicorn has no deadline for receiving a request (its keep-alive timeout restarts with
# every byte), so a client trickling a byte at a time could hold a connection for ever, and a few hundred such
# clients every connection there is (Slowloris). A request must arrive whole, headers and body, within
# REQUEST_SECONDS of its connection opening (or of the previous answer on a kept-alive connection); at most
# MAX_CONNECTIONS are open at once (far below the process's file limit), and one more gets 503 at once.
REQUEST_SECONDS = 30.0  # a 5 MB upload at 200 kB/s fits
MAX_CONNECTIONS = 512
KEEP_ALIVE_SECONDS = 5  # uvicorn's own default: idle kept-alive connections close after this
BACKLOG = 2048  # connections the kernel queues before the server accepts them (uvicorn's default; capped by somaxconn)
MAX_WORKERS = 8  # each worker holds its own torch and models (~300 MB); more rarely pays on one machine
STOP_SECONDS = 15.0  # how long stopping workers may take to finish the requests they hold, before they are killed


def http_protocol() -> type:
    """uvicorn's HTTP protocol: httptools' C parser where it is installed (`cnnlab[serve]` brings it through
    uvicorn[standard]), else the pure-Python h11, which costs more CPU per request than the model's forward pass."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def request_deadline_protocol(seconds: float = REQUEST_SECONDS, base: type | None = None) -> type:
    """uvicorn's HTTP protocol (`base`, default `http_protocol()`) with a deadline for receiving each request,
    headers and body."""
    protocol: Any = base or http_protocol()

    class RequestDeadline(protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
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


# ------------------------------------------------------------------------------------------ worker processes
class ServerError(UserError, RuntimeError):
    """The server cannot listen on its address, or one of its worker processes stopped on its own."""


@dataclass(frozen=True)
class ServedApp:
    """What a worker process needs to build the app `cnnlab serve` serves; picklable, as it crosses to workers."""

    runs: tuple[Path, ...]
    batching: BatchSettings = BatchSettings()
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    backend: str = "torch"  # cnnlab.use.backends: torch, onnx or auto

    def build(self) -> FastAPI:
        from cnnlab.use.serve.app import create_app

        return create_app(list(self.runs), batching=self.batching, allowed_hosts=self.allowed_hosts,
                          backend=self.backend)


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    """Worker processes for `cnnlab serve` on `cores` cores: one per 2 cores, at most MAX_WORKERS.

    A worker's event loop (HTTP, form parsing, JSON: Python holding the GIL) and its forward passes (torch,
    which uses two threads well) each want about a core; one worker per two cores keeps both busy without the
    workers' torch threads outrunning the cores.
    """
    return max(1, min(MAX_WORKERS, (cores or usable_cores()) // 2))


def serve(served: ServedApp, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          application: FastAPI | None = None, listening: socket.socket | None = None) -> None:
    """Run the server until Ctrl+C or SIGTERM: in this process (workers=1; `application` if already built), or
    in `workers` spawned processes that share one listening socket, the kernel handing each new connection
    to one of them. Each worker loads the models itself and gets usable_cores() / workers torch threads.
    `listening`: the socket, bound already (listening_socket), else bound here."""
    import uvicorn

    listening = listening or listening_socket(host, port)
    if workers <= 1:
        try:
            uvicorn.Server(server_config(application or served.build(), host, port)).run(sockets=[listening])
        finally:
            listening.close()
        return
    threads = max(1, usable_cores() // workers)
    context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's thread pools
    processes = [context.Process(target=run_worker, args=(served, listening, host, port, threads),
                                 name=f"cnnlab-serve-{i}", daemon=False) for i in range(workers)]
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)  # a plain `kill` stops the workers too
    try:
        for process in processes:
            process.start()
        wait([process.sentinel for process in processes])  # until Ctrl+C, SIGTERM or a worker ends
        ended = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode is not None)
        raise ServerError(f"worker {ended} stopped on its own; the server stopped too (its log is above)")
    except KeyboardInterrupt:
        pass  # Ctrl+C reaches the workers as well: each finishes what it is answering, then stops
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(processes)
        listening.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (IPv6 for an address with a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:  # the port taken, an address not of this machine: before any worker starts
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_worker(served: ServedApp, listening: socket.socket, host: str, port: int, threads: int) -> None:
    """One worker process: its own models and torch threads, serving connections from the shared socket."""
    import torch
    import uvicorn

    torch.set_num_threads(threads)
    uvicorn.Server(server_config(served.build(), host, port)).run(sockets=[listening])


def stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Ask every live worker to stop (SIGTERM: uvicorn finishes the requests in hand), then kill stragglers."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is None:
            continue  # never started
        process.join(STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
