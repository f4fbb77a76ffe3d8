import gzip
import struct

import numpy as np
import pytest

from cnnlab.data.idx import IDXError, encode_idx, parse_idx, read_idx, write_idx

pytestmark = pytest.mark.unit  # every test here is in-process and quick


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip_every_dtype_raw_and_gzip(tmp_path, dtype, suffix):
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == "uint8":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\x00\x00")
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_header_is_big_endian_as_in_the_mnist_files():
    data = encode_idx(np.zeros((60000, 28, 28), dtype=np.uint8)[:2])
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (2, 28, 28)


def bad(data: bytes, tmp_path, name="bad.idx"):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(IDXError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    return str(info.value)


GOOD = encode_idx(np.arange(12, dtype=np.uint8).reshape(3, 4))


def test_empty_file(tmp_path):
    assert "0 bytes is too short" in bad(b"", tmp_path)


def test_bad_magic(tmp_path):
    assert "bad magic number 0x01000802" in bad(b"\x01\x00\x08\x02" + GOOD[4:], tmp_path)


def test_unknown_dtype_code(tmp_path):
    assert "bad magic number 0x00000702" in bad(b"\x00\x00\x07\x02" + GOOD[4:], tmp_path)


def test_zero_dimensions(tmp_path):
    assert "0 dimensions" in bad(b"\x00\x00\x08\x00", tmp_path)


def test_header_shorter_than_its_dimensions(tmp_path):
    assert "needs 12 header bytes" in bad(GOOD[:9], tmp_path)


def test_one_byte_short(tmp_path):
    message = bad(GOOD[:-1], tmp_path)
    assert "shape (3, 4)" in message and "12 payload bytes" in message and "holds 11" in message
    assert "truncated" in message


def test_one_byte_long(tmp_path):
    assert "trailing data" in bad(GOOD + b"\x00", tmp_path)


def test_truncated_gzip(tmp_path):
    assert "gzip stream is corrupt or truncated" in bad(gzip.compress(GOOD)[:-6], tmp_path, "bad.gz")


def test_huge_declared_shape_is_refused_without_allocating():
    header = struct.pack(">HBB3I", 0, 8, 3, 10**9, 1000, 1000)
    with pytest.raises(IDXError, match="trailing data|truncated"):
        parse_idx(header + b"\x00" * 10)


def test_parse_returns_native_byte_order():
    array = np.array([1, 256, -2], dtype=np.int32)
    back = parse_idx(encode_idx(array))
    assert back.dtype.isnative and back.tolist() == [1, 256, -2]
