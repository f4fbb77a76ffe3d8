"""Prepare a user's picture the way the dataset's own images were made, so the model sees what it knows.

Three recipes, named by `DatasetSpec.recipe`:
  digits   MNIST: grey, light-on-dark, cropped to the ink, fitted into 20x20 keeping the aspect
           ratio, placed in 28x28 with the ink's centre of mass at the centre.
  objects  Fashion-MNIST: trim the background (colour of the corners, 5% tolerance), resize the
           longest side to 28, sharpen, centre on the background, negate to light-on-dark, grey.
  photos   CIFAR-10 and colour image folders: RGB, the largest centred square cropped out, resized to 32x32;
           no inversion (photos-grey: the same in grey, for folders trained with data.channels=1). This
           is `cnnlab.images.read_pixels`, the image folders' own decoder: a file gives a folder-trained
           model exactly the pixels it would have had in training.
digits and objects return uint8 (H, W) with a black (0) background; photos uint8 (H, W, 3) RGB.
Every recipe reads the file with `cnnlab.images` (one policy for formats, limits, EXIF rotation,
transparency and bit depth).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from cnnlab.errors import UserError
from cnnlab.images import MAX_PIXELS, ImageFile, border, luminance, normalized, open_image, read_pixels

# Work on at most this many pixels along a side: bigger inputs are max-pooled down first, which keeps
# thin strokes (averaging would fade a 2 px pen line in a 4000 px photo to nothing).
WORK_SIDE = 256
MAX_SIDE = 2048  # the whole picture is max-pooled to this before any float copy is made


class BlankImage(UserError, ValueError):
    """An image with nothing to classify: no ink or object stands out from the background."""


# ------------------------------------------------------------------------------ digits (MNIST)
def prepare_digit(image: Image.Image, size: int = 28, box: int = 20) -> np.ndarray:
    """MNIST's recipe: light ink on black, cropped, fitted into box x box, centred by mass in size x size."""
    grey = np.asarray(image.convert("L"))  # uint8 (H, W)
    if float(np.median(border(grey))) > 127.5:  # dark ink on light paper: MNIST's ink is light
        grey = 255 - grey
    grey = max_pool_to(grey, MAX_SIDE)  # a huge photo: shrink first, keeping thin strokes
    ink = ink_on_black(grey)
    ink = max_pool_to(crop(ink, ink_box(ink)), WORK_SIDE)
    fitted = fit_within(thicken_thin_strokes(ink, box), box)
    return place_by_centre_of_mass(fitted, size)


def ink_on_black(grey: np.ndarray) -> np.ndarray:
    """float (H, W) 0..1 from light-on-dark uint8 grey (H, W): ink bright, background exactly 0, paper noise removed.

    Otsu's threshold splits ink from background; values below the background's mean + 3 standard
    deviations count as paper. Every statistic comes from the 256-level histogram, and the pixels are mapped
    through a 256-entry table: two passes over the pixels (count, map) instead of a dozen, 0.15 ms instead of
    0.5 ms for a 280x280 drawing. (The statistics are float64 sums over the histogram, where they were float32
    sums over the pixels: the same to ~1e-6, see tests/test_recipe_histogram.py.)
    """
    counts = grey_histogram(grey)  # (256,) pixels per grey level
    present = np.flatnonzero(counts)
    if present[-1] - present[0] < 24:  # under 10% contrast: nothing drawn
        raise BlankImage("no ink found: the picture is blank or too faint")
    threshold = otsu_threshold(counts)
    levels = np.arange(256, dtype=np.float64)
    background = np.where(levels <= threshold + 0.5, counts, 0.0)  # +0.5: the histogram bins levels to whole numbers
    mean = float(background @ levels) / background.sum()
    std = np.sqrt(float(background @ (levels - mean) ** 2) / background.sum())
    floor = min(mean + 3 * std, threshold)
    above = np.where(levels > threshold, counts, 0.0)
    ink_level = level_percentile(above, 95) if above.any() else float(present[-1])
    # (level - floor) / range, clipped to 0..1: float32, or float64 when the floor is the statistics' (a NumPy float64)
    table = np.clip((levels.astype(np.float32) - floor) / max(ink_level - floor, 1.0), 0.0, 1.0)
    return table[grey]  # fancy indexing: np.take would first copy the uint8 levels to 64-bit indices


