"""cnnlab.playground.conv against torch.nn.functional and scipy, the lesson's facts, and every error message."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import convolve2d

from cnnlab.playground.conv import (
    avg_pool2d,
    conv2d,
    conv2d_per_channel,
    explain_output_size,
    max_pool2d,
    output_size,
    same_padding,
)

SETTINGS = settings(max_examples=150, deadline=None)
sides = st.integers(1, 11)
small = st.integers(1, 4)
pairs = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
paddings = st.one_of(st.just("valid"), st.just("same"), st.integers(0, 2),
                     st.tuples(st.integers(0, 2), st.integers(0, 2)))


def as_pair(value):
    return (value, value) if isinstance(value, int) else value


def explicit_pads(padding, in_hw, window, stride, dilation=(1, 1)):
    """(top, bottom, left, right) written out independently of the library (Keras rule for 'same')."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        rows, cols = [], []
        for n, k, s, d, out in zip(in_hw, window, stride, dilation, (rows, cols)):
            total = max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
            out += [total // 2, total - total // 2]
        return rows[0], rows[1], cols[0], cols[1]
    p = as_pair(padding)
    return p[0], p[0], p[1], p[1]


def torch_conv(image_hwc, bank, stride, padding, dilation):
    """Reference: torch conv2d on an explicitly padded NCHW float64 tensor -> (H', W', F)."""
    x = torch.from_numpy(image_hwc).permute(2, 0, 1)[None]
    top, bottom, left, right = explicit_pads(padding, image_hwc.shape[:2], bank.shape[:2], stride, dilation)
    x = F.pad(x, (left, right, top, bottom))
    w = torch.from_numpy(bank).permute(3, 2, 0, 1)          # (F, C, kh, kw)
    return F.conv2d(x, w, stride=stride, dilation=dilation)[0].permute(1, 2, 0).numpy()


def fits(in_hw, pads, window, dilation=(1, 1)):
    top, bottom, left, right = pads
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, window)]
    return in_hw[0] + top + bottom >= spans[0] and in_hw[1] + left + right >= spans[1]


# ---------------------------------------------------------------- conv2d == torch

@SETTINGS
@given(h=sides, w=sides, c=st.integers(1, 3), f=st.integers(1, 3), kh=small, kw=small, stride=pairs,
       dilation=st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))),
       padding=paddings, kernel_ndim=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**16))
def test_conv2d_matches_torch(h, w, c, f, kh, kw, stride, dilation, padding, kernel_ndim, seed):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((h, w, c))
    bank = rng.standard_normal((kh, kw, c, f))
    if kernel_ndim < 4:                       # 3-D kernel: one output channel; 2-D: grey image too
        bank = bank[:, :, :, :1]
    if kernel_ndim == 2:
        image, bank = image[:, :, :1], bank[:, :, :1]
    kernel = bank.reshape(bank.shape[:kernel_ndim]) if kernel_ndim < 4 else bank
    lib_image = image[:, :, 0] if kernel_ndim == 2 else image
    pads = explicit_pads(padding, (h, w), (kh, kw), as_pair(stride), as_pair(dilation))
    if not fits((h, w), pads, (kh, kw), as_pair(dilation)):
        with pytest.raises(ValueError, match="spans"):
            conv2d(lib_image, kernel, stride=stride, padding=padding, dilation=dilation)
        return
    ours = conv2d(lib_image, kernel, stride=stride, padding=padding, dilation=dilation)
    expected = torch_conv(image, bank, as_pair(stride), padding, as_pair(dilation))
    if kernel_ndim < 4:
        expected = expected[:, :, 0]
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    if padding == "same":
        assert ours.shape[:2] == (math.ceil(h / as_pair(stride)[0]), math.ceil(w / as_pair(stride)[1]))


