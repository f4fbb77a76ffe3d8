"""The convolution playground: convolution and pooling from scratch, in NumPy only (no torch).

Images are channels-last like the lesson: (H, W) for grey, (H, W, C) for colour.
Every function computes what a CNN layer computes, so the results match
``torch.nn.functional.conv2d`` / ``max_pool2d`` / ``avg_pool2d`` (see tests/test_conv.py).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Padding = str | int | tuple[int, int]
Pair = int | tuple[int, int]

# Output rows handled per matrix product in conv2d: bounds the im2col copy to about
# _TARGET_IM2COL_ELEMENTS numbers (a few MB) whatever the image size.
_TARGET_IM2COL_ELEMENTS = 1 << 20


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


def same_padding(in_size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """(before, after) zeros for Keras "same" padding; the odd pixel goes after (bottom/right)."""
    span = dilation * (kernel_size - 1) + 1
    total = max((math.ceil(in_size / stride) - 1) * stride + span - in_size, 0)
    return total // 2, total - total // 2


def explain_output_size(in_size: int, kernel_size: int, stride: int = 1, padding: str | int = "valid",
                        dilation: int = 1) -> str:
    """The output-size arithmetic as a sentence, e.g. 'out = floor((28 + 2*0 - 3) / 1) + 1 = 26'."""
    out = output_size(in_size, kernel_size, stride, padding, dilation)
    span = dilation * (kernel_size - 1) + 1
    span_text = f"{span}" if dilation == 1 else f"({dilation}*({kernel_size}-1)+1)"
    if padding == "same":
        before, after = same_padding(in_size, kernel_size, stride, dilation)
        return (f"out = ceil({in_size} / {stride}) = {out}   (same padding: total = "
                f"max(({out}-1)*{stride} + {span} - {in_size}, 0) = {before + after}, "
                f"{before} before and {after} after)")
    pad = 0 if padding == "valid" else padding
    return f"out = floor(({in_size} + 2*{pad} - {span_text}) / {stride}) + 1 = {out}"


# ---------------------------------------------------------------- argument checking

def _pair(value: Pair, name: str) -> tuple[int, int]:
    """An int or a pair of ints >= 1 as (rows, cols)."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be an int >= 1 or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def padding_amounts(padding: Padding, in_hw: tuple[int, int], spans: tuple[int, int],
                    strides: tuple[int, int]) -> list[tuple[int, int]]:
    """Zeros (before, after) to add on the row and column axes for a padding spec; spans are the
    dilated window sizes (kh, kw)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0), (0, 0)]
        if padding == "same":  # spans already include dilation, so pass dilation=1
            return [same_padding(n, s, st) for n, s, st in zip(in_hw, spans, strides)]
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    pair = (padding, padding) if isinstance(padding, (int, np.integer)) else tuple(padding)
    if len(pair) != 2 or not all(isinstance(p, (int, np.integer)) and p >= 0 for p in pair):
        raise ValueError(f"padding must be 'valid', 'same', an int >= 0 or a pair of them, got {padding!r}")
    return [(int(p), int(p)) for p in pair]


def _as_hwc(image: np.ndarray) -> np.ndarray:
    """View a (H, W) or (H, W, C) image as (H, W, C)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    return image[:, :, None] if image.ndim == 2 else image


def _as_kernel_bank(kernel: np.ndarray, channels: int) -> np.ndarray:
    """View any accepted kernel shape as (kh, kw, C, F); reject shapes that do not fit the image."""
    kernel = np.asarray(kernel)
    if kernel.ndim == 2 and channels != 1:
        raise ValueError(
            f"a 2-D kernel {kernel.shape} needs a 2-D (grey) image, got {channels} channels; pass a "
            f"(kh, kw, {channels}) kernel (e.g. np.repeat(k[:, :, None], {channels}, axis=2)) to sum "
            f"over channels, or use conv2d_per_channel to keep the colours")
    if kernel.ndim not in (2, 3, 4):
        raise ValueError(f"kernel must be (kh, kw), (kh, kw, C) or (kh, kw, C, F), got shape {kernel.shape}")
    # Missing C and F axes become 1. (Annotated: numpy's stubs take a tuple of unknown length for a 0-d shape.)
    bank: np.ndarray = kernel.reshape(kernel.shape + (1,) * (4 - kernel.ndim))
    if bank.shape[2] != channels:
        raise ValueError(f"kernel has {bank.shape[2]} input channels but the image has {channels}: "
                         f"kernel shape {kernel.shape}")
    if 0 in bank.shape:
        raise ValueError(f"kernel must not be empty, got shape {kernel.shape}")
    return bank


