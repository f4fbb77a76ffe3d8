"""The IDX file format of MNIST and Fashion-MNIST: read and write, raw or gzip, validated.

An IDX file is a big-endian header followed by the payload:
  bytes 0-1  zero
  byte  2    dtype code (0x08 = uint8, ...)
  byte  3    number of dimensions
  then one uint32 per dimension, then prod(dims) items of that dtype.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from cnnlab import files
from cnnlab.errors import UserError
from cnnlab.files import read_bytes as read_regular

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


# Refused from the header, before anything is inflated or allocated: the largest real IDX file
# (MNIST's training images) holds 47 MB, so 4 GiB is generous and still bounds memory.
MAX_PAYLOAD_BYTES = 4 << 30
# Deflate's best case is one 258-byte match per 2 bits, 1032:1; a gzip file of n bytes cannot
# inflate to more than about n * 1032 bytes, so a header declaring more is forged or the file cut.
GZIP_MAX_RATIO = 1032
MAX_RAW_BYTES = MAX_PAYLOAD_BYTES + (1 << 20)  # a file as stored: the payload, its header and gzip's framing
HEADER_MIN = 4  # zero, zero, dtype code, ndim
MAX_NDIM = 32  # NumPy 1's limit (NumPy 2 allows 64); MNIST's files have 1 or 3
INFLATE_INPUT_BYTES = 1 << 20  # compressed bytes handed to zlib per step, at most
FIRST_INPUT_BYTES = 1 << 10  # ... and at the start of each gzip member


class IDXError(UserError, ValueError):
    """A file that is not a valid IDX file; the message names the file and what is wrong."""


def decompress(raw: bytes, source: str) -> bytes:
    """The IDX bytes of a gzip stream (detected by its magic), inflated no further than its header declares.

    The header is read first; a declared size that is absurd (over MAX_PAYLOAD_BYTES, or more than
    the compressed size can hold) is refused before anything else is inflated, and inflating stops
    one byte past the declared size. Raw IDX bytes pass through unchanged (parse_idx checks them).
    """
    if not raw.startswith(GZIP_MAGIC):
        return raw
    stream = GzipStream(raw, source)
    head = stream.read(HEADER_MIN)
    if len(head) < HEADER_MIN:
        raise IDXError(f"{source}: {len(head)} bytes is too short for an IDX header (needs at least 4)")
    dims = stream.read(4 * check_magic(head, source))
    header = head + dims
    shape, dtype, expected = declared(header, len(header), source)
    bound = len(raw) * GZIP_MAX_RATIO
    if len(header) + expected > bound:
        raise IDXError(f"{source}: header declares shape {shape} of {dtype.name} ({expected:,} payload bytes) but "
                       f"the file is a {len(raw):,}-byte gzip stream, which inflates to at most {bound:,} bytes "
                       "(a forged header or a truncated file); refused before inflating it")
    payload = stream.read(expected + 1)  # one byte more than declared tells "trailing data" apart
    if len(payload) > expected:
        raise IDXError(f"{source}: header declares shape {shape} of {dtype.name} ({expected:,} payload bytes) "
                       f"but the file holds more than {expected:,} payload bytes (trailing data; "
                       "decompression stopped there)")
    if len(payload) < expected:
        raise IDXError(f"{source}: header declares shape {shape} of {dtype.name} ({expected:,} payload bytes) "
                       f"but the file holds {len(payload):,} payload bytes (truncated)")
    return header + payload


class GzipStream:
    """A gzip file (one member or several, as `gzip` writes them) inflated on demand, never past what is asked.

    zlib copies the input it has not used at each member's end, so each member is fed small pieces first
    (FIRST_INPUT_BYTES, doubling up to INFLATE_INPUT_BYTES): a file of many tiny members stays linear.
    """

    def __init__(self, raw: bytes, source: str):
        self.raw = memoryview(raw)
        self.offset = 0  # compressed bytes handed to zlib so far; the pending input is raw[offset - len(tail):offset]
        self.tail = b""  # input handed over that zlib has not consumed yet (kept back by max_length)
        self.source = source
        self.inflater: zlib._Decompress | None = None  # the current member's decompressor; None between members
        self.piece = FIRST_INPUT_BYTES
        self.members = 0  # gzip members started

    def read(self, size: int) -> bytes:
        """Up to `size` more bytes; fewer only where the stream ends."""
        parts, left = [], size
        try:
            while left > 0:
                inflater = self.inflater if self.inflater is not None else self.next_member()
                if inflater is None:
                    break
                if not self.tail:
                    self.tail = bytes(self.raw[self.offset:self.offset + self.piece])
                    self.offset += len(self.tail)
                    self.piece = min(2 * self.piece, INFLATE_INPUT_BYTES)
                chunk = inflater.decompress(self.tail, left)  # output never exceeds `left`
                self.tail = inflater.unconsumed_tail
                parts.append(chunk)
                left -= len(chunk)
                if inflater.eof:  # the input after the member goes back (unconsumed_tail may repeat it)
                    self.offset -= len(inflater.unused_data)
                    self.tail, self.inflater = b"", None
                elif not self.tail and self.offset >= len(self.raw):
                    raise IDXError(f"{self.source}: gzip stream is corrupt or truncated (it ends before its "
                                   "end-of-stream marker)")
        except zlib.error as exc:
            raise IDXError(f"{self.source}: gzip stream is corrupt or truncated ({exc})") from None
        return b"".join(parts)

    def next_member(self) -> zlib._Decompress | None:
        """Start the next gzip member: its decompressor; None at the end (zero padding after a member is allowed,
        as gzip does)."""
        if self.members:
            step = FIRST_INPUT_BYTES
            while self.offset < len(self.raw) and self.raw[self.offset] == 0:  # skip the padding, piece by piece
                piece = bytes(self.raw[self.offset:self.offset + step])
                self.offset += len(piece) - len(piece.lstrip(b"\x00"))
                step = min(2 * step, INFLATE_INPUT_BYTES)
            if self.offset >= len(self.raw):
                return None
        if self.raw[self.offset:self.offset + 2] != GZIP_MAGIC:
            raise IDXError(f"{self.source}: gzip stream is corrupt or truncated (found "
                           f"{len(self.raw) - self.offset:,} bytes that are not gzip after the end of the "
                           "compressed data)")
        self.inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and CRC-32/length trailer
        self.piece = FIRST_INPUT_BYTES
        self.members += 1
        return self.inflater


def check_magic(head: bytes, source: str) -> int:
    """The number of dimensions in a valid 4-byte IDX magic number."""
    zero, code, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise IDXError(f"{source}: bad magic number 0x{head[:4].hex()}: expected 0x0000 followed by a "
                       f"dtype code ({', '.join(hex(c) for c in IDX_DTYPES)}) and the number of dimensions")
    if not 1 <= ndim <= MAX_NDIM:
        raise IDXError(f"{source}: header declares {ndim} dimensions; expected 1 to {MAX_NDIM}")
    return ndim


def declared(data: bytes, size: int, source: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, payload bytes) that an IDX header declares; `size` is the file's length, for messages.

    Sizes are Python integers (no overflow); one over MAX_PAYLOAD_BYTES is refused here, before any allocation.
    """
    if len(data) < HEADER_MIN:
        raise IDXError(f"{source}: {len(data)} bytes is too short for an IDX header (needs at least 4)")
    ndim = check_magic(data, source)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXError(f"{source}: header declares {ndim} dimensions, which needs {header_len} header "
                       f"bytes, but the file has only {size}")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[data[2]]
    expected = math.prod(shape) * dtype.itemsize
    # NumPy also refuses a shape whose non-zero sides overflow, even when one side is 0: (0, 2**32, 2**32)
    extent = math.prod(max(side, 1) for side in shape) * dtype.itemsize
    if max(expected, extent) > MAX_PAYLOAD_BYTES:
        size_of = f"{expected:,} payload bytes" if expected else f"{extent:,} bytes counting its non-zero sides"
        raise IDXError(f"{source}: header declares shape {shape} of {dtype.name} ({size_of}), more than the "
                       f"{MAX_PAYLOAD_BYTES:,} an IDX file may hold (a forged header or a truncated file); "
                       "refused before reading the payload")
    return shape, dtype, expected


def read_raw(path: str | Path) -> bytes:
    """A file's bytes as stored (`cnnlab.files`): a regular file only (a FIFO, a device or a link to one
    is refused without blocking), refused unread when larger than any IDX file (compressed or not) may be, and
    never read past that bound (a file that grows while it is read)."""
    return read_regular(path, MAX_RAW_BYTES, "dataset file")


def read_bytes(path: str | Path) -> bytes:
    """The decompressed bytes of a raw or gzip-compressed file."""
    return decompress(read_raw(path), str(path))


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array of the header's shape, in native byte order."""
    shape, dtype, expected = declared(data, len(data), source)
    header_len = 4 + 4 * len(shape)
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
    for code, dtype in IDX_DTYPES.items():  # noqa: B007 (`code` is used after the loop)
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            break
    else:
        raise ValueError(f"IDX has no code for dtype {array.dtype}")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an array as IDX, atomically (`cnnlab.files.write_bytes`); gzip when `compress` is true or, if
    None, when the name ends in .gz."""
    path = Path(path)
    data = encode_idx(array)
    if compress or (compress is None and path.suffix == ".gz"):
        data = gzip.compress(data, mtime=0)
    files.write_bytes(path, data)
