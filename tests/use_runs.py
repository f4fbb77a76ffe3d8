"""Helpers shared by the preprocess / predict / serve / browser tests: tiny trained runs (trained once per test
process), a real uvicorn server on a free loopback port, and a decompression-bomb PNG."""
from __future__ import annotations

import atexit
import shutil
import socket
import struct
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cnnlab.cli.use  # noqa: F401  (registers predict/export/serve until cli/__init__ imports it)
from cnnlab.cli import app

# 4 filters, 32 dense units, 2 epochs: ~85% on the MNIST sample (1 epoch with 8 units stays near chance). One thread:
# under load from other processes torch's 2-thread pool spins and the same training takes 30 s instead of 0.5 s.
TINY = ["--model", "seed", "--epochs", "2", "--set", "first_layer_convs=4", "--set", "dense_layer_size=32",
        "--threads", "1", "--quiet"]
_root: Path | None = None
_trained: dict[str, Path] = {}


def tiny_run(dataset: str = "mnist-sample") -> Path:
    """A run trained on a shipped sample, shared by every test module in this process."""
    global _root
    if dataset not in _trained:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="cnnlab-use-runs-"))
            atexit.register(shutil.rmtree, _root, ignore_errors=True)
        name = dataset.removesuffix("-sample")
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("XDG_CACHE_HOME", str(_root / "cache"))
            result = CliRunner().invoke(app, ["train", *TINY, "--dataset", dataset, "--runs-dir", str(_root),
                                              "--name", name], catch_exceptions=False)
        torch.set_num_threads(threads)  # --threads sets it for the whole process; later tests get theirs back
        assert result.exit_code == 0, result.output
        _trained[dataset] = _root / name
    return _trained[dataset]


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
