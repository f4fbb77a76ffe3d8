"""Where datasets are found, and downloads against a local HTTP server (never the internet)."""
from __future__ import annotations

import gzip
import http.server
import threading
from contextlib import contextmanager
from dataclasses import replace

import pytest

from cnnlab.data import ChecksumMismatch, DatasetUnavailable, load_dataset, locate, store, verify
from cnnlab.data.registry import get_dataset
from conftest import write_dataset

pytestmark = pytest.mark.unit  # every test here is in-process and quick


# --------------------------------------------------------------------------------- lookup order
def test_lookup_order_data_dir_then_cache_then_system(tiny, tmp_path, monkeypatch):
    spec, arrays, _ = tiny
    assert locate(spec) is None
    write_dataset(store.SYSTEM_ROOT / "tiny", arrays)
    assert locate(spec).origin == "system"
    write_dataset(store.cache_root() / "tiny", arrays)
    assert locate(spec).origin == "cache"
    write_dataset(tmp_path / "mine" / "tiny", arrays)
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "mine"))
    assert locate(spec).origin == "CNNLAB_DATA"
    write_dataset(tmp_path / "explicit" / "tiny", arrays)
    found = locate(spec, tmp_path / "explicit")
    assert found.origin == "data-dir" and found.directory == tmp_path / "explicit" / "tiny"


def test_a_folder_missing_one_file_is_skipped(tiny):
    spec, arrays, _ = tiny
    write_dataset(store.cache_root() / "tiny", {k: v for k, v in arrays.items() if "t10k-labels" not in k})
    write_dataset(store.SYSTEM_ROOT / "tiny", arrays)
    assert locate(spec).origin == "system"


def test_shipped_samples_are_found_in_the_package_and_verify():
    for name in ("mnist-sample", "fashion-mnist-sample"):
        location = locate(get_dataset(name))
        assert location.origin == "package"
        assert all(check.ok for check in verify(location))


def test_debian_recompressed_files_verify_on_their_payload(tiny):
    """Checksums are of the decompressed bytes, so a recompressed copy still verifies."""
    import gzip

    spec, arrays, blobs = tiny
    folder = store.SYSTEM_ROOT / "tiny"
    folder.mkdir(parents=True)
    for name, blob in blobs.items():
        (folder / name).write_bytes(gzip.compress(gzip.decompress(blob), compresslevel=1, mtime=12345))
    assert all(check.ok for check in verify(locate(spec)))


def test_checksum_mismatch_needs_the_explicit_flag_and_is_recorded(tiny, tmp_path):
    spec, arrays, _ = tiny
    changed = dict(arrays)
    changed["t10k-images-idx3-ubyte.gz"] = arrays["t10k-images-idx3-ubyte.gz"].copy()
    changed["t10k-images-idx3-ubyte.gz"][0, 0, 0] ^= 1
    write_dataset(tmp_path / "tiny", changed)
    with pytest.raises(ChecksumMismatch, match="t10k-images-idx3-ubyte.gz.*--allow-checksum-mismatch"):
        load_dataset(spec, tmp_path, download=False)
    dataset = load_dataset(spec, tmp_path, allow_mismatch=True, download=False)
    verdicts = {f["name"]: f["verified"] for f in dataset.files}
    assert verdicts == {name: name != "t10k-images-idx3-ubyte.gz" for name in arrays}


