"""Playground commands: samples, convolve, pool, explain (conv | pool). Thin wrappers over cnnlab.playground.

NumPy and Pillow only (the playground has no torch); matplotlib is imported by `explain` alone.
"""
from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import typer

from cnnlab.cli._app import LEARN, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.playground.display import MAX_FRAMES, RESCALE_RULES
from cnnlab.playground.kernels import list_kernels

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

P = ParamSpec("P")
R = TypeVar("R")

explain_app = typer.Typer(help="Animate a kernel or a pooling window sliding over a small image, step by step.",
                          no_args_is_help=True)


class PoolMode(str, Enum):
    max = "max"
    avg = "avg"


class Rescale(str, Enum):
    auto = "auto"
    clip = "clip"
    minmax = "minmax"
    abs = "abs"


KERNEL_HELP = (f"Kernel: a name ({', '.join(list_kernels())}), box:SIZE, gaussian:SIZE:SIGMA, RUN:LAYER:INDEX "
               "(filter INDEX of a trained run's conv layer, e.g. runs/mnist-seed:conv1:5), "
               "or weights with rows separated by ';' and values by ',', e.g. '1,0,-1;2,0,-2;1,0,-1'.")
PADDING_HELP = "'valid' (no padding), 'same' (output = ceil(input / stride), Keras), N zeros (0-256), or 'ROWS,COLS'."
IMAGE_ARG = typer.Argument(..., help="Image file to read (PNG, JPEG, ...); scaled to floats in [0, 1].")


# ---------------------------------------------------------------- reading, parsing, writing

def open_image(path: Path, gray: bool) -> tuple[Image.Image, list[str]]:
    """The image as mode 'L' or 'RGB', read by cnnlab's one image reader (the limits and the policy of
    `cnnlab predict`), grey if asked; the notes say what was done to it."""
    from cnnlab import images

    image = images.open_image(path)  # ImageReadError (too many pixels, not an image): one line via friendly_errors
    notes = []
    if image.mode == "P":
        notes.append("palette image expanded to RGB")
    if image.mode in images.ALPHA_MODES or "transparency" in image.info:
        notes.append("transparency: composited on a contrasting background (white behind dark, black behind light)")
    if image.mode in images.WIDE_GREY_MODES:
        notes.append("16-bit grey scaled to 8 bits")
    picture = images.normalized(image)
    if gray and picture.mode != "L":
        notes.append("converted to grey")
        picture = picture.convert("L")
    return picture, notes


def to_floats(image: Image.Image) -> np.ndarray:
    """Pixels as floats in [0, 1]: (H, W) for grey, (H, W, 3) for colour."""
    import numpy as np

    return np.asarray(image, dtype=np.float64) / 255.0


def save_image(values: np.ndarray, path: Path) -> None:
    """Save a [0, 1] (H, W) or (H, W, 3) array atomically (cnnlab.files: never half-written, never a device)."""
    import numpy as np
    from PIL import Image

    from cnnlab.files import write_atomic

    pixels = np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)
    kind = Image.registered_extensions()[path.suffix.lower()]
    write_atomic(path, lambda tmp: Image.fromarray(pixels).save(tmp, format=kind))


def check_image_output(path: Path) -> None:
    """Fail before any work if Pillow cannot write the output's file type, or the target is not a file."""
    from PIL import Image

    from cnnlab.files import output_target

    if path.suffix.lower() not in Image.registered_extensions():
        raise typer.BadParameter(f"cannot write {path.suffix or 'a file without extension'}: use .png or .jpg",
                                 param_hint="--out")
    output_target(path)


def parse_padding(text: str) -> str | int | tuple[int, int]:
    """'valid', 'same', '2' or '1,2' as the library expects them."""
    text = text.strip().lower()
    if text in ("valid", "same"):
        return text
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected {PADDING_HELP} Got {text!r}", param_hint="--padding") from None
    if len(numbers) > 2 or min(numbers) < 0 or max(numbers) > 256:
        raise typer.BadParameter(f"expected {PADDING_HELP} Got {text!r}", param_hint="--padding")
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


