"""The decoded-data cache (`cnnlab.data.decoded`): a second load skips gunzip, and never trusts an entry
it should not (changed source, corrupt or truncated entry, unwritable folder, mismatching checksums)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data import decoded, loading, store
from cnnlab.data.idx import encode_idx, read_idx, write_idx
from cnnlab.data.registry import DataFile, _idx_files
from cnnlab.data.store import ChecksumMismatch
from conftest import write_dataset

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"


@pytest.fixture(autouse=True)
def cache_tiny_files(monkeypatch):
    """Cache every gzip file, however small (the real threshold leaves the tiny test files out)."""
    monkeypatch.setattr(decoded, "MIN_PAYLOAD_BYTES", 0)
    monkeypatch.delenv(decoded.ENV, raising=False)


@pytest.fixture
def gunzips(monkeypatch):
    """The names of the files `loading` decompresses, in order (the decoder still runs)."""
    seen: list[str] = []
    real = loading.decompress

    def counting(raw: bytes, source: str) -> bytes:
        seen.append(Path(source).name)
        return real(raw, source)

    monkeypatch.setattr(loading, "decompress", counting)
    return seen


def no_decoding(monkeypatch) -> None:
    """From now on, decompressing any file fails the test: everything must come from the cache."""
    def refuse(raw: bytes, source: str) -> bytes:
        raise AssertionError(f"{source} was decompressed, not read from the cache")

    monkeypatch.setattr(loading, "decompress", refuse)


def entries() -> list[Path]:
    folder = store.cache_root() / decoded.FOLDER
    return sorted(folder.glob("*.idx")) if folder.is_dir() else []


def entry_of(directory: Path, name: str) -> Path:
    return decoded.entry_path(store.cache_root() / decoded.FOLDER, directory / name)


def same(a: loading.Dataset, b: loading.Dataset) -> None:
    """Bitwise equal arrays (values, dtype, shape) and the same manifest records."""
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), field
    assert a.files == b.files


# ------------------------------------------------------------------------------ 1. it does its job
@pytest.mark.unit
def test_the_second_load_reads_the_cache_and_equals_decoding(tiny, tmp_path, monkeypatch):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    first = loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert [p.name.split(".")[0] for p in entries()] == sorted(n.split(".")[0] for n in arrays)
    no_decoding(monkeypatch)
    second = loading.load_dataset(spec, tmp_path, download=False, progress=False)
    same(first, second)
    assert all(f["verified"] for f in second.files)
    for name, array in arrays.items():  # and both are what the files say
        assert read_idx(tmp_path / "tiny" / name).tobytes() == array.tobytes()
    assert second.train_images.flags.writeable  # torch.from_numpy wants a writable array


@pytest.mark.unit
def test_entries_live_in_the_user_cache_folder(tiny, tmp_path, monkeypatch):
    """$XDG_CACHE_HOME/cnnlab/decoded, beside the downloaded datasets; the source's own folder is left alone."""
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert len(list((tmp_path / "elsewhere" / "cnnlab" / "decoded").glob("*.idx"))) == 4
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted(arrays)


@pytest.mark.unit
def test_a_source_that_changes_while_read_is_not_cached(tiny, tmp_path, monkeypatch):
    """Its identity after the read differs from before: the entry could describe neither version."""
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    real = loading.read_raw

    def read_then_replace(path: Path) -> bytes:
        data = real(path)
        if path.name == TEST_IMAGES:  # another process swaps the file in (a new inode) just after the read
            replacement = path.with_name("new")
            replacement.write_bytes(data)
            os.replace(replacement, path)
        return data

    monkeypatch.setattr(loading, "read_raw", read_then_replace)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert TEST_IMAGES.split(".")[0] not in [p.name.split(".")[0] for p in entries()] and len(entries()) == 3


@pytest.mark.unit
def test_the_cache_can_be_turned_off(tiny, tmp_path, monkeypatch, gunzips):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    monkeypatch.setenv(decoded.ENV, "off")
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert entries() == [] and len(gunzips) == 8


@pytest.mark.unit
def test_small_and_uncompressed_files_are_not_cached(tiny, tmp_path, monkeypatch):
    spec, arrays, _ = tiny
    folder = tmp_path / "tiny"
    folder.mkdir()
    for name, array in arrays.items():  # raw IDX under the .gz names: nothing to gain from a cache
        write_idx(folder / name, array, compress=False)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert entries() == []
    write_dataset(folder, arrays)
    monkeypatch.setattr(decoded, "MIN_PAYLOAD_BYTES", 1 << 20)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert entries() == []


