"""The one image reader: how any picture file becomes pixels, for image folders, predict, serve,
show and the playground alike (no torch).

One policy, applied in this order:
  refused before decoding  EPS (Pillow would hand it to Ghostscript), more than MAX_PIXELS pixels
                           (read from the header: a small file can claim a huge size), Pillow's own
                           decompression-bomb verdict
  EXIF orientation         applied: a phone photo comes out upright
  animations               the first frame
  palette                  expanded to RGB (RGBA when it has a transparent colour)
  transparency             composited on a background that contrasts with the opaque part: white
                           behind a dark drawing, black behind a light one (a white digit drawn on a
                           transparent layer stays visible); grey stays grey, colour stays colour
  16- and 32-bit grey      scaled to 8 bits: round(v * 255 / 65535), clipped (257 * k becomes k)
  CMYK, YCbCr, LAB, HSV    converted to RGB; 1-bit and float grey to 8-bit grey
so every image becomes mode "L" (grey) or "RGB". `read_pixels` then fits it to a size, resized with
Lanczos, in one of three ways (`data.resize`): `crop` the largest centred box of the target's aspect,
`pad` the whole picture with bars of its own border colour, or `squish` the whole picture stretched;
the way image folders and the photos recipe both see it: the same file gives the same pixels
whichever command reads it.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from cnnlab.errors import UserError
from cnnlab.files import FileRefused, check_regular

# Above this many pixels an image is refused before it is decoded. 50 MP still admits any phone
# photo; decoding it takes about 150 MB.
MAX_PIXELS = 50_000_000
UNSAFE_FORMATS = frozenset({"EPS"})  # decoding runs an external interpreter on the file's contents
GREY_MODES = frozenset({"L", "LA", "La", "1", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})  # 16- or 32-bit integer grey
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# read_pixels shrinks a much larger picture by an integer factor first (box average), keeping at
# least this many source pixels per output pixel for the Lanczos resize: same quality, a fraction of the work
REDUCING_GAP = 3.0

# where a picture comes from: a path, its bytes, an open binary file, or a PIL image
ImageFile = str | Path | bytes | BinaryIO | Image.Image


class ImageReadError(UserError, ValueError):
    """A file that cannot be read as an image (not an image, truncated, empty, refused); the message names it."""


class ImageTooLarge(ImageReadError):
    """An image with more pixels than allowed (or that Pillow flags as a decompression bomb)."""


def open_image(source: ImageFile, name: str | None = None, max_pixels: int = MAX_PIXELS,
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image (path, bytes, binary file or PIL image), upright by its EXIF tag, checked first.

    `draft` (width, height) lets a JPEG decode at a reduced scale that is still at least that large.
    Raises ImageReadError (ImageTooLarge for too many pixels) with `name` (default the path) in the
    message; a missing file raises FileNotFoundError.
    """
    if isinstance(source, Image.Image):
        return source
    label = name or (str(source) if isinstance(source, (str, Path)) else "upload")
    if isinstance(source, (str, Path)) and os.path.lexists(source):
        try:  # a FIFO or a device would block Pillow's read, or never end
            check_regular(source, "image")
        except FileRefused as exc:
            raise ImageReadError(str(exc)) from None
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as opened:
                width, height = opened.size  # from the header: refuse before decoding a single pixel
                if opened.format in UNSAFE_FORMATS:
                    raise ImageReadError(f"{label}: {opened.format} files are not read (Pillow hands them to "
                                         "Ghostscript, which runs the PostScript in them)")
                if width * height > max_pixels:
                    raise ImageTooLarge(f"{label}: {width}x{height} pixels is more than the {max_pixels:,} allowed")
                if draft is not None:
                    opened.draft(None, draft)
                # exif_transpose's copy is wanted even with nothing to turn: the copy owns its pixels, where the
                # opened image may map the file (an uncompressed TIFF: a file changed under it kills the process);
                # and it reads the EXIF before decoding, which Pillow 10.0 cannot do after (multi-page TIFFs)
                image = ImageOps.exif_transpose(opened)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses a huge header itself, before its size reaches the check above: said the same way
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        if counted is None or int(counted.group(1)) <= max_pixels:  # a caller that lifted the limit past Pillow's
            raise ImageTooLarge(f"{label}: refused as a possible decompression bomb ({exc})") from None
        raise ImageTooLarge(f"{label}: {int(counted.group(1)):,} pixels is more than the {max_pixels:,} "
                            "allowed") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError, ImageReadError, MemoryError, RecursionError):
        raise
    except Exception as exc:  # noqa: BLE001
        # Pillow's decoders report a malformed file with whatever they hit: OSError, ValueError, SyntaxError,
        # EOFError, but also TypeError, KeyError, IndexError, struct.error (fuzzing found a TIFF raising
        # TypeError); Pillow's own fuzzers catch Exception for the same reason. Only decoding is in this block.
        raise ImageReadError(f"{label}: not a readable image ({describe(exc)})") from None
    return image


def describe(exc: Exception) -> str:
    """The exception's message without Python object addresses (Pillow names the BytesIO it was given)."""
    return re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", str(exc)) or type(exc).__name__