def parse_kernel(spec: str) -> np.ndarray:
    """A named or written-out kernel, or RUN:LAYER:INDEX for one a trained model learned."""
    from cnnlab.playground.kernels import get_kernel

    try:
        run, _, rest = spec.partition(":")
        if rest and Path(run, "config.yaml").is_file():
            from cnnlab.inspect.activations import learned_kernel  # imports torch: only when a run is named

            layer, _, index = rest.partition(":")
            return learned_kernel(run, layer, int(index) if index.isdigit() else -1)
        if rest and ("/" in run or Path(run).exists()):  # meant as RUN:LAYER:INDEX, but no run is there
            what = "is not a run directory (no config.yaml in it)" if Path(run).exists() else "does not exist"
            raise ValueError(f"{run} {what}: --kernel RUN:LAYER:INDEX takes a trained run's directory, "
                             f"e.g. runs/seed-1:conv1:0")
        return get_kernel(spec)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--kernel") from None


def print_arithmetic(in_shape: tuple[int, ...], window: tuple[int, int], stride: int,
                     padding: str | int | tuple[int, int], dilation: int = 1) -> None:
    """Print the output-size formula for the height and the width."""
    from cnnlab.playground.conv import explain_output_size

    pads = padding if isinstance(padding, tuple) else (padding, padding)
    for axis, name in enumerate(("height", "width")):
        formula = explain_output_size(in_shape[axis], window[axis], stride, pads[axis], dilation)
        typer.echo(f"  {name}: {formula}")


