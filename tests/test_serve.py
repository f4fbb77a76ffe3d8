"""The web demo's API over real HTTP: uvicorn in a thread on 127.0.0.1, httpx as the client."""
from __future__ import annotations

import base64
import io
import json
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

for _module in ("fastapi", "uvicorn", "multipart", "httpx"):
    pytest.importorskip(_module, reason="the web demo's tests need: pip install -e '.[test]'")

import httpx  # noqa: E402

from cnnlab.cli import app  # noqa: E402
from cnnlab.data import load_dataset  # noqa: E402
from cnnlab.use.serve import create_app  # noqa: E402
from cnnlab.use.serve.app import STATIC  # noqa: E402
from use_runs import png_header_claiming, running_server, tiny_run  # noqa: E402

LIMIT = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def server():
    """Two models at once: MNIST digits (the default) and Fashion-MNIST clothing."""
    application = create_app([tiny_run("mnist-sample"), tiny_run("fashion-mnist-sample")])
    with running_server(application) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> bytes:
    """A real test digit, dark on white and enlarged, as a learner would upload it."""
    image = load_dataset("mnist-sample", progress=False).test_images[0]
    buffer = io.BytesIO()
    Image.fromarray(255 - image).resize((140, 140), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: httpx.Client, data: bytes, name: str = "digit.png", **params) -> httpx.Response:
    return client.post("/api/predict", files={"file": (name, data, "image/png")}, params=params)


def post_raw(client: httpx.Client, data: bytes, kind: str = "image/png", **params) -> httpx.Response:
    """The picture as the request's body, as a script or an app sends it (no form)."""
    return client.post("/api/predict", content=data, headers={"Content-Type": kind}, params=params)


def test_page_and_its_files_are_local(server):
    page = server.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<canvas id="canvas"' in page.text and 'type="file"' in page.text
    for name in ("app.js", "style.css"):
        assert server.get(f"/static/{name}").status_code == 200
    for file in STATIC.iterdir():  # no CDN, no web fonts: the demo works offline
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", file.read_text()), file.name


def test_model_description(server):
    info = server.get("/api/model").json()
    assert info["default"] == "mnist" and [m["name"] for m in info["models"]] == ["mnist", "fashion-mnist"]
    digits, clothes = info["models"]
    assert digits["dataset"] == "mnist-sample" and digits["recipe"] == "digits"
    assert digits["classes"] == [str(d) for d in range(10)] and clothes["classes"][9] == "Ankle boot"
    assert digits["parameters"] > 0 and 0.5 < digits["test_accuracy"] <= 1
    assert digits["conv_layers"] == ["conv1"] and info["max_upload_bytes"] == LIMIT


def test_predict_returns_the_json_of_predict_json(server, digit_png, tmp_path):
    response = upload(server, digit_png)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"file", "label", "class_name", "probabilities"} and body["file"] == "digit.png"
    (tmp_path / "digit.png").write_bytes(digit_png)
    import cnnlab.cli.use  # noqa: F401

    cli = CliRunner().invoke(app, ["predict", str(tiny_run("mnist-sample")), str(tmp_path / "digit.png"), "--json"])
    expected = json.loads(cli.stdout)
    assert body["label"] == expected["label"]
    assert all(abs(body["probabilities"][k] - p) < 1e-6 for k, p in expected["probabilities"].items())


def test_details_add_the_input_and_the_feature_maps(server, digit_png):
    body = upload(server, digit_png, details="true").json()
    assert body["model"] == "mnist"
    seen = Image.open(io.BytesIO(base64.b64decode(body["input_image"].split(",", 1)[1])))
    assert seen.size == (28, 28) and seen.mode == "L"
    (conv1,) = body["feature_maps"]
    assert conv1["layer"] == "conv1" and conv1["count"] == 4 and len(conv1["maps"]) == 4
    assert (conv1["height"], conv1["width"]) == (26, 26) and conv1["title"].startswith("conv1")