def test_offline_error_lists_every_place_and_how_to_get_the_data(tmp_path):
    spec = get_dataset("fashion-mnist")
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(spec, tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "fashion-mnist") in message
    assert str(store.cache_root() / "fashion-mnist") in message
    assert str(store.SYSTEM_ROOT / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message


# ------------------------------------------------------------------------------------ downloads
class Mirror(http.server.BaseHTTPRequestHandler):
    """Serves files per mirror prefix with a chosen behaviour: good, 404, html, flip, truncate."""

    files: dict[str, bytes] = {}
    behaviour: dict[str, str] = {}
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        Mirror.hits.append(self.path)
        prefix, _, name = self.path.strip("/").partition("/")
        mode = Mirror.behaviour.get(prefix, "good")
        body = Mirror.files.get(name)
        if mode == "404" or body is None:
            self.send_error(404)
            return
        if mode == "403":
            self.send_error(403)
            return
        content_type = "application/gzip"
        if mode == "html":
            body, content_type = b"<!DOCTYPE html><html><body>Moved</body></html>", "text/html"
        if mode == "html-as-gzip":
            body = b"<html><body>Please log in</body></html>"
        if mode == "flip":  # a flipped byte in the .gz: gzip's own CRC catches it
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        if mode == "tamper":  # a valid .gz of a changed payload: only the SHA-256 catches it
            payload = bytearray(gzip.decompress(body))
            payload[-1] ^= 0xFF
            body = gzip.compress(bytes(payload))
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def serve(files: dict[str, bytes], behaviour: dict[str, str] | None = None, handler: type[Mirror] = Mirror):
    """Local mirrors on 127.0.0.1: `behaviour` maps a mirror's path prefix to how it misbehaves."""
    Mirror.files, Mirror.behaviour, Mirror.hits = files, behaviour or {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def cache_is_clean(spec) -> bool:
    folder = store.cache_root() / spec.name
    return not folder.exists() or not any(p.name.endswith(".part") for p in folder.iterdir())


@pytest.mark.parametrize("mode", ["404", "403", "html", "html-as-gzip", "flip", "tamper", "truncate"])
def test_a_bad_mirror_moves_on_to_the_next(tiny, mode):
    spec, arrays, blobs = tiny
    with serve(blobs, {"bad": mode}) as url:
        location = store.fetch(replace(spec, mirrors=(f"{url}/bad/", f"{url}/good/")), progress=False)
    assert location.origin == "download"
    assert all(check.ok for check in verify(location))
    assert any(hit.startswith("/bad/") for hit in Mirror.hits)
    assert cache_is_clean(spec)
    # a second fetch finds the cache and opens no connection
    with serve(blobs, {}) as url:
        assert store.fetch(replace(spec, mirrors=(f"{url}/good/",)), progress=False).origin == "cache"
        assert Mirror.hits == []


def test_all_mirrors_failing_lists_each_url_and_reason_and_leaves_nothing(tiny):
    spec, arrays, blobs = tiny
    with serve(blobs, {"a": "404", "b": "tamper", "c": "html", "d": "flip"}) as url, \
            pytest.raises(DatasetUnavailable) as info:
        store.fetch(replace(spec, mirrors=tuple(f"{url}/{m}/" for m in "abcd")), progress=False)
    message = str(info.value)
    assert f"{url}/a/train-images-idx3-ubyte.gz: HTTP 404" in message
    assert f"{url}/b/train-images-idx3-ubyte.gz: checksum mismatch: got" in message
    assert f"{url}/c/train-images-idx3-ubyte.gz: served an HTML page" in message
    assert f"{url}/d/train-images-idx3-ubyte.gz: the download: gzip stream is corrupt" in message
    folder = store.cache_root() / "tiny"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_unreachable_mirror_is_reported(tiny):
    spec, arrays, blobs = tiny
    with serve(blobs, {}) as url:
        dead = url.rsplit(":", 1)[0] + ":9"  # the discard port: nothing listens
        location = store.fetch(replace(spec, mirrors=(f"{dead}/x/", f"{url}/good/")), progress=False)
    assert location.origin == "download"


def test_downloaded_dataset_loads(tiny):
    spec, arrays, blobs = tiny
    with serve(blobs, {}) as url:
        dataset = load_dataset(replace(spec, mirrors=(f"{url}/m/",)), progress=False)
    assert dataset.train_images.shape == (60, 28, 28)
    assert all(f["verified"] for f in dataset.files)


def test_gz_digest_verifies_when_the_payload_digest_is_unknown(tiny):
    """MNIST's train images are checked against the official .gz digest."""
    import hashlib

    spec, arrays, blobs = tiny
    name = "train-images-idx3-ubyte.gz"
    images = replace(spec.files["train"][0], sha256=None, gz_sha256=hashlib.sha256(blobs[name]).hexdigest())
    spec = replace(spec, files={**spec.files, "train": (images, spec.files["train"][1])})
    with serve(blobs, {"bad": "flip"}) as url:
        location = store.fetch(replace(spec, mirrors=(f"{url}/bad/", f"{url}/good/")), progress=False)
    assert (location.directory / name).read_bytes() == blobs[name]


def test_a_valid_cache_opens_no_socket(tiny, monkeypatch):
    """With the files in the cache, loading a dataset with mirrors configured never touches the network."""
    import socket

    spec, arrays, _ = tiny
    spec = replace(spec, mirrors=("http://127.0.0.1:9/never/",))
    write_dataset(store.cache_root() / "tiny", arrays)

    def no_network(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    dataset = load_dataset(spec)
    assert dataset.location.origin == "cache" and len(dataset.train_labels) == len(arrays["train-labels-idx1-ubyte.gz"])