# ------------------------------------------------------------------------------ the pixel policy
def normalized(image: Image.Image) -> Image.Image:
    """Any Pillow mode as "L" (grey sources) or "RGB" (colour ones), by the policy in the module docstring."""
    if image.mode in WIDE_GREY_MODES:
        return grey_to_8_bits(image)
    if image.mode in ("1", "F"):
        return image.convert("L")  # Pillow rounds and clips floats to 0..255
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ALPHA_MODES or (image.mode in ("RGB", "L") and "transparency" in image.info):
        return on_contrasting_background(image)
    if image.mode in ("RGB", "L"):
        return image
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def grey_to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grey -> "L" by rounding v * 255 / 65535 (65535 -> 255, 257 * k -> k)."""
    values = np.asarray(image)
    if values.dtype.kind == "i":  # mode "I" (int32): clip to the 16-bit range first
        values = values.clip(0, 65535)
    values = values.astype(np.uint32)  # 4 bytes a pixel, scaled in place
    values *= 255
    values += 32767
    values //= 65535
    return Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode "L"


def on_contrasting_background(image: Image.Image) -> Image.Image:
    """Composite a transparent image on white (dark drawing) or black (light drawing); grey stays "L"."""
    grey = image.mode in GREY_MODES
    rgba = image.convert("RGBA")
    sample = rgba.copy()
    sample.thumbnail((256, 256))  # enough to judge the drawing's brightness
    pixels = np.asarray(sample, dtype=np.float32)
    level = int(contrasting_level(pixels[:, :, :3], pixels[:, :, 3] / 255.0))
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (level, level, level, 255)), rgba)
    return flat.convert("L" if grey else "RGB")


def contrasting_level(colour: np.ndarray, alpha: np.ndarray) -> float:
    """255 (white) behind a dark drawing, 0 behind a light one: colour (H, W, 3), alpha (H, W) in [0, 1]."""
    weight = float(alpha.sum())
    if weight == 0:
        return 255.0
    mean = float((luminance(colour) * alpha).sum()) / weight
    return 0.0 if mean > 127.5 else 255.0


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as Pillow's convert("L"): (H, W, 3) -> (H, W)."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def with_channels(image: Image.Image, channels: int) -> Image.Image:
    """A normalized image as grey ("L", channels 1) or colour ("RGB", channels 3)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    return image.convert("L" if channels == 1 else "RGB")


# ------------------------------------------------------------------------------ fitting to a size
RESIZE_MODES = ("crop", "pad", "squish")  # how a picture of another aspect meets the target size (data.resize)


def fitted(image: Image.Image, size: tuple[int, int], resize: str = "crop") -> Image.Image:
    """The picture at size (height, width), resized with Lanczos: `crop` keeps the largest centred box of
    the target's aspect (Keras' crop_to_aspect_ratio), `pad` keeps the whole picture and fills the bars with
    its border's median colour (pad_to_aspect_ratio), `squish` stretches the whole picture to fit."""
    height, width = size
    if resize == "squish":
        return image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    if resize == "pad":
        return padded(image, size)
    if resize != "crop":
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    crop = centred_crop(image.size, width / height)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=crop, reducing_gap=REDUCING_GAP)


def padded(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The whole picture scaled to fit inside size (height, width), centred on its border's median colour."""
    height, width = size
    scale = min(width / image.width, height / image.height)
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(inner, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    canvas = Image.new(image.mode, (width, height), border_colour(image))
    canvas.paste(resized, ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


def border(pixels: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of an (H, W, ...) array, concatenated: (2W + 2H, ...)."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def border_colour(image: Image.Image) -> int | tuple[int, ...]:
    """The median of the picture's outermost pixels: the bars of a padded picture continue its backdrop."""
    median = np.median(border(np.asarray(image)), axis=0).astype(np.uint8)
    return int(median) if median.ndim == 0 else tuple(int(v) for v in median)


def centred_crop(source: tuple[int, int], aspect: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the largest centred box of aspect width / height (as ImageOps.fit)."""
    width, height = source
    if width / height >= aspect:  # wider than needed: crop the sides
        crop_width, crop_height = aspect * height, float(height)
    else:  # taller than needed: crop top and bottom
        crop_width, crop_height = float(width), width / aspect
    left, top = (width - crop_width) / 2, (height - crop_height) / 2
    return left, top, left + crop_width, top + crop_height


def read_pixels(source: ImageFile, size: tuple[int, int], channels: int, name: str | None = None,
                max_pixels: int = MAX_PIXELS, resize: str = "crop") -> np.ndarray:
    """A picture as the network sees it: uint8 (H, W) grey or (H, W, 3) RGB, fitted to size (H, W) by
    `resize` (crop, pad or squish: `fitted`).

    The decoder of image folders and of the photos recipe (predict, serve, show): one function, so
    a file gives the same pixels in training and in use.
    """
    height, width = size
    side = 2 * max(height, width)
    image = normalized(open_image(source, name, max_pixels, draft=(side, side)))
    return np.array(fitted(with_channels(image, channels), size, resize), dtype=np.uint8)


# ------------------------------------------------------------------------------ for HTML pages
def png_data_url(picture: np.ndarray | Image.Image | bytes) -> str:
    """A picture as a `data:image/png;base64,...` URL, for pages that load nothing from anywhere.

    `picture`: uint8 pixels (H, W) or (H, W, 3|4), a PIL image, or PNG bytes already encoded.
    """
    import base64

    if not isinstance(picture, bytes):
        image = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        picture = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(picture).decode("ascii")
