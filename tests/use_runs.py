"""Helpers shared by the preprocess / predict / serve / browser tests: tiny trained runs (trained once per test
process, in conftest), a real uvicorn server on a free loopback port, and a decompression-bomb PNG."""
from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import cnnlab.cli.use  # noqa: F401  (registers predict/export/serve until cli/__init__ imports it)
from conftest import tiny_trained

# 4 filters, batches of 32: the serve and browser tests count conv1's four feature maps
USE_RUN = ("first_layer_convs=4", "batch_size=32")


def tiny_run(dataset: str = "mnist-sample") -> Path:
    """The shared tiny run on a shipped sample (conftest.tiny_trained), trained once per test process."""
    return tiny_trained(dataset, *USE_RUN).run


@contextmanager
def running_server(application, **options):
    """Serve an ASGI app with uvicorn in a thread on 127.0.0.1 and a free port; yields the base URL."""
    import uvicorn

    from cnnlab.use.serve.server import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(application, port=port, lifespan="off", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")
