"""The layer plan of a model config: every layer of the network in the lesson's order, with its output
shape, parameters and multiply-adds (no torch).

A plan is typed: each layer's `spec` is one small frozen dataclass per kind (`cnnlab.models.layers`:
Conv, BatchNorm, Activation, Pool, GlobalPool, Dropout, Flatten, Dense, Add), which computes the
layer's numbers; a residual block is a `Block` holding its body, its shortcut and the add that joins
them. `cnnlab.models.cnn` builds torch modules from exactly these specs, named as the plan names them,
so the table `cnnlab summary` prints is the network that trains. Shapes are channels-last, as the
lesson writes them: (H, W, C) for feature maps, (n,) after Flatten or global pooling.

The plan is the lesson's order (conv -> ReLU -> pool) everywhere a learner looks; the one speed-up that
runs a max pool before a ReLU-like activation (the same values, on a quarter of them) is made where the
modules are built (`cnnlab.models.layers.runs_after_pool`, applied by `cnnlab.models.cnn`).
"""
from __future__ import annotations

from dataclasses import dataclass

from cnnlab.config import ConfigError, ConvBlock, ModelConfig, ResidualStage
from cnnlab.models.layers import (
    Activation,
    Add,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    LayerDoesNotFit,
    Pool,
    Shape,
    Spec,
    runs_after_pool,
)

__all__ = ["Activation", "Add", "BatchNorm", "Block", "Conv", "Dense", "Dropout", "Flatten", "GlobalPool", "Layer",
           "Node", "Plan", "Pool", "Shape", "Spec", "count_macs", "kernel_pair", "plan"]


@dataclass(frozen=True)
class Layer:
    """One layer of the plan; `name` is the torch module's path under `features` or `head`."""

    name: str  # e.g. "conv1", "res2.conv1", "fc1", "classifier"
    spec: Spec
    output_shape: Shape
    params: int = 0  # parameters, trained or not
    macs: int = 0  # multiply-adds per image
    formula: str = ""  # how `params` (or the shape) comes about, for --explain
    inputs: tuple[str, ...] = ()  # the layers it reads ("input": the image); for the summary's "connected to"
    frozen: int = 0  # of `params`, those set from the data and never trained (a whitening layer's kernels)

    @property
    def title(self) -> str:
        return self.spec.title


@dataclass(frozen=True)
class Block:
    """A residual block: body(x) + shortcut(x), then `after` (the activation). An empty shortcut is x itself."""

    name: str  # e.g. "res3"; its layers are named "res3.conv1", ...
    body: tuple[Layer, ...]
    shortcut: tuple[Layer, ...]
    add: Layer
    after: tuple[Layer, ...]

    @property
    def layers(self) -> tuple[Layer, ...]:
        return (*self.body, *self.shortcut, self.add, *self.after)

    @property
    def output_shape(self) -> Shape:
        return self.layers[-1].output_shape


Node = Layer | Block


@dataclass(frozen=True)
class Plan:
    """A whole network: `features` (conv blocks and residual blocks) then `head` (pooling, dense, classifier)."""

    input_shape: Shape  # (H, W, C)
    num_classes: int
    features: tuple[Node, ...]
    head: tuple[Layer, ...]

    def layers(self) -> list[Layer]:
        """Every layer in the lesson's order (residual blocks expanded); the network may run a max pool before
        the activation it follows (`cnnlab.models.cnn.run_order`)."""
        out: list[Layer] = []
        for node in self.features:
            out.extend(node.layers if isinstance(node, Block) else (node,))
        return out + list(self.head)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers())

    @property
    def frozen_params(self) -> int:
        """Parameters set from the data and never trained (whitening kernels)."""
        return sum(layer.frozen for layer in self.layers())

    @property
    def macs(self) -> int:
        """Multiply-adds of one forward pass of one image (conv and dense layers)."""
        return sum(layer.macs for layer in self.layers())

    @property
    def residual(self) -> bool:
        return any(isinstance(node, Block) for node in self.features)

    @property
    def feature_shape(self) -> Shape:
        """(H, W, C) of the feature maps the head receives."""
        return self.features[-1].output_shape if self.features else self.input_shape

    def conv_layers(self) -> list[Layer]:
        return [layer for layer in self.layers() if isinstance(layer.spec, Conv)]


