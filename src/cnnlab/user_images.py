"""Turn a user's picture into what the models were trained on: 28x28 grey, white object on black.

Deliberately simple (fit in the frame, invert a light background); a later preprocessing recipe
per dataset will replace `read_as_dataset_image`, the one function the rest of cnnlab calls.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """A file that Pillow cannot read as an image; the message names it."""


def read_as_dataset_image(file: str | Path, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Read any image as uint8 grey (H, W) = size, fitted into the frame with its aspect ratio kept.

    A light background (the border is brighter than mid-grey) is inverted, so a dark digit on white
    paper becomes MNIST's white-on-black.
    """
    try:
        with Image.open(file) as opened:
            image = ImageOps.exif_transpose(opened)  # phone photos: apply the rotation tag
            image.load()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageReadError(f"cannot read {str(file)!r} as an image ({exc})") from None
    if image.mode in ("RGBA", "LA", "PA", "P"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    grey = image.convert("L")
    if border_mean(np.asarray(grey)) > 127:
        grey = ImageOps.invert(grey)
    height, width = size
    if grey.size != (width, height):
        # shrink/grow to fit, then centre on black: no stretching of the object
        grey = ImageOps.pad(grey, (width, height), method=Image.Resampling.LANCZOS, color=0)
    return np.asarray(grey, dtype=np.uint8).copy()


def border_mean(pixels: np.ndarray) -> float:
    """Mean of the outermost rows and columns (0-255): the background's brightness."""
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(edges.mean())
