"""What a trained network learned: its conv kernels, and the feature maps it computes for an image.

Both come from the model's own API (`CNN.conv_layers`, `CNN.feature_maps`), never from module names."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlab.data.pixels import image_input
from cnnlab.errors import UserError
from cnnlab.inspect.figures import Output, draw_image, grid_shape, new_figure, save_figure
from cnnlab.models.cnn import CNN
from cnnlab.runs.layout import RunError
from cnnlab.runs.weights import load_model
from cnnlab.suggest import did_you_mean

COLOUR_NAMES = ("red", "green", "blue")


class LayerError(UserError, ValueError):
    """A layer name the model does not have; the message lists the ones it has."""


def conv_weights(model: CNN, layer: str = "conv1") -> np.ndarray:
    """A conv layer's kernels as float (filters, input channels, kernel height, kernel width)."""
    convs = model.conv_layers()
    if layer not in convs:
        raise LayerError(f"no conv layer {layer!r}{did_you_mean(layer, convs)} "
                         f"(this model has: {', '.join(convs) or 'none'})")
    return convs[layer].weight.detach().cpu().numpy().astype(np.float64)


def learned_kernel(run: str | Path, layer: str, index: int) -> np.ndarray:
    """Filter `index` of conv layer `layer` of a trained run, channels-last: (kh, kw) or (kh, kw, C)."""
    model, _, _ = load_model(run)
    try:
        weights = conv_weights(model, layer)  # (filters, C, kh, kw)
    except LayerError as exc:
        raise RunError(f"{run}: {exc}") from None
    if not 0 <= index < weights.shape[0]:
        raise RunError(f"{run}: {layer} has filters 0..{weights.shape[0] - 1}, got {index}")
    kernel = weights[index].transpose(1, 2, 0)  # (kh, kw, C)
    return kernel[:, :, 0] if kernel.shape[2] == 1 else kernel


# ---------------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class KernelGrid:
    """How a kernel picture is laid out: a grid of rows x columns panels."""

    layer: str
    filters: int  # filters drawn (at most max_filters)
    channels: int  # input channels drawn per filter
    rows: int
    columns: int
    total_filters: int = 0  # the layer's filters and input channels, drawn or not (0: as drawn)
    total_channels: int = 0

    def describe(self) -> str:
        """One line: what is drawn, and of how many when the picture shows only the first ones."""
        filters = f"{self.filters} of {self.total_filters}" if self.total_filters > self.filters else f"{self.filters}"
        channels = (f"{self.channels} of {self.total_channels}" if self.total_channels > self.channels
                    else f"{self.channels}")
        return f"{self.layer}: {filters} filters x {channels} input channel(s) in a {self.rows}x{self.columns} grid"


def plot_kernels(weights: np.ndarray, out: Output, layer: str = "conv1", title: str = "",
                 max_filters: int = 64, max_channels: int = 8, each_scaled: bool = False) -> KernelGrid:
    """Draw kernels (F, C, kh, kw): one panel per filter for grey input, else a row per filter, a column per channel.

    One diverging colour scale for all panels (red positive, blue negative, white 0) so weights compare;
    `each_scaled` divides each filter by its largest |weight| first, for kernels whose scales differ by
    design (a whitening layer's: 1/sqrt(variance) of each direction), so every pattern shows.
    """
    if each_scaled:
        largest = np.abs(weights).reshape(len(weights), -1).max(axis=1)
        weights = weights / np.where(largest > 0, largest, 1.0)[:, None, None, None]
    total_filters, total_channels = weights.shape[:2]
    if total_channels > 1:
        max_filters = min(max_filters, 16)  # a row per filter: keep the picture a sensible height
    weights = weights[:max_filters, :max_channels]
    filters, channels = weights.shape[:2]
    if channels == 1:
        rows, columns = grid_shape(filters, 8)
    else:
        rows, columns = filters, channels
    width = 1.1 * columns + 1.2
    fig = new_figure(width, 1.1 * rows + 0.8)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    limit = float(np.abs(weights).max()) or 1.0
    image = None
    for ax in axes:
        ax.axis("off")
    for f in range(filters):
        for c in range(channels):
            ax = axes[f if channels == 1 else f * columns + c]
            image = ax.imshow(weights[f, c], cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(kernel_caption(f, c, channels), fontsize=7)
    if image is None:
        raise ValueError(f"{layer}: no kernel to draw (weights of shape {weights.shape})")
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8,
                 label="weight ÷ its filter's largest (red +, blue −)" if each_scaled else "weight (red +, blue −)")
    kh, kw = weights.shape[2:]
    title = title or f"{layer}: {total_filters} learned {kh}x{kw} kernels"
    shown = [f"the first {n} of {total} {what}" for n, total, what in
             ((filters, total_filters, "filters"), (channels, total_channels, "input channels")) if n < total]
    if shown:
        title += f"\n({' and '.join(shown)} shown)"
    fig.suptitle(wrap_title(title, width))
    save_figure(fig, out)
    return KernelGrid(layer, filters, channels, rows, columns, total_filters, total_channels)


