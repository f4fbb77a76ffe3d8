"""The convolution playground: convolution and pooling from scratch, in NumPy only (no torch)."""
from __future__ import annotations

import math

Padding = str | int | tuple[int, int]


def output_size(in_size: int, kernel_size: int, stride: int = 1, padding: str | int = "valid",
                dilation: int = 1) -> int:
    """Length of one output side: floor((in + 2*pad - dilation*(k-1) - 1) / stride) + 1.

    padding "valid" means no padding; "same" means ceil(in / stride) whatever the kernel (Keras).
    """
    if stride < 1 or dilation < 1 or kernel_size < 1:
        raise ValueError(f"kernel_size, stride and dilation must be >= 1, got "
                         f"kernel_size={kernel_size}, stride={stride}, dilation={dilation}")
    if padding == "same":
        return math.ceil(in_size / stride)
    pad = 0 if padding == "valid" else padding
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"padding must be 'valid', 'same' or an int >= 0, got {padding!r}")
    span = dilation * (kernel_size - 1) + 1  # pixels the (dilated) kernel covers
    if in_size + 2 * pad < span:
        raise ValueError(f"kernel spans {span} pixels but the padded input has only {in_size + 2 * pad}")
    return (in_size + 2 * pad - span) // stride + 1
