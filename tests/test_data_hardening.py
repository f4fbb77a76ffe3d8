"""The data path against broken and hostile files: every error names the file, what was expected and what
was found; forged headers and decompression bombs are refused in bounded memory; validation survives
`python -O`; two processes fetching the same dataset at once both succeed.

Raw IDX files one byte short or long, empty, with a bad magic number or 0 dimensions are in test_idx.py;
here the same faults in .gz files and in whole datasets loaded by name, and the pair checks.
"""
from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.data import CifarError, DataError, IDXError, idx, load_dataset, read_idx, store, verify
from cnnlab.data.cifar import RECORD_BYTES, read_archive
from cnnlab.data.idx import encode_idx
from cnnlab.use.recipes import BlankImage, prepare
from conftest import write_dataset
from test_fuzz import FOLDER, TINY_CIFAR, cifar_archive
from test_store import Mirror, serve

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
MiB = 1 << 20


# ------------------------------------------------------------------------------------ error table
def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def images(n: int = 6) -> np.ndarray:
    return np.arange(n * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(n, 28, 28)


GOOD_IMAGES = encode_idx(images())
# case -> (file to replace, its bytes, error, what the message must say besides the file's path)
CASES = {
    "one byte short": (TRAIN_IMAGES, gz(GOOD_IMAGES[:-1]), IDXError,
                       ["shape (6, 28, 28)", "4,704 payload bytes", "holds 4,703", "truncated"]),
    "one byte long": (TRAIN_IMAGES, gz(GOOD_IMAGES + b"\x00"), IDXError,
                      ["shape (6, 28, 28)", "4,704 payload bytes", "more than 4,704", "trailing data"]),
    "empty file": (TRAIN_IMAGES, b"", IDXError, ["0 bytes is too short", "needs at least 4"]),
    "empty gzip stream": (TRAIN_IMAGES, gz(b""), IDXError, ["0 bytes is too short", "needs at least 4"]),
    "bad magic": (TRAIN_IMAGES, gz(b"\x00\x01" + GOOD_IMAGES[2:]), IDXError,
                  ["bad magic number 0x00010803", "expected 0x0000 followed by a dtype code"]),
    "corrupt gzip": (TRAIN_IMAGES, gz(GOOD_IMAGES)[:-5] + b"\xff" * 5, IDXError, ["gzip stream is corrupt"]),
    "images not 3-D": (TRAIN_IMAGES, gz(encode_idx(images().reshape(6, 784))), DataError,
                       ["expected uint8 images of shape (N, 28, 28)", "found uint8 of shape (6, 784)"]),
    "labels not 1-D": (TRAIN_LABELS, gz(encode_idx(np.zeros((6, 1), np.uint8))), DataError,
                       ["expected a 1-D array of labels", "found shape (6, 1)"]),
    "label 10 of 10 classes": (TRAIN_LABELS, gz(encode_idx(np.array([0, 1, 2, 10, 4, 5], np.uint8))), DataError,
                               ["label 10 is outside 0..9", "(10 classes)"]),
    "6 images, 5 labels": (TRAIN_LABELS, gz(encode_idx(np.arange(5, dtype=np.uint8))), DataError,
                           ["holds 6 images", "holds 5 labels"]),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_dataset_file_is_named_with_what_was_expected_and_found(tiny, tmp_path, case):
    spec, arrays, _ = tiny
    name, data, error, says = CASES[case]
    arrays = {**arrays, TRAIN_IMAGES: images(), TRAIN_LABELS: np.arange(6, dtype=np.uint8)}
    write_dataset(tmp_path / spec.name, arrays)
    (tmp_path / spec.name / name).write_bytes(data)
    with pytest.raises(error) as info:
        load_dataset(spec, tmp_path, allow_mismatch=True, download=False)
    message = str(info.value)
    assert str(tmp_path / spec.name / name) in message, message
    for words in says:
        assert words in message, message


# ------------------------------------------------------------------------------- bounded memory
def peak_bytes(action) -> tuple[int, BaseException | None]:
    """The largest amount of memory Python (and NumPy) held at once while `action` ran, and what it raised."""
    tracemalloc.start()
    try:
        action()
        raised = None
    except Exception as exc:  # noqa: BLE001 (returned to the test, which checks its type)
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


def deflated(*parts: tuple[bytes, int]) -> bytes:
    """A gzip stream of each (bytes, repeat) in turn, built without holding the inflated data."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [compressor.compress(chunk) for chunk, repeat in parts for _ in range(repeat)]
    return b"".join(out) + compressor.flush()


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(2**32 - 1, 28, 28), (10**6, 10**6, 28, 28), (0, 2**32 - 1, 2**32 - 1)],
                         ids=["4-billion-images", "10**12-images", "zero-by-huge"])
@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
def test_a_header_declaring_absurdly_many_images_is_refused_before_allocating(tmp_path, shape, compressed):
    header = struct.pack(f">HBB{len(shape)}I", 0, 8, len(shape), *shape)
    path = tmp_path / ("huge.idx.gz" if compressed else "huge.idx")
    path.write_bytes(gz(header + bytes(100)) if compressed else header + bytes(100))
    peak, raised = peak_bytes(lambda: read_idx(path))
    assert isinstance(raised, IDXError), raised
    message = str(raised)
    assert str(path) in message and f"shape {shape}" in message and "more than the 4,294,967,296" in message
    assert peak < MiB, f"peak {peak:,} bytes"


@pytest.mark.unit
def test_a_header_declaring_more_than_the_gzip_can_hold_is_refused_before_inflating(tmp_path):
    """784,000 bytes declared in a 40-byte .gz: deflate tops out at 1032:1, so the header is forged."""
    path = tmp_path / "forged.gz"
    path.write_bytes(gz(struct.pack(">HBB3I", 0, 8, 3, 1000, 28, 28) + bytes(10)))
    peak, raised = peak_bytes(lambda: read_idx(path))
    assert isinstance(raised, IDXError), raised
    assert str(path) in str(raised) and "784,000 payload bytes" in str(raised)
    assert f"{path.stat().st_size}-byte gzip stream, which inflates to at most" in str(raised)
    assert peak < MiB


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """~100 KB of gzip inflating to 100 MB: a 1000-image header, its 784,000 bytes, then 99.2 MB more zeros.

    (1 KB cannot inflate to 100 MB: deflate's ratio tops out at 1032:1; 100 KB is the smallest such bomb.)
    """
    header = struct.pack(">HBB3I", 0, 8, 3, 1000, 28, 28)
    return deflated((header, 1), (bytes(MiB), 100))


@pytest.mark.unit
def test_a_gzip_bomb_is_cut_off_one_byte_past_its_declared_size(tmp_path, bomb, monkeypatch):
    assert len(bomb) < 110_000
    path = tmp_path / TRAIN_IMAGES
    path.write_bytes(bomb)
    inflated = []  # every byte the reader got out of zlib: counted, not timed
    real_read = idx.GzipStream.read
    monkeypatch.setattr(idx.GzipStream, "read", lambda self, size: inflated.append(real_read(self, size)) or
                        inflated[-1])
    peak, raised = peak_bytes(lambda: read_idx(path))
    assert isinstance(raised, IDXError), raised
    assert str(path) in str(raised) and "784,000 payload bytes" in str(raised) and "trailing data" in str(raised)
    assert peak < 4 * MiB, f"peak {peak:,} bytes for a bomb of 100 MB"  # about twice the 784 KB declared
    assert sum(map(len, inflated)) == 16 + 784_000 + 1  # header, payload, one byte more: the 99 MB beyond never


@pytest.mark.unit
def test_a_gzip_bomb_downloaded_from_a_mirror_is_refused_and_not_cached(tiny, bomb):
    spec, arrays, blobs = tiny
    with serve({**blobs, TRAIN_IMAGES: bomb}) as url:
        peak, raised = peak_bytes(lambda: store.fetch(replace(spec, mirrors=(f"{url}/m/",)), progress=False))
    assert isinstance(raised, store.DatasetUnavailable), raised
    assert "the download: header declares shape (1000, 28, 28)" in str(raised) and "trailing data" in str(raised)
    assert peak < 8 * MiB, f"peak {peak:,} bytes"
    assert not (store.cache_root() / spec.name / TRAIN_IMAGES).exists()


@pytest.mark.unit
def test_a_file_of_a_hundred_thousand_gzip_members_reads_in_linear_time(tmp_path, monkeypatch):
    """`cat a.gz b.gz` is valid gzip; 100,000 empty members between two halves took gzip.decompress 29 s,
    because it handed each member the whole rest of the file. Linear: each compressed byte is given to a
    decompressor a bounded number of times, counted here."""
    import zlib

    import cnnlab.data.idx as idx

    raw = encode_idx(images())
    path = tmp_path / "members.gz"
    path.write_bytes(gz(raw[:16]) + gz(b"") * 100_000 + b"\x00" * 512 + gz(raw[16:]))
    fed = [0]
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def decompress(self, data, *args):
            fed[0] += len(data)
            return self.inner.decompress(data, *args)

        def __getattr__(self, name):  # eof, unused_data, unconsumed_tail
            return getattr(self.__dict__["inner"], name)

    monkeypatch.setattr(idx.zlib, "decompressobj", Counting)
    np.testing.assert_array_equal(read_idx(path), images())
    # each 20-byte member is handed one first piece of input (1 KiB), so ~50x the file; handing every member
    # the rest of the file, as gzip.decompress did, would be ~50,000x
    assert fed[0] <= 100 * path.stat().st_size, (fed[0], path.stat().st_size)


def tar_gz(*members: tuple[tarfile.TarInfo, bytes, int]) -> bytes:
    """A tar.gz of (header, data, repeat): the header as written, then data repeated; built in small pieces."""
    parts = []
    for info, data, repeat in members:
        parts.append((info.tobuf(format=tarfile.GNU_FORMAT), 1))
        size = len(data) * repeat
        parts += [(data, repeat), (bytes(-size % 512), 1)]
    return deflated(*parts, (bytes(1024), 1))


def member(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info


CIFAR_BOMBS = {
    # a batch whose header declares a million records (3 GB) where the spec expects 5: refused from its header
    "member declaring 3 GB": (member(f"{FOLDER}/data_batch_1.bin", 10**6 * RECORD_BYTES), bytes(MiB), 4,
                              "its header declares 3,073,000,000 bytes; expected at most 15,365"),
    # an extra member (the readme) honestly holding 50 MB of zeros: refused from its header too
    "50 MB readme": (member(f"{FOLDER}/readme.html", 50 * MiB), bytes(MiB), 50,
                     "its header declares 52,428,800 bytes; expected at most 1,048,576"),
    # a GNU long-name header declaring 1 GiB, which tarfile itself would read into memory: the stream cap stops it
    "1 GiB long-name header": (member("././@LongLink", 1 << 30, tarfile.GNUTYPE_LONGNAME), bytes(MiB), 24,
                               "the archive inflates to more than"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(CIFAR_BOMBS))
def test_a_cifar_archive_is_never_inflated_past_its_expected_size(tmp_path, case):
    info, data, repeat, says = CIFAR_BOMBS[case]
    path = tmp_path / "cifar-10-binary.tar.gz"
    path.write_bytes(tar_gz((info, data, repeat)))
    peak, raised = peak_bytes(lambda: read_archive(path, TINY_CIFAR.archive, TINY_CIFAR.classes))
    assert isinstance(raised, CifarError), raised
    assert str(raised).startswith(f"{path}: ") and says in str(raised), str(raised)
    assert peak < 40 * MiB, f"peak {peak:,} bytes"  # the stream cap: 16 MiB of slack over 6 records


@pytest.mark.unit
def test_the_tiny_archive_reads(tmp_path):
    """The bombs above are refused for their size, not because the tiny spec reads nothing."""
    path = tmp_path / "ok.tar.gz"
    path.write_bytes(cifar_archive())
    splits = read_archive(path, TINY_CIFAR.archive, TINY_CIFAR.classes)
    assert splits["train"][0].shape == (5, 32, 32, 3)


@pytest.mark.unit
@pytest.mark.parametrize("recipe", ["digits", "objects", "photos", "photos-grey"])
def test_a_two_million_pixel_tall_sliver_is_prepared_in_bounded_memory(recipe):
    """8 x 2,000,000 px (16 MP, under MAX_PIXELS): max-pooling used to pad the width to the factor, 2.1 GB."""
    sliver = Image.new("L", (8, 2_000_000), 255)
    sliver.paste(0, (2, 900_000, 6, 1_100_000))  # a dark stroke on white paper
    buffer = io.BytesIO()
    sliver.save(buffer, format="PNG")
    del sliver
    peak, raised = peak_bytes(lambda: prepare(buffer.getvalue(), recipe, 32 if recipe.startswith("photos") else 28))
    assert raised is None or isinstance(raised, BlankImage), raised
    assert peak < 200 * MiB, f"peak {peak:,} bytes"  # NumPy's arrays; Pillow's own image memory is not traced


# ------------------------------------------------------------------------------------- python -O
OPTIMISED_SCRIPT = r'''
import gzip, struct, sys
from pathlib import Path
import numpy as np
from cnnlab.data import CifarError, DataError, IDXError, read_idx
from cnnlab.data.cifar import read_archive
from cnnlab.data.idx import encode_idx
from cnnlab.use.recipes import BlankImage, prepare
from cnnlab.data.loading import check_pair
from cnnlab.data.registry import CIFAR10, get_dataset
from cnnlab.use.recipes import prepare

folder = Path(sys.argv[1])
print("optimize", sys.flags.optimize, "asserts", "on" if __debug__ else "off")
good = encode_idx(np.zeros((6, 28, 28), np.uint8))
files = {
    "short": gzip.compress(good[:-1]), "long": gzip.compress(good + b"x"), "empty": b"",
    "magic": b"\x01" + good[1:], "ndim0": b"\x00\x00\x08\x00",
    "absurd": struct.pack(">HBB4I", 0, 8, 4, 10**6, 10**6, 28, 28),
    "forged": gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 1000, 28, 28)),
    "bomb": gzip.compress(good + bytes(10**6)),
}
spec = get_dataset("mnist-sample")
cases = {name: (lambda path=folder / name: read_idx(path)) for name in files}
cases["images-2d"] = lambda: check_pair(spec, np.zeros((6, 784), np.uint8), np.zeros(6, np.uint8), "img", "lab")
cases["labels-2d"] = lambda: check_pair(spec, np.zeros((6, 28, 28), np.uint8), np.zeros((6, 1), np.uint8), "img", "lab")
cases["label-10"] = lambda: check_pair(spec, np.zeros((6, 28, 28), np.uint8), np.full(6, 10, np.uint8), "img", "lab")
cases["6-vs-5"] = lambda: check_pair(spec, np.zeros((6, 28, 28), np.uint8), np.zeros(5, np.uint8), "img", "lab")
cases["cifar"] = lambda: read_archive(folder / "magic", CIFAR10.archive, CIFAR10.classes)
cases["upload"] = lambda: prepare(b"GIF89a not really", "digits", name="upload")
cases["blank"] = lambda: prepare(BLANK, "digits", name="blank")
import io
from PIL import Image
buffer = io.BytesIO(); Image.new("L", (20, 20), 255).save(buffer, "PNG"); BLANK = buffer.getvalue()
for name, data in files.items():
    (folder / name).write_bytes(data)
for name, case in cases.items():
    try:
        case()
        print(name, "NO ERROR", sep="|")
    except Exception as exc:
        print(name, type(exc).__name__, str(exc).replace("\n", " "), sep="|")
'''
OPTIMISED_EXPECT = {
    "short": ("IDXError", "short", "truncated"), "long": ("IDXError", "long", "trailing data"),
    "empty": ("IDXError", "empty", "0 bytes is too short"), "magic": ("IDXError", "magic", "bad magic number"),
    "ndim0": ("IDXError", "ndim0", "0 dimensions"), "absurd": ("IDXError", "absurd", "more than the 4,294,967,296"),
    "forged": ("IDXError", "forged", "inflates to at most"), "bomb": ("IDXError", "bomb", "trailing data"),
    "images-2d": ("DataError", "img", "expected uint8 images of shape (N, 28, 28)"),
    "labels-2d": ("DataError", "lab", "expected a 1-D array of labels"),
    "label-10": ("DataError", "lab", "label 10 is outside 0..9"), "6-vs-5": ("DataError", "img", "5 labels"),
    "cifar": ("CifarError", "magic", "not a readable tar.gz archive"),
    "upload": ("ImageReadError", "upload", "not a readable image"), "blank": ("BlankImage", "", "no ink found"),
}


def test_data_validation_holds_under_python_dash_o(tmp_path):
    """Under -O `assert` is stripped: every check must still raise (and src/ uses no assert for validation)."""
    done = subprocess.run([sys.executable, "-O", "-c", OPTIMISED_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "optimize 1 asserts off", lines[0]
    results = {name: (kind, message) for name, kind, message in (line.split("|", 2) for line in lines[1:])}
    assert set(results) == set(OPTIMISED_EXPECT)
    for name, (kind, names, says) in OPTIMISED_EXPECT.items():
        found_kind, message = results[name]
        assert found_kind == kind and names in message and says in message, (name, found_kind, message)


@pytest.mark.unit
def test_no_assert_statement_in_the_package():
    source = Path(__file__).parents[1] / "src" / "cnnlab"
    offenders = [f"{path}:{number}" for path in source.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith("assert ")]
    assert offenders == [], "use real checks (raise), not assert, in src/: " + ", ".join(offenders)


# -------------------------------------------------------------------------------- concurrent fetch
class OverlappingMirror(Mirror):
    """test_store's mirror that holds each download of the training images until a second one has
    started (or 60 s passed), then sends the bodies in two halves: the downloads overlap by
    construction, not by how the scheduler happened to run the processes."""

    arrived = 0
    both_started = threading.Condition()

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.endswith(TRAIN_IMAGES):
            with OverlappingMirror.both_started:
                OverlappingMirror.arrived += 1
                OverlappingMirror.both_started.notify_all()
                OverlappingMirror.both_started.wait_for(lambda: OverlappingMirror.arrived >= 2, timeout=60)
        real_write = self.wfile.write

        def write_in_halves(data):
            if len(data) > 512:
                real_write(data[: len(data) // 2])
                self.wfile.flush()
                time.sleep(0.1)
                data = data[len(data) // 2:]
            return real_write(data)

        self.wfile.write = write_in_halves
        super().do_GET()


FETCH_SCRIPT = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
from dataclasses import replace
from conftest import tiny_arrays, gz_bytes
import hashlib
from cnnlab.data import store, verify
from cnnlab.data.idx import encode_idx
from cnnlab.use.recipes import BlankImage, prepare
from cnnlab.data.registry import DatasetSpec, _idx_files
arrays = tiny_arrays()
digests = {name: (hashlib.sha256(encode_idx(a)).hexdigest(), None) for name, a in arrays.items()}
spec = DatasetSpec(name="tiny", title="tiny test set", classes=tuple("abcdefghij"), files=_idx_files(digests),
                   mirrors=(sys.argv[2],), val_size=10)
while time.time() < float(sys.argv[3]):  # start together
    time.sleep(0.005)
location = store.fetch(spec, progress=False)
print(json.dumps({"origin": location.origin, "ok": all(check.ok for check in verify(location))}))
'''


def test_two_processes_and_a_thread_fetching_the_same_dataset_at_once_all_succeed(tiny):
    spec, arrays, blobs = tiny
    tests = str(Path(__file__).parent)
    OverlappingMirror.arrived = 0
    with serve(blobs, handler=OverlappingMirror) as url:
        mirror = f"{url}/m/"
        start = time.time() + 2.0
        processes = [subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, tests, mirror, str(start)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outcome = {}

        def in_thread():
            time.sleep(max(start - time.time(), 0))
            outcome["location"] = store.fetch(replace(spec, mirrors=(mirror,)), progress=False)

        thread = threading.Thread(target=in_thread)
        thread.start()
        results = [process.communicate(timeout=120) for process in processes]
        thread.join(timeout=120)
    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["ok"] and result["origin"] in ("download", "cache"), out
    assert all(check.ok for check in verify(outcome["location"]))
    # the mirror held the first download until a second began: two wrote into the cache at once,
    # and no temporary file is left behind
    assert sum(hit.endswith(TRAIN_IMAGES) for hit in Mirror.hits) >= 2
    folder = store.cache_root() / spec.name
    assert sorted(p.name for p in folder.iterdir()) == sorted(arrays)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.mark.unit
def test_eps_is_never_handed_to_ghostscript_whatever_its_name(tmp_path):
    """Pillow decodes EPS by running Ghostscript on it; cnnlab refuses the format from its header."""
    from cnnlab.data.folder import decode_image
    from cnnlab.images import ImageReadError
    from cnnlab.images import open_image as read_image

    (tmp_path / "photo.png").write_bytes(EPS)
    with pytest.raises(ImageReadError, match="EPS files are not read"):
        read_image(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="EPS files are not read"):
        decode_image(tmp_path / "photo.png", (8, 8), 3)
