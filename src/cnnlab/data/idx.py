"""The IDX file format of MNIST and Fashion-MNIST: read and write, raw or gzip, validated.

An IDX file is a big-endian header followed by the payload:
  bytes 0-1  zero
  byte  2    dtype code (0x08 = uint8, ...)
  byte  3    number of dimensions
  then one uint32 per dimension, then prod(dims) items of that dtype.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

# IDX dtype code -> big-endian NumPy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """A file that is not a valid IDX file; the message names the file and what is wrong."""


def decompress(raw: bytes, source: str) -> bytes:
    """The bytes of a gzip stream (detected by its magic); raw IDX bytes pass through unchanged."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IDXError(f"{source}: gzip stream is corrupt or truncated ({exc})") from None


def read_bytes(path: str | Path) -> bytes:
    """The decompressed bytes of a raw or gzip-compressed file."""
    return decompress(Path(path).read_bytes(), str(path))


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array of the header's shape, in native byte order."""
    if len(data) < 4:
        raise IDXError(f"{source}: {len(data)} bytes is too short for an IDX header (needs at least 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise IDXError(f"{source}: bad magic number 0x{data[:4].hex()}: expected 0x0000 followed by a "
                       f"dtype code ({', '.join(hex(c) for c in IDX_DTYPES)}) and the number of dimensions")
    if ndim == 0:
        raise IDXError(f"{source}: header declares 0 dimensions; expected at least 1")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXError(f"{source}: header declares {ndim} dimensions, which needs {header_len} header "
                       f"bytes, but the file has only {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        raise IDXError(f"{source}: header declares shape {shape} of {dtype.name} ({expected} payload bytes) "
                       f"but the file holds {found} payload bytes "
                       f"({'truncated' if found < expected else 'trailing data'})")
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a raw or gzip IDX file, validating magic number, dtype, dimensions and payload length."""
    return parse_idx(read_bytes(path), source=str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of an array (uint8, int8, int16, int32, float32 or float64)."""
    for code, dtype in IDX_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            break
    else:
        raise ValueError(f"IDX has no code for dtype {array.dtype}")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an array as IDX; gzip when `compress` is true or, if None, when the name ends in .gz."""
    path = Path(path)
    data = encode_idx(array)
    if compress or (compress is None and path.suffix == ".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
