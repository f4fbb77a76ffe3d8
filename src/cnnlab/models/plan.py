"""The layer plan of a CNN config: every layer's output shape, parameters and multiply-adds.

Computed from the config alone (no torch), so `cnnlab summary` can explain a network before it is
built; `cnnlab.models.cnn` builds the torch modules from the same plan, so the two cannot disagree.
Shapes are channels-last, as the lesson writes them: (H, W, C) for images, (n,) after Flatten.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnnlab.config import ConfigError, ConvBlock, ModelConfig
from cnnlab.playground.conv import output_size

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """One layer of the plan."""

    name: str  # module name in the built network, e.g. "conv1", "fc1", "classifier"
    kind: str  # conv, batch_norm, activation, max_pool, avg_pool, dropout, flatten, dense
    output_shape: Shape
    params: int = 0  # trainable parameters
    formula: str = ""  # how `params` (or the shape) comes about, for --explain
    macs: int = 0  # multiply-adds per image
    options: dict[str, Any] = field(default_factory=dict)  # what the builder needs (kernel_size, ...)
    section: str = "features"  # "features" (conv stages) or "head" (flatten, dense, classifier)

    @property
    def title(self) -> str:
        return LAYER_TITLES[self.kind](self.options)


LAYER_TITLES = {
    # with batch norm, the activation follows the normalisation, not the conv
    "conv": lambda o: f"Conv2D {o['kernel_size'][0]}x{o['kernel_size'][1]}" + (f", {o['activation']}" if o["bias"] else ""),
    "batch_norm": lambda o: f"BatchNorm, {o['activation']}",
    "max_pool": lambda o: f"MaxPool {o['size']}x{o['size']}",
    "avg_pool": lambda o: f"AvgPool {o['size']}x{o['size']}",
    "dropout": lambda o: f"Dropout {o['p']:g}",
    "flatten": lambda o: "Flatten",
    "dense": lambda o: f"Dense, {o['activation']}",
}


def kernel_pair(kernel_size: int | list[int]) -> tuple[int, int]:
    if isinstance(kernel_size, int):
        return kernel_size, kernel_size
    return (kernel_size[0], kernel_size[0]) if len(kernel_size) == 1 else (kernel_size[0], kernel_size[1])


def plan(config: ModelConfig, input_shape: Shape = (28, 28, 1), num_classes: int = 10) -> list[Layer]:
    """The layers of `config` applied to images of `input_shape` (H, W, C), in order."""
    layers: list[Layer] = []
    h, w, c = input_shape
    for i, block in enumerate(config.conv, start=1):
        conv, (h, w, c) = conv_layer(i, block, (h, w, c))
        layers.append(conv)
        stages = [pool_layer, norm_layer] if block.pool_first else [norm_layer, pool_layer]
        for stage in stages:
            layer = stage(i, block, (h, w, c))
            if layer is not None:
                layers.append(layer)
                h, w, c = layer.output_shape
        if block.batch_norm:
            # the conv's bias is dropped (BN's shift replaces it): its parameters move to the BN layer
            kh, kw = kernel_pair(block.kernel_size)
            weights = kh * kw * conv.options["in_channels"] * block.filters
            layers[layers.index(conv)] = with_params(conv, weights, f"{kh}·{kw}·{conv.options['in_channels']}·"
                                                     f"{block.filters} = {weights:,} (no bias: BN shifts)")
        if block.dropout:
            layers.append(Layer(f"drop{i}", "dropout", (h, w, c), 0, "no parameters", options=dict(p=block.dropout)))
    n = h * w * c
    shape_text = "·".join(str(d) for d in (h, w, c)) if config.conv else "·".join(str(d) for d in input_shape)
    layers.append(Layer("flatten", "flatten", (n,), 0, f"{shape_text} = {n:,} values, no parameters",
                        section="head"))
    dense = [(f"fc{j}", d.units, d.activation, d.dropout) for j, d in enumerate(config.dense, start=1)]
    dense.append(("classifier", num_classes, "softmax", config.classifier_dropout))
    for name, units, activation, dropout in dense:
        if dropout:
            layers.append(Layer(f"drop_{name}", "dropout", (n,), 0, "no parameters",
                                options=dict(p=dropout), section="head"))
        params = (n + 1) * units
        layers.append(Layer(name, "dense", (units,), params, f"({n:,}+1)·{units} = {params:,}", n * units,
                            dict(in_features=n, units=units, activation=activation), section="head"))
        n = units
    return layers


def conv_layer(i: int, block: ConvBlock, shape: Shape) -> tuple[Layer, Shape]:
    """The i-th conv layer (1-based) on an input of `shape` (H, W, C), and its output shape."""
    h, w, c = shape
    kh, kw = kernel_pair(block.kernel_size)
    try:
        oh = output_size(h, kh, block.stride, block.padding)
        ow = output_size(w, kw, block.stride, block.padding)
    except ValueError as exc:
        raise ConfigError(f"model.conv[{i - 1}]: a {kh}x{kw} kernel does not fit the "
                          f"({h}, {w}, {c}) input of this layer: {exc}") from None
    params = (kh * kw * c + 1) * block.filters
    layer = Layer(f"conv{i}", "conv", (oh, ow, block.filters), params,
                  f"({kh}·{kw}·{c}+1)·{block.filters} = {params:,}", oh * ow * block.filters * kh * kw * c,
                  dict(in_channels=c, filters=block.filters, kernel_size=(kh, kw), stride=block.stride,
                       padding=block.padding, activation=block.activation, bias=not block.batch_norm))
    return layer, (oh, ow, block.filters)


def norm_layer(i: int, block: ConvBlock, shape: Shape) -> Layer | None:
    if not block.batch_norm:
        return None
    c = shape[2]
    return Layer(f"bn{i}", "batch_norm", shape, 2 * c, f"2·{c} = {2 * c} (scale and shift per channel)",
                 options=dict(channels=c, activation=block.activation))


def pool_layer(i: int, block: ConvBlock, shape: Shape) -> Layer | None:
    if not block.pool:
        return None
    h, w, c = shape
    size = block.pool_size
    try:
        out = (output_size(h, size, size), output_size(w, size, size), c)
    except ValueError:
        raise ConfigError(f"model.conv[{i - 1}]: a {size}x{size} pool does not fit its ({h}, {w}, {c}) input") from None
    return Layer(f"pool{i}", f"{block.pool}_pool", out, 0,
                 f"no parameters: the {block.pool} of each {size}x{size} window", options=dict(size=size))


def with_params(layer: Layer, params: int, formula: str) -> Layer:
    return Layer(layer.name, layer.kind, layer.output_shape, params, formula, layer.macs,
                 layer.options, layer.section)


def count_params(layers: list[Layer]) -> int:
    return sum(layer.params for layer in layers)


def count_macs(layers: list[Layer]) -> int:
    """Multiply-adds of one forward pass of one image (conv and dense layers)."""
    return sum(layer.macs for layer in layers)
