"""Pictures for the playground: display rescaling and step-by-step animations of conv and pooling.

`explain_conv` / `explain_pool` draw one frame per kernel position (the patch highlighted, the
weights, the products and the sum landing in the output pixel) and save a GIF or an HTML stepper;
in a notebook the frames show themselves as that stepper. `conv_figure` draws a convolution's input,
kernel and output side by side. Matplotlib's object API with the Agg canvas is used, so no display
is needed. No torch here.
"""
from __future__ import annotations

import html
import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from cnnlab.files import write_atomic, write_text
from cnnlab.images import png_data_url
from cnnlab.inline import InlineFigure
from cnnlab.playground.conv import Padding, avg_pool2d, conv2d, max_pool2d, padding_amounts
from cnnlab.playground.display import FRAME_MS, MAX_FRAMES


class Stepper(list):  # list[Image.Image]: a plain list to save_animation and the CLI
    """Animation frames that a notebook shows as the HTML stepper (previous / next / play)."""

    def __init__(self, frames: list[Image.Image], title: str = ""):
        super().__init__(frames)
        self.title = title

    def _repr_html_(self) -> str:
        return _stepper(self, self.title)


@dataclass
class Step:
    """One window position: where it sits in the padded input and what it contributes."""
    out_row: int
    out_col: int
    top: int            # window's top-left corner in the padded input, pixels
    left: int
    caption: str        # the arithmetic for this position, e.g. "0.2×0.1 + ... = 0.43"


# ---------------------------------------------------------------- building the steps

def _fmt(value: float) -> str:
    """Short number for a picture: 2 decimals, no trailing zeros, never '-0'."""
    text = f"{value + 0.0:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _factor(value: float) -> str:
    """A number as a multiplication operand: negatives bracketed, e.g. '(-1)'."""
    text = _fmt(value)
    return f"({text})" if text.startswith("-") else text


def conv_steps(kernel: np.ndarray, stride: int, padded: np.ndarray, out: np.ndarray, dilation: int = 1) -> list[Step]:
    """Every kernel position in reading order with its products written out.

    Grey: kernel (kh, kw), padded (H, W). Colour: kernel (kh, kw, C), padded (H, W, C): each channel's
    products summed, then the channel sums added up."""
    steps = []
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            patch = window_at(padded, r * stride, c * stride, kernel.shape[:2], dilation)
            if kernel.ndim == 2:
                terms = " + ".join(f"{_factor(p)}×{_factor(w)}" for p, w in zip(patch.ravel(), kernel.ravel()))
                caption = f"{terms} = {_fmt(out[r, c])}"
            else:
                sums = (patch * kernel).sum(axis=(0, 1))  # (C,): one sum of products per channel
                names = channel_names(kernel.shape[2])
                caption = (", ".join(f"{n}: {_fmt(v)}" for n, v in zip(names, sums))
                           + f"; channels summed: {' + '.join(_factor(v) for v in sums)} = {_fmt(out[r, c])}")
            steps.append(Step(r, c, r * stride, c * stride, caption))
    return steps


def window_at(padded: np.ndarray, top: int, left: int, size: tuple[int, int], dilation: int = 1) -> np.ndarray:
    """The input values a (kh, kw) kernel with `dilation` multiplies at one position: (kh, kw[, C])."""
    kh, kw = size
    return padded[top:top + dilation * (kh - 1) + 1:dilation, left:left + dilation * (kw - 1) + 1:dilation]


def channel_names(channels: int) -> list[str]:
    return list("RGB") if channels == 3 else [f"channel {c}" for c in range(channels)]


def pool_steps(mode: str, size: int, stride: int, padded: np.ndarray, out: np.ndarray) -> list[Step]:
    """Every pooling window in reading order; padded cells (nan) are left out, as the pool does."""
    steps = []
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            window = padded[r * stride:r * stride + size, c * stride:c * stride + size].ravel()
            real = [_fmt(v) for v in window if v == v]
            formula = f"max({', '.join(real)})" if mode == "max" else f"({' + '.join(real)}) / {len(real)}"
            steps.append(Step(r, c, r * stride, c * stride, f"{formula} = {_fmt(out[r, c])}"))
    return steps


# ---------------------------------------------------------------- drawing

