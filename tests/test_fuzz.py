"""Hostile input on the data path: the IDX reader, the upload preprocessing of `predict`/`serve`, the CIFAR
archive reader. Property: cnnlab's own documented errors only, never another exception, a crash, a hang
or an allocation out of proportion to the input.

Three layers, one set of targets (`TARGETS`):
  - hypothesis properties on random and mutated valid inputs (fast);
  - a replay of every input that ever crashed a target, kept in tests/fuzz_corpus/<target>/ (fast);
  - coverage-guided fuzzing with atheris, one bounded subprocess per target (slow). This file is also the
    harness: `python tests/test_fuzz.py <target> [libFuzzer options] [corpus folders]`.
A crash found by atheris lands in the artifact folder the slow test prints: fix it, then copy the
input into tests/fuzz_corpus/<target>/ so the replay keeps it fixed.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # the atheris harness: instrument the code under test before it is imported
    import atheris

    with atheris.instrument_imports(include=["cnnlab.data", "cnnlab.use.recipes", "PIL", "tarfile", "gzip"]):
        import gzip  # noqa: F401
        import tarfile  # noqa: F401

        import PIL.Image  # noqa: F401

        import cnnlab.data.cifar  # noqa: F401
        import cnnlab.data.idx  # noqa: F401
        import cnnlab.use.recipes  # noqa: F401

import gzip
import io
import os
import struct
import subprocess
import tarfile
import tempfile
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from cnnlab.data.cifar import CifarError, encode, read_archive
from cnnlab.data.idx import GZIP_MAX_RATIO, IDXError, decompress, encode_idx, parse_idx
from cnnlab.data.loading import DataError, check_pair
from cnnlab.data.registry import CIFAR10
from cnnlab.images import ImageReadError
from cnnlab.use.recipes import RECIPES, BlankImage, prepare

CORPUS = Path(__file__).parent / "fuzz_corpus"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on the corrupt files we feed it
# CIFAR-10's layout with one record per batch file: a valid archive is a few hundred bytes, a good fuzz seed
TINY_CIFAR = replace(CIFAR10, name="fuzz-cifar", archive=replace(CIFAR10.archive, counts={"train": 5, "test": 1}))
FOLDER = "cifar-10-batches-bin"


# ------------------------------------------------------------------------------------------- targets
def idx_target(data: bytes) -> None:
    """The first byte picks the entry point; the rest is the file (or, for mode 2, the payload gzip wraps)."""
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    try:
        if mode == 0:
            parse_idx(body, "fuzz.idx")
        elif mode == 1:  # a .gz as found on disk: corrupt streams, bombs, forged headers
            array = parse_idx(decompress(body, "fuzz.idx.gz"), "fuzz.idx.gz")
            assert array.nbytes <= len(body) * GZIP_MAX_RATIO, "inflated past what the compressed size can hold"
        else:  # a valid gzip of arbitrary content: must agree with gzip's own reading
            wrapped = gzip.compress(body, compresslevel=1, mtime=0)
            try:
                payload = decompress(wrapped, "fuzz.gz")
            except IDXError:
                payload = None
            if payload is not None:
                assert payload == body, "decompress changed the bytes of a valid gzip stream"
                parse_idx(payload, "fuzz.gz")
            else:
                try:
                    parse_idx(body, "fuzz.gz")
                except IDXError:
                    return
                raise AssertionError("decompress refused a gzip stream holding a valid IDX file")
    except IDXError:
        pass


def image_target(data: bytes) -> None:
    """An upload through every recipe `cnnlab predict` and `cnnlab serve` use."""
    for recipe in RECIPES:
        side = 32 if recipe.startswith("photos") else 28
        try:
            array = prepare(data, recipe, side, name="upload")
        except ImageReadError:  # (ImageTooLarge is one) the same bytes fail every recipe at reading
            return
        except BlankImage:  # blank by this recipe's measure; another may still find something
            continue
        assert array.dtype == np.uint8 and array.shape[:2] == (side, side), (recipe, array.dtype, array.shape)


def cifar_target(data: bytes) -> None:
    """Bytes as the downloaded archive of a one-record-per-batch CIFAR-10. The first byte picks: even, the rest
    is the file as downloaded; odd, the rest is the tar inside, gzipped here (mutations then reach tar parsing)."""
    if not data:
        return
    body = data[1:] if data[0] % 2 == 0 else gzip.compress(data[1:], compresslevel=1, mtime=0)
    path = Path(tempfile.gettempdir()) / f"cnnlab-fuzz-{os.getpid()}.tar.gz"
    path.write_bytes(body)
    try:
        splits = read_archive(path, TINY_CIFAR.archive, TINY_CIFAR.classes)
        for split in ("train", "test"):
            check_pair(TINY_CIFAR, *splits[split], path, path)
    except (CifarError, DataError):
        pass
    finally:
        path.unlink(missing_ok=True)


TARGETS = {"idx": idx_target, "image": image_target, "cifar": cifar_target}


# --------------------------------------------------------------------------------------------- seeds
def idx_seeds() -> list[bytes]:
    images = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    labels = np.array([3, 7], dtype=np.uint8)
    raws = [encode_idx(images), encode_idx(labels), encode_idx(np.array([1.5, -2.0], dtype=np.float32)),
            encode_idx(np.array([[1, -2]], dtype=np.int16))]
    return ([b"\x00" + raw for raw in raws] + [b"\x01" + gzip.compress(raw, mtime=0) for raw in raws]
            + [b"\x02" + raw for raw in raws])


def image_seeds() -> list[bytes]:
    seeds = []
    digit = Image.new("L", (12, 12), 255)
    ImageDraw.Draw(digit).line([(3, 2), (8, 10)], fill=0, width=2)
    for image, fmt in [(digit, "PNG"), (digit.convert("RGB"), "JPEG"), (digit, "GIF"), (digit, "BMP"),
                       (digit, "TIFF"), (digit.convert("RGBA"), "PNG"), (digit.convert("I;16"), "PNG"),
                       (digit.convert("F"), "TIFF"), (digit.convert("RGB"), "WEBP"), (digit.convert("P"), "PNG")]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        seeds.append(buffer.getvalue())
    return seeds


def cifar_archive(records: dict[str, bytes] | None = None, meta: bytes | None = None) -> bytes:
    """A valid tiny archive (one black record per batch, labels 0..5), optionally with members replaced."""
    members = [*TINY_CIFAR.archive.members["train"], *TINY_CIFAR.archive.members["test"]]
    blobs = {name: encode(np.zeros((1, 32, 32, 3), np.uint8), np.array([i])) for i, name in enumerate(members)}
    blobs.update(records or {})
    blobs[f"{FOLDER}/batches.meta.txt"] = meta if meta is not None else "\n".join(CIFAR10.classes).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return gzip.compress(buffer.getvalue(), mtime=0)


def cifar_seeds() -> list[bytes]:
    archive = cifar_archive()
    return [b"\x00" + archive, b"\x01" + gzip.decompress(archive)]


SEEDS = {"idx": idx_seeds, "image": image_seeds, "cifar": cifar_seeds}


# ------------------------------------------------------------------------------------------- replay
def corpus_inputs(target: str) -> list[Path]:
    folder = CORPUS / target
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []


def bounded(target: str, data: bytes) -> None:
    """Run a target and check its peak allocation stays in proportion to the input (IDX and CIFAR readers)."""
    tracemalloc.start()
    try:
        TARGETS[target](data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if target != "image":  # an image may legitimately declare up to MAX_PIXELS: bounded by ImageTooLarge instead
        assert peak <= 4 * len(data) * GZIP_MAX_RATIO + (32 << 20), f"{target}: peak {peak:,} bytes"


@pytest.mark.unit
def test_the_seeds_are_valid_inputs_and_pass(tmp_path):
    """The seeds reach the deep paths: each is read successfully (a seed that fails early seeds nothing)."""
    for raw in idx_seeds():
        idx_target(raw)
    parse_idx(decompress(idx_seeds()[4][1:], "seed"), "seed")
    for seed in cifar_seeds():
        cifar_target(seed)
    (tmp_path / "seed.tar.gz").write_bytes(cifar_archive())
    splits = read_archive(tmp_path / "seed.tar.gz", TINY_CIFAR.archive, TINY_CIFAR.classes)
    assert splits["train"][1].tolist() == [0, 1, 2, 3, 4] and splits["test"][1].tolist() == [5]
    for seed in image_seeds():
        image_target(seed)


@pytest.mark.unit
def test_every_input_that_ever_crashed_a_target_is_handled():
    replayed = 0
    for target in TARGETS:
        for path in corpus_inputs(target):
            bounded(target, path.read_bytes())
            replayed += 1
    assert replayed >= 1, "the crash corpus is empty: tests/fuzz_corpus/<target>/ should hold every past crash"


# --------------------------------------------------------------------------------------- hypothesis
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw, seeds):
    """A seed with random bytes flipped, cut, inserted or appended: close enough to valid to reach deep code."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "append", "header"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif kind == "header" and len(data) > 8:  # a big-endian uint32 somewhere in the first 24 bytes
            at = draw(st.integers(0, min(len(data), 24) - 4))
            data[at:at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 255, 2**16, 2**31, 2**32 - 1])))
    return bytes(data)


