"""A trained CNN as the explorer page shows it: a list of stages, each one computation a reader can click into.

A stage is a conv with the batch norm and activation that follow it (the lesson's "conv layer"), a pool,
a leftover batch norm or activation, a residual add, a global pool, a flatten, a dense layer with its
activation, or the softmax. Stages read earlier stages by index (a residual block's convs and its add
read the block's input), so any network cnnlab builds becomes one flat list the page runs in order.

The stages follow the plan, which is the lesson's order (conv -> ReLU -> pool): a conv's maps are its
activated output at its own resolution, as `CNN.feature_maps` and `cnnlab summary` show them, with the
numbers the network computes (it may pool first: the same values). Dropout is left out: it is the
identity in evaluation. `STAGE_KINDS` says which stage each layer kind becomes, and `PAGE_KINDS` the kinds
explore.html must compute (a test reads the page for them). `replay` runs the stages with the model's own
torch modules, so tests can check that the list computes exactly what the network does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnlab.models.cnn import CNN
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
    Pool,
    Spec,
)

Shape = tuple[int, ...]  # (C, H, W) for maps, (n,) for vectors: torch's order, as the page stores them


@dataclass(frozen=True)
class Stage:
    """One row of the page: what it computes (`kind`), from which stages, with which of the model's modules."""

    name: str  # the plan layer it is named after ("conv1", "res2.conv1", "res2.add", "classifier", "input")
    kind: str  # input, conv, pool, elementwise, add, global_pool, flatten, dense, softmax
    title: str  # e.g. "conv1: Conv2D 3x3 → BatchNorm → relu"
    shape: Shape
    inputs: tuple[int, ...] = ()  # indices of the stages it reads
    modules: tuple[str, ...] = ()  # paths under the model ("features.conv1", "head.fc1"), applied in order
    spec: Spec | None = None  # the plan spec of its main layer (Conv, Pool, GlobalPool, Dense), None for the others
    norm: str | None = None  # module path of its batch norm, if any
    activation: str | None = None  # its activation's name ("relu", ...), if any
    extra: dict[str, Any] = field(default_factory=dict)