def _grid(ax: Axes, values: np.ndarray, title: str, cmap: str, vmin: float, vmax: float,
          numbers: bool) -> None:
    """Draw a 2-D array as coloured cells, with the values written in when they fit."""
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#f4f1e4")  # nan cells: pale background
    ax.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if not numbers:
        return
    font = 8 if max(values.shape) <= 5 else 6
    for (r, c), v in np.ndenumerate(values):
        if v == v:  # skip nan (padding / not computed yet)
            shade = (v - vmin) / ((vmax - vmin) or 1)  # 0..1 position in the colour map
            dark = shade < 0.5 if cmap == "gray" else abs(shade - 0.5) > 0.3
            ax.text(c, r, _fmt(v), ha="center", va="center", fontsize=font, color="white" if dark else "black")


def _box(ax: Axes, top: int, left: int, height: int, width: int, colour: str = "red") -> None:
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), width, height, fill=False, edgecolor=colour, linewidth=2))


def _render(fig: Figure) -> Image.Image:
    """Rasterise a figure to a palette image (few colours: small GIF/PNG)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3]
    return Image.fromarray(rgb).quantize(colors=64, method=Image.Quantize.MEDIANCUT)


def _frame(input_grid: np.ndarray, input_title: str, window: tuple[int, int],
           middle: list[tuple[np.ndarray, str, str]], output_grid: np.ndarray,
           out_range: tuple[float, float], step: Step | None, title: str, caption: str,
           panels: int) -> Image.Image:
    """One frame of `panels` panels: input with the window boxed | middle (kernel, products...) | output.

    middle holds (values, panel title, colour map); unused middle panels stay blank so every frame of
    an animation has the same size. step None draws the finished output, unboxed.
    """
    fig = Figure(figsize=(2.3 * panels, 3.0), dpi=72)
    axes = fig.subplots(1, panels)
    for ax in axes[1 + len(middle):-1]:
        ax.axis("off")
    _grid(axes[0], input_grid, input_title, "gray", 0, 1, numbers=max(input_grid.shape) <= 8)
    for ax, (values, name, cmap) in zip(axes[1:-1], middle):
        if cmap == "gray":
            _grid(ax, values, name, cmap, 0, 1, numbers=True)
        else:  # signed values: a diverging map centred on 0
            limit = 1.5 * float(np.nanmax(np.abs(values))) or 1.0  # 1.5: pale colours, legible numbers
            _grid(ax, values, name, cmap, -limit, limit, numbers=True)
    _grid(axes[-1], output_grid, "output", "gray", *out_range, numbers=max(output_grid.shape) <= 8)
    if step is not None:
        _box(axes[0], step.top, step.left, *window)
        _box(axes[-1], step.out_row, step.out_col, 1, 1)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.02, _wrap(caption), ha="center", va="bottom", fontsize=8, family="monospace")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.82, bottom=0.16, wspace=0.15)
    return _render(fig)


def _colour_frame(padded: np.ndarray, span: tuple[int, int], kernel: np.ndarray, so_far: np.ndarray,
                  out_range: tuple[float, float], step: Step | None, dilation: int, title: str,
                  caption: str) -> Image.Image:
    """One frame for a colour input: a row per channel (its padded input with the window boxed, the patch,
    the kernel's slice for it, their products) and the one output map, where the channel sums add up."""
    channels = padded.shape[2]
    fig = Figure(figsize=(2.3 * 5, 2.2 * channels + 0.9), dpi=72)
    axes = fig.subplots(channels, 5, squeeze=False)
    limit = 1.5 * float(np.abs(kernel).max()) or 1.0  # 1.5: pale colours, legible numbers
    for c, name in enumerate(channel_names(channels)):
        row = axes[c]
        _grid(row[0], padded[:, :, c], f"input, {name}", "gray", 0, 1, numbers=max(padded.shape[:2]) <= 8)
        weights = kernel[:, :, c]
        if step is None:
            for ax in row[1:4]:
                ax.axis("off")
            _grid(row[1], weights, f"kernel, {name}", "RdBu_r", -limit, limit, numbers=True)
        else:
            _box(row[0], step.top, step.left, *span)
            patch = window_at(padded[:, :, c], step.top, step.left, weights.shape, dilation)
            _grid(row[1], patch, f"patch, {name}" + (f", dilation {dilation}" if dilation > 1 else ""), "gray", 0, 1,
                  numbers=True)
            _grid(row[2], weights, f"kernel, {name}", "RdBu_r", -limit, limit, numbers=True)
            products = patch * weights
            _grid(row[3], products, f"products: sum {_fmt(float(products.sum()))}", "RdBu_r", -limit, limit,
                  numbers=True)
        if c:
            row[4].axis("off")
    _grid(axes[0][4], so_far, "output (channels summed)", "gray", *out_range, numbers=max(so_far.shape) <= 8)
    if step is not None:
        _box(axes[0][4], step.out_row, step.out_col, 1, 1)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, _wrap(caption), ha="center", va="bottom", fontsize=8, family="monospace")
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.55 / fig.get_figheight(),
                        bottom=0.45 / fig.get_figheight(), wspace=0.15, hspace=0.3)
    return _render(fig)