@pytest.mark.unit
def test_the_shipped_sample_trains_the_same_from_the_cache(tmp_path, monkeypatch):
    """The real threshold: the sample's training images (3.1 MB) are cached, its test images (0.8 MB) are not."""
    monkeypatch.setattr(decoded, "MIN_PAYLOAD_BYTES", 1 << 20)
    first = loading.load_dataset("mnist-sample", progress=False)
    assert sorted(p.name.split(".")[0] for p in entries()) == ["train-images-idx3-ubyte"]
    no_decoding(monkeypatch)
    with pytest.raises(AssertionError, match="train-labels"):  # the next file is decoded: the guard bites
        loading.load_dataset("mnist-sample", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(decoded, "MIN_PAYLOAD_BYTES", 1 << 20)
    same(first, loading.load_dataset("mnist-sample", progress=False))


# ------------------------------------------------------------------------------ 2. when not to trust it
@pytest.mark.unit
def test_a_changed_source_invalidates_its_entry(tiny, tmp_path, gunzips):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    changed = arrays[TEST_IMAGES] ^ 1
    write_idx(tmp_path / "tiny" / TEST_IMAGES, changed)
    gunzips.clear()
    with pytest.raises(ChecksumMismatch):  # the new file is checked, not the old one's cached bytes served
        loading.load_dataset(spec, tmp_path, download=False, progress=False)
    dataset = loading.load_dataset(spec, tmp_path, download=False, progress=False, allow_mismatch=True)
    assert dataset.test_images.tobytes() == changed.tobytes()
    assert {f["name"]: f["verified"] for f in dataset.files}[TEST_IMAGES] is False
    assert gunzips == [TEST_IMAGES, TEST_IMAGES]  # the other three still came from the cache


@pytest.mark.unit
def test_a_source_rewritten_in_place_with_its_old_mtime_is_not_served_from_the_cache(tiny, tmp_path):
    """Same size, same modification time (set back): the change time still tells, and the file is read."""
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    path = tmp_path / "tiny" / TEST_IMAGES
    info = path.stat()
    time.sleep(0.02)  # past the file system's timestamp granularity
    with open(path, "r+b") as handle:  # a byte of the deflate stream flipped: same size, a corrupt file
        handle.seek(len(path.read_bytes()) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns
    with pytest.raises(loading.UserError, match="gzip stream is corrupt|checksum mismatch"):
        loading.load_dataset(spec, tmp_path, download=False, progress=False)


def corrupt_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def pad(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def bad_magic(path: Path) -> None:
    path.write_bytes(b"X" + path.read_bytes()[1:])


def bad_header(path: Path) -> None:
    data = path.read_bytes()
    start = len(decoded.MAGIC) + decoded.LENGTH.size
    path.write_bytes(data[:start] + b"[" + data[start + 1:])


def header_of_wrong_types(path: Path) -> None:
    """Valid JSON whose payload size is a string: a header written by no version of the cache."""
    data = path.read_bytes()
    start = len(decoded.MAGIC) + decoded.LENGTH.size
    (length,) = decoded.LENGTH.unpack(data[len(decoded.MAGIC):start])
    head = json.loads(data[start:start + length])
    text = json.dumps({**head, "payload_bytes": str(head["payload_bytes"])}).encode()
    path.write_bytes(decoded.MAGIC + decoded.LENGTH.pack(len(text)) + text + data[start + length:])


def huge_header_length(path: Path) -> None:
    data = path.read_bytes()
    start = len(decoded.MAGIC) + decoded.LENGTH.size
    path.write_bytes(decoded.MAGIC + decoded.LENGTH.pack(2**32 - 1) + data[start:])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def a_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.unit
@pytest.mark.parametrize("damage", [corrupt_payload, truncate, pad, bad_magic, bad_header, header_of_wrong_types,
                                    huge_header_length, empty, a_folder])
def test_a_damaged_entry_is_detected_decoded_again_and_rebuilt(tiny, tmp_path, capsys, gunzips, damage):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    first = loading.load_dataset(spec, tmp_path, download=False, progress=False)
    entry = entry_of(tmp_path / "tiny", TRAIN_IMAGES)
    damage(entry)
    gunzips.clear()
    second = loading.load_dataset(spec, tmp_path, download=False, progress=True)
    same(first, second)  # never a wrong array
    assert gunzips == [TRAIN_IMAGES]  # not trusted: decoded again
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: decoded-data cache not used: ") and \
        str(entry) in err and "CNNLAB_DATA_CACHE=off" in err, err
    if damage is not a_folder:  # rebuilt: the third load decodes nothing
        gunzips.clear()
        same(first, loading.load_dataset(spec, tmp_path, download=False, progress=True))
        assert gunzips == [] and capsys.readouterr().err == ""


@pytest.mark.unit
def test_a_forged_entry_cannot_pass_for_verified_data(tiny, tmp_path, monkeypatch):
    """An entry whose header agrees with its (other) payload is refused by the registry's digest, as the
    source would be: the cache saves gunzip, never the check."""
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    entry = entry_of(tmp_path / "tiny", TEST_IMAGES)
    data = entry.read_bytes()
    start = len(decoded.MAGIC) + decoded.LENGTH.size
    (length,) = decoded.LENGTH.unpack(data[len(decoded.MAGIC):start])
    head = json.loads(data[start:start + length])
    forged = encode_idx(arrays[TEST_IMAGES] ^ 1)
    head["payload_sha256"] = hashlib.sha256(forged).hexdigest()
    text = json.dumps(head).encode()
    entry.write_bytes(decoded.MAGIC + decoded.LENGTH.pack(len(text)) + text + forged)
    no_decoding(monkeypatch)  # the forged bytes are what gets checked
    with pytest.raises(ChecksumMismatch, match="checksum mismatch"):
        loading.load_dataset(spec, tmp_path, download=False, progress=False)
    dataset = loading.load_dataset(spec, tmp_path, download=False, progress=False, allow_mismatch=True)
    assert {f["name"]: f["verified"] for f in dataset.files}[TEST_IMAGES] is False


# ------------------------------------------------------------------------------ 3. checksums, as without it
def outcome(spec, tmp_path, allow: bool) -> tuple[str, list[dict] | None]:
    try:
        dataset = loading.load_dataset(spec, tmp_path, download=False, progress=False, allow_mismatch=allow)
    except ChecksumMismatch as exc:
        return str(exc), None
    return "", dataset.files


def mismatching(tiny) -> tuple:
    """The tiny spec with a wrong payload digest for the test images, and one known by its .gz digest alone."""
    spec, arrays, blobs = tiny
    digests = {name: (hashlib.sha256(encode_idx(a)).hexdigest(), None) for name, a in arrays.items()}
    digests[TEST_IMAGES] = ("0" * 64, None)
    files = _idx_files(digests)
    train_images = DataFile(TRAIN_IMAGES, None, hashlib.sha256(blobs[TRAIN_IMAGES]).hexdigest())
    files["train"] = (train_images, files["train"][1])
    return replace(spec, files=files), arrays


@pytest.mark.unit
@pytest.mark.parametrize("allow", [False, True])
def test_a_mismatching_source_is_treated_exactly_as_without_the_cache(tiny, tmp_path, monkeypatch, allow):
    spec, arrays = mismatching(tiny)
    write_dataset(tmp_path / "tiny", arrays)
    monkeypatch.setenv(decoded.ENV, "off")
    without = outcome(spec, tmp_path, allow)
    monkeypatch.delenv(decoded.ENV)
    loading.load_dataset(spec, tmp_path, download=False, progress=False, allow_mismatch=True)  # fills the cache
    assert len(entries()) == 4
    no_decoding(monkeypatch)
    assert outcome(spec, tmp_path, allow) == without
    if allow:
        assert {f["name"]: f["verified"] for f in without[1]} == {
            TRAIN_IMAGES: True, "train-labels-idx1-ubyte.gz": True, TEST_IMAGES: False,
            "t10k-labels-idx1-ubyte.gz": True}
    else:
        assert "checksum mismatch" in without[0] and "--allow-checksum-mismatch" in without[0]


@pytest.mark.unit
def test_a_refused_copy_leaves_no_entry(tiny, tmp_path):
    spec, arrays = mismatching(tiny)
    write_dataset(tmp_path / "tiny", arrays)
    with pytest.raises(ChecksumMismatch):
        loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert TEST_IMAGES.split(".")[0] not in [p.name.split(".")[0] for p in entries()]


@pytest.mark.unit
def test_a_gz_digest_is_checked_on_the_gz_read_again(tiny, tmp_path, monkeypatch):
    """A file known by its .gz digest alone: a cache hit hashes the .gz it did not decompress."""
    spec, arrays = mismatching(tiny)
    write_dataset(tmp_path / "tiny", arrays)
    loading.load_dataset(spec, tmp_path, download=False, progress=False, allow_mismatch=True)  # fills the cache
    wrong = replace(spec, files={**spec.files, "train": (DataFile(TRAIN_IMAGES, None, "1" * 64),
                                                        spec.files["train"][1])})
    no_decoding(monkeypatch)
    files = loading.load_dataset(wrong, tmp_path, download=False, progress=False, allow_mismatch=True).files
    assert {f["name"]: f["verified"] for f in files}[TRAIN_IMAGES] is False


# ------------------------------------------------------------------------------ 4. a cache that cannot be written
@pytest.mark.unit
def test_a_cache_folder_that_cannot_be_made_costs_one_line(tiny, tmp_path, capsys):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    (store.cache_root()).mkdir(parents=True, exist_ok=True)
    (store.cache_root() / decoded.FOLDER).write_text("not a folder")
    dataset = loading.load_dataset(spec, tmp_path, download=False, progress=True)
    assert dataset.test_images.tobytes() == arrays[TEST_IMAGES].tobytes()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "(and 3 more)" in err, err


@pytest.mark.unit
def test_a_full_disk_leaves_nothing_half_written(tiny, tmp_path, monkeypatch, capsys):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)

    def full(tmp: Path, head: bytes, payload: bytes) -> None:
        tmp.write_bytes(head[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(decoded, "write_entry", full)
    first = loading.load_dataset(spec, tmp_path, download=False, progress=True)
    assert "No space left on device (ENOSPC)" in capsys.readouterr().err
    assert list((store.cache_root() / decoded.FOLDER).iterdir()) == []  # no entry, no temporary file
    monkeypatch.undo()
    monkeypatch.setattr(decoded, "MIN_PAYLOAD_BYTES", 0)
    same(first, loading.load_dataset(spec, tmp_path, download=False, progress=False))


def test_training_still_works_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(decoded, "MIN_PAYLOAD_BYTES", 1 << 20)
    store.cache_root().mkdir(parents=True, exist_ok=True)
    (store.cache_root() / decoded.FOLDER).write_text("not a folder")
    result = CliRunner().invoke(app, ["train", "--dataset", "mnist-sample", "--model", "fast", "--epochs", "1",
                                      "--set", "data.val_size=100", "--runs-dir", str(tmp_path), "--name", "r",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert "decoded-data cache not used" in result.output and "Traceback" not in result.output
    assert (tmp_path / "r" / "test.json").is_file()


# ------------------------------------------------------------------------------ 5. runs at the same time
@pytest.mark.unit
def test_concurrent_loads_leave_whole_entries(tiny, tmp_path, monkeypatch):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    results, failures = [], []

    def load() -> None:
        try:
            results.append(loading.load_dataset(spec, tmp_path, download=False, progress=False))
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(results) == 6
    assert len(entries()) == 4 and not [p for p in (store.cache_root() / decoded.FOLDER).iterdir()
                                        if p.suffix != ".idx"]
    no_decoding(monkeypatch)
    for result in results:
        same(result, loading.load_dataset(spec, tmp_path, download=False, progress=False))


@pytest.mark.unit
def test_a_dead_writers_temporary_file_is_cleared(tiny, tmp_path):
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    entry = entry_of(tmp_path / "tiny", TRAIN_IMAGES)
    entry.parent.mkdir(parents=True)
    leftover = entry.parent / f".{entry.name}.999999999.abc.tmp.idx"  # a pid no process has
    leftover.write_bytes(b"half")
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    assert not leftover.exists() and entry.is_file()


@pytest.mark.unit
def test_identity_sees_a_rewrite_with_the_same_size_and_mtime(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    before = decoded.identity(path)
    time.sleep(0.02)
    path.write_bytes(b"xyz")
    os.utime(path, ns=(before[3], before[3]))
    after = decoded.identity(path)
    assert after is not None and after[2:4] == before[2:4] and after != before
    assert decoded.identity(tmp_path / "missing") is None


@pytest.mark.unit
def test_an_entry_of_the_real_arrays_is_just_their_idx_bytes(tiny, tmp_path):
    """The format: magic, header length, JSON header, then the IDX payload exactly as gunzip gives it."""
    spec, arrays, _ = tiny
    write_dataset(tmp_path / "tiny", arrays)
    loading.load_dataset(spec, tmp_path, download=False, progress=False)
    data = entry_of(tmp_path / "tiny", TRAIN_IMAGES).read_bytes()
    assert data.startswith(decoded.MAGIC)
    assert data.endswith(encode_idx(arrays[TRAIN_IMAGES]))
    assert np.array_equal(read_idx(tmp_path / "tiny" / TRAIN_IMAGES), arrays[TRAIN_IMAGES])
