"""The digits recipe's ink map from the grey levels' histogram (`recipes.ink_on_black`) against the per-pixel
computation it replaced (kept here as the reference): the same prepared tensor for drawings, photos of digits and
noisy scans."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnnlab.data import load_dataset
from cnnlab.use import recipes
from cnnlab.use.recipes import BlankImage, ink_on_black, level_percentile, prepare

pytestmark = pytest.mark.unit  # no training run, no process: the inner loop


def reference_otsu(grey: np.ndarray) -> float:
    counts = np.bincount(np.clip(grey, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    return recipes.otsu_threshold(counts)


def reference_ink_on_black(grey: np.ndarray) -> np.ndarray:
    """The per-pixel ink map of before issue 31: float32 grey (H, W) 0..255 in, float32 0..1 out."""
    if float(grey.max() - grey.min()) < 24:
        raise BlankImage("no ink found: the picture is blank or too faint")
    threshold = reference_otsu(grey)
    background = grey[grey <= threshold + 0.5]
    floor = min(float(background.mean() + 3 * background.std()), threshold)
    above = grey[grey > threshold]
    ink_level = float(np.percentile(above, 95)) if above.size else float(grey.max())
    return np.clip((grey - floor) / max(ink_level - floor, 1.0), 0.0, 1.0)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    """A canvas drawing, MNIST digits dark on light and light on dark at mixed sizes, some with sensor noise."""
    rng = np.random.default_rng(0)
    canvas = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(canvas).line([(80, 60), (200, 60), (120, 230)], fill="black", width=20)
    found = [png(canvas)]
    for i, digit in enumerate(load_dataset("mnist-sample", progress=False).test_images[:60]):
        side = int(rng.integers(28, 320))
        picture = Image.fromarray(255 - digit if i % 2 else digit).resize((side, int(side * rng.uniform(0.6, 1.5))))
        if i % 3 == 0:
            noisy = np.asarray(picture, dtype=np.float32) + rng.normal(0, 8, picture.size[::-1])
            picture = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        found.append(png(picture))
    return found


def test_the_ink_map_matches_the_per_pixel_one(pictures):
    for data in pictures:
        grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        np.testing.assert_allclose(ink_on_black(grey), reference_ink_on_black(grey.astype(np.float32)),
                                   rtol=0, atol=1e-6)


def test_prepared_pictures_are_the_same_tensor(pictures, monkeypatch):
    fast = [prepare(data, "digits") for data in pictures]
    monkeypatch.setattr(recipes, "ink_on_black", lambda grey: reference_ink_on_black(grey.astype(np.float32)))
    reference = [prepare(data, "digits") for data in pictures]
    for mine, theirs in zip(fast, reference):
        assert mine.dtype == theirs.dtype == np.uint8 and np.array_equal(mine, theirs)


def test_blank_and_faint_pictures_are_refused_alike():
    for level in (0, 128, 255):
        flat = np.full((40, 40), level, np.uint8)
        faint = flat.copy()
        faint[10:20, 10:20] = min(level + 20, 255)
        for grey in (flat, faint):
            with pytest.raises(BlankImage):
                ink_on_black(grey)
            with pytest.raises(BlankImage):
                reference_ink_on_black(grey.astype(np.float32))


@pytest.mark.parametrize("q", [0, 5, 50, 95, 99.9, 100])
def test_level_percentile_is_numpys(q):
    pixels = np.random.default_rng(1).integers(0, 256, 1001).astype(np.uint8)
    counts = np.bincount(pixels, minlength=256).astype(np.float64)
    assert level_percentile(counts, q) == pytest.approx(float(np.percentile(pixels, q)), abs=1e-9)


def test_grey_levels_are_counted_as_numpy_counts_them():
    """recipes.grey_histogram (Pillow's) equals np.bincount on uint8 pictures of any shape and memory layout."""
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, (37, 23), dtype=np.uint8)
    for grey in (picture, picture.T, picture[::2, ::-3], np.zeros((5, 9), np.uint8), np.full((1, 7), 255, np.uint8),
                 np.full((7, 1), 3, np.uint8)):
        assert np.array_equal(recipes.grey_histogram(grey), np.bincount(grey.ravel(), minlength=256))