def _wrap(text: str, width: int = 110) -> str:
    """Split a long arithmetic caption over lines at ' + ' boundaries."""
    lines, line = [], ""
    for part in text.split(" + "):
        candidate = f"{line} + {part}" if line else part
        if len(candidate) > width and line:
            lines.append(line + " +")
            candidate = part
        line = candidate
    return "\n".join(lines + [line])


# ---------------------------------------------------------------- whole animations

def conv_figure(image: np.ndarray, kernel: np.ndarray, stride: int = 1, padding: Padding = "valid",
                title: str = "") -> InlineFigure:
    """Input | kernel | output of one convolution, values written in when they fit (small grids).

    `image` is floats in [0, 1], grey (H, W) or colour (H, W, C); a (kh, kw) kernel on a colour image is
    copied to every channel and the per-channel results summed into one output channel, as a conv layer does.
    """
    if image.ndim == 3 and kernel.ndim == 2:
        kernel = np.repeat(kernel[:, :, None], image.shape[2], axis=2)  # (kh, kw, C): one copy per channel
    out = conv2d(image, kernel, stride=stride, padding=padding)  # (H_out, W_out)
    slices = [kernel] if kernel.ndim == 2 else [kernel[:, :, c] for c in range(kernel.shape[2])]
    fig = InlineFigure(figsize=(2.6 * (2 + len(slices)), 3.0), dpi=80, layout="constrained")
    axes = fig.subplots(1, 2 + len(slices))
    if image.ndim == 2:
        _grid(axes[0], image, f"input {image.shape[0]}x{image.shape[1]}", "gray", 0, 1,
              numbers=max(image.shape) <= 8)
    else:
        axes[0].imshow(np.clip(image, 0, 1), interpolation="nearest")
        axes[0].set_title(f"input {'x'.join(map(str, image.shape))}", fontsize=9)
        axes[0].set_xticks([])
        axes[0].set_yticks([])
    limit = 1.5 * float(np.abs(kernel).max()) or 1.0  # 1.5: pale colours, legible numbers
    for c, (ax, weights) in enumerate(zip(axes[1:-1], slices)):
        name = "kernel" if len(slices) == 1 else f"kernel, channel {'RGB'[c] if len(slices) == 3 else c}"
        _grid(ax, weights, f"{name} {weights.shape[0]}x{weights.shape[1]}", "RdBu_r", -limit, limit, numbers=True)
    high = float(out.max()) if out.max() > out.min() else float(out.min()) + 1
    summed = " (channels summed)" if image.ndim == 3 else ""
    _grid(axes[-1], out, f"output {out.shape[0]}x{out.shape[1]}{summed}", "gray", float(out.min()), high,
          numbers=max(out.shape) <= 8)
    fig.suptitle(title or f"stride {stride}, padding {padding!r}", fontsize=10)
    return fig