@pytest.mark.unit
def test_int_padding_matches_torch_builtin_padding():
    rng = np.random.default_rng(0)
    image, bank = rng.standard_normal((9, 7, 2)), rng.standard_normal((3, 3, 2, 4))
    expected = F.conv2d(torch.from_numpy(image).permute(2, 0, 1)[None],
                        torch.from_numpy(bank).permute(3, 2, 0, 1), stride=2, padding=1)
    np.testing.assert_allclose(conv2d(image, bank, stride=2, padding=1),
                               expected[0].permute(1, 2, 0).numpy(), atol=1e-10)


@pytest.mark.unit
def test_float32_stays_float32_and_ints_become_float64():
    image = np.ones((5, 5), dtype=np.float32)
    assert conv2d(image, np.ones((3, 3), dtype=np.float32)).dtype == np.float32
    assert conv2d(np.ones((5, 5), dtype=np.uint8), np.ones((3, 3), dtype=int)).dtype == np.float64


@pytest.mark.unit
def test_per_channel_keeps_colour_and_equals_each_channel_alone():
    rng = np.random.default_rng(1)
    image, kernel = rng.random((8, 9, 3)), rng.standard_normal((3, 3))
    out = conv2d_per_channel(image, kernel, padding="same")
    assert out.shape == (8, 9, 3)
    for c in range(3):
        np.testing.assert_allclose(out[:, :, c], conv2d(image[:, :, c], kernel, padding="same"))
    np.testing.assert_allclose(conv2d_per_channel(image[:, :, 0], kernel), conv2d(image[:, :, 0], kernel))


# ---------------------------------------------------------------- flip=True is textbook convolution

@pytest.mark.unit
@SETTINGS
@given(h=st.integers(4, 12), w=st.integers(4, 12), kh=small, kw=small, seed=st.integers(0, 2**16))
def test_flip_is_scipy_convolve2d_valid(h, w, kh, kw, seed):
    rng = np.random.default_rng(seed)
    image, kernel = rng.standard_normal((h, w)), rng.standard_normal((kh, kw))
    np.testing.assert_allclose(conv2d(image, kernel, flip=True),
                               convolve2d(image, kernel, mode="valid"), atol=1e-10)


@pytest.mark.unit
@SETTINGS
@given(h=sides, w=sides, k=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2**16))
def test_flip_with_same_padding_is_scipy_same_for_odd_kernels(h, w, k, seed):
    rng = np.random.default_rng(seed)
    image, kernel = rng.standard_normal((h, w)), rng.standard_normal((k, k))
    np.testing.assert_allclose(conv2d(image, kernel, padding="same", flip=True),
                               convolve2d(image, kernel, mode="same"), atol=1e-10)


# ---------------------------------------------------------------- pooling == torch (padded cells ignored)

def torch_pool(image_hwc, mode, size, stride, padding):
    """Reference: explicit padding; -inf cells never win a max, and avg = sum / count of real cells."""
    x = torch.from_numpy(image_hwc).permute(2, 0, 1)[None]
    top, bottom, left, right = explicit_pads(padding, image_hwc.shape[:2], size, stride)
    if mode == "max":
        padded = F.pad(x, (left, right, top, bottom), value=-math.inf)
        out = F.max_pool2d(padded, size, stride)
    else:
        sums = F.avg_pool2d(F.pad(x, (left, right, top, bottom)), size, stride, divisor_override=1)
        ones = torch.ones_like(x[:, :1])
        counts = F.avg_pool2d(F.pad(ones, (left, right, top, bottom)), size, stride, divisor_override=1)
        out = sums / counts
    return out[0].permute(1, 2, 0).numpy()


@SETTINGS
@given(h=sides, w=sides, c=st.integers(1, 3), size=st.one_of(small, st.tuples(small, small)),
       stride=st.one_of(st.none(), pairs), padding=paddings, mode=st.sampled_from(["max", "avg"]),
       grey=st.booleans(), seed=st.integers(0, 2**16))