def grey_histogram(grey: np.ndarray) -> np.ndarray:
    """float64 (256,) pixels per level of uint8 grey (H, W): Pillow's histogram, 2-3x np.bincount's speed (which
    first copies the pixels to 64-bit integers)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(grey)).histogram(), dtype=np.float64)


def otsu_threshold(counts: np.ndarray) -> float:
    """The grey level (0..255) that best splits pixels into two classes (Otsu 1979), from counts (256,) per level."""
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * levels)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros(256), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros(256), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(best[0] + best[-1]) / 2  # the middle of a tie: two clean levels split half-way, not at the lower


def level_percentile(counts: np.ndarray, q: float) -> float:
    """np.percentile(pixels, q) (linear interpolation) of the pixels whose grey levels have these counts (256,)."""
    total = int(counts.sum())
    position = (total - 1) * q / 100  # index into the sorted pixels
    below = int(np.floor(position))
    ends = np.cumsum(counts)  # sorted pixel i has the first level whose running count exceeds i
    low, high = np.searchsorted(ends, [below + 1, min(below + 2, total)])
    return float(low + (high - low) * (position - below))


def ink_box(ink: np.ndarray, mass_trim: float = 0.002) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), exclusive ends, around the ink; a speck holding <0.2% of the ink is left out."""
    rows, columns = ink.sum(axis=1), ink.sum(axis=0)
    total = float(rows.sum())
    if total <= 0:
        raise BlankImage("no ink found: the picture is blank or too faint")
    top, bottom = mass_span(rows / total, mass_trim)
    left, right = mass_span(columns / total, mass_trim)
    return top, bottom, left, right


def mass_span(fractions: np.ndarray, trim: float) -> tuple[int, int]:
    """First and one-past-last index where the cumulative mass lies inside [trim, 1 - trim]."""
    cumulative = np.cumsum(fractions)
    start = int(np.searchsorted(cumulative, trim, side="right"))
    end = int(np.searchsorted(cumulative, 1.0 - trim, side="left")) + 1
    return start, max(end, start + 1)


def crop(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = box
    return pixels[top:bottom, left:right]


def max_pool_to(ink: np.ndarray, side: int) -> np.ndarray:
    """Shrink by an integer factor, each block keeping its brightest pixel, until both sides are <= side.

    Blocks at the bottom and right edges are partial (as if padded with 0 for the non-negative input). No
    padded copy is made: for a picture 8 px wide and 2 million tall, padding the width to the factor
    (1056) took 2.3 GB (found by fuzzing).
    """
    factor = -(-max(ink.shape) // side)  # ceil
    if factor <= 1:
        return ink
    rows = np.maximum.reduceat(ink, np.arange(0, ink.shape[0], factor), axis=0)  # (ceil(H / factor), W)
    return np.maximum.reduceat(rows, np.arange(0, ink.shape[1], factor), axis=1)  # (ceil(H / f), ceil(W / f))


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: ink area / half its outline (a stroke of length L and width w has outline ~2L)."""
    mask = ink > 0.5
    area = int(mask.sum())
    if area == 0:
        return 0.0
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=bool)  # np.pad(mask, 1), at a third of its cost
    padded[1:-1, 1:-1] = mask
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    outline = int((mask & ~inner).sum())
    return area / max(outline / 2, 1)


def thicken_thin_strokes(ink: np.ndarray, box: int, target: float = 2.0) -> np.ndarray:
    """Dilate strokes that would end up thinner than ~1.5 px once fitted into box (MNIST pens are ~2 px wide)."""
    scale = box / max(ink.shape)
    width = stroke_width(ink)
    if scale >= 1 or width * scale >= 1.5:
        return ink
    grow = int(round(target / scale - width))
    if grow < 2:
        return ink
    size = grow + 1 if grow % 2 == 0 else grow  # MaxFilter needs an odd size
    image = Image.fromarray((ink * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(size))
    return np.asarray(image, dtype=np.float32) / 255.0


def fit_within(ink: np.ndarray, box: int) -> np.ndarray:
    """Resize (anti-aliased) so the longest side is `box`, keeping the aspect ratio; float 0..1."""
    height, width = ink.shape
    scale = box / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # Pillow wants (W, H)
    image = Image.fromarray(ink.astype(np.float32), mode="F").resize(new_size, Image.Resampling.LANCZOS)
    fitted = np.clip(np.asarray(image, dtype=np.float32), 0.0, None)
    peak = float(fitted.max())
    return fitted / peak if peak > 0 else fitted


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    """(row, column) of the intensity-weighted centre of an (H, W) array, in pixel indices."""
    total = float(pixels.sum())
    rows, columns = np.indices(pixels.shape)
    return float((rows * pixels).sum()) / total, float((columns * pixels).sum()) / total


def place_by_centre_of_mass(fitted: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size) with `fitted` pasted so its centre of mass is at the centre, never cut off."""
    height, width = fitted.shape
    row, column = centre_of_mass(fitted)
    centre = size / 2  # where MNIST's own digits have it: (14.0, 14.0) on average in 28x28, std 0.3 px
    top = min(max(int(round(centre - row)), 0), size - height)
    left = min(max(int(round(centre - column)), 0), size - width)
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[top:top + height, left:left + width] = fitted
    return np.round(canvas * 255).astype(np.uint8)


# ---------------------------------------------------------------------- objects (Fashion-MNIST)
def prepare_object(image: Image.Image, size: int = 28, tolerance: float = 0.05) -> np.ndarray:
    """Fashion-MNIST's recipe: trim the background, longest side to size, sharpen, centre, light-on-dark, grey.

    Products on a light background are negated (as Fashion-MNIST did); ones already on a dark background are not.
    """
    rgb = np.asarray(shrunk(image.convert("RGB"), 8 * size), dtype=np.float32)  # (H, W, 3)
    background = np.median(np.stack([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]]), axis=0)
    # "close to the corner colour": within 5% of the largest possible RGB distance (255·√3)
    distance = np.sqrt(((rgb - background) ** 2).sum(axis=2))
    mask = despeckle(distance > tolerance * 255 * np.sqrt(3))
    if not mask.any():
        raise BlankImage("no object found: the picture is one colour")
    grey = luminance(crop(rgb, ink_box(mask.astype(np.float32), mass_trim=0.001)))
    background_grey = float(luminance(background[None, None])[0, 0])
    resized = resize_longest_side(grey, size)
    sharpened = resized.filter(ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0))
    framed = ImageOps.pad(sharpened, (size, size), color=int(round(background_grey)), centering=(0.5, 0.5))
    pixels = np.asarray(framed, dtype=np.float32)
    light_background = background_grey > 127.5
    if light_background:
        pixels, background_grey = 255.0 - pixels, 255.0 - background_grey
    # stretch so the background is exactly black (an off-white sheet becomes Fashion-MNIST's pure 0)
    stretched = (pixels - background_grey) * (255.0 / max(255.0 - background_grey, 1.0))
    return np.clip(np.round(stretched), 0, 255).astype(np.uint8)


