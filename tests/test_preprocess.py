"""Preparing your own pictures like the dataset's: crafted images, then real MNIST / Fashion-MNIST test images
re-rendered the way a learner would photograph or draw them."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnnlab.data import get_dataset, load_dataset
from cnnlab.images import ImageReadError, ImageTooLarge
from cnnlab.images import open_image as read_image
from cnnlab.use.predict import Predictor
from cnnlab.use.recipes import BlankImage, centre_of_mass, prepare, stroke_width
from use_runs import png_header_claiming, tiny_run


def seven(size=(300, 200), at=(200, 40), scale=1.0, width=12, ink=0, paper=255, mode="L") -> Image.Image:
    """A '7' drawn with a pen of `width` px, top-left near `at`: dark ink on light paper by default."""
    image = Image.new(mode, size, paper)
    x, y = at
    points = [(x, y), (x + 60 * scale, y), (x + 25 * scale, y + 140 * scale)]
    ImageDraw.Draw(image).line(points, fill=ink, width=width, joint="curve")
    return image


def assert_like_mnist(digit: np.ndarray) -> None:
    """28x28 uint8, black background, bright ink inside the 20x20 box, centre of mass at MNIST's (14, 14).

    Centring by mass may shift a top-heavy digit up to 4 px off the box's centre, so only the outermost pixels are
    required black (99.3% of MNIST's test digits leave them black).
    """
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit.max() >= 250, "ink present and bright"
    assert (digit > 128).sum() >= 20, "more than a few pixels of ink"
    edges = np.concatenate([digit[0], digit[-1], digit[:, 0], digit[:, -1]])
    assert edges.max() == 0, "background dark up to the border"
    rows, columns = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    assert max(rows[-1] - rows[0], columns[-1] - columns[0]) + 1 <= 22, "fitted into MNIST's 20x20 box"
    row, column = centre_of_mass(digit.astype(float))
    assert abs(row - 14) <= 1.0 and abs(column - 14) <= 1.0


def png_bytes(image: Image.Image, format="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


# ------------------------------------------------------------------------------- digits (MNIST)
@pytest.mark.unit
@pytest.mark.parametrize("image", [
    seven(),  # dark on light, off-centre to the right
    seven(ink=255, paper=0),  # already light on dark
    seven(size=(4000, 3000), at=(3300, 200), scale=5, width=4),  # huge photo, hair-thin pen
    seven(size=(12, 12), at=(1, 1), scale=0.09, width=1),  # tiny
    seven(mode="RGB", ink=(20, 40, 160), paper=(250, 245, 230)),  # blue pen on cream paper
], ids=["dark-on-light-off-centre", "light-on-dark", "huge-thin", "tiny", "colour"])
def test_digits_come_out_like_mnist(image):
    assert_like_mnist(prepare(image, "digits"))


@pytest.mark.unit
def test_thin_strokes_are_thickened_to_mnist_pen_width():
    digit = prepare(seven(size=(3000, 3000), at=(500, 500), scale=10, width=3), "digits")
    assert_like_mnist(digit)
    assert 1.5 <= stroke_width(digit / 255.0) <= 4.5  # MNIST strokes are ~2-3 px wide


@pytest.mark.unit
def test_transparent_drawings_get_a_contrasting_background():
    dark = seven(mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0))  # black pen on a transparent layer
    light = seven(mode="RGBA", ink=(255, 255, 255, 255), paper=(255, 255, 255, 0))  # white pen, transparent
    expected = prepare(seven(), "digits")
    for image in (dark, light):
        digit = prepare(image, "digits")
        assert_like_mnist(digit)
        assert np.abs(digit.astype(int) - expected).mean() < 10


@pytest.mark.unit
def test_palette_grey_alpha_and_16_bit_images():
    palette = seven().convert("P")
    palette_transparent = seven(mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0)).convert("P")
    grey_alpha = seven(mode="LA", ink=(0, 255), paper=(0, 0))
    sixteen_bit = Image.fromarray(np.asarray(seven(), dtype=np.uint16) * 257)  # 16-bit grey scan
    for image in (palette, palette_transparent, grey_alpha, sixteen_bit):
        assert_like_mnist(prepare(Image.open(io.BytesIO(png_bytes(image))), "digits"))


@pytest.mark.unit
def test_jpeg_exif_rotation_is_applied():
    # a phone held sideways: the pixels lie on their side, the EXIF tag says "rotate 90° clockwise to view"
    upright = seven(size=(200, 300), at=(50, 60))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    data = png_bytes(sideways, "JPEG", exif=exif, quality=95)
    assert read_image(data).size == upright.size
    from_tag, expected = prepare(data, "digits"), prepare(upright, "digits")
    assert np.abs(from_tag.astype(int) - expected).mean() < 12


@pytest.mark.unit
def test_photo_noise_and_shading_stay_background():
    rng = np.random.default_rng(0)
    paper = np.asarray(seven(), dtype=float)
    shading = np.linspace(0, 40, paper.shape[1])[None, :]  # a shadow across the page
    photo = np.clip(paper - shading + rng.normal(0, 6, paper.shape), 0, 255).astype(np.uint8)
    digit = prepare(Image.fromarray(photo), "digits")
    assert_like_mnist(digit)
    assert np.abs(digit.astype(int) - prepare(seven(), "digits")).mean() < 12


@pytest.mark.unit
def test_blank_pictures_are_refused():
    with pytest.raises(BlankImage, match="no ink found"):
        prepare(Image.new("L", (50, 50), 255), "digits")
    with pytest.raises(BlankImage, match="no object found"):
        prepare(Image.new("RGB", (50, 50), (200, 10, 10)), "objects")


# ------------------------------------------------------------------------- objects (Fashion-MNIST)
def shoe(size=(640, 480), paper=(255, 255, 255), colour=(60, 40, 30)) -> Image.Image:
    image = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(image)
    draw.polygon([(150, 300), (250, 180), (330, 190), (380, 260), (520, 290), (530, 340), (150, 340)], fill=colour)
    return image


@pytest.mark.unit
@pytest.mark.parametrize("image", [shoe(), shoe(paper=(235, 232, 225)),
                                   shoe(paper=(10, 10, 10), colour=(200, 180, 160))],
                         ids=["white", "off-white", "dark-background"])
def test_objects_fill_the_frame_light_on_dark(image):
    item = prepare(image, "objects")
    assert item.shape == (28, 28) and item.dtype == np.uint8
    assert item[0].max() == 0 and item[-1].max() == 0, "background dark (the short side is padded)"
    columns = np.flatnonzero(item.any(axis=0))
    assert columns[-1] - columns[0] + 1 >= 27, "longest side resized to the frame"
    assert item[14, 14] > 100 and item.max() >= 200, "the object is light"
    row, column = centre_of_mass(item.astype(float))
    assert abs(column - 14) < 3 and abs(row - 14) < 3


@pytest.mark.unit
def test_recipes_are_part_of_the_datasets():
    assert get_dataset("mnist-sample").recipe == "digits"
    assert get_dataset("fashion-mnist-sample").recipe == "objects"
    with pytest.raises(ValueError, match="unknown preprocessing recipe"):
        prepare(seven(), "cartoons")


# -------------------------------------------------------------------------------- bad files
@pytest.mark.unit
def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match="8000x8000 pixels is more than the 50,000,000 allowed"):
        read_image(png_header_claiming(8000, 8000), "bomb.png")
    for side in (10_000, 100_000):  # past Pillow's own guards too (its warning, its error): the same words
        with pytest.raises(ImageTooLarge, match=f"bomb.png: {side * side:,} pixels is more than the 50,000,000 "
                           "allowed"):
            read_image(png_header_claiming(side, side), "bomb.png")
    for side in (10_000, 30_000):  # Pillow's own guard (its warning, then its error), where ours is lifted
        with pytest.raises(ImageTooLarge, match="decompression bomb"):
            read_image(png_header_claiming(side, side), "bomb.png", max_pixels=10**12)


@pytest.mark.unit
@pytest.mark.parametrize("data, message", [
    (b"", "not a readable image"),
    (b"hello, I am text", "not a readable image"),
    (png_bytes(seven())[:200], "not a readable image"),  # truncated
])
def test_unreadable_data_is_a_clear_error(data, message):
    with pytest.raises(ImageReadError, match=message) as error:
        read_image(data, "up.png")
    assert str(error.value).startswith("up.png: ") and "0x" not in str(error.value)


# ------------------------------------------------------------------ the real check: dataset images
def rendered_like_a_learner(image: np.ndarray, rng: np.random.Generator, scale: int = 3) -> Image.Image:
    """A 28x28 dataset image drawn dark-on-light, enlarged, off-centre on a bigger noisy sheet of paper."""
    big = Image.fromarray(255 - image).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    sheet = Image.new("L", (240, 180), 255)
    sheet.paste(big, (int(rng.integers(0, 240 - 28 * scale)), int(rng.integers(0, 180 - 28 * scale))))
    noisy = np.asarray(sheet, dtype=float) - rng.normal(0, 4, (180, 240))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mnist-sample", "fashion-mnist-sample"])
def test_rerendered_test_images_are_classified_like_the_originals(dataset):
    predictor = Predictor.from_run(tiny_run(dataset))
    originals = load_dataset(dataset, progress=False).test_images[:150]
    rng = np.random.default_rng(1)
    prepared = np.stack([predictor.prepare(rendered_like_a_learner(image, rng)) for image in originals])
    before = predictor.probabilities(originals).argmax(axis=1)
    after = predictor.probabilities(prepared).argmax(axis=1)
    agreement = float((before == after).mean())
    assert agreement >= 0.85, f"only {agreement:.0%} of re-rendered {dataset} images keep their class"
