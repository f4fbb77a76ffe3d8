"""cnnlab.playground.kernels: the named kernels, the parameterised ones, custom weights and the error messages."""
import numpy as np
import pytest

from cnnlab.playground.conv import conv2d
from cnnlab.playground.kernels import box, gaussian, get_kernel, list_kernels, parse_kernel

pytestmark = pytest.mark.unit  # every test here is in-process and quick

NAMES = ["identity", "blur", "box", "gaussian", "sharpen", "sobel-x", "sobel-y", "laplacian", "outline", "emboss"]


def test_list_kernels_names_and_describes_every_kernel():
    kernels = list_kernels()
    assert list(kernels) == NAMES
    assert all(isinstance(text, str) and text for text in kernels.values())


@pytest.mark.parametrize("name", NAMES)
def test_every_named_kernel_is_a_3x3_float_array(name):
    kernel = get_kernel(name)
    assert kernel.shape == (3, 3) and kernel.dtype == np.float64


def test_lesson_blur_is_all_tenths():
    np.testing.assert_array_equal(get_kernel("blur"), np.full((3, 3), 0.1))


def test_identity_leaves_the_image_unchanged():
    image = np.random.default_rng(0).random((6, 7))
    np.testing.assert_allclose(conv2d(image, get_kernel("identity"), padding="same"), image)


@pytest.mark.parametrize("name", ["sobel-x", "sobel-y", "laplacian", "outline"])
def test_edge_kernels_ignore_flat_regions(name):
    assert get_kernel(name).sum() == 0
    np.testing.assert_allclose(conv2d(np.full((5, 5), 0.7), get_kernel(name)), 0, atol=1e-12)


def test_sobel_x_responds_to_a_vertical_edge_and_sobel_y_does_not():
    image = np.zeros((5, 6))
    image[:, 3:] = 1.0                                   # dark left half, bright right half
    assert np.abs(conv2d(image, get_kernel("sobel-x"))).max() == 4
    np.testing.assert_allclose(conv2d(image, get_kernel("sobel-y")), 0)


def test_blurs_and_sharpen_keep_brightness():
    for kernel in (get_kernel("box"), get_kernel("gaussian"), get_kernel("sharpen"), box(5), gaussian(7, 2.0)):
        assert kernel.sum() == pytest.approx(1.0)


def test_gaussian_is_symmetric_and_peaks_in_the_centre():
    kernel = gaussian(5, 1.0)
    np.testing.assert_allclose(kernel, kernel.T)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1])
    assert kernel.argmax() == 12


def test_parameterised_names():
    np.testing.assert_allclose(get_kernel("gaussian:5:1.5"), gaussian(5, 1.5))
    np.testing.assert_allclose(get_kernel("gaussian:5"), gaussian(5, 1.0))
    np.testing.assert_allclose(get_kernel("Box:4"), np.full((4, 4), 1 / 16))


def test_names_are_case_and_space_insensitive():
    np.testing.assert_array_equal(get_kernel("  Sobel-X "), get_kernel("sobel-x"))


def test_custom_weights_are_parsed_row_by_row():
    np.testing.assert_array_equal(get_kernel("1,0,-1;2,0,-2;1,0,-1"), get_kernel("sobel-x"))
    np.testing.assert_array_equal(get_kernel(" 1, 2 ; 3, 4 ;"), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(get_kernel("0.5"), [[0.5]])
    np.testing.assert_array_equal(parse_kernel("1,2,3"), [[1, 2, 3]])


def test_get_kernel_returns_a_fresh_array_each_time():
    get_kernel("blur")[0, 0] = 99
    assert get_kernel("blur")[0, 0] == 0.1


@pytest.mark.parametrize("spec, message", [
    ("sobel_x", r"unknown kernel 'sobel_x'; did you mean 'sobel-x'\? \(known: identity, blur"),
    ("sharpn", r"did you mean 'sharpen'"),
    ("zebra", r"unknown kernel 'zebra' \(known:"),
    ("", r"kernel is empty"),
    ("1,2;3", r"rows must all have the same number of values, got \[2, 1\]"),
    ("1,x;3,4", r"kernel row 1 '1,x' is not a comma-separated list of numbers"),
    ("1,2;;3,4", r"kernel row 2 '' is not"),
    ("sharpen:3", r"kernel 'sharpen' takes no parameters"),
    ("gaussian:big", r"bad parameters in 'gaussian:big'"),
    ("gaussian:0", r"gaussian size must be an int from 1 to 255, got 0"),
    ("gaussian:5:-1", r"gaussian sigma must be a number of pixels in \(0, 1000\], got -1"),
    ("box:2:3:4", r"bad parameters in 'box:2:3:4'"),
])
def test_bad_kernels_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        get_kernel(spec)
