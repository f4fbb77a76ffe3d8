"""The torch network of a layer plan, and the model API the rest of cnnlab looks inside it with.

Every module is named as its plan layer (`features.conv1`, `features.res2.conv1`, `head.fc1`), so
code never parses module names: it asks the model for `conv_layers()` or `feature_maps(x)`, or runs
`forward_features` and `forward_head` (timm's split) on its own.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn

from cnnlab.config import ModelConfig
from cnnlab.config.activations import ACTIVATION_KINDS
from cnnlab.models.layers import runs_after_pool
from cnnlab.models.plan import (
    Activation,
    Add,
    BatchNorm,
    Block,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    Layer,
    Node,
    Plan,
    Pool,
    Shape,
    Spec,
    plan,
)


class MaxPool2d(nn.MaxPool2d):
    """Max pooling that runs channels-last on the CPU, where torch's NCHW kernel is about 10x slower
    (torch 2.13 on 2 cores: 1.7 ms vs 0.17 ms for a (32, 32, 26, 26) batch); same values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class GlobalPool2d(nn.Module):
    """(N, C, H, W) -> (N, C): the mean or the max of each feature map."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.mode == "avg" else x.amax(dim=(2, 3))


def conv_module(spec: Conv) -> nn.Conv2d:
    conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
                     padding=spec.padding, bias=spec.bias)
    if spec.whiten:  # fitted to the data by models.whitening, then never trained (its bias is)
        conv.weight.requires_grad_(False)
    return conv


def activation_module(name: str) -> nn.Module:
    """The torch module of an activation in config.ACTIVATION_KINDS, with torch's defaults."""
    return cast("type[nn.Module]", getattr(nn, ACTIVATION_KINDS[name].torch_module))()


# The torch module of each layer kind; Add has none (ResidualBlock.forward adds).
MODULES: dict[type, Callable[[Any], nn.Module]] = {
    Conv: conv_module,
    BatchNorm: lambda spec: nn.BatchNorm2d(spec.channels),
    Activation: lambda spec: activation_module(spec.function),
    Pool: lambda spec: MaxPool2d(spec.size) if spec.mode == "max" else nn.AvgPool2d(spec.size),
    GlobalPool: lambda spec: GlobalPool2d(spec.mode),
    Dropout: lambda spec: nn.Dropout(spec.p),
    Flatten: lambda spec: nn.Flatten(),
    Dense: lambda spec: nn.Linear(spec.in_features, spec.units),
}
MODULELESS = (Add,)  # kinds the network computes without a module of their own


def module_for(spec: Spec) -> nn.Module:
    """The torch module for one planned layer."""
    build = MODULES.get(type(spec))
    if build is None:
        raise TypeError(f"no torch module for {type(spec).__name__}")
    return build(spec)


N = TypeVar("N", Layer, Node)


def run_order(nodes: Sequence[N]) -> list[N]:
    """The plan's layers in the order the network runs them: the lesson's order, except that a max pool right
    after a never-decreasing activation runs first (the same values, gradients included, on 1/size² of them).
    The one place this speed-up is made; the summary, the explorer and `show features` keep the lesson's order."""
    order = list(nodes)
    for i in range(len(order) - 1):
        first, second = order[i], order[i + 1]
        if isinstance(first, Layer) and isinstance(second, Layer) and runs_after_pool(first.spec, second.spec):
            order[i], order[i + 1] = second, first
    return order


def short(layer: Layer) -> str:
    """A layer's name inside its block: 'res2.conv1' -> 'conv1'."""
    return layer.name.rpartition(".")[2]