def explain_conv(image: np.ndarray, kernel: np.ndarray, stride: int = 1, padding: Padding = "valid",
                 steps: int = 12, start: int = 0, dilation: int = 1) -> Stepper:
    """Frames for `steps` kernel positions from position `start` (reading order) on a small image, then
    one frame with the whole result.

    Grey (H, W) with a (kh, kw) kernel; or colour (H, W, C) with a (kh, kw, C) kernel, or a (kh, kw) one
    copied to every channel: a row per channel, the channels' sums of products added into one output."""
    if image.ndim == 3 and kernel.ndim == 2:
        kernel = np.repeat(kernel[:, :, None], image.shape[2], axis=2)  # (kh, kw, C): one copy per channel
    if image.ndim == 2 and kernel.ndim == 3 or image.ndim == 3 and kernel.shape[2] != image.shape[2]:
        raise ValueError(f"a kernel of shape {kernel.shape} does not fit an image of shape {image.shape}: "
                         "a colour kernel needs one slice per channel of the image")
    kh, kw = kernel.shape[:2]
    span = (dilation * (kh - 1) + 1, dilation * (kw - 1) + 1)  # input pixels the (dilated) kernel covers
    pads = padding_amounts(padding, image.shape[:2], span, (stride, stride))
    out = conv2d(image, kernel, stride=stride, padding=padding, dilation=dilation)   # (H_out, W_out)
    padded = np.pad(image, pads + [(0, 0)] * (image.ndim - 2))  # conv pads with zeros: they are real inputs
    out_range = (float(out.min()), float(out.max()) if out.max() > out.min() else float(out.min()) + 1)
    dilated = f", dilation {dilation}" if dilation > 1 else ""
    title = f"convolution: {'x'.join(map(str, image.shape))} input, {'x'.join(map(str, kernel.shape))} kernel, " \
            f"stride {stride}, padding {padding!r}{dilated} -> {out.shape[0]}x{out.shape[1]} output"
    all_steps = conv_steps(kernel, stride, padded, out, dilation)
    if image.ndim == 3:
        return _colour_stepper(padded, span, kernel, out, out_range, all_steps, start, steps, dilation, title)
    frames = []
    for index, step in _shown(all_steps, start, steps):
        patch = window_at(padded, step.top, step.left, (kh, kw), dilation)
        so_far = _filled(out, index)
        middle = [(patch, "patch" + (f" (dilation {dilation})" if dilation > 1 else ""), "gray"),
                  (kernel, "kernel (weights)", "RdBu_r"), (patch * kernel, "patch × kernel", "RdBu_r")]
        frames.append(_frame(padded, "input (zero padded)" if padded.shape != image.shape else "input",
                             span, middle, so_far, out_range, step, title,
                             f"out[{step.out_row}, {step.out_col}] = sum of products = {step.caption}", 5))
    frames.append(_frame(padded, "input", span, [(kernel, "kernel (weights)", "RdBu_r")], out,
                         out_range, None, title, f"all {len(all_steps)} positions done", 5))
    return Stepper(frames, title)


def _colour_stepper(padded: np.ndarray, span: tuple[int, int], kernel: np.ndarray, out: np.ndarray,
                    out_range: tuple[float, float], all_steps: list[Step], start: int, steps: int, dilation: int,
                    title: str) -> Stepper:
    frames = [_colour_frame(padded, span, kernel, _filled(out, index), out_range, step, dilation, title,
                            f"out[{step.out_row}, {step.out_col}]: sums of products per channel {step.caption}")
              for index, step in _shown(all_steps, start, steps)]
    frames.append(_colour_frame(padded, span, kernel, out, out_range, None, dilation, title,
                                f"all {len(all_steps)} positions done"))
    return Stepper(frames, title)


def explain_pool(image: np.ndarray, mode: str = "max", size: int = 2, stride: int | None = None,
                 padding: Padding = "valid", steps: int = 12, start: int = 0) -> Stepper:
    """Frames for `steps` pooling windows from window `start` (reading order) on a small grey
    (H, W) image, then one frame with the whole result."""
    if mode not in ("max", "avg"):
        raise ValueError(f"pool mode must be 'max' or 'avg', got {mode!r}")
    stride = stride or size
    pool = max_pool2d if mode == "max" else avg_pool2d
    out = pool(image, size=size, stride=stride, padding=padding)  # (H_out, W_out)
    pads = padding_amounts(padding, image.shape, (size, size), (stride, stride))
    padded = np.pad(image, pads, constant_values=np.nan)  # nan = padding, ignored by the pool
    out_range = (0.0, 1.0)
    title = f"{mode} pooling: {image.shape[0]}x{image.shape[1]} input, {size}x{size} window, " \
            f"stride {stride}, padding {padding!r} -> {out.shape[0]}x{out.shape[1]} output"
    frames = []
    all_steps = pool_steps(mode, size, stride, padded, out)
    for index, step in _shown(all_steps, start, steps):
        window = padded[step.top:step.top + size, step.left:step.left + size]
        middle = [(window, "window", "gray")]
        frames.append(_frame(padded, "input", (size, size), middle, _filled(out, index), out_range, step,
                             title, f"out[{step.out_row}, {step.out_col}] = {step.caption}", 3))
    frames.append(_frame(padded, "input", (size, size), [], out, out_range, None, title,
                         f"all {len(all_steps)} windows done", 3))
    return Stepper(frames, title)