# ------------------------------------------------------------------------ building a plan
def kernel_pair(kernel_size: int | list[int]) -> tuple[int, int]:
    if isinstance(kernel_size, int):
        return kernel_size, kernel_size
    return (kernel_size[0], kernel_size[0]) if len(kernel_size) == 1 else (kernel_size[0], kernel_size[1])


class _Builder:
    """Appends layers while tracking the current shape and the name of the layer last added."""

    def __init__(self, shape: Shape, last: str = "input"):
        self.shape, self.last = shape, last
        self.layers: list[Layer] = []

    def add(self, name: str, spec: Spec, where: str = "", formula: str | None = None,
            inputs: tuple[str, ...] | None = None) -> Layer:
        """The layer `spec` makes of the current shape, its numbers asked of the spec; `where` is the config key
        a layer that does not fit is blamed on."""
        try:
            shape = spec.output_shape(self.shape)
        except LayerDoesNotFit as exc:
            raise ConfigError(f"{where}: {exc}") from None
        layer = Layer(name, spec, shape, spec.params, spec.macs(self.shape),
                      spec.formula(self.shape) if formula is None else formula, inputs or (self.last,), spec.frozen)
        self.layers.append(layer)
        self.shape, self.last = shape, name
        return layer

    def conv(self, name: str, conv: Conv, where: str) -> Layer:
        layer = self.add(name, conv, where)
        if conv.whiten:
            check_whitening(conv, conv.in_channels, where)
        return layer

    def norm(self, name: str) -> Layer:
        return self.add(name, BatchNorm(self.shape[-1]))

    def activation(self, name: str, function: str, note: str | None = None) -> Layer | None:
        if function == "none":
            return None
        return self.add(name, Activation(function), formula=note)

    def dropout(self, name: str, p: float) -> Layer | None:
        return self.add(name, Dropout(p)) if p else None


def check_whitening(conv: Conv, channels: int, where: str) -> None:
    """A whitening layer has one kernel per direction of a patch, and one for its negative: an even number
    of filters, at most 2·kh·kw·C."""
    kh, kw = conv.kernel_size
    most = 2 * kh * kw * channels
    if conv.out_channels % 2 or conv.out_channels > most:
        raise ConfigError(f"{where}.filters: a whitening layer needs an even number of filters, at most "
                          f"2·{kh}·{kw}·{channels} = {most} (each of the patches' {kh * kw * channels} directions "
                          f"and its negative); found {conv.out_channels}")


def plan(config: ModelConfig, input_shape: Shape = (28, 28, 1), num_classes: int = 10) -> Plan:
    """The layers of `config` applied to images of `input_shape` (H, W, C), in the lesson's order."""
    builder = _Builder(tuple(input_shape))
    features: list[Node] = []
    for i, block in enumerate(config.conv, start=1):
        start = len(builder.layers)
        conv_block(builder, i, block)
        features.extend(builder.layers[start:])
    number = 0
    for s, stage in enumerate(config.stages):
        for b in range(stage.blocks):
            number += 1
            features.append(residual_block(builder, f"res{number}", stage, config.widen,
                                           stage.stride if b == 0 else 1, f"model.stages[{s}]"))
    feature_shape = builder.shape
    head = _Builder(feature_shape, builder.last)
    pooling(head, config.pooling, bool(features))
    dense = [(f"fc{j}", d.units, d.activation, d.dropout) for j, d in enumerate(config.dense, start=1)]
    dense.append(("classifier", num_classes, "none", config.classifier_dropout))
    for name, units, activation, dropout in dense:
        n = head.shape[0]
        head.dropout(f"drop_{name}", dropout)
        head.add(name, Dense(n, units))
        head.activation(f"{activation}_{name}", activation)
    return Plan(tuple(input_shape), num_classes, tuple(features), tuple(head.layers))


