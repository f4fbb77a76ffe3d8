"""The data path against a hostile or careless file system and network: links inside image folders, a cached
copy that does not verify while a good one exists elsewhere, FIFOs and devices in place of dataset files, numbers
out of range, a server that never stops sending, a --data-dir that is a file, names that are not text.

Each test asserts what the code promises (which copy is used, what is reported, that a call returns); none
depends on how a race fell or on how long something took, except the bound that proves nothing blocked.
"""
from __future__ import annotations

import contextlib
import http.server
import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import Config, DataConfig
from cnnlab.data import ChecksumMismatch, DatasetUnavailable, load_dataset, read_idx, store, verify
from cnnlab.data.cifar import read_archive
from cnnlab.data.folder import FolderError, open_image_folder
from cnnlab.data.registry import DATASETS
from cnnlab.data.sources import load_data, prepare_data
from cnnlab.errors import UserError
from cnnlab.files import FileRefused
from conftest import gz_bytes, write_dataset
from test_fuzz import TINY_CIFAR
from test_store import Mirror, serve

pytestmark = pytest.mark.unit  # every test here is in-process and quick

runner = CliRunner()
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
BOUND_S = 30  # far longer than any of these calls takes; reaching it means the call blocked


# ------------------------------------------------------------------------------------------ helpers
def within(seconds: float, action, fifos=()) -> dict:
    """Run `action` in a thread: {"value": ...} or {"error": ...}; fail the test if it is still running after
    `seconds` (blocked), after opening `fifos` for writing so that a reader stuck in open() can finish."""
    box: dict = {}

    def run():
        try:
            box["value"] = action()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"still running after {seconds} s: it blocked")
    return box