@pytest.mark.unit
@FAST
@given(st.binary(max_size=256) | mutated(idx_seeds()))
def test_idx_reader_raises_only_idx_errors(data):
    bounded("idx", data)


@pytest.mark.unit
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=128) | mutated(image_seeds()))
def test_upload_preprocessing_raises_only_its_own_errors(data):
    image_target(data)


@pytest.mark.unit
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=128) | mutated(cifar_seeds()))
def test_cifar_reader_raises_only_cifar_errors(data):
    bounded("cifar", data)


@pytest.mark.unit
@FAST
@given(st.lists(st.integers(0, 4), min_size=1, max_size=4), st.integers(0, 255),
       st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]), st.data())
def test_valid_idx_files_read_back_through_gzip_split_in_members(shape, cut, dtype, data):
    """Round trip through a gzip stream written as two members at an arbitrary point (as `cat a.gz b.gz`)."""
    array = np.zeros(shape, dtype=dtype) + data.draw(st.integers(0, 100))
    raw = encode_idx(array)
    cut = min(cut, len(raw))
    stream = gzip.compress(raw[:cut], mtime=0) + gzip.compress(raw[cut:], mtime=0)
    np.testing.assert_array_equal(parse_idx(decompress(stream, "two-members.gz")), array)


# ------------------------------------------------------------------------------------------- atheris
def atheris_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True).returncode == 0


