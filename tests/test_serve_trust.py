"""`cnnlab serve` trusts neither its callers nor the names it is given: each served run has a name no other
can take, only the hosts the server was started for are answered (DNS rebinding), no response holds a path on
this machine, and every error says in words what was expected."""
from __future__ import annotations

import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

for _module in ("fastapi", "uvicorn", "multipart", "httpx"):
    pytest.importorskip(_module, reason="the web demo's tests need: pip install -e '.[test]'")

import httpx  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cnnlab.cli import app  # noqa: E402
from cnnlab.use.serve import create_app  # noqa: E402
from cnnlab.use.serve.app import ServeError, unique_names  # noqa: E402
from cnnlab.use.serve.guards import in_words, served_hosts  # noqa: E402
from test_serve_hardening import digit  # noqa: E402
from use_runs import running_server, tiny_run  # noqa: E402

DIGITS = [str(d) for d in range(10)]


# ------------------------------------------------------------------------------- 1. names by construction
@pytest.fixture(scope="module")
def same_named_runs(tmp_path_factory) -> dict[str, Path]:
    """a/m (digits), b/m (clothes) and c/m-2 (clothes): two folders named m, and one really named m-2."""
    root = tmp_path_factory.mktemp("named")
    runs = {"a/m": "mnist-sample", "b/m": "fashion-mnist-sample", "c/m-2": "fashion-mnist-sample"}
    for place, dataset in runs.items():
        shutil.copytree(tiny_run(dataset), root / place)
    return {place: root / place for place in runs}


def test_runs_of_one_folder_name_are_told_apart_by_their_parents_and_each_answers_for_itself(same_named_runs):
    runs = list(same_named_runs.values())
    with running_server(create_app(runs)) as url, httpx.Client(base_url=url, timeout=30) as client:
        models = client.get("/api/model").json()["models"]
        assert [m["name"] for m in models] == ["a/m", "b/m", "m-2"]  # m-2 keeps its own name; nothing is numbered
        for model in models:
            response = client.post("/api/predict", files={"file": ("d.png", digit(0))}, params={"model": model["name"]})
            assert response.status_code == 200, response.text
            digits = model["name"] == "a/m"
            assert (list(response.json()["probabilities"]) == DIGITS) is digits  # the model asked for answered


@pytest.mark.unit
@pytest.mark.parametrize("paths", [
    ["a/m", "b/m", "c/m-2"], ["x/m", "y/x/m"], ["/x/m", "/y/x/m", "/z/y/x/m"], ["p/q/r/m", "s/q/r/m", "m"],
    ["runs/m", "runs/m-2", "runs/m-3", "old/runs/m"],
])
def test_served_names_are_distinct_suffixes_of_their_paths_and_never_absolute(tmp_path, paths):
    runs = [SimpleNamespace(run=tmp_path / p.lstrip("/"), name=Path(p).name) for p in paths]
    names = [r.name for r in unique_names(runs)]  # type: ignore[arg-type]
    assert len(set(names)) == len(names), names
    for run, name in zip(runs, names):
        assert str(run.run).endswith("/" + name) and not name.startswith("/") and str(tmp_path) not in name


def test_the_same_run_twice_is_refused_in_one_line(same_named_runs):
    run = same_named_runs["a/m"]
    with pytest.raises(ServeError, match="given twice"):
        create_app([run, run.parent / ".." / "a" / "m"])
    result = CliRunner().invoke(app, ["serve", str(run), str(run)])
    assert result.exit_code == 2 and "given twice" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------- 2. hosts it answers to
@pytest.fixture(scope="module")
def server():
    application = create_app([tiny_run("mnist-sample")], allowed_hosts=served_hosts("127.0.0.1", ["demo.lan"]))
    with running_server(application) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST.", "[::1]", "demo.lan"])
def test_the_hosts_it_was_started_for_are_answered(server, host):
    port = server.base_url.port
    response = server.get("/api/model", headers={"Host": f"{host}:{port}"})
    assert response.status_code == 200 and response.json()["default"] == "mnist"


@pytest.mark.parametrize("host, status", [("attacker.example", 421), ("127.0.0.1.attacker.example", 421),
                                          ("192.168.1.20", 421), ("", 400), ("a b", 400), ("[::1", 400)])