def picture(path: Path, seed: int, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def pets(root: Path, per_class: int = 20, classes=("cat", "dog")) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            picture(root / name / f"{i:02}.png", seed=100 * c + i)
    return root


def every_path(folder) -> list[str]:
    return sorted(str(s.paths[i]) for s in (folder.train, folder.val, folder.test) for i in range(len(s)))


def counts(folder) -> dict[str, int]:
    per_class = folder.describe()["per_class"]
    return {name: sum(per_class[split][name] for split in per_class) for name in folder.classes}


# ------------------------------------------------------------------------- 1. links in image folders
def test_a_directory_link_inside_a_class_folder_is_not_followed_and_is_reported(tmp_path):
    """cat/up -> .. and dog/cats -> ../cat: following them counted every dog under 'cat' and every cat twice."""
    root = pets(tmp_path / "pets")
    os.symlink("..", root / "cat" / "up")
    os.symlink("../cat", root / "dog" / "cats")
    folder = open_image_folder(root, workers=0)
    assert counts(folder) == {"cat": 20, "dog": 20}
    assert all(path.split("/")[0] in ("cat", "dog") and len(path.split("/")) == 2 for path in every_path(folder))
    assert folder.describe()["links_not_followed"] == {"count": 2, "paths": ["cat/up", "dog/cats"]}


def test_the_user_is_told_how_many_links_were_left_out(tmp_path, capsys):
    root = pets(tmp_path / "pets")
    os.symlink("../dog", root / "cat" / "dogs")
    config = Config(data=DataConfig(dataset=str(root), image_size=8, workers=0))
    data = load_data(config, progress=True)
    err = capsys.readouterr().err
    assert "1 directory link inside class folders was not followed" in err and "cat/dogs" in err, err
    assert data.about["image_folder"]["links_not_followed"]["count"] == 1
    load_data(config, progress=False)
    assert capsys.readouterr().err == ""


def test_class_folders_may_be_links(tmp_path):
    """Datasets are often assembled from links: a class folder that is a link is followed."""
    elsewhere = pets(tmp_path / "store", classes=("cats",))
    root = pets(tmp_path / "pets", classes=("dog",))
    os.symlink(elsewhere / "cats", root / "cat")
    folder = open_image_folder(root, workers=0)
    assert counts(folder) == {"cat": 20, "dog": 20}
    assert folder.describe()["links_not_followed"] == {"count": 0, "paths": []}


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    root = pets(tmp_path / "pets")
    os.symlink("dog", root / "puppy")
    with pytest.raises(FolderError, match="the same folder as") as info:
        open_image_folder(root, workers=0)
    assert str(root / "puppy") in str(info.value) and str(root / "dog") in str(info.value)


def test_a_class_folder_that_links_to_the_dataset_itself_is_refused(tmp_path):
    root = pets(tmp_path / "pets")
    os.symlink(".", root / "everything")
    with pytest.raises(FolderError, match="holds the dataset itself") as info:
        open_image_folder(root, workers=0)
    assert str(root / "everything") in str(info.value)


def test_a_test_class_linked_into_train_is_refused(tmp_path):
    """train/cat -> ../test/cat would train on the test images."""
    root = tmp_path / "d"
    pets(root / "test")
    pets(root / "train", classes=("dog",))
    os.symlink("../test/cat", root / "train" / "cat")
    with pytest.raises(FolderError, match="the same folder as"):
        open_image_folder(root, workers=0)


def test_file_links_to_images_are_followed_and_a_broken_one_is_reported(tmp_path):
    root = pets(tmp_path / "pets")
    picture(tmp_path / "pool" / "extra.png", seed=7)
    os.symlink(tmp_path / "pool" / "extra.png", root / "cat" / "extra.png")
    os.symlink(tmp_path / "pool" / "gone.png", root / "cat" / "gone.png")
    folder = open_image_folder(root, workers=0, val_fraction=0.0, test_fraction=0.2)
    assert counts(folder) == {"cat": 22, "dog": 20}
    everything = [folder.train, folder.test]
    for source in everything:
        list(source.batches([torch.arange(len(source))]))
    skipped = {**folder.train.skipped, **folder.test.skipped}
    assert list(skipped) == [str(root / "cat" / "gone.png")]
    assert "no such" in skipped[str(root / "cat" / "gone.png")]


# -------------------------------------------------------------------------- 2. copies that do not verify
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_fetch_passes_over_a_truncated_cached_copy_for_a_good_system_copy(tiny):
    spec, arrays, _ = tiny
    write_dataset(store.cache_root() / "tiny", arrays)
    truncate(store.cache_root() / "tiny" / TEST_IMAGES)
    write_dataset(store.SYSTEM_ROOT / "tiny", arrays)
    location = store.fetch(spec, progress=False)
    assert location.origin == "system" and all(check.ok for check in verify(location))
    [line] = location.passed_over
    assert line.startswith(f"skipped the cache copy {store.cache_root() / 'tiny'}: {TEST_IMAGES}: ") and \
        "truncated" in line and "\n" not in line, line


def test_the_commands_say_which_copy_was_skipped_and_why(tiny, monkeypatch):
    spec, arrays, _ = tiny
    monkeypatch.setitem(DATASETS, spec.name, spec)
    write_dataset(store.cache_root() / "tiny", arrays)
    truncate(store.cache_root() / "tiny" / TEST_IMAGES)
    write_dataset(store.SYSTEM_ROOT / "tiny", arrays)
    fetched = runner.invoke(app, ["datasets", "fetch", "tiny"])
    assert fetched.exit_code == 0, fetched.output
    assert "skipped the cache copy" in fetched.output and f"tiny: {store.SYSTEM_ROOT / 'tiny'} (system)" in \
        fetched.output
    where = runner.invoke(app, ["datasets", "where", "tiny"])
    assert where.exit_code == 0, where.output
    assert f"-> system       {store.SYSTEM_ROOT / 'tiny'}" in where.output and "skipped the cache copy" in where.output
    listing = runner.invoke(app, ["datasets", "list"])
    assert f"system: {store.SYSTEM_ROOT / 'tiny'}" in listing.output
    checked = runner.invoke(app, ["datasets", "verify", "tiny"])
    assert checked.exit_code == 0, checked.output
    assert "UNREADABLE" in checked.output and f"all 4 files verified in {store.SYSTEM_ROOT / 'tiny'}" in checked.output


def test_training_loads_the_good_copy_says_so_and_records_it(tiny, capsys):
    spec, arrays, _ = tiny
    write_dataset(store.cache_root() / "tiny", arrays)
    truncate(store.cache_root() / "tiny" / TEST_IMAGES)
    write_dataset(store.SYSTEM_ROOT / "tiny", arrays)
    dataset = load_dataset(spec, progress=True)
    assert dataset.location.origin == "system" and all(f["verified"] for f in dataset.files)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: skipped the cache copy") and TEST_IMAGES in err, err
    data = prepare_data(dataset, Config(data=DataConfig(dataset="tiny")))
    assert data.about["data_origin"] == "system" and len(data.about["skipped_copies"]) == 1


def test_a_corrupt_cache_is_downloaded_again_when_there_are_mirrors(tiny):
    spec, arrays, blobs = tiny
    write_dataset(store.cache_root() / "tiny", arrays)
    (store.cache_root() / "tiny" / TEST_IMAGES).write_bytes(b"\x1f\x8b not gzip at all")
    with serve(blobs) as url:
        location = store.fetch(replace(spec, mirrors=(f"{url}/m/",)), progress=False)
    assert location.origin == "download" and location.directory == store.cache_root() / "tiny"
    assert [hit.rsplit("/", 1)[1] for hit in Mirror.hits] == [TEST_IMAGES]  # only the bad file is fetched again
    assert all(check.ok for check in verify(location)) and len(location.passed_over) == 1


def test_allow_checksum_mismatch_uses_the_mismatching_copy_and_records_it(tiny):
    """A changed copy is trained on when the user says so (recorded); without the flag the good copy is used."""
    spec, arrays, _ = tiny
    changed = {**arrays, TEST_IMAGES: arrays[TEST_IMAGES] ^ 1}
    write_dataset(store.cache_root() / "tiny", changed)
    write_dataset(store.SYSTEM_ROOT / "tiny", arrays)
    mine = load_dataset(spec, allow_mismatch=True, progress=False)
    assert mine.location.origin == "cache" and mine.location.passed_over == ()
    assert {f["name"]: f["verified"] for f in mine.files}[TEST_IMAGES] is False
    good = load_dataset(spec, progress=False)
    assert good.location.origin == "system" and all(f["verified"] for f in good.files)
    assert "checksum mismatch" in good.location.passed_over[0] and "--allow-checksum-mismatch" in \
        good.location.passed_over[0]


def test_no_good_copy_anywhere_lists_each_copy_and_why(tiny):
    spec, arrays, _ = tiny
    for root in (store.cache_root(), store.SYSTEM_ROOT):
        write_dataset(root / "tiny", arrays)
    truncate(store.cache_root() / "tiny" / TEST_IMAGES)
    (store.SYSTEM_ROOT / "tiny" / TEST_IMAGES).write_bytes(gz_bytes(arrays[TEST_IMAGES] ^ 1))
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(spec, progress=False)
    message = str(info.value)
    assert "skipped the cache copy" in message and "truncated" in message
    assert "skipped the system copy" in message and "checksum mismatch" in message
    with pytest.raises(DatasetUnavailable, match="skipped the system copy"):
        store.fetch(spec, progress=False)


def test_a_single_mismatching_copy_keeps_its_own_error(tiny, tmp_path):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", {**arrays, TEST_IMAGES: arrays[TEST_IMAGES] ^ 1})
    with pytest.raises(ChecksumMismatch, match="--allow-checksum-mismatch"):
        load_dataset(spec, tmp_path, progress=False)


# --------------------------------------------------------------------------- 3. FIFOs and devices
@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.gz"
    os.mkfifo(path)
    return path


def test_an_idx_fifo_is_refused_without_blocking(fifo, tmp_path):
    os.symlink(fifo, tmp_path / "link.gz")
    for path in (fifo, tmp_path / "link.gz"):
        box = within(BOUND_S, lambda path=path: read_idx(path), [fifo])
        assert isinstance(box.get("error"), FileRefused), box
        assert str(path) in str(box["error"]) and "FIFO" in str(box["error"])


def test_a_cifar_archive_fifo_is_refused_without_blocking(fifo):
    box = within(BOUND_S, lambda: read_archive(fifo, TINY_CIFAR.archive, TINY_CIFAR.classes), [fifo])
    assert isinstance(box.get("error"), UserError) and "FIFO" in str(box["error"]), box


def test_verifying_a_copy_whose_file_became_a_fifo_returns(tiny, tmp_path):
    """locate() saw regular files; one is swapped for a FIFO before it is read."""
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    location = store.Location(spec, tmp_path / "tiny", "data-dir")
    (tmp_path / "tiny" / TEST_IMAGES).unlink()
    os.mkfifo(tmp_path / "tiny" / TEST_IMAGES)
    box = within(BOUND_S, lambda: verify(location), [tmp_path / "tiny" / TEST_IMAGES])
    checks = {check.name: check for check in box["value"]}
    assert not checks[TEST_IMAGES].ok and "FIFO" in checks[TEST_IMAGES].problem
    assert box["value"] and all(c.ok for name, c in checks.items() if name != TEST_IMAGES)


def test_a_fifo_among_the_dataset_files_is_named_when_nothing_is_found(tiny, tmp_path):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    (tmp_path / "tiny" / TEST_IMAGES).unlink()
    os.mkfifo(tmp_path / "tiny" / TEST_IMAGES)
    box = within(BOUND_S, lambda: load_dataset(spec, tmp_path, download=False), [tmp_path / "tiny" / TEST_IMAGES])
    assert isinstance(box.get("error"), DatasetUnavailable), box
    assert f"{TEST_IMAGES} is a FIFO (named pipe)" in str(box["error"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_fifo_in_a_class_folder_is_skipped_and_reported(tmp_path, workers):
    root = pets(tmp_path / "pets")
    os.mkfifo(root / "cat" / "pipe.png")
    folder = open_image_folder(root, workers=workers, val_fraction=0.0, test_fraction=0.2)
    assert counts(folder) == {"cat": 21, "dog": 20}
    # and one swapped in after the scan: a decoder that opened it would wait for a writer forever
    victim = folder.train.path(0)
    victim.unlink()
    os.mkfifo(victim)

    def read_all():
        for source in (folder.train, folder.test):
            list(source.batches(torch.arange(len(source)).split(8)))

    within(BOUND_S * 2, read_all, [root / "cat" / "pipe.png", victim])
    skipped = {**folder.train.skipped, **folder.test.skipped}
    assert set(skipped) == {str(root / "cat" / "pipe.png"), str(victim)}
    assert all("FIFO" in reason for reason in skipped.values()), skipped


def test_an_image_file_over_the_size_limit_is_skipped_unread(tmp_path, monkeypatch):
    from cnnlab.data import folder_source

    monkeypatch.setattr(folder_source, "MAX_IMAGE_FILE_BYTES", 2000)
    root = pets(tmp_path / "pets")
    big = picture(root / "cat" / "big.png", seed=5, size=64)
    assert big.stat().st_size > 2000
    source = open_image_folder(root, workers=0, val_fraction=0.0, test_fraction=0.2).train
    list(source.batches([torch.arange(len(source))]))
    assert "more than" in source.skipped.get(str(big), ""), source.skipped


# ---------------------------------------------------------------------------------- 4. numbers
def test_a_validation_split_as_large_as_the_training_set_names_the_key(tiny, tmp_path):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    dataset = load_dataset(spec, tmp_path, download=False)
    for val_size in (60, 61, 10**6):
        with pytest.raises(UserError) as info:
            prepare_data(dataset, Config(data=DataConfig(dataset="tiny", val_size=val_size)))
        message = str(info.value)
        assert message.startswith("data.val_size: ") and "'tiny'" in message and "60 images" in message, message
        assert "\n" not in message


@pytest.mark.parametrize("kwargs, key", [({"image_size": (100_000, 100_000)}, "data.image_size"),
                                         ({"image_size": (32, 0)}, "data.image_size"),
                                         ({"image_size": (32.5, 32)}, "data.image_size"),
                                         ({"channels": 4}, "data.channels"),
                                         ({"workers": 1000}, "data.workers"), ({"workers": -1}, "data.workers")])
def test_image_folder_numbers_are_range_checked_by_key(tmp_path, kwargs, key):
    pets(tmp_path / "pets", per_class=2)
    with pytest.raises(FolderError) as info:
        open_image_folder(tmp_path / "pets", **kwargs)
    assert str(info.value).startswith(f"{key}: expected"), str(info.value)


# ------------------------------------------------------------------------------ 5. other classes
class Drip(http.server.BaseHTTPRequestHandler):
    """Announces a large body, then sends one byte every 20 ms, forever (until the client hangs up)."""

    stop = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(10**8))
        self.end_headers()
        try:
            while not Drip.stop.wait(0.02):
                self.wfile.write(b"\x1f")
                self.wfile.flush()
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_server_that_sends_slowly_forever_is_cut_off(tiny, monkeypatch):
    spec, _, blobs = tiny
    monkeypatch.setattr(store, "LOW_SPEED_WINDOW_S", 1.0, raising=False)
    Drip.stop.clear()
    try:
        with serve(blobs, handler=Drip) as url:
            box = within(BOUND_S, lambda: store.fetch(replace(spec, mirrors=(f"{url}/slow/",)), progress=False))
    finally:
        Drip.stop.set()
    assert isinstance(box.get("error"), DatasetUnavailable), box
    assert "bytes/s" in str(box["error"]) and "slower than" in str(box["error"]), str(box["error"])
    assert not any(p.name.endswith(".part") for p in (store.cache_root() / "tiny").iterdir())


def test_a_data_dir_that_is_a_file_is_one_line(tiny, tmp_path, monkeypatch):
    spec, _, _ = tiny
    monkeypatch.setitem(DATASETS, spec.name, spec)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetUnavailable, match="not a directory") as info:
        load_dataset(spec, tmp_path / "afile", download=False)
    assert str(info.value).startswith(f"--data-dir {tmp_path / 'afile'}: ")
    for command in (["datasets", "where", "tiny"], ["datasets", "list"], ["datasets", "verify", "tiny"]):
        result = runner.invoke(app, [*command, "--data-dir", str(tmp_path / "afile")])
        assert result.exit_code == 2 and "not a directory" in result.output, (command, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_a_cache_folder_that_cannot_be_made_is_one_line(tiny):
    spec, _, blobs = tiny
    store.cache_root().parent.mkdir(parents=True, exist_ok=True)
    store.cache_root().write_text("a file where the cache folder should be")
    with serve(blobs) as url, pytest.raises(DatasetUnavailable) as info:
        store.fetch(replace(spec, mirrors=(f"{url}/m/",)), progress=False)
    assert str(store.cache_root() / "tiny") in str(info.value) and "cannot" in str(info.value)


@pytest.mark.parametrize("name", [b"caf\xff", b"two\nlines", b"tab\there"])
def test_a_class_folder_whose_name_is_not_printable_text_is_refused(tmp_path, name):
    """Class names become labels in test.json, plots and tables; b'caf\\xff' crashed the confusion plot."""
    root = pets(tmp_path / "pets")
    os.rename(root / "dog", os.path.join(os.fsencode(root), name))
    with pytest.raises(FolderError, match="rename it") as info:
        open_image_folder(root, workers=0)
    message = str(info.value)
    assert repr(name)[1:] in message and "\n" not in message
    message.encode("utf-8")  # printable on a UTF-8 terminal


def test_image_file_names_with_odd_bytes_are_fine(tmp_path):
    root = pets(tmp_path / "pets")
    picture(Path(os.fsdecode(os.path.join(os.fsencode(root / "cat"), b"odd\xfe.png"))), seed=3)
    folder = open_image_folder(root, workers=0, val_fraction=0.0, test_fraction=0.2)
    assert counts(folder)["cat"] == 21
    images, _ = next(folder.train.batches([torch.arange(len(folder.train))]))
    assert len(images) == len(folder.train) and folder.train.skipped == {}


def test_reading_a_small_image_asks_for_its_size_not_the_limit(tmp_path):
    """cnnlab.files.read_bytes asks for limit + 1 bytes at once, which allocates them: 256 MiB per image read."""
    import tracemalloc

    from cnnlab.data.folder import decode_image

    path = picture(tmp_path / "small.png", seed=1)
    tracemalloc.start()
    try:
        decode_image(path, (8, 8), 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak:,} bytes to decode a {path.stat().st_size}-byte image"


class NotANumber(Mirror):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", "lots")
        self.end_headers()


def test_a_content_length_that_is_not_a_number_is_one_line(tiny):
    spec, _, blobs = tiny
    with serve(blobs, handler=NotANumber) as url:
        box = within(BOUND_S, lambda: store.fetch(replace(spec, mirrors=(f"{url}/m/",)), progress=False))
    assert isinstance(box.get("error"), DatasetUnavailable), box
    assert "announced a Content-Length of 'lots'" in str(box["error"])