def test_pooling_matches_torch(h, w, c, size, stride, padding, mode, grey, seed):
    image = np.random.default_rng(seed).standard_normal((h, w, c))
    size2 = as_pair(size)
    stride2 = size2 if stride is None else as_pair(stride)
    pool = max_pool2d if mode == "max" else avg_pool2d
    lib_image = image[:, :, 0] if grey else image
    pads = explicit_pads(padding, (h, w), size2, stride2)
    if any(p >= s for p, s in zip(pads, (size2[0], size2[0], size2[1], size2[1]))):
        with pytest.raises(ValueError, match="pool padding must be smaller than the window"):
            pool(lib_image, size, stride, padding)
        return
    if not fits((h, w), pads, size2):
        with pytest.raises(ValueError, match="spans"):
            pool(lib_image, size, stride, padding)
        return
    ours = pool(lib_image, size, stride, padding)
    expected = torch_pool(image, mode, size2, stride2, padding)
    expected = expected[:, :, 0] if grey else expected
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.unit
def test_int_pool_padding_matches_torch_builtins():
    image = np.random.default_rng(2).standard_normal((7, 9, 2))
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    as_hwc = lambda t: t[0].permute(1, 2, 0).numpy()  # noqa: E731
    np.testing.assert_allclose(max_pool2d(image, 3, 2, padding=1), as_hwc(F.max_pool2d(x, 3, 2, padding=1)))
    np.testing.assert_allclose(avg_pool2d(image, 3, 2, padding=1),
                               as_hwc(F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)))


# ---------------------------------------------------------------- the lesson's facts

@pytest.mark.unit
def test_lesson_blur_kernel_is_nine_tenths_of_the_local_mean():
    image = np.random.default_rng(3).random((10, 10))
    blurred = conv2d(image, np.full((3, 3), 0.1))
    local_mean = conv2d(image, np.full((3, 3), 1 / 9))
    np.testing.assert_allclose(blurred, 0.9 * local_mean)


@pytest.mark.unit
def test_lesson_blur_keeps_a_constant_image_at_nine_tenths_inside():
    out = conv2d(np.full((28, 28), 0.5), np.full((3, 3), 0.1), padding="same")
    np.testing.assert_allclose(out[1:-1, 1:-1], 0.45)
    assert out[0, 0] < 0.45  # the border sees zero padding, so it is darker


@pytest.mark.unit
def test_lesson_output_sizes():
    image, kernel = np.zeros((28, 28)), np.zeros((3, 3))
    assert conv2d(image, kernel).shape == (26, 26)                         # valid: 28 -> 26
    assert conv2d(image, kernel, padding="same").shape == (28, 28)         # same keeps 28
    assert conv2d(image, kernel, stride=2, padding="same").shape == (14, 14)
    assert max_pool2d(image).shape == (14, 14)                             # 2x2 max pool halves
    assert max_pool2d(np.zeros((28, 28, 3))).shape == (14, 14, 3)
    assert conv2d(np.zeros((28, 28, 3)), np.zeros((3, 3, 3))).shape == (26, 26)
    assert conv2d(np.zeros((28, 28, 3)), np.zeros((3, 3, 3, 8))).shape == (26, 26, 8)


@pytest.mark.unit
def test_lesson_max_pool_takes_the_largest_of_each_block():
    image = np.array([[1, 2, 5, 6], [3, 4, 7, 8], [0, 0, 1, 1], [0, 9, 1, 1]], dtype=float)
    np.testing.assert_array_equal(max_pool2d(image), [[4, 8], [9, 1]])
    np.testing.assert_array_equal(avg_pool2d(image), [[2.5, 6.5], [2.25, 1]])


# ---------------------------------------------------------------- output_size and its explanation

@pytest.mark.unit
@pytest.mark.parametrize("args, expected", [((28, 3), 26), ((28, 3, 1, "same"), 28), ((28, 3, 2, "same"), 14),
                                            ((28, 3, 1, 1), 28), ((28, 3, 2, 0, 2), 12), ((5, 5), 1)])
