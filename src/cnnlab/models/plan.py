"""The layer plan of a model config: every layer the network runs, in the order it runs them, with
its output shape, parameters and multiply-adds (no torch).

A plan is typed: each layer's `spec` is one small frozen dataclass per kind (Conv, BatchNorm,
Activation, Pool, GlobalPool, Dropout, Flatten, Dense, Add), and a residual block is a `Block`
holding its body, its shortcut and the add that joins them. `cnnlab.models.cnn` builds torch modules
from exactly these specs, named as the plan names them, so the table `cnnlab summary` prints is the
network that trains. Shapes are channels-last, as the lesson writes them: (H, W, C) for feature
maps, (n,) after Flatten or global pooling.

The plan also decides one speed-up in the open: a ReLU-like activation followed by a max pool runs
after the pool instead (act(max(a, b)) == max(act(a), act(b)) for any non-decreasing act, gradients
included), on a quarter of the values for a 2x2 pool.
"""
from __future__ import annotations

from dataclasses import dataclass

from cnnlab.config import ConfigError, ConvBlock, ModelConfig, ResidualStage
from cnnlab.playground.conv import output_size

Shape = tuple[int, ...]

# Activations that never decrease commute with max pooling, so the plan pools first.
POOL_FIRST = frozenset({"relu", "leaky_relu", "elu", "tanh", "sigmoid"})


# ---------------------------------------------------------------------------- what a layer is
@dataclass(frozen=True)
class Conv:
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]  # (height, width), pixels
    stride: int = 1
    padding: str | int = "valid"  # "valid", "same" or zeros on each side
    bias: bool = True  # False when batch norm follows: its shift replaces the bias
    whiten: bool = False  # the kernels are fitted to the training images' patches and frozen (models.whitening)

    @property
    def title(self) -> str:
        kh, kw = self.kernel_size
        return (f"Conv2D {kh}x{kw}" + (f", stride {self.stride}" if self.stride != 1 else "")
                + (", whitening" if self.whiten else ""))


@dataclass(frozen=True)
class BatchNorm:
    channels: int
    title = "BatchNorm"


@dataclass(frozen=True)
class Activation:
    function: str  # a name from config.ACTIVATIONS other than "none"

    @property
    def title(self) -> str:
        return self.function


@dataclass(frozen=True)
class Pool:
    mode: str  # "max" or "avg"
    size: int  # window side and stride, pixels

    @property
    def title(self) -> str:
        return f"{self.mode.capitalize()}Pool {self.size}x{self.size}"


@dataclass(frozen=True)
class GlobalPool:
    mode: str  # "avg" or "max": one value per feature map

    @property
    def title(self) -> str:
        return f"Global{self.mode.capitalize()}Pool"


@dataclass(frozen=True)
class Dropout:
    p: float

    @property
    def title(self) -> str:
        return f"Dropout {self.p:g}"


@dataclass(frozen=True)
class Flatten:
    title = "Flatten"


@dataclass(frozen=True)
class Dense:
    in_features: int
    units: int
    title = "Dense"


@dataclass(frozen=True)
class Add:
    title = "Add"