def _check_fits(padded_hw: tuple[int, int], spans: tuple[int, int], what: str) -> None:
    """Raise if the window (kernel or pool) is bigger than the padded image."""
    if padded_hw[0] < spans[0] or padded_hw[1] < spans[1]:
        raise ValueError(f"{what} spans {spans[0]}x{spans[1]} pixels but the padded image is only "
                         f"{padded_hw[0]}x{padded_hw[1]}")


def _windows(padded: np.ndarray, spans: tuple[int, int], strides: tuple[int, int],
             dilations: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Every window the kernel visits, as a view: (H_out, W_out, C, kh, kw). No copy."""
    view = sliding_window_view(padded, spans, axis=(0, 1))  # (H-span_h+1, W-span_w+1, C, span_h, span_w)
    return view[::strides[0], ::strides[1], :, ::dilations[0], ::dilations[1]]


# ---------------------------------------------------------------- convolution

def conv2d(image: np.ndarray, kernel: np.ndarray, stride: Pair = 1, padding: Padding = "valid",
           dilation: Pair = 1, flip: bool = False) -> np.ndarray:
    """Slide `kernel` over `image` and sum the products at each position (cross-correlation, like CNNs).

    Shapes: (H, W) image with a (kh, kw) kernel -> (H', W'); (H, W, C) with (kh, kw, C) -> (H', W')
    (one kernel per channel, results summed); (kh, kw, C, F) -> (H', W', F). A 2-D kernel on a colour
    image is an error (use conv2d_per_channel). flip=True rotates the kernel 180 degrees: textbook
    convolution. padding: "valid", "same" (Keras: out = ceil(in / stride)), an int or a pair.
    """
    hwc = _as_hwc(image)
    bank = _as_kernel_bank(kernel, hwc.shape[2])
    if flip:
        bank = bank[::-1, ::-1]
    strides, dilations = _pair(stride, "stride"), _pair(dilation, "dilation")
    spans = tuple(d * (k - 1) + 1 for d, k in zip(dilations, bank.shape[:2]))
    pads = padding_amounts(padding, hwc.shape[:2], spans, strides)
    dtype = np.result_type(hwc.dtype, bank.dtype, np.float32)  # float32 stays float32, ints -> float64
    padded = np.pad(hwc.astype(dtype, copy=False), pads + [(0, 0)])
    dilated = "" if dilations == (1, 1) else f" with dilation {dilations}"
    _check_fits(padded.shape[:2], spans, f"kernel {bank.shape[0]}x{bank.shape[1]}{dilated}")

    windows = _windows(padded, spans, strides, dilations)  # (H_out, W_out, C, kh, kw)
    out = _matmul_windows(windows, bank.astype(dtype, copy=False))  # (H_out, W_out, F)
    return out[:, :, 0] if np.ndim(kernel) in (2, 3) else out


def _matmul_windows(windows: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """im2col in blocks of output rows: each window flattened to a row, times the flattened kernels.

    windows: (H_out, W_out, C, kh, kw) view; bank: (kh, kw, C, F). Returns (H_out, W_out, F).
    Blocking keeps the copied window matrix small while each matmul stays big enough to be fast.
    """
    h_out, w_out, c, kh, kw = windows.shape
    # Order each window (kh, kw, C) like the kernel bank: in memory the C values of a pixel and the
    # kw pixels of a kernel row are neighbours, so the copy below moves contiguous runs.
    windows = windows.transpose(0, 1, 3, 4, 2)                       # (H_out, W_out, kh, kw, C)
    weights = bank.reshape(kh * kw * c, -1)                          # (kh*kw*C, F)
    out = np.empty((h_out, w_out, weights.shape[1]), dtype=weights.dtype)
    rows_per_block = max(1, _TARGET_IM2COL_ELEMENTS // max(1, w_out * c * kh * kw))
    for top in range(0, h_out, rows_per_block):
        block = windows[top:top + rows_per_block]                       # (rows, W_out, kh, kw, C)
        columns = block.reshape(-1, kh * kw * c)                        # copy: (rows*W_out, kh*kw*C)
        out[top:top + rows_per_block] = (columns @ weights).reshape(block.shape[0], w_out, -1)
    return out


def conv2d_per_channel(image: np.ndarray, kernel: np.ndarray, stride: Pair = 1, padding: Padding = "valid",
                       dilation: Pair = 1, flip: bool = False) -> np.ndarray:
    """Convolve each channel of an (H, W, C) image with the same 2-D kernel: (H', W', C), colours kept."""
    hwc = _as_hwc(image)
    kernel = np.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"conv2d_per_channel needs a 2-D (kh, kw) kernel, got shape {kernel.shape}")
    channels = [conv2d(hwc[:, :, c], kernel, stride, padding, dilation, flip) for c in range(hwc.shape[2])]
    return np.stack(channels, axis=-1) if np.ndim(image) == 3 else channels[0]


# ---------------------------------------------------------------- pooling

def max_pool2d(image: np.ndarray, size: Pair = 2, stride: Pair | None = None,
               padding: Padding = "valid") -> np.ndarray:
    """Largest value in each size x size window; (H, W) -> (H', W'), (H, W, C) -> (H', W', C).

    stride defaults to size. Padded cells never win: they are ignored (Keras "same", torch).
    """
    padded, real, spans, strides = _pool_inputs(image, size, stride, padding, fill=-np.inf)
    out = _windows(padded, spans, strides).max(axis=(-2, -1))  # (H_out, W_out, C)
    return out[:, :, 0] if np.ndim(image) == 2 else out


def avg_pool2d(image: np.ndarray, size: Pair = 2, stride: Pair | None = None,
               padding: Padding = "valid") -> np.ndarray:
    """Mean of each size x size window; padded cells are ignored (divide by the count of real cells)."""
    padded, real, spans, strides = _pool_inputs(image, size, stride, padding, fill=0.0)
    sums = _windows(padded, spans, strides).sum(axis=(-2, -1))   # (H_out, W_out, C)
    counts = _windows(real, spans, strides).sum(axis=(-2, -1))   # (H_out, W_out, 1) real cells per window
    out = sums / counts
    return out[:, :, 0] if np.ndim(image) == 2 else out


def _pool_inputs(image: np.ndarray, size: Pair, stride: Pair | None, padding: Padding, fill: float
                 ) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[int, int]]:
    """Padded image, a padded 'is real' mask (H_p, W_p, 1), window sizes and strides for pooling."""
    hwc = _as_hwc(image)
    spans = _pair(size, "size")
    strides = spans if stride is None else _pair(stride, "stride")
    pads = padding_amounts(padding, hwc.shape[:2], spans, strides)
    if any(before >= s or after >= s for (before, after), s in zip(pads, spans)):
        # A window made only of padding would have no real cell to take the max or mean of.
        raise ValueError(f"pool padding must be smaller than the window {spans}, got {padding!r}")
    dtype = np.result_type(hwc.dtype, np.float32)
    padded = np.pad(hwc.astype(dtype, copy=False), pads + [(0, 0)], constant_values=fill)
    _check_fits(padded.shape[:2], spans, f"pool window {spans[0]}x{spans[1]}")
    real = np.pad(np.ones(hwc.shape[:2] + (1,), dtype=dtype), pads + [(0, 0)])
    return padded, real, spans, strides