def test_the_model_selector(server, digit_png):
    clothes = server.post("/api/predict", files={"file": ("x.png", digit_png)}, data={"model": "fashion-mnist"}).json()
    assert "Ankle boot" in clothes["probabilities"]
    by_query = upload(server, digit_png, model="fashion-mnist").json()
    assert by_query["probabilities"] == clothes["probabilities"]
    unknown = upload(server, digit_png, model="cifar")
    assert unknown.status_code == 404
    assert "no model named 'cifar'; serving: mnist, fashion-mnist" in unknown.json()["error"]


@pytest.mark.parametrize("data, status, message", [
    (b"GIF89a but not really", 400, "not a readable image"),
    (b"", 400, "the file is empty"),
    (png_header_claiming(9000, 9000), 413, "9000x9000 pixels is more than the 50,000,000 allowed"),
    (png_header_claiming(30000, 30000), 413, "900,000,000 pixels is more than the 50,000,000 allowed"),
    (np.full((30, 30), 255, np.uint8).tobytes(), 400, "not a readable image"),
], ids=["not-an-image", "empty", "too-many-pixels", "pillow-bomb", "raw-bytes"])
@pytest.mark.parametrize("how", ["form", "raw body"])
def test_bad_uploads_get_a_4xx_with_a_message(server, data, status, message, how):
    response = upload(server, data, name="bad.png") if how == "form" else post_raw(server, data)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in response.text


def test_the_picture_as_the_body_gets_the_forms_answer(server, digit_png):
    form = upload(server, digit_png).json()
    raw = post_raw(server, digit_png)
    assert raw.status_code == 200, raw.text
    assert raw.json() == {**form, "file": "upload"}  # a body has no file name
    clothes = post_raw(server, digit_png, "image/jpeg", model="fashion-mnist")  # the type is not trusted
    assert clothes.status_code == 200 and clothes.json()["probabilities"] == upload(
        server, digit_png, model="fashion-mnist").json()["probabilities"]
    details = post_raw(server, digit_png, details="true").json()
    assert details["input_image"].startswith("data:image/png;base64,") and details["feature_maps"]


def test_64_clients_at_once_are_all_answered(server, digit_png):
    """64 connections, 3 requests each, at once: every request answered, no connection dropped (the
    benchmark's 64-client run once ended in a ReadError: BENCHMARKS.md, "Serving")."""
    import asyncio

    async def clients() -> list[int]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=120) as client:
            async def one() -> list[int]:
                return [(await client.post("/api/predict", content=digit_png, headers={"Content-Type": "image/png"},
                                           params={"model": ("mnist", "fashion-mnist")[i % 2]})).status_code
                        for i in range(3)]
            return [status for statuses in await asyncio.gather(*(one() for _ in range(64))) for status in statuses]

    assert asyncio.run(clients()) == [200] * 64 * 3


def test_a_raw_body_of_another_format_is_refused_by_its_bytes(server):
    pdf = post_raw(server, b"%PDF-1.7\n%...", "image/png")
    assert pdf.status_code == 415 and pdf.json()["error"] == (
        "upload: PDF files are not accepted; send one of: PNG, JPEG, GIF, BMP, WebP")
    too_big = post_raw(server, b"\0" * (LIMIT + 1))
    assert too_big.status_code == 413 and "upload too large" in too_big.json()["error"]


def test_blank_drawings_are_unprocessable(server):
    buffer = io.BytesIO()
    Image.new("L", (280, 280), 255).save(buffer, format="PNG")
    response = upload(server, buffer.getvalue())
    assert response.status_code == 422 and "no ink found" in response.json()["error"]


def test_uploads_over_the_limit_are_refused_unread(server):
    too_big = upload(server, b"\0" * (LIMIT + 1))
    assert too_big.status_code == 413 and "the limit is 5 MB" in too_big.json()["error"]