def _shown(all_steps: list[Step], start: int, steps: int) -> list[tuple[int, Step]]:
    """(index, step) for the positions to draw: `steps` of them (at most MAX_FRAMES) from `start`."""
    if steps < 1 or not 0 <= start < len(all_steps):
        raise ValueError(f"need steps >= 1 and 0 <= start < {len(all_steps)} (the number of positions), "
                         f"got steps={steps}, start={start}")
    chosen = range(start, min(start + min(steps, MAX_FRAMES), len(all_steps)))
    return [(index, all_steps[index]) for index in chosen]


def _filled(out: np.ndarray, last_index: int) -> np.ndarray:
    """The output with positions after `last_index` (reading order) not computed yet (nan)."""
    so_far = np.full(out.shape, np.nan)
    so_far.flat[:last_index + 1] = out.flat[:last_index + 1]
    return so_far


def save_animation(frames: list[Image.Image], path: Path) -> None:
    """Write frames as an animated .gif or a self-contained .html stepper; never leaves half a file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".html", ".htm"):
        raise ValueError(f"animation output must end in .gif or .html, got {path.name!r}")
    if suffix == ".gif":
        write_atomic(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                      duration=FRAME_MS, loop=0))
    else:
        write_text(path, _html(frames, path.stem))


_STEPPERS = itertools.count()  # each stepper in a notebook gets its own element ids


def _stepper(frames: list[Image.Image], title: str) -> str:
    """Every frame as a base64 PNG and buttons to step through them (no internet); its script touches only
    its own elements, so several steppers can share a page or a notebook."""
    uid = f"cnnlab-stepper-{next(_STEPPERS)}"
    images = "\n".join(f'<img class="f" src="{png_data_url(frame)}" style="display:{"block" if i == 0 else "none"}">'
                        for i, frame in enumerate(frames))
    return f"""<div id="{uid}" tabindex="0" style="font-family:sans-serif">
{f"<p><b>{html.escape(title)}</b></p>" if title else ""}
<p><button class="prev">&larr; previous</button> <button class="next">next &rarr;</button>
<button class="play">play / pause</button> <span class="n"></span></p>
{images}
<script>
(() => {{ const root = document.getElementById("{uid}"); const frames = root.querySelectorAll("img.f");
  let i = 0, timer = null;
  function show() {{ frames.forEach((f, k) => f.style.display = k === i ? "block" : "none");
    root.querySelector(".n").textContent = `step ${{i + 1}} / ${{frames.length}}`; }}
  function go(d) {{ i = (i + d + frames.length) % frames.length; show(); }}
  root.querySelector(".prev").onclick = () => go(-1); root.querySelector(".next").onclick = () => go(1);
  root.querySelector(".play").onclick = () => {{ if (timer) {{ clearInterval(timer); timer = null; }}
    else timer = setInterval(() => go(1), {FRAME_MS}); }};
  root.addEventListener("keydown", e => {{ if (e.key === "ArrowRight") go(1); if (e.key === "ArrowLeft") go(-1); }});
  show(); }})();
</script></div>"""


def _html(frames: list[Image.Image], title: str) -> str:
    """A page holding the stepper: every frame embedded, buttons and arrow keys to step through them."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>
<body style="font-family:sans-serif">
<h2>{html.escape(title)}</h2>
{_stepper(frames, "")}
<script>document.querySelector("[tabindex]").focus();</script>
</body></html>
"""
