"""cnnlab convolve / pool / explain on real image files made with Pillow."""
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app

runner = CliRunner()


def make_pictures(folder):
    """One file per kind of input the commands must read: 28x28 unless said otherwise."""
    rng = np.random.default_rng(0)
    grey = (rng.random((28, 28)) * 255).astype(np.uint8)
    colour = (rng.random((28, 28, 3)) * 255).astype(np.uint8)
    paths = {name: folder / f"{name}.{ext}" for name, ext in
             [("grey", "png"), ("rgb", "png"), ("rgba", "png"), ("palette", "png"), ("jpeg", "jpg")]}
    Image.fromarray(grey).save(paths["grey"])
    Image.fromarray(colour).save(paths["rgb"])
    rgba = np.dstack([colour, np.zeros((28, 28), np.uint8)])  # fully transparent: composited on white
    Image.fromarray(rgba).save(paths["rgba"])
    Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE).save(paths["palette"])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(colour[:10]).save(paths["jpeg"], exif=exif.tobytes())  # stored 10 high, 28 wide
    (folder / "notes.png").write_text("this is not an image")
    paths["not_image"] = folder / "notes.png"
    return paths


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    return make_pictures(tmp_path_factory.mktemp("pictures"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def plain(output: str) -> str:
    """Output without rich's error-box borders and line wrapping, for matching messages."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def size_of(path):
    with Image.open(path) as image:
        return image.size, image.mode


# ---------------------------------------------------------------- convolve

@pytest.mark.unit
def test_convolve_grey_blur_prints_the_arithmetic(pictures, tmp_path):
    out = tmp_path / "blurred.png"
    result = invoke("convolve", pictures["grey"], "--kernel", "blur", "--out", out)
    assert result.exit_code == 0, result.output
    assert "out = floor((28 + 2*0 - 3) / 1) + 1 = 26" in result.output
    assert "input  28 x 28" in result.output and "output 26 x 26" in result.output
    assert "display: clip" in result.output
    assert size_of(out) == ((26, 26), "L")


@pytest.mark.unit
def test_convolve_colour_same_stride_2_sums_the_channels(pictures, tmp_path):
    out = tmp_path / "blurred.png"
    result = invoke("convolve", pictures["rgb"], "--kernel", "blur", "--stride", "2", "--padding", "same", "--out", out)
    assert result.exit_code == 0, result.output
    assert "input  28 x 28 x 3   kernel 3 x 3 x 3" in result.output
    assert "summed into one channel" in result.output
    assert "out = ceil(28 / 2) = 14" in result.output
    assert size_of(out) == ((14, 14), "L")


@pytest.mark.unit
def test_convolve_custom_edges_on_grey_uses_minmax(pictures, tmp_path):
    out = tmp_path / "edges.png"
    result = invoke("convolve", pictures["rgb"], "--kernel", "1,0,-1;2,0,-2;1,0,-1", "--gray", "--out", out)
    assert result.exit_code == 0, result.output
    assert "converted to grey" in result.output and "display: minmax" in result.output
    assert size_of(out) == ((26, 26), "L")
    pixels = np.asarray(Image.open(out))
    assert pixels.min() == 0 and pixels.max() == 255  # min-max stretches to the full range


@pytest.mark.unit
def test_convolve_per_channel_keeps_colour(pictures, tmp_path):
    out = tmp_path / "sharp.png"
    result = invoke("convolve", pictures["rgb"], "-k", "sharpen", "--per-channel", "--rescale", "clip", "-o", out)
    assert result.exit_code == 0, result.output
    assert "output 26 x 26 x 3" in result.output and "display: clip" in result.output
    assert size_of(out) == ((26, 26), "RGB")


@pytest.mark.unit
def test_convolve_identity_reproduces_the_picture(pictures, tmp_path):
    out = tmp_path / "same.png"
    result = invoke("convolve", pictures["grey"], "-k", "identity", "--padding", "same", "-o", out)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(pictures["grey"])))


@pytest.mark.unit
def test_convolve_dilation_and_int_padding(pictures, tmp_path):
    out = tmp_path / "dilated.png"
    result = invoke("convolve", pictures["grey"], "--dilation", "2", "--padding", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert "out = floor((28 + 2*1 - (2*(3-1)+1)) / 1) + 1 = 26" in result.output


@pytest.mark.unit
def test_fully_transparent_rgba_is_composited_on_white(pictures, tmp_path):
    out = tmp_path / "white.png"
    result = invoke("convolve", pictures["rgba"], "-k", "identity", "--per-channel", "-o", out)
    assert result.exit_code == 0, result.output
    assert "composited on a contrasting background" in result.output
    assert (np.asarray(Image.open(out)) == 255).all()  # fully transparent pixels become white


@pytest.mark.unit
def test_palette_png_is_converted(pictures, tmp_path):
    out = tmp_path / "pal.png"
    result = invoke("convolve", pictures["palette"], "-k", "box", "-o", out)
    assert result.exit_code == 0, result.output
    assert "palette image expanded to RGB" in result.output and "28 x 28 x 3" in result.output


@pytest.mark.unit
def test_jpeg_exif_rotation_is_applied(pictures, tmp_path):
    out = tmp_path / "rotated.png"
    result = invoke("convolve", pictures["jpeg"], "-k", "identity", "-o", out)
    assert result.exit_code == 0, result.output
    assert "input  28 x 10 x 3" in result.output  # stored 10 x 28, displayed 28 high after rotation
    assert size_of(out) == ((8, 26), "L")


# ---------------------------------------------------------------- pool

@pytest.mark.unit
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool_halves_each_side(pictures, tmp_path, mode):
    out = tmp_path / "half.png"
    result = invoke("pool", pictures["rgb"], "--mode", mode, "--size", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "out = floor((28 + 2*0 - 2) / 2) + 1 = 14" in result.output
    assert size_of(out) == ((14, 14), "RGB")


@pytest.mark.unit
def test_max_pool_same_padding_on_grey(pictures, tmp_path):
    out = tmp_path / "third.png"
    result = invoke("pool", pictures["grey"], "--size", "3", "--padding", "same", "-o", out)
    assert result.exit_code == 0, result.output
    assert "out = ceil(28 / 3) = 10" in result.output
    assert size_of(out) == ((10, 10), "L")


# ---------------------------------------------------------------- explain

@pytest.mark.unit
def test_explain_conv_gif(pictures, tmp_path):
    out = tmp_path / "conv.gif"
    result = invoke("explain", "conv", pictures["grey"], "--kernel", "sharpen", "--steps", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert "downscaled from 28x28 to 12x12" in result.output
    assert "out = floor((12 + 2*0 - 3) / 1) + 1 = 10" in result.output
    assert "positions 0 to 2 of 100 shown" in result.output
    with Image.open(out) as gif:
        assert gif.n_frames == 4  # 3 steps + the finished output
    assert out.stat().st_size < 400_000


def test_explain_conv_colour_with_dilation_keeps_a_row_per_channel(pictures, tmp_path):
    grey_out, colour_out = tmp_path / "grey.gif", tmp_path / "colour.gif"
    assert invoke("explain", "conv", pictures["rgb"], "--steps", "2", "--out", grey_out).exit_code == 0
    result = invoke("explain", "conv", pictures["rgb"], "--colour", "--dilation", "2", "--kernel", "sobel-x",
                    "--steps", "2", "--max-side", "8", "--out", colour_out)
    assert result.exit_code == 0, result.output
    assert "input  8 x 8 x 3   kernel 3 x 3 x 3" in result.output and "dilation 2" in result.output
    assert "out = floor((8 + 2*0 - (2*(3-1)+1)) / 1) + 1 = 4" in result.output
    with Image.open(grey_out) as grey, Image.open(colour_out) as colour:
        assert colour.n_frames == 3
        assert colour.size[1] > 2 * grey.size[1]  # three channel rows against one
    on_grey = invoke("explain", "conv", pictures["grey"], "--colour", "--steps", "1", "--out", tmp_path / "g.gif")
    assert on_grey.exit_code == 0 and "is a grey image (one channel): --colour has one row to show" in on_grey.output


@pytest.mark.unit
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("channels", [0, 3])
def test_every_explained_window_sums_to_the_convolution(channels, dilation):
    """The patch each frame shows, times the kernel, is the output pixel it lands in (the conv is checked
    against torch elsewhere), and the channel sums in the caption add up to it."""
    from cnnlab.playground.conv import conv2d, padding_amounts
    from cnnlab.playground.explain import conv_steps, window_at

    rng = np.random.default_rng(channels + dilation)
    image = rng.random((7, 7, channels) if channels else (7, 7))
    kernel = rng.normal(size=(3, 3, channels) if channels else (3, 3))
    out = conv2d(image, kernel, stride=1, padding="same", dilation=dilation)
    span = 2 * dilation + 1
    padded = np.pad(image, padding_amounts("same", (7, 7), (span, span), (1, 1)) + [(0, 0)] * (image.ndim - 2))
    steps = conv_steps(kernel, 1, padded, out, dilation)
    assert len(steps) == out.size
    for step in steps:
        patch = window_at(padded, step.top, step.left, (3, 3), dilation)
        assert np.isclose((patch * kernel).sum(), out[step.out_row, step.out_col])
        if channels:
            sums = [float(part.split(": ")[1]) for part in step.caption.split(";")[0].split(", ")]
            assert abs(sum(sums) - out[step.out_row, step.out_col]) < 0.02  # the caption rounds to 2 decimals


def test_explain_pool_html_is_self_contained(pictures, tmp_path):
    out = tmp_path / "pool.html"
    result = invoke("explain", "pool", pictures["rgb"], "--mode", "avg", "--steps", "2", "--max-side", "8", "-o", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page
    assert "output 4 x 4" in result.output


# ---------------------------------------------------------------- errors: clean message, exit != 0, no file

@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["convolve", "{not_image}"], "not a readable image"),
    (["convolve", "{missing}"], "nowhere.png: No such file or directory"),
    (["pool", "{not_image}"], "not a readable image"),
    (["explain", "conv", "{not_image}"], "not a readable image"),
    (["convolve", "{grey}", "--kernel", "sobl-x"], "did you mean 'sobel-x'"),
    (["convolve", "{grey}", "--kernel", "1,2;3"], "same number of values"),
    (["convolve", "{grey}", "--padding", "full"], "--padding"),
    (["convolve", "{grey}", "--stride", "0"], "'--stride': Input should be greater than or equal to 1"),
    (["convolve", "{grey}", "--kernel", "gaussian:31"], "spans 31x31 pixels but the padded image is only 28x28"),
    (["pool", "{grey}", "--size", "3", "--padding", "3"], "pool padding must be smaller"),
    (["convolve", "{grey}", "--kernel", "runs/missing:conv1:0"], "runs/missing does not exist: --kernel RUN:LAYER"),
    (["explain", "conv", "{grey}", "--kernel", "{folder}:conv1:0"], "is not a run directory (no config.yaml in it)"),
])
def test_bad_input_gives_a_clean_error_and_no_output(pictures, tmp_path, args, message):
    out = tmp_path / "result.png"
    names = {**{k: str(v) for k, v in pictures.items()}, "missing": str(tmp_path / "nowhere.png"),
             "folder": str(pictures["grey"].parent)}
    if args[0] == "explain":
        out = tmp_path / "result.gif"
    result = runner.invoke(app, [a.format(**names) for a in args] + ["--out", str(out)])
    assert result.exit_code != 0
    assert message in plain(result.output)
    assert "Traceback" not in result.output and not isinstance(result.exception, ValueError)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


@pytest.mark.unit
def test_unreadable_file_is_named_in_the_error(pictures, tmp_path):
    result = invoke("convolve", pictures["not_image"], "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "notes.png" in result.output


@pytest.mark.unit
def test_unknown_output_type_is_refused_before_work(pictures, tmp_path):
    result = invoke("convolve", pictures["grey"], "--out", tmp_path / "x.unknown")
    assert result.exit_code == 2 and "cannot write .unknown" in plain(result.output)
    result = invoke("explain", "conv", pictures["grey"], "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "must end in .gif or .html" in plain(result.output)


@pytest.mark.unit
def test_help_text_on_every_option():
    for command in (["convolve"], ["pool"], ["explain", "conv"], ["explain", "pool"]):
        result = runner.invoke(app, command + ["--help"])
        assert result.exit_code == 0
    assert "sobel-x" in runner.invoke(app, ["convolve", "--help"]).output


@pytest.mark.unit
def test_explain_start_picks_the_positions_shown(pictures, tmp_path):
    out = tmp_path / "later.gif"
    result = invoke("explain", "conv", pictures["grey"], "--start", "95", "--steps", "10", "-o", out)
    assert result.exit_code == 0, result.output
    assert "positions 95 to 99 of 100 shown" in result.output  # clipped at the last position
    with Image.open(out) as gif:
        assert gif.n_frames == 6 and gif.size == Image.open(out).size


@pytest.mark.unit
def test_explain_start_past_the_end_is_a_clean_error(pictures, tmp_path):
    result = invoke("explain", "pool", pictures["grey"], "--start", "36", "-o", tmp_path / "x.gif")
    assert result.exit_code == 2 and "0 <= start < 36" in result.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- display rules (cnnlab.playground.explain.rescale)

@pytest.mark.unit
def test_rescale_rules():
    from cnnlab.playground.display import rescale
    values = np.array([[-2.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(rescale(values, "clip")[0], [[0, 0], [1, 1]])
    np.testing.assert_allclose(rescale(values, "minmax")[0], [[0, 0.5], [0.75, 1]])
    np.testing.assert_allclose(rescale(values, "abs")[0], [[1, 0], [0.5, 1]])
    assert rescale(values)[1] == "minmax" and rescale(values / 4 + 0.5)[1] == "clip"
    assert (rescale(np.full((2, 2), 3.0), "minmax")[0] == 0).all()  # flat output: no division by zero
    with pytest.raises(ValueError, match="rescale rule must be one of auto, clip, minmax, abs, got 'log'"):
        rescale(values, "log")
