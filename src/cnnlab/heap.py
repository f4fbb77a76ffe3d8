"""The C heap under torch's CPU tensors (glibc's malloc): reused by training steps, trimmed while streaming.

Training: tensors freed every step come back from the heap, not as fresh pages (`keep_freed_memory`).

A training step allocates and frees the same large tensors every time (the gradients: 2.8 MB for the lesson's
dense layer; activations and their gradients). glibc serves an allocation of more than its mmap threshold
(128 kB at start, raised only as such blocks are freed) with fresh pages from the kernel and returns them on
free, so unless something earlier in the process raised the threshold, every step pays a page fault for each
4 kB it touches again: a Trainer built in a fresh process took 1,675 faults per `seed` step (6.5 ms a step
against 4.3 with the threshold set). `cnnlab train` loads its dataset first, which raises the threshold as
a side effect, so there the setting changes little (BENCHMARKS.md, "Engine speed, second pass"); it makes the
step's memory behaviour the same whatever ran before. The threshold is fixed at glibc's maximum (32 MB) and
freed memory is kept up to 128 MB. Linux with glibc only; elsewhere, or with CNNLAB_MALLOC_TUNING=off (to
measure without it), nothing changes.

Streaming image folders: heap memory freed in the middle of the heap stays resident, so `trim_heap` gives it
back now and then (`cnnlab.data.folder`, which calls it whenever the process has grown by 128 MiB).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024  # free memory kept at the heap's top before it goes back to the kernel
SWITCH = "CNNLAB_MALLOC_TUNING"


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim are glibc's); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # by name: find_library would run ldconfig at every import (25 ms)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim  # noqa: B018 -- musl and others have neither
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()
_kept: bool | None = None  # None: not tried yet in this process; then whether both thresholds were set


def keep_freed_memory() -> bool:
    """Set glibc's thresholds, once per process (for good: every later allocation of the process is served so);
    whether they are set (False: not glibc, switched off, or refused)."""
    global _kept
    if _kept is None:
        if _LIBC is None or os.environ.get(SWITCH, "").lower() in ("off", "0", "false"):
            return False
        mmap_set = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        _kept = mmap_set and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _kept


def trim_heap() -> None:
    """Give the freed parts of the C heap back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB; training fixes it there),
    after which per-batch tensors of a few MB come from the heap, which fragments and grows with the number of
    batches: one epoch over 16,000 96x96 images peaked at 639 MiB against 350 MiB for 1,500. Trimming whenever
    the process has grown by a slack keeps the peak flat. Trimming after every batch, or a low fixed threshold,
    bounds it too but makes each batch fault its pages in again: 20-30% slower steps for deep-color
    (bench/folder_memory.py, BENCHMARKS.md).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