class ResidualBlock(nn.Module):
    """after(body(x) + shortcut(x)); the shortcut is x itself when it has no layers."""

    def __init__(self, block: Block):
        super().__init__()
        self.body_names = tuple(short(layer) for layer in run_order(block.body))
        self.shortcut_names = tuple(short(layer) for layer in block.shortcut)
        self.after_names = tuple(short(layer) for layer in block.after)
        for layer in (*run_order(block.body), *block.shortcut, *block.after):
            self.add_module(short(layer), module_for(layer.spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch types _modules as holding None too (a registered None); __init__ added a module under every name
        modules = cast("dict[str, nn.Module]", self._modules)
        out, skip = x, x
        for name in self.body_names:
            out = modules[name](out)
        for name in self.shortcut_names:
            skip = modules[name](skip)
        out = out + skip
        for name in self.after_names:
            out = modules[name](out)
        return out


@dataclass
class FeatureMap:
    """One row of feature maps: what a conv layer (or a residual block) outputs for a batch."""

    name: str  # the plan layer or block, e.g. "conv1", "res3"
    title: str  # what was applied, e.g. "conv1 → batch norm → relu"
    maps: torch.Tensor  # (N, C, H, W)


class CNN(nn.Module):
    """features (conv blocks, residual blocks) -> head (pooling, dense layers, classifier); outputs logits.

    The classifier's softmax is applied by the loss (cross-entropy) and by `predict_proba`, which
    is numerically safer than a softmax layer followed by a log.
    """

    def __init__(self, config: ModelConfig, input_shape: Shape = (28, 28, 1), num_classes: int = 10):
        super().__init__()
        self.config = config
        self.input_shape = tuple(input_shape)  # (H, W, C)
        self.num_classes = num_classes
        self.plan: Plan = plan(config, self.input_shape, num_classes)
        self.features = nn.Sequential(OrderedDict(
            (node.name, ResidualBlock(node) if isinstance(node, Block) else module_for(node.spec))
            for node in run_order(self.plan.features)))
        self.head = nn.Sequential(OrderedDict((layer.name, module_for(layer.spec))
                                              for layer in run_order(self.plan.head)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] -> the last feature maps (N, C', H', W')."""
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The last feature maps -> logits (N, num_classes)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def whitening_layers(self) -> dict[str, nn.Conv2d]:
        """The conv layers whose kernels are fitted to the data rather than trained (`whiten: true`)."""
        whitening = {layer.name for layer in self.plan.conv_layers() if cast(Conv, layer.spec).whiten}
        return {name: conv for name, conv in self.conv_layers().items() if name in whitening}

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """Every conv layer by its plan name ("conv1", "res2.conv1", "res2.proj"), in the order they run."""
        # module_for built an nn.Conv2d for each Conv layer of the plan
        return {layer.name: cast(nn.Conv2d, self.features.get_submodule(layer.name))
                for layer in self.plan.conv_layers()}

    @torch.no_grad()
    def feature_maps(self, x: torch.Tensor) -> list[FeatureMap]:
        """What each conv layer of the stem, and each residual block, computes for images x (N, C, H, W).

        A conv layer's maps are shown after its batch norm and activation, in the plan's order: at the conv's
        own resolution as the lesson draws them (conv -> ReLU -> pool), whatever order the network runs its
        pool in (`run_order` may pool before the activation: the same values, pooled); pooled when the
        config pools first (pool_first: conv -> pool -> BN -> ReLU). A residual block's maps are its output,
        after the add.
        """
        was_training = self.training
        self.eval()
        captured: dict[str, torch.Tensor] = {}
        hooks = [self.features.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output))
            for name, _, _ in self.display_stages()]
        try:
            self.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        rows = []
        for name, then, title in self.display_stages():
            maps = captured[name]
            for step in then:
                maps = self.features.get_submodule(step)(maps)
            rows.append(FeatureMap(name, title, maps))
        return rows

    def display_stages(self) -> list[tuple[str, tuple[str, ...], str]]:
        """(layer whose output is captured, layers then applied to it, title) per row of feature maps."""
        stages: list[tuple[str, tuple[str, ...], str]] = []
        nodes = list(self.plan.features)
        for i, node in enumerate(nodes):
            if isinstance(node, Block):
                stages.append((node.name, (), block_title(node)))
                continue
            if not isinstance(node.spec, Conv):
                continue
            block: list[Layer] = []  # the layers up to the next conv, in the plan's (the lesson's) order
            for later in nodes[i + 1:]:
                if isinstance(later, Block) or isinstance(later.spec, Conv):
                    break
                block.append(later)
            # through its last batch norm or activation: conv -> bn -> relu (the pool after it not drawn), or
            # with pool_first conv -> pool -> bn -> relu, the pool too; dropout is the identity when drawing
            ends = [j for j, later in enumerate(block) if isinstance(later.spec, (BatchNorm, Activation))]
            then = [later for later in block[:ends[-1] + 1] if not isinstance(later.spec, Dropout)] if ends else []
            steps = [node.name] + ["batch norm" if isinstance(t.spec, BatchNorm) else t.title for t in then]
            stages.append((node.name, tuple(t.name for t in then), " → ".join(steps)))
        return stages

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes) for images (N, C, H, W) scaled to [0, 1]."""
        was_training = self.training
        self.eval()
        try:
            return torch.softmax(self(x), dim=1)
        finally:
            self.train(was_training)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class index for each image."""
        return self.predict_proba(x).argmax(dim=1)


def block_title(block: Block) -> str:
    """'res2: conv 3x3 → bn → relu → conv 3x3 → bn, + projection → relu' (what the block computes)."""
    inner = " → ".join(("bn" if isinstance(layer.spec, BatchNorm) else
                        f"conv {layer.spec.kernel_size[0]}x{layer.spec.kernel_size[1]}" if isinstance(layer.spec, Conv)
                        else layer.title) for layer in block.body)
    after = "".join(f" → {layer.title}" for layer in block.after)
    return f"{block.name}: {inner}, + {'projection' if block.shortcut else 'input'}{after}"


def build_model(config: ModelConfig, input_shape: Shape = (28, 28, 1), num_classes: int = 10,
                seed: int | None = None) -> CNN:
    """A freshly initialised CNN; `seed` makes the initial weights reproducible."""
    if seed is None:
        return CNN(config, input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CNN(config, input_shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