def wrap_title(title: str, width_inches: float) -> str:
    """A figure title in lines that fit its width: a row per filter makes a narrow picture (about 11
    characters an inch at matplotlib's 12-point title)."""
    return "\n".join(textwrap.fill(line, max(24, int(width_inches * 11))) for line in title.splitlines())


def kernel_caption(filter_index: int, channel: int, channels: int) -> str:
    if channels == 1:
        return f"filter {filter_index}"
    name = COLOUR_NAMES[channel] if channels == 3 else f"in {channel}"
    return f"f{filter_index} · {name}"


# ----------------------------------------------------------------------------- feature maps
@dataclass
class FeatureMaps:
    """The output of every conv stage (after its activation) for one image: name -> (C, H, W)."""

    image: np.ndarray  # the uint8 input, grey (H, W) or colour (H, W, C)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)  # name -> "conv1 → relu" etc.


def feature_maps(model: CNN, image: np.ndarray) -> FeatureMaps:
    """Every conv stage's (and residual block's) activated output for one uint8 image, (H, W) or (H, W, C)."""
    result = FeatureMaps(image)
    for row in model.feature_maps(image_input(image).to(next(model.parameters()).device)):
        result.maps[row.name] = row.maps[0].cpu().numpy()
        result.titles[row.name] = row.title
    return result


def plot_feature_maps(result: FeatureMaps, out: Output, title: str = "", max_maps: int = 16,
                      columns: int = 8) -> dict[str, int]:
    """The input image, then up to `max_maps` maps of each conv stage; returns panels drawn per row group."""
    groups: list[tuple[str, np.ndarray | None]] = [("input", None), *result.maps.items()]
    columns = min(columns, max(min(len(maps), max_maps) for maps in result.maps.values())) if result.maps else 1
    shapes = {name: grid_shape(1 if maps is None else min(len(maps), max_maps), columns) for name, maps in groups}
    height = sum(1.2 * rows + 0.5 for rows, _ in shapes.values())
    fig = new_figure(1.2 * columns + 1.3, height + 0.4)
    ratios = [shapes[n][0] + 0.4 for n, _ in groups]
    subfigures = fig.subfigures(len(groups), 1, squeeze=False, height_ratios=ratios).ravel()  # one row group each
    panels = {}
    for sub, (name, maps) in zip(subfigures, groups):
        rows, cols = shapes[name]
        axes = np.atleast_1d(sub.subplots(rows, columns, squeeze=False)).ravel()
        for ax in axes:
            ax.axis("off")
        if maps is None:
            draw_image(axes[0], result.image)
            sub.suptitle(f"input image ({result.image.shape[0]}x{result.image.shape[1]})", fontsize=9, x=0.02,
                         ha="left")
            panels[name] = 1
            continue
        shown = maps[:max_maps]
        low, high = float(shown.min()), float(shown.max())  # one scale per layer: maps compare in strength
        image = None
        for i, (ax, fmap) in enumerate(zip(axes, shown)):
            image = ax.imshow(fmap, cmap="magma", vmin=low, vmax=high if high > low else low + 1)
            ax.set_title(f"map {i}", fontsize=7)
        sub.colorbar(image, ax=axes.tolist(), shrink=0.9, label="activation")
        sub.suptitle(f"{result.titles[name]}: {len(shown)} of {len(maps)} maps, {maps.shape[1]}x{maps.shape[2]} "
                     "(bright = strong response)", fontsize=9, x=0.02, ha="left")
        panels[name] = len(shown)
    if title:
        fig.suptitle(title)
    save_figure(fig, out)
    return panels
