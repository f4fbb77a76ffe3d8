"""Regenerate the pictures of docs/playground.md: a drawn 'photo', a digit, and the commands' outputs.

Usage (from the repository root): python docs/img/make_playground_images.py
Nothing is downloaded: the sample photo is a scene drawn with Pillow.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from cnnlab.cli import app

HERE = Path(__file__).parent
SIDE = 160  # pixels: small enough to keep every picture a few tens of KB


def draw_scene(path: Path) -> None:
    """A small landscape: sky gradient, sun, hills, a house with a window, and some text."""
    sky = np.linspace([90, 150, 230], [200, 225, 250], SIDE)                  # (SIDE, 3) top to bottom
    pixels = np.repeat(sky[:, None, :], SIDE, axis=1).astype(np.uint8)      # (SIDE, SIDE, 3)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((110, 14, 146, 50), fill=(255, 215, 70))                     # sun
    draw.polygon([(0, 110), (50, 80), (100, 105), (160, 75), (160, 160), (0, 160)], fill=(70, 140, 60))
    draw.rectangle((30, 95, 85, 140), fill=(190, 80, 60))                     # house
    draw.polygon([(24, 96), (57, 68), (91, 96)], fill=(110, 50, 40))          # roof
    draw.rectangle((40, 105, 54, 119), fill=(250, 250, 210))                  # window
    draw.rectangle((63, 112, 75, 140), fill=(80, 50, 30))                     # door
    draw.text((96, 128), "cnnlab", fill=(255, 255, 255), font=ImageFont.load_default(size=14))
    noise = np.random.default_rng(0).normal(0, 6, (SIDE, SIDE, 3))          # camera-like grain
    grainy = np.clip(np.asarray(image, dtype=float) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(grainy).save(path)


def draw_digit(path: Path) -> None:
    """A 28x28 grey '3', white on black like MNIST."""
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).text((14, 14), "3", fill=255, anchor="mm", stroke_width=2, stroke_fill=255,
                               font=ImageFont.load_default(size=26))
    image.save(path)


COMMANDS = [
    "convolve photo.png --kernel blur --out blur.png",
    "convolve photo.png --kernel blur --per-channel --out blur-colour.png",
    'convolve photo.png --kernel "1,0,-1;2,0,-2;1,0,-1" --gray --out edges.png',
    "convolve photo.png --kernel outline --gray --rescale abs --out outline.png",
    "convolve photo.png --kernel blur --stride 2 --padding same --per-channel --out stride2.png",
    "pool photo.png --mode max --size 4 --out max-pool.png",
    "pool photo.png --mode avg --size 4 --out avg-pool.png",
    "explain conv digit.png --kernel sharpen --start 21 --steps 6 --out explain-conv.gif",
    "explain pool digit.png --mode max --start 7 --steps 4 --out explain-pool.gif",
]


def main() -> None:
    draw_scene(HERE / "photo.png")
    draw_digit(HERE / "digit.png")
    runner = CliRunner()
    for command in COMMANDS:
        args = [str(HERE / a) if "." in a and not a.startswith("1,") else a for a in shlex.split(command)]
        result = runner.invoke(app, args)
        print(f"$ cnnlab {command}\n{result.output}")
        assert result.exit_code == 0, result.output
    for path in sorted(HERE.glob("*.*")):
        print(f"{path.name}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