def run_library(call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call a cnnlab.playground.conv function, turning its ValueError into a clean CLI error (exit 2)."""
    try:
        return call(*args, **kwargs)
    except ValueError as error:
        raise fail(str(error)) from None


def shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(str(n) for n in shape)


# ---------------------------------------------------------------- commands

@app.command(rich_help_panel=LEARN)
@friendly_errors
def samples(
    folder: Path = typer.Argument(..., help="Folder to write them into (made if missing), e.g. '.'."),
    force: bool = typer.Option(False, "--force", help="Overwrite pictures of the same names already there."),
) -> None:
    """Write the lesson's sample pictures (photo.png, digit.png, trousers.png) into a folder: the tour starts here."""
    from cnnlab.data.pictures import write_samples

    for path, what in write_samples(folder, overwrite=force):
        typer.echo(f"{path}: {what}")


@app.command(rich_help_panel=LEARN)
@friendly_errors
def convolve(
    image: Path = IMAGE_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the result (.png, .jpg, ...)."),
    kernel: str = typer.Option("blur", "--kernel", "-k", help=KERNEL_HELP),
    stride: int = typer.Option(1, min=1, max=256, help="Step between kernel positions, in pixels."),
    padding: str = typer.Option("valid", help=PADDING_HELP),
    dilation: int = typer.Option(1, min=1, max=64,
                                  help="Gap between kernel taps: 2 spreads a 3x3 kernel over 5x5 pixels."),
    gray: bool = typer.Option(False, "--gray", help="Convert the image to grey first."),
    per_channel: bool = typer.Option(False, "--per-channel",
                                     help="Keep colour: convolve R, G and B separately with the same kernel "
                                          "(default: one copy per channel, results summed into one channel)."),
    flip: bool = typer.Option(False, "--flip", help="Rotate the kernel 180 degrees: textbook convolution."),
    rescale_rule: Rescale = typer.Option(Rescale.auto, "--rescale",
                                         help="How raw outputs become pixels: " +
                                              "; ".join(f"{k}: {v}" for k, v in RESCALE_RULES.items()) + "."),
) -> None:
    """Convolve an image with a kernel and save the result, printing the shapes and the size arithmetic."""
    import numpy as np

    from cnnlab.playground.conv import conv2d, conv2d_per_channel
    from cnnlab.playground.display import rescale

    check_image_output(out)
    weights = parse_kernel(kernel)
    pad = parse_padding(padding)
    picture, notes = open_image(image, gray)
    pixels = to_floats(picture)
    for note in notes:
        typer.echo(f"note: {note}")
    if pixels.ndim == 3 and per_channel:
        result = run_library(conv2d_per_channel, pixels, weights, stride, pad, dilation, flip)
        how = "each channel convolved separately (--per-channel): colour kept"
    elif pixels.ndim == 3 and weights.ndim == 3:  # a kernel learned on colour input: a slice per channel already
        result = run_library(conv2d, pixels, weights, stride, pad, dilation, flip)
        how = f"the kernel's own slice for each of the {pixels.shape[2]} channels, the results summed into one"
    elif pixels.ndim == 3:
        weights = np.repeat(weights[:, :, None], pixels.shape[2], axis=2)  # (kh, kw, C)
        result = run_library(conv2d, pixels, weights, stride, pad, dilation, flip)
        how = f"one copy of the kernel per channel, the {pixels.shape[2]} results summed into one channel"
    else:
        result = run_library(conv2d, pixels, weights, stride, pad, dilation, flip)
        how = "grey image, one channel"
    typer.echo(f"input  {shape_text(pixels.shape)}   kernel {shape_text(weights.shape)}   ({how})")
    typer.echo(f"stride {stride}, padding {pad!r}, dilation {dilation}:")
    print_arithmetic(pixels.shape, weights.shape[:2], stride, pad, dilation)
    typer.echo(f"output {shape_text(result.shape)}   raw values in [{result.min():.3g}, {result.max():.3g}]")
    display, rule = rescale(result, rescale_rule.value)
    typer.echo(f"display: {rule} ({RESCALE_RULES[rule]})")
    save_image(display, out)
    typer.echo(f"saved {out}")


@app.command(rich_help_panel=LEARN)
@friendly_errors
def pool(
    image: Path = IMAGE_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the result (.png, .jpg, ...)."),
    mode: PoolMode = typer.Option(PoolMode.max, help="max: largest value of each window; avg: its mean."),
    size: int = typer.Option(2, min=1, max=256, help="Window side, in pixels."),
    stride: int = typer.Option(None, min=1, max=256,
                               help="Step between windows, in pixels (default: the window size)."),
    padding: str = typer.Option("valid", help=PADDING_HELP + " Padded cells are ignored."),
    gray: bool = typer.Option(False, "--gray", help="Convert the image to grey first."),
) -> None:
    """Max- or average-pool an image (each channel separately) and save the smaller result."""
    from cnnlab.playground.conv import avg_pool2d, max_pool2d

    check_image_output(out)
    pad = parse_padding(padding)
    stride = stride or size
    picture, notes = open_image(image, gray)
    pixels = to_floats(picture)
    for note in notes:
        typer.echo(f"note: {note}")
    function = max_pool2d if mode == PoolMode.max else avg_pool2d
    result = run_library(function, pixels, size, stride, pad)
    typer.echo(f"input  {shape_text(pixels.shape)}   {mode.value} pool {size}x{size}, stride {stride}, "
               f"padding {pad!r}:")
    print_arithmetic(pixels.shape, (size, size), stride, pad)
    typer.echo(f"output {shape_text(result.shape)}   (channels pooled separately)")
    save_image(result, out)
    typer.echo(f"saved {out}")


# ---------------------------------------------------------------- explain conv | pool

def small_grey(path: Path, max_side: int) -> np.ndarray:
    """The image in grey, downscaled (area average) so its longer side is at most max_side pixels."""
    return small_image(path, max_side, grey=True)


def small_image(path: Path, max_side: int, grey: bool) -> np.ndarray:
    """The image (in grey if `grey`), downscaled (area average) so its longer side is at most max_side pixels."""
    from PIL import Image

    picture, notes = open_image(path, gray=grey)
    for note in notes:
        typer.echo(f"note: {note}")
    width, height = picture.size
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX)
        typer.echo(f"note: downscaled from {height}x{width} to {picture.height}x{picture.width} "
                   f"(--max-side {max_side}) so every cell stays readable")
    return to_floats(picture)


def save_frames(frames: list[Image.Image], out: Path, start: int, total: int) -> None:
    shown = len(frames) - 1  # the last frame is the finished output
    typer.echo(f"animation: positions {start} to {start + shown - 1} of {total} shown "
               f"(--start, --steps to change), then the result")
    from cnnlab.playground.explain import save_animation

    save_animation(frames, out)
    typer.echo(f"saved {out} ({len(frames)} frames)")


def check_animation_output(out: Path) -> None:
    from cnnlab.files import output_target

    if out.suffix.lower() not in (".gif", ".html", ".htm"):
        raise typer.BadParameter(f"animation output must end in .gif or .html, got {out.name!r}", param_hint="--out")
    output_target(out)


STEPS_HELP = f"How many positions to animate before the final frame (at most {MAX_FRAMES})."
START_HELP = "First position to animate, counting from 0 in reading order (earlier ones are computed silently)."
MAX_SIDE_HELP = "Downscale the input so its longer side is at most this many pixels."
OUT_HELP = "Animation file: .gif, or .html for a self-contained page with a step-by-step slider."


