"""The lesson's sample pictures (`cnnlab samples DIR`), made from what the package ships: nothing downloaded,
nothing read from the repository's docs/.

  photo.png     a 160x160 colour scene drawn with Pillow (sky, sun, hills, a house, grain): the playground's photo
  digit.png     a 28x28 grey '3', white on black like MNIST
  trousers.png  a stand-in for a photo of clothing: the first Trouser of the Fashion-MNIST sample's test set,
                drawn large and dark on a light background, as a phone photo of trousers on a table would be

The docs' pictures (docs/img/photo.png, digit.png, tour-trousers.png) are these, made by the same functions.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnnlab.data.idx import read_idx
from cnnlab.errors import UserError
from cnnlab.files import write_atomic

SIDE = 160  # the photo's side in pixels: small enough for the playground's pictures to stay a few tens of KB
TROUSER = 1  # Fashion-MNIST's class index of "Trouser"


class SamplesError(UserError, ValueError):
    """A folder `cnnlab samples` cannot write into; the message says why."""


def scene() -> Image.Image:
    """A small landscape: sky gradient, sun, hills, a house with a window, some text and camera-like grain."""
    sky = np.linspace([90, 150, 230], [200, 225, 250], SIDE)  # (SIDE, 3) top to bottom
    image = Image.fromarray(np.repeat(sky[:, None, :], SIDE, axis=1).astype(np.uint8))  # (SIDE, SIDE, 3)
    draw = ImageDraw.Draw(image)
    draw.ellipse((110, 14, 146, 50), fill=(255, 215, 70))  # sun
    draw.polygon([(0, 110), (50, 80), (100, 105), (160, 75), (160, 160), (0, 160)], fill=(70, 140, 60))  # hills
    draw.rectangle((30, 95, 85, 140), fill=(190, 80, 60))  # house
    draw.polygon([(24, 96), (57, 68), (91, 96)], fill=(110, 50, 40))  # roof
    draw.rectangle((40, 105, 54, 119), fill=(250, 250, 210))  # window
    draw.rectangle((63, 112, 75, 140), fill=(80, 50, 30))  # door
    draw.text((96, 128), "cnnlab", fill=(255, 255, 255), font=ImageFont.load_default(size=14))
    noise = np.random.default_rng(0).normal(0, 6, (SIDE, SIDE, 3))  # grain, seeded: the same photo every time
    return Image.fromarray(np.clip(np.asarray(image, dtype=float) + noise, 0, 255).astype(np.uint8))


def digit() -> Image.Image:
    """A 28x28 grey '3', white on black like MNIST."""
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).text((14, 14), "3", fill=255, anchor="mm", stroke_width=2, stroke_fill=255,
                               font=ImageFont.load_default(size=26))
    return image


def trousers() -> Image.Image:
    """The Fashion-MNIST sample's first test image of trousers, negated to dark-on-light and drawn at 168 px
    on a 224 px beige background."""
    folder = Path(str(resources.files("cnnlab.data") / "samples" / "fashion-mnist-sample"))
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    index = int(np.flatnonzero(labels == TROUSER)[0])
    item = read_idx(folder / "t10k-images-idx3-ubyte.gz")[index]  # uint8 (28, 28), light on dark
    large = Image.fromarray(255 - item).resize((168, 168), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (224, 224), (235, 232, 225))
    canvas.paste(large.convert("RGB"), (28, 28))
    return canvas


SAMPLES: dict[str, tuple[Callable[[], Image.Image], str]] = {
    "photo.png": (scene, "a 160x160 colour scene, for convolve, pool and explain"),
    "digit.png": (digit, "a 28x28 grey 3, white on black like MNIST"),
    "trousers.png": (trousers, "a stand-in photo of trousers on a table, for predict on a Fashion-MNIST run"),
}


def png_writer(picture: Image.Image) -> Callable[[Path], None]:
    """What write_atomic calls with its temporary file: save `picture` there as PNG."""
    def write(tmp: Path) -> None:
        picture.save(tmp, format="PNG")
    return write


def write_samples(folder: str | Path, overwrite: bool = False) -> list[tuple[Path, str]]:
    """Write the sample pictures into `folder` (made if missing); [(file, what it is)].

    Refuses, writing nothing, when `folder` is not a folder or (without `overwrite`) already holds one of them.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SamplesError(f"{folder}: not a folder (`cnnlab samples` writes {', '.join(SAMPLES)} into a folder)")
    targets = [folder / name for name in SAMPLES]
    taken = [path.name for path in targets if path.exists() or path.is_symlink()]
    if taken and not overwrite:
        raise SamplesError(f"{folder}: already holds {', '.join(taken)}; pass --force to overwrite, or choose "
                           "another folder")
    pictures = [(path, make()) for path, (make, _) in zip(targets, SAMPLES.values())]  # all made before any written
    folder.mkdir(parents=True, exist_ok=True)
    for path, picture in pictures:
        write_atomic(path, png_writer(picture))
    return [(path, what) for path, (_, what) in zip(targets, SAMPLES.values())]