def despeckle(mask: np.ndarray) -> np.ndarray:
    """The mask without isolated pixels (3x3 median): sensor noise on a photo's background is not the object."""
    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(3))
    return np.asarray(image) > 127


def shrunk(image: Image.Image, side: int) -> Image.Image:
    """Box-average a big photo down (integer factor) so its longest side is at most ~side: trimming needs no more."""
    factor = max(image.size) // side
    return image.reduce(factor) if factor > 1 else image


def resize_longest_side(grey: np.ndarray, side: int) -> Image.Image:
    """An L image whose longest side is `side`, aspect ratio kept (anti-aliased where Fashion-MNIST subsampled)."""
    height, width = grey.shape
    scale = side / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    return image.resize(new_size, Image.Resampling.LANCZOS)


# -------------------------------------------------------------------------------- by recipe
# digits and objects work on the whole picture (the decoded, normalized image); photos are read by
# the image folders' own decoder, so a photo gives a folder-trained model exactly its training pixels.
PICTURE_RECIPES: dict[str, Callable[[Image.Image, int], np.ndarray]] = {
    "digits": lambda image, size: prepare_digit(image, size, box=round(size * 20 / 28)),
    "objects": lambda image, size: prepare_object(image, size),
}
PHOTO_CHANNELS = {"photos": 3, "photos-grey": 1}  # CIFAR-10 and colour folders; folders trained in grey
RECIPES = (*PICTURE_RECIPES, *PHOTO_CHANNELS)


def prepare(source: ImageFile, recipe: str = "digits", size: int = 28, name: str | None = None,
            max_pixels: int = MAX_PIXELS, resize: str = "crop") -> np.ndarray:
    """Read an image (path, bytes, file object or PIL image) and prepare it by a recipe.

    uint8 (size, size) for the grey recipes, (size, size, 3) for photos; `resize` (crop, pad or squish) is how
    a photo meets the square, as its folder's data.resize says. Raises ImageReadError
    (ImageTooLarge) for unreadable or oversized pictures, BlankImage when nothing stands out.
    """
    if recipe in PHOTO_CHANNELS:
        # CIFAR-10's look: the largest centred square (or the folder's data.resize), resized; nothing trimmed or
        # inverted (a photo's background is part of what the model learned from)
        return read_pixels(source, (size, size), PHOTO_CHANNELS[recipe], name, max_pixels, resize)
    if recipe not in PICTURE_RECIPES:
        raise ValueError(f"unknown preprocessing recipe {recipe!r} (known: {', '.join(RECIPES)})")
    return PICTURE_RECIPES[recipe](normalized(open_image(source, name, max_pixels)), size)
