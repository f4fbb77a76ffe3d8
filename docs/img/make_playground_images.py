"""Regenerate the pictures of docs/playground.md: a drawn 'photo', a digit, and the commands' outputs.

Usage (from the repository root): python docs/img/make_playground_images.py
Nothing is downloaded: the pictures are `cnnlab samples`' (cnnlab.data.pictures).
"""
from __future__ import annotations

import shlex
from pathlib import Path

from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data.pictures import digit, scene, trousers

HERE = Path(__file__).parent


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
    scene().save(HERE / "photo.png")  # what `cnnlab samples` writes
    digit().save(HERE / "digit.png")
    trousers().save(HERE / "tour-trousers.png")
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