def conv_block(builder: _Builder, i: int, block: ConvBlock) -> None:
    """conv -> [bn] -> act -> [pool] -> [dropout], as the lesson writes it; pool_first: conv -> pool -> [bn] -> act."""
    where = f"model.conv[{i - 1}]"
    kh, kw = kernel_pair(block.kernel_size)
    builder.conv(f"conv{i}", Conv(builder.shape[-1], block.filters, (kh, kw), block.stride, block.padding,
                                  bias=not block.batch_norm, whiten=block.whiten), where)
    pool = Pool(block.pool, block.pool_size) if block.pool else None
    if pool and block.pool_first:
        builder.add(f"pool{i}", pool, where)
    if block.batch_norm:
        builder.norm(f"bn{i}")
    note = None
    if pool and not block.pool_first and runs_after_pool(Activation(block.activation), pool):
        note = (f"{block.activation} runs after pool{i} in the network: the same values (max pooling and "
                f"{block.activation} commute), on 1/{pool.size ** 2} of them")
    builder.activation(f"{block.activation}{i}", block.activation, note)
    if pool and not block.pool_first:
        builder.add(f"pool{i}", pool, where)
    builder.dropout(f"drop{i}", block.dropout)


def residual_block(builder: _Builder, name: str, stage: ResidualStage, widen: int, stride: int, where: str) -> Block:
    """A basic block: conv-bn-act-[dropout]-conv-bn plus the input (projected by 1x1 conv + BN when the
    shape changes), then act."""
    entry_shape, entry = builder.shape, builder.last
    filters = stage.filters * widen
    k, pad = stage.kernel_size, stage.kernel_size // 2
    body_start = len(builder.layers)
    builder.conv(f"{name}.conv1", Conv(entry_shape[-1], filters, (k, k), stride, pad, bias=False), where)
    builder.norm(f"{name}.bn1")
    builder.activation(f"{name}.{stage.activation}1", stage.activation)
    builder.dropout(f"{name}.drop", stage.dropout)
    builder.conv(f"{name}.conv2", Conv(filters, filters, (k, k), 1, pad, bias=False), where)
    builder.norm(f"{name}.bn2")
    body = tuple(builder.layers[body_start:])
    body_end, body_shape = builder.last, builder.shape
    shortcut: tuple[Layer, ...] = ()
    if body_shape != entry_shape:  # a 1x1 conv (strided like the body) and BN bring the input to the body's shape
        side = _Builder(entry_shape, entry)
        side.conv(f"{name}.proj", Conv(entry_shape[-1], filters, (1, 1), stride, 0, bias=False), where)
        side.norm(f"{name}.proj_bn")
        shortcut = tuple(side.layers)
        builder.layers.extend(shortcut)
    joined = shortcut[-1].name if shortcut else entry
    add = builder.add(f"{name}.add", Add(), formula=f"no parameters: {body_end} + {joined}, "
                      "element by element (the skip connection)", inputs=(body_end, joined))
    start = len(builder.layers)
    builder.activation(f"{name}.{stage.activation}", stage.activation)
    return Block(name, body, shortcut, add, tuple(builder.layers[start:]))


def pooling(head: _Builder, mode: str, has_features: bool) -> None:
    """How the feature maps (H, W, C) become the head's input: Flatten (H·W·C values) or a global pool (C)."""
    if mode == "flatten":
        head.add("flatten", Flatten())
        return
    if not has_features:
        raise ConfigError(f"model.pooling: {mode} pools feature maps, but this model has no conv layers; use flatten")
    kind = mode.removeprefix("global_")
    head.add(f"global_{kind}_pool", GlobalPool(kind))


def count_macs(plan: Plan) -> int:
    """Multiply-adds of one forward pass of one image (conv and dense layers)."""
    return plan.macs