def test_any_other_host_gets_nothing_from_any_page(server, host, status):
    for method, path in (("GET", "/api/model"), ("GET", "/"), ("POST", "/api/predict"), ("GET", "/static/app.js")):
        kwargs = {"files": {"file": ("d.png", digit(0))}} if method == "POST" else {}
        response = server.request(method, path, headers={"Host": host}, **kwargs)
        assert response.status_code == status, (path, response.text)
        assert "mnist" not in response.text and "error" in response.json()
    if status == 421:
        assert f"--allowed-host {host}" in response.json()["error"]


def test_a_request_without_a_host_header_is_refused(server):
    with socket.create_connection((server.base_url.host, server.base_url.port), timeout=10) as sock:
        sock.sendall(b"GET /api/model HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"no Host header" in reply and b"mnist" not in reply


@pytest.mark.unit
def test_the_bound_host_is_answered_and_a_wildcard_adds_no_name():
    assert served_hosts("192.168.1.5") == ("localhost", "127.0.0.1", "::1", "192.168.1.5")
    assert served_hosts("0.0.0.0") == served_hosts("::") == ("localhost", "127.0.0.1", "::1")
    assert served_hosts("::", ["Demo.LAN.", "[fe80::1]"]) == ("localhost", "127.0.0.1", "::1", "demo.lan", "fe80::1")


# ------------------------------------------------------------------------------- 3. no paths, errors in words
def bad_requests(client: httpx.Client) -> dict[str, httpx.Response]:
    cut = (b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
           b"Content-Type: image/png\r\n\r\n" + digit(0)[:200])
    multipart = {"content-type": "multipart/form-data; boundary=XX"}
    return {
        "text as file": client.post("/api/predict", data={"file": "not a picture"}, files={"other": ("o.png", b"x")}),
        "cut-off multipart": client.post("/api/predict", content=cut, headers=multipart),
        "malformed multipart": client.post("/api/predict", content=b"garbage", headers=multipart),
        "no boundary": client.post("/api/predict", content=b"x", headers={"content-type": "multipart/form-data"}),
        "json body": client.post("/api/predict", json={"file": "x"}),
        "no file field": client.post("/api/predict", files={"picture": ("d.png", digit(0))}),
        "details=maybe": client.post("/api/predict", files={"file": ("d.png", digit(0))}, params={"details": "maybe"}),
        "unknown model": client.post("/api/predict", files={"file": ("d.png", digit(0))}, params={"model": "x"}),
        "unknown page": client.get("/nothing/here"),
        "wrong method": client.get("/api/predict"),
        "too large": client.post("/api/predict", files={"file": ("d.png", b"\0" * (6 << 20))}),
    }


EXPECTED_WORDS = {
    "text as file": "the field 'file' holds text; expected a file upload",
    "cut-off multipart": "without its closing boundary: it was cut off",
    "malformed multipart": "the multipart/form-data body is malformed",
    "no boundary": "has no boundary",
    "json body": "or a multipart/form-data body with it in field 'file', found application/json",
    "no file field": "no picture in the request: send it as the multipart/form-data file field 'file'",
    "details=maybe": "?details='maybe': expected true or false",
    "unknown model": "no model named 'x'; serving: mnist",
    "unknown page": "nothing at '/nothing/here'; this server has /",
    "wrong method": "GET is not accepted at '/api/predict'; use POST",
    "too large": "upload too large",
}


def test_every_error_says_what_was_expected_in_words(server):
    for case, response in bad_requests(server).items():
        assert 400 <= response.status_code < 500, (case, response.text)
        message = response.json()["error"]
        assert EXPECTED_WORDS[case] in message, (case, message)
        assert "<class" not in message and "missing form field" not in message and "\n" not in message


@pytest.mark.unit
def test_python_type_names_never_reach_a_message():
    assert in_words("Expected UploadFile, received: <class 'str'>") == "Expected UploadFile, received: text"
    assert in_words("found <class 'starlette.datastructures.UploadFile'>") == "found UploadFile"


def test_no_response_reveals_where_the_runs_are(server, same_named_runs):
    run = tiny_run("mnist-sample")
    places = {str(run), str(run.resolve()), str(run.parent), str(same_named_runs["a/m"].parent)}
    responses = [server.get("/api/model"), server.get("/"), server.get("/static/app.js"),
                 server.post("/api/predict", files={"file": ("d.png", digit(0))}, params={"details": "true"}),
                 *bad_requests(server).values()]
    with running_server(create_app(list(same_named_runs.values()))) as url:
        responses.append(httpx.get(f"{url}/api/model", timeout=30))
    for response in responses:
        assert not any(place in response.text for place in places), response.text[:300]
