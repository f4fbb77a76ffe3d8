"""`cnnlab serve --workers N`: worker processes sharing one socket, each with its own models; the HTTP parser."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

for _module in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason="the web demo's tests need: pip install -e '.[test]'")

import httpx  # noqa: E402

from cnnlab.use.serve.server import (  # noqa: E402
    MAX_WORKERS,
    default_workers,
    http_protocol,
    request_deadline_protocol,
)
from use_runs import tiny_run  # noqa: E402

SRC = Path(__file__).resolve().parent.parent / "src"


def test_one_worker_per_two_cores():
    assert [default_workers(cores) for cores in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 2, 4, MAX_WORKERS]


def test_the_c_parser_is_used_where_installed():
    pytest.importorskip("httptools")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert http_protocol() is HttpToolsProtocol
    assert issubclass(request_deadline_protocol(), HttpToolsProtocol)  # the request deadline goes with it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_workers_answer_and_stop_together(tmp_path):
    port = free_port()
    buffer = io.BytesIO()
    Image.new("L", (56, 56), 255).save(buffer, format="PNG")  # blank: 422, a full answer from a worker's model
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    server = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(tiny_run("mnist-sample")), "--port",
                               str(port), "--workers", "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        answers = []
        while len(answers) < 8 and time.monotonic() < deadline and server.poll() is None:
            try:  # a fresh connection each time: the kernel hands connections to either worker
                answers.append(httpx.post(f"{url}/api/predict", content=buffer.getvalue(),
                                          headers={"Content-Type": "image/png"}, timeout=10))
            except httpx.TransportError:
                time.sleep(0.2)  # not listening yet
        assert [a.status_code for a in answers] == [422] * 8, [a.text for a in answers]
        server.send_signal(signal.SIGTERM)  # a plain `kill`: the workers stop with the server
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert "serving mnist on http://127.0.0.1:" in output and "(2 worker processes)" in output
    assert "Traceback" not in output
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/api/model", timeout=5)  # nothing listens any more


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_one_line_before_any_worker_starts(workers):
    from typer.testing import CliRunner

    from cnnlab.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(tiny_run("mnist-sample")), "--port", str(port),
                                          "--workers", workers])
    assert result.exit_code == 2, result.output
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
    assert "Traceback" not in result.output and "serving" not in result.output  # not announced, then failed