def test_output_size(args, expected):
    assert output_size(*args) == expected


@pytest.mark.unit
def test_same_padding_puts_the_odd_pixel_after():
    assert same_padding(28, 3, 2) == (0, 1)
    assert same_padding(28, 4, 1) == (1, 2)
    assert same_padding(5, 1, 1) == (0, 0)


@pytest.mark.unit
def test_explain_output_size_writes_the_formula():
    assert explain_output_size(28, 3) == "out = floor((28 + 2*0 - 3) / 1) + 1 = 26"
    assert explain_output_size(28, 3, 2, "same").startswith("out = ceil(28 / 2) = 14")
    assert "(2*(3-1)+1)" in explain_output_size(28, 3, dilation=2)


# ---------------------------------------------------------------- errors say what was expected and got

@pytest.mark.unit
@pytest.mark.parametrize("call, message", [
    (lambda: conv2d(np.zeros((2, 2)), np.ones((3, 3))),
     r"kernel 3x3 spans 3x3 pixels but the padded image is only 2x2"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((3, 3)), dilation=3), r"with dilation \(3, 3\) spans 7x7"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((3, 3)), stride=0), r"stride must be an int >= 1.*got 0"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((3, 3)), stride=(1, -2)), r"stride must be.*\(1, -2\)"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((3, 3)), dilation=0), r"dilation must be an int >= 1"),
    (lambda: conv2d(np.zeros((5, 5, 3)), np.ones((3, 3, 2))), r"kernel has 2 input channels but the image has 3"),
    (lambda: conv2d(np.zeros((5, 5, 3)), np.ones((3, 3))), r"2-D kernel \(3, 3\) needs a 2-D \(grey\) image"),
    (lambda: conv2d(np.zeros(5), np.ones((3, 3))), r"image must be \(H, W\) or \(H, W, C\), got shape \(5,\)"),
    (lambda: conv2d(np.zeros((5, 5, 1, 1)), np.ones((3, 3))), r"image must be .*got shape \(5, 5, 1, 1\)"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones(3)), r"kernel must be \(kh, kw\).*got shape \(3,\)"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((0, 3))), r"kernel must not be empty"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((3, 3)), padding="full"), r"padding must be 'valid', 'same'.*'full'"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((3, 3)), padding=-1), r"padding must be .*got -1"),
    (lambda: conv2d(np.zeros((5, 5)), np.ones((3, 3)), padding=(1, 2, 3)), r"padding must be"),
    (lambda: conv2d_per_channel(np.zeros((5, 5, 3)), np.ones((3, 3, 3))), r"needs a 2-D \(kh, kw\) kernel"),
    (lambda: max_pool2d(np.zeros((5, 5)), size=0), r"size must be an int >= 1.*got 0"),
    (lambda: avg_pool2d(np.zeros((5, 5)), stride=0), r"stride must be an int >= 1"),
    (lambda: max_pool2d(np.zeros((1, 5))), r"pool window 2x2 spans 2x2 pixels but the padded image is only 1x5"),
    (lambda: max_pool2d(np.zeros((5, 5)), padding=2), r"pool padding must be smaller than the window"),
    (lambda: avg_pool2d(np.zeros((5, 5)), padding="full"), r"padding must be 'valid', 'same'"),
    (lambda: max_pool2d(np.zeros((2, 2, 2, 2))), r"image must be \(H, W\) or \(H, W, C\)"),
    (lambda: output_size(28, 3, stride=0), r"must be >= 1, got kernel_size=3, stride=0"),
    (lambda: output_size(28, 3, padding="full"), r"padding must be 'valid', 'same' or an int"),
    (lambda: output_size(2, 3), r"kernel spans 3 pixels but the padded input has only 2"),
])
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_importing_conv_does_not_import_torch():
    code = ("import sys, cnnlab.playground.conv, cnnlab.playground.kernels, cnnlab.playground.explain; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