Spec = Conv | BatchNorm | Activation | Pool | GlobalPool | Dropout | Flatten | Dense | Add


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
        """Every layer in the order the network runs them (residual blocks expanded)."""
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

    def add(self, name: str, spec: Spec, shape: Shape, params: int = 0, macs: int = 0, formula: str = "",
            inputs: tuple[str, ...] | None = None, frozen: int = 0) -> Layer:
        layer = Layer(name, spec, shape, params, macs, formula, inputs or (self.last,), frozen)
        self.layers.append(layer)
        self.shape, self.last = shape, name
        return layer

    def conv(self, name: str, conv: Conv, where: str) -> Layer:
        h, w, c = self.shape
        kh, kw = conv.kernel_size
        try:
            oh = output_size(h, kh, conv.stride, conv.padding)
            ow = output_size(w, kw, conv.stride, conv.padding)
        except ValueError as exc:
            raise ConfigError(f"{where}: a {kh}x{kw} kernel does not fit the ({h}, {w}, {c}) input of this "
                              f"layer: {exc}") from None
        weights = kh * kw * c * conv.out_channels
        if conv.bias:
            params, formula = weights + conv.out_channels, f"({kh}·{kw}·{c}+1)·{conv.out_channels} = " \
                                                            f"{weights + conv.out_channels:,}"
        else:
            params, formula = weights, f"{kh}·{kw}·{c}·{conv.out_channels} = {weights:,} (no bias: BN shifts)"
        if conv.whiten:
            check_whitening(conv, c, where)
            formula += (f"; the {weights:,} kernel weights are the {conv.out_channels // 2} main directions of the "
                        f"images' {kh}x{kw} patches (and their negatives), fitted to the data, not trained")
        return self.add(name, conv, (oh, ow, conv.out_channels), params, oh * ow * weights, formula,
                        frozen=weights if conv.whiten else 0)

    def norm(self, name: str) -> Layer:
        c = self.shape[-1]
        return self.add(name, BatchNorm(c), self.shape, 2 * c, formula=f"2·{c} = {2 * c} (scale and shift per channel)")

    def activation(self, name: str, function: str, note: str = "no parameters") -> Layer | None:
        if function == "none":
            return None
        return self.add(name, Activation(function), self.shape, formula=note)

    def pool(self, name: str, mode: str, size: int, where: str) -> Layer:
        h, w, c = self.shape
        try:
            shape = (output_size(h, size, size), output_size(w, size, size), c)
        except ValueError:
            raise ConfigError(f"{where}: a {size}x{size} pool does not fit its ({h}, {w}, {c}) input") from None
        return self.add(name, Pool(mode, size), shape,
                        formula=f"no parameters: the {mode} of each {size}x{size} window")

    def dropout(self, name: str, p: float) -> Layer | None:
        return self.add(name, Dropout(p), self.shape, formula="no parameters") if p else None


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
    """The layers of `config` applied to images of `input_shape` (H, W, C), in the order they run."""
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
    pooling(head, config.pooling, feature_shape, bool(features))
    dense = [(f"fc{j}", d.units, d.activation, d.dropout) for j, d in enumerate(config.dense, start=1)]
    dense.append(("classifier", num_classes, "none", config.classifier_dropout))
    for name, units, activation, dropout in dense:
        n = head.shape[0]
        head.dropout(f"drop_{name}", dropout)
        params = (n + 1) * units
        head.add(name, Dense(n, units), (units,), params, n * units, f"({n:,}+1)·{units} = {params:,}")
        head.activation(f"{activation}_{name}", activation)
    return Plan(tuple(input_shape), num_classes, tuple(features), tuple(head.layers))


def conv_block(builder: _Builder, i: int, block: ConvBlock) -> None:
    """conv -> [bn] -> act -> [pool] -> [dropout], as the lesson writes it; pool_first: conv -> pool -> [bn] -> act.

    A max pool after a non-decreasing activation is moved before it (same values, less work).
    """
    where = f"model.conv[{i - 1}]"
    kh, kw = kernel_pair(block.kernel_size)
    builder.conv(f"conv{i}", Conv(builder.shape[-1], block.filters, (kh, kw), block.stride, block.padding,
                                  bias=not block.batch_norm, whiten=block.whiten), where)
    swap = block.pool == "max" and block.activation in POOL_FIRST and not block.pool_first
    if block.pool and block.pool_first:
        builder.pool(f"pool{i}", block.pool, block.pool_size, where)
    if block.batch_norm:
        builder.norm(f"bn{i}")
    if swap:
        builder.pool(f"pool{i}", "max", block.pool_size, where)  # swap: block.pool is "max"
        builder.activation(f"{block.activation}{i}", block.activation,
                           f"{block.activation} after the pool: they commute, same values for a quarter of the work")
    else:
        builder.activation(f"{block.activation}{i}", block.activation)
        if block.pool and not block.pool_first:
            builder.pool(f"pool{i}", block.pool, block.pool_size, where)
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
    add = builder.add(f"{name}.add", Add(), body_shape, formula=f"no parameters: {body_end} + {joined}, "
                      "element by element (the skip connection)", inputs=(body_end, joined))
    start = len(builder.layers)
    builder.activation(f"{name}.{stage.activation}", stage.activation)
    return Block(name, body, shortcut, add, tuple(builder.layers[start:]))


def pooling(head: _Builder, mode: str, shape: Shape, has_features: bool) -> None:
    """How the feature maps (H, W, C) become the head's input: Flatten (H·W·C values) or a global pool (C)."""
    if mode == "flatten":
        n = 1
        for d in shape:
            n *= d
        head.add("flatten", Flatten(), (n,), formula=f"{'·'.join(str(d) for d in shape)} = {n:,} values, no parameters")
        return
    if not has_features:
        raise ConfigError(f"model.pooling: {mode} pools feature maps, but this model has no conv layers; use flatten")
    kind = mode.removeprefix("global_")
    h, w, c = shape
    head.add(f"global_{kind}_pool", GlobalPool(kind), (c,),
             formula=f"no parameters: the {'mean' if kind == 'avg' else 'max'} of each {h}x{w} map -> {c} values")


def count_macs(plan: Plan) -> int:
    """Multiply-adds of one forward pass of one image (conv and dense layers)."""
    return plan.macs