def run_atheris(target: str, seconds: int, work: Path) -> tuple[int, str]:
    """Fuzz one target in a subprocess, bounded in time, memory per process and time per input."""
    seeds = work / "seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS[target]()):
        (seeds / f"seed-{i}").write_bytes(seed)
    for path in corpus_inputs(target):  # past crashes steer the fuzzer back to what once broke
        (seeds / f"crash-{path.name}").write_bytes(path.read_bytes())
    artifacts = work / "artifacts"
    artifacts.mkdir(exist_ok=True)
    command = [sys.executable, __file__, target, f"-max_total_time={seconds}", "-rss_limit_mb=2048",
               "-timeout=60", "-max_len=65536", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(seeds)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 300)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_atheris_finds_no_crash(target, tmp_path):
    """Coverage-guided fuzzing of one target for CNNLAB_FUZZ_SECONDS (default 60) in a bounded subprocess."""
    if not atheris_available():
        pytest.skip("atheris is not installed (CPython < 3.12 on x86-64 Linux: pip install '.[test]')")
    code, log = run_atheris(target, int(os.environ.get("CNNLAB_FUZZ_SECONDS", "60")), tmp_path)
    # crash-, oom- and timeout- files are findings; slow-unit- files only note an input that took over 10 s
    crashes = sorted(path for path in (tmp_path / "artifacts").iterdir() if not path.name.startswith("slow-unit-"))
    assert code == 0 and not crashes, (f"atheris found {len(crashes)} crashing input(s) in {tmp_path / 'artifacts'}: "
                                       f"fix them, then add them to {CORPUS / target}/\n{log[-4000:]}")
    executed = [line for line in log.splitlines() if "stat::number_of_executed_units" in line]
    assert executed and int(executed[-1].split(":")[-1]) > 0, log[-2000:]


def main(argv: list[str]) -> None:
    import atheris

    target = TARGETS[argv[1]]

    def one_input(data: bytes) -> None:
        target(data)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