def channels_first(shape: Shape) -> Shape:
    """The plan's (H, W, C) as (C, H, W); a vector (n,) stays as it is."""
    return (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape


def activation_of(layer: Layer | None) -> str | None:
    """The activation's name if `layer` is an activation, else None."""
    return layer.spec.function if layer is not None and isinstance(layer.spec, Activation) else None


def module_path(prefix: str, layer: Layer) -> str:
    """The torch module of a plan layer: 'features.conv1', 'features.res2.conv1' (a block names its own short)."""
    return f"{prefix}.{layer.name.rpartition('.')[2]}"


# The stage each layer kind becomes (None: left out). A conv takes the batch norm and activation after it, a
# dense layer its activation, a batch norm its activation; an add joins a residual block's two branches.
STAGE_KINDS: dict[type, str | None] = {
    Conv: "conv", BatchNorm: "elementwise", Activation: "elementwise", Pool: "pool", GlobalPool: "global_pool",
    Dropout: None, Flatten: "flatten", Dense: "dense", Add: "add",
}
# every kind of stage the page computes, in the order a network meets them
PAGE_KINDS = ("input", "conv", "elementwise", "pool", "add", "global_pool", "flatten", "dense", "softmax")


class _Stages:
    """Appends stages while walking the plan, remembering which stage holds each plan layer's output."""

    def __init__(self, model: CNN):
        h, w, c = model.input_shape
        self.stages = [Stage("input", "input", f"input image ({h}x{w}, {c} channel{'s' if c > 1 else ''})",
                             (c, h, w))]

    def add(self, stage: Stage) -> int:
        self.stages.append(stage)
        return len(self.stages) - 1

    def chain(self, layers: list[Layer], source: int, prefix: str) -> int:
        """Stages for a run of plan layers (no blocks) reading stage `source`; returns the last stage's index."""
        i = 0
        while i < len(layers):
            layer = layers[i]
            kind = STAGE_KINDS[type(layer.spec)]
            if kind is None:
                i += 1
                continue
            norm = activation = None
            modules, steps = [module_path(prefix, layer)], [layer.spec.title]
            if isinstance(layer.spec, BatchNorm):
                norm, steps = modules[0], ["BatchNorm"]
            i += 1
            if isinstance(layer.spec, Conv) and i < len(layers) and isinstance(layers[i].spec, BatchNorm):
                norm = module_path(prefix, layers[i])
                modules.append(norm)
                steps.append("BatchNorm")
                i += 1
            if (isinstance(layer.spec, (Conv, BatchNorm, Dense)) and i < len(layers)
                    and (activation := activation_of(layers[i])) is not None):
                modules.append(module_path(prefix, layers[i]))
                steps.append(activation)
                i += 1
            if kind == "elementwise" and activation is None and norm is None:  # an activation alone
                activation = activation_of(layer)
            source = self.add(Stage(layer.name, kind, stage_title(layer, steps, activation),
                                    channels_first(layer.output_shape), (source,), tuple(modules),
                                    layer.spec if kind in ("conv", "pool", "global_pool", "dense") else None,
                                    norm, activation))
        return source

    def block(self, block: Block, source: int) -> int:
        """A residual block: its body and shortcut read the block's input; the add joins them, then the activation."""
        prefix = f"features.{block.name}"
        body = self.chain(list(block.body), source, prefix)
        skip = self.chain(list(block.shortcut), source, prefix) if block.shortcut else source
        after = [layer for layer in block.after if isinstance(layer.spec, Activation)]
        activation = activation_of(after[0]) if after else None
        modules = tuple(module_path(prefix, layer) for layer in after)
        names = (self.stages[body].name, self.stages[skip].name)
        title = f"{block.add.name}: {names[0]} + {names[1]}" + (f" → {activation}" if activation else "")
        return self.add(Stage(block.add.name, "add", title, channels_first(block.add.output_shape), (body, skip),
                              modules, None, None, activation, {"block": block.name}))

    def softmax(self, source: int, num_classes: int) -> int:
        return self.add(Stage("softmax", "softmax", f"softmax: the probability of each of the {num_classes} classes",
                              (num_classes,), (source,)))


def stage_title(layer: Layer, steps: list[str], activation: str | None) -> str:
    """What a stage computes: "conv1: Conv2D 3x3 → BatchNorm → relu", "fc1: Dense 5408 → 128 → relu"."""
    spec = layer.spec
    if isinstance(spec, Flatten):
        return f"{layer.name}: {layer.formula}"
    if isinstance(spec, Dense):
        return f"{layer.name}: Dense {spec.in_features} → {spec.units}" + (
            f" → {activation}" if activation else " (logits)" if layer.name == "classifier" else "")
    return f"{layer.name}: {' → '.join(steps)}"


def explore_stages(model: CNN) -> list[Stage]:
    """The page's stages for a model, in the lesson's order: input first, softmax last."""
    builder = _Stages(model)
    source = 0  # the stage the next layers read: the input image
    run: list[Layer] = []  # plain layers since the last residual block
    for node in model.plan.features:
        if isinstance(node, Block):
            source = builder.chain(run, source, "features")
            run = []
            source = builder.block(node, source)
        else:
            run.append(node)
    source = builder.chain(run, source, "features")
    source = builder.chain(list(model.plan.head), source, "head")
    builder.softmax(source, model.num_classes)
    return builder.stages


@torch.no_grad()
def replay(model: CNN, stages: list[Stage], x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's output for images x (N, C, H, W) in [0, 1], computed with the model's own modules (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        outputs: list[torch.Tensor] = []
        for stage in stages:
            if stage.kind == "input":
                value = x
            elif stage.kind == "add":
                value = outputs[stage.inputs[0]] + outputs[stage.inputs[1]]
            elif stage.kind == "softmax":
                value = torch.softmax(outputs[stage.inputs[0]], dim=1)
            else:
                value = outputs[stage.inputs[0]]
            for path in stage.modules:
                module: nn.Module = model.get_submodule(path)
                value = module(value)
            outputs.append(value)
        return outputs
    finally:
        model.train(was_training)