@explain_app.command("conv")
@friendly_errors
def explain_conv_command(
    image: Path = IMAGE_ARG,
    out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    kernel: str = typer.Option("blur", "--kernel", "-k", help=KERNEL_HELP),
    stride: int = typer.Option(1, min=1, max=256, help="Step between kernel positions, in pixels."),
    padding: str = typer.Option("valid", help=PADDING_HELP),
    steps: int = typer.Option(12, min=1, max=MAX_FRAMES, help=STEPS_HELP),
    start: int = typer.Option(0, min=0, help=START_HELP),
    max_side: int = typer.Option(12, min=2, max=64, help=MAX_SIDE_HELP),
    dilation: int = typer.Option(1, min=1, max=16, help="Spacing between the kernel's taps, in pixels (1: none)."),
    colour: bool = typer.Option(False, "--colour", "--color",
                                help="Keep a colour image's channels: a row per channel, their sums added up."),
) -> None:
    """Show a kernel sliding over a small image: patch, weights, products and the sum landing in the output
    (grey by default; --colour: one kernel slice per channel, summed)."""
    import numpy as np

    from cnnlab.playground.conv import conv2d

    check_animation_output(out)
    weights = parse_kernel(kernel)
    pad = parse_padding(padding)
    pixels = small_image(image, max_side, grey=not colour)
    if colour and pixels.ndim == 2:
        typer.echo(f"note: {image.name} is a grey image (one channel): --colour has one row to show")
    if pixels.ndim == 2 and weights.ndim == 3:
        raise fail(f"--kernel {kernel}: a kernel learned on colour input has {weights.shape[2]} slices; "
                   "explain it on a colour image with --colour")
    if pixels.ndim == 3 and weights.ndim == 2:
        weights = np.repeat(weights[:, :, None], pixels.shape[2], axis=2)  # (kh, kw, C): one copy per channel
        typer.echo(f"note: one copy of the kernel per channel, the {pixels.shape[2]} results summed into one")
    result = run_library(conv2d, pixels, weights, stride, pad, dilation)
    typer.echo(f"input  {shape_text(pixels.shape)}   kernel {shape_text(weights.shape)}   stride {stride}, "
               f"padding {pad!r}{f', dilation {dilation}' if dilation > 1 else ''}:")
    print_arithmetic(pixels.shape, weights.shape[:2], stride, pad, dilation)
    typer.echo(f"output {shape_text(result.shape)}")
    from cnnlab.playground.explain import explain_conv

    frames = run_library(explain_conv, pixels, weights, stride, pad, steps, start, dilation)
    save_frames(frames, out, start, result.size)


@explain_app.command("pool")
@friendly_errors
def explain_pool_command(
    image: Path = IMAGE_ARG,
    out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    mode: PoolMode = typer.Option(PoolMode.max, help="max: largest value of each window; avg: its mean."),
    size: int = typer.Option(2, min=1, max=256, help="Window side, in pixels."),
    stride: int = typer.Option(None, min=1, max=256,
                               help="Step between windows, in pixels (default: the window size)."),
    padding: str = typer.Option("valid", help=PADDING_HELP + " Padded cells are ignored."),
    steps: int = typer.Option(12, min=1, max=MAX_FRAMES, help=STEPS_HELP),
    start: int = typer.Option(0, min=0, help=START_HELP),
    max_side: int = typer.Option(12, min=2, max=64, help=MAX_SIDE_HELP),
) -> None:
    """Show a pooling window sliding over a small grey image and the max or mean landing in the output."""
    from cnnlab.playground.conv import avg_pool2d, max_pool2d

    check_animation_output(out)
    pad = parse_padding(padding)
    stride = stride or size
    pixels = small_grey(image, max_side)
    function = max_pool2d if mode == PoolMode.max else avg_pool2d
    result = run_library(function, pixels, size, stride, pad)
    typer.echo(f"input  {shape_text(pixels.shape)}   {mode.value} pool {size}x{size}, stride {stride}, "
               f"padding {pad!r}:")
    print_arithmetic(pixels.shape, (size, size), stride, pad)
    typer.echo(f"output {shape_text(result.shape)}")
    from cnnlab.playground.explain import explain_pool

    frames = run_library(explain_pool, pixels, mode.value, size, stride, pad, steps, start)
    save_frames(frames, out, start, result.size)


app.add_typer(explain_app, name="explain", rich_help_panel=LEARN)
