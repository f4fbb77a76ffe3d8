"""One description per layer kind: each spec knows its output shape, parameters, multiply-adds, title
and the formula `cnnlab summary --explain` shows (no torch).

A spec is a small frozen dataclass. `cnnlab.models.plan` puts specs in the lesson's order and asks them
for their numbers; `cnnlab.models.cnn` builds one torch module per spec from its table (`MODULES`);
the explorer (`cnnlab.inspect.explore.stages`) groups them into the stages its page computes. Shapes
are channels-last, as the lesson writes them: (H, W, C) for feature maps, (n,) after Flatten or a
global pool. Adding a kind is a class here, a member of `Spec`, a line in `cnn.MODULES`, and its
stage in the explorer; tests check that each of those knows every member of `Spec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from cnnlab.config.activations import ACTIVATION_KINDS
from cnnlab.playground.conv import output_size

Shape = tuple[int, ...]


class LayerDoesNotFit(ValueError):
    """A layer whose window is larger than its input; the plan adds the config key it came from."""


class LayerKind:
    """What every spec answers; the defaults are the common case (same shape, no parameters, no work)."""

    @property
    def title(self) -> str:
        """What the summary and the explorer call it: "Conv2D 3x3", "MaxPool 2x2", "relu"."""
        return type(self).__name__

    @property
    def params(self) -> int:
        """Parameters, trained or not."""
        return 0

    @property
    def frozen(self) -> int:
        """Of `params`, those set from the data and never trained."""
        return 0

    def output_shape(self, shape: Shape) -> Shape:
        """The shape it makes of an input of `shape`; raises LayerDoesNotFit when its window is too big."""
        return shape

    def macs(self, shape: Shape) -> int:
        """Multiply-adds per image for an input of `shape`."""
        return 0

    def formula(self, shape: Shape) -> str:
        """How `params` (or the shape) comes about, for `cnnlab summary --explain`."""
        return "no parameters"


@dataclass(frozen=True)
class Conv(LayerKind):
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

    @property
    def weights(self) -> int:
        """Kernel weights: kh·kw·C_in·C_out."""
        kh, kw = self.kernel_size
        return kh * kw * self.in_channels * self.out_channels

    @property
    def params(self) -> int:
        return self.weights + (self.out_channels if self.bias else 0)

    @property
    def frozen(self) -> int:
        """Parameters set from the data and never trained: a whitening layer's kernels."""
        return self.weights if self.whiten else 0

    def output_shape(self, shape: Shape) -> Shape:
        h, w, c = shape
        kh, kw = self.kernel_size
        try:
            return (output_size(h, kh, self.stride, self.padding), output_size(w, kw, self.stride, self.padding),
                    self.out_channels)
        except ValueError as exc:
            raise LayerDoesNotFit(f"a {kh}x{kw} kernel does not fit the ({h}, {w}, {c}) input of this layer: "
                                  f"{exc}") from None

    def macs(self, shape: Shape) -> int:
        oh, ow, _ = self.output_shape(shape)
        return oh * ow * self.weights  # one multiply-add per kernel weight per output pixel

    def formula(self, shape: Shape) -> str:
        kh, kw = self.kernel_size
        c, out = self.in_channels, self.out_channels
        if self.bias:
            text = f"({kh}·{kw}·{c}+1)·{out} = {self.params:,}"
        else:
            text = f"{kh}·{kw}·{c}·{out} = {self.weights:,} (no bias: BN shifts)"
        if self.whiten:
            text += (f"; the {self.weights:,} kernel weights are the {out // 2} main directions of the "
                     f"images' {kh}x{kw} patches (and their negatives), fitted to the data, not trained")
        return text


@dataclass(frozen=True)
class BatchNorm(LayerKind):
    channels: int

    @property
    def params(self) -> int:
        return 2 * self.channels  # a scale and a shift per channel (the running statistics are buffers)

    def formula(self, shape: Shape) -> str:
        return f"2·{self.channels} = {self.params} (scale and shift per channel)"


@dataclass(frozen=True)
class Activation(LayerKind):
    function: str  # a name from config.ACTIVATION_KINDS

    @property
    def title(self) -> str:
        return self.function

    @property
    def non_decreasing(self) -> bool:
        return ACTIVATION_KINDS[self.function].non_decreasing


@dataclass(frozen=True)
class Pool(LayerKind):
    mode: str  # "max" or "avg"
    size: int  # window side and stride, pixels

    @property
    def title(self) -> str:
        return f"{self.mode.capitalize()}Pool {self.size}x{self.size}"

    def output_shape(self, shape: Shape) -> Shape:
        h, w, c = shape
        try:
            return output_size(h, self.size, self.size), output_size(w, self.size, self.size), c
        except ValueError:
            raise LayerDoesNotFit(f"a {self.size}x{self.size} pool does not fit its ({h}, {w}, {c}) input") from None

    def formula(self, shape: Shape) -> str:
        return f"no parameters: the {self.mode} of each {self.size}x{self.size} window"


@dataclass(frozen=True)
class GlobalPool(LayerKind):
    mode: str  # "avg" or "max": one value per feature map

    @property
    def title(self) -> str:
        return f"Global{self.mode.capitalize()}Pool"

    def output_shape(self, shape: Shape) -> Shape:
        return (shape[-1],)

    def formula(self, shape: Shape) -> str:
        h, w, c = shape
        return f"no parameters: the {'mean' if self.mode == 'avg' else 'max'} of each {h}x{w} map -> {c} values"


@dataclass(frozen=True)
class Dropout(LayerKind):
    p: float

    @property
    def title(self) -> str:
        return f"Dropout {self.p:g}"


@dataclass(frozen=True)
class Flatten(LayerKind):
    """(H, W, C) -> (H·W·C,): every value of the feature maps to the head, in torch's (C, H, W) order."""

    def output_shape(self, shape: Shape) -> Shape:
        return (prod(shape),)

    def formula(self, shape: Shape) -> str:
        return f"{'·'.join(str(d) for d in shape)} = {prod(shape):,} values, no parameters"


@dataclass(frozen=True)
class Dense(LayerKind):
    in_features: int
    units: int

    @property
    def params(self) -> int:
        return (self.in_features + 1) * self.units

    def output_shape(self, shape: Shape) -> Shape:
        return (self.units,)

    def macs(self, shape: Shape) -> int:
        return self.in_features * self.units

    def formula(self, shape: Shape) -> str:
        return f"({self.in_features:,}+1)·{self.units} = {self.params:,}"


@dataclass(frozen=True)
class Add(LayerKind):
    """The skip connection's sum; the plan writes its formula (it names the two layers it adds)."""


Spec = Conv | BatchNorm | Activation | Pool | GlobalPool | Dropout | Flatten | Dense | Add


def runs_after_pool(activation: Spec, pool: Spec) -> bool:
    """Whether `activation` followed by `pool` may run as pool, then activation: a max pool after a
    never-decreasing activation (act(max(a, b)) == max(act(a), act(b)), gradients included), which
    then runs on 1/size² of the values. `cnnlab.models.cnn` applies it; the plan keeps the lesson's order."""
    return (isinstance(activation, Activation) and activation.non_decreasing
            and isinstance(pool, Pool) and pool.mode == "max")