def test_streamed_uploads_without_a_length_are_cut_off_at_the_limit(server):
    boundary = "cnnlab-test"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body():  # a generator: httpx sends it chunked, without Content-Length
        yield head
        for _ in range(8):
            yield b"\0" * (1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = server.post("/api/predict", content=body(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "upload too large" in response.json()["error"]


def test_requests_without_a_file_field(server):
    as_json = server.post("/api/predict", json={"image": "data"})
    assert as_json.status_code == 400 and as_json.json()["error"] == (
        "expected the picture as the body (Content-Type image/png, image/jpeg, ...) or a multipart/form-data body "
        "with it in field 'file', found application/json")
    wrong_field = server.post("/api/predict", files={"picture": ("a.png", b"x")})
    assert wrong_field.status_code == 400 and "no picture in the request" in wrong_field.json()["error"]


def test_unknown_paths_are_404_json(server):
    response = server.get("/api/nothing")
    assert response.status_code == 404 and response.json() == {
        "error": "nothing at '/api/nothing'; this server has / (the demo), GET /api/model and POST /api/predict"}


def test_models_load_from_safetensors_without_pickle(monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used to load a served model")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert create_app([tiny_run("mnist-sample")]) is not None


def test_serve_binds_to_loopback_by_default(monkeypatch):
    import uvicorn

    import cnnlab.cli.use  # noqa: F401
    from cnnlab.use.serve import server

    monkeypatch.setattr(server, "usable_cores", lambda: 2)  # one worker by default: served in this process

    calls, bound = [], []

    class Server:  # records the configuration instead of serving
        def __init__(self, config):
            calls.append(config)

        def run(self, sockets=None):
            pass

    class Socket:  # records the address instead of binding it (port 8000 may be taken here)
        def __init__(self, host, port):
            bound.append((host, port))

        def close(self):
            pass

    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(server, "listening_socket", Socket)
    result = CliRunner().invoke(app, ["serve", str(tiny_run("mnist-sample"))])
    assert result.exit_code == 0, result.output
    [config] = calls
    assert (config.host, config.port, config.limit_concurrency) == ("127.0.0.1", 8000, 512)
    assert bound == [("127.0.0.1", 8000)]
    exposed = CliRunner().invoke(app, ["serve", str(tiny_run("mnist-sample")), "--host", "0.0.0.0"])
    assert "warning: listening on 0.0.0.0" in exposed.output


@pytest.mark.unit
def test_serve_needs_real_runs(tmp_path):
    import cnnlab.cli.use  # noqa: F401

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_a_huge_declared_length_is_answered_without_reading_the_body(server):
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(str(server.base_url))
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n")
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413") and "connection: close" in reply.lower()


def test_a_client_that_leaves_mid_body_is_no_crash_in_the_log(server, caplog):
    """A cut-short upload is a normal client event: one line in the log, no traceback, and the server goes on."""
    import logging
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(str(server.base_url))
    caplog.set_level(logging.INFO)
    with socket.create_connection((where.hostname, where.port)) as connection:
        connection.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 100\r\n\r\nabc")  # 3 of the 100 bytes promised, then gone
    deadline = time.monotonic() + 10
    while "went away" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "the client went away before its request was complete" in caplog.text
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert server.get("/api/model").status_code == 200


def test_two_pictures_or_two_models_in_one_request_are_refused_not_half_read(server, digit_png):
    two = server.post("/api/predict", files=[("file", ("a.png", digit_png, "image/png")),
                                             ("file", ("b.png", digit_png, "image/png"))])
    assert two.status_code == 400 and "send one picture per request" in two.json()["error"]
    names = server.get("/api/model").json()["models"]
    first, second = names[0]["name"], names[1]["name"]
    both = server.post(f"/api/predict?model={first}", files={"file": ("a.png", digit_png, "image/png")},
                       data={"model": second})
    assert both.status_code == 400 and "two models named" in both.json()["error"]
    same = server.post(f"/api/predict?model={first}", files={"file": ("a.png", digit_png, "image/png")},
                       data={"model": first})
    assert same.status_code == 200
