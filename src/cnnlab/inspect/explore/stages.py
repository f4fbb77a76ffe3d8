"""A trained CNN as the explorer page shows it: a list of stages, each one computation a reader can click into.

A stage is a conv with the batch norm and activation that follow it (the lesson's "conv layer"), a pool,
a leftover batch norm or activation, a residual add, a global pool, a flatten, a dense layer with its
activation, or the softmax. Stages read earlier stages by index (a residual block's convs and its add
read the block's input), so any network cnnlab builds becomes one flat list the page runs in order.

The plan may run a max pool before a ReLU-like activation (they commute, `cnnlab.models.plan`); here the
activation is put back with its conv, so a conv's maps are its activated output at its own resolution,
as `CNN.feature_maps` draws them, with the same numbers the network computes. Dropout is left out: it is
the identity in evaluation. `replay` runs the stages with the model's own torch modules, so tests can
check that the list computes exactly what the network does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnlab.models.cnn import CNN
from cnnlab.models.plan import (
    POOL_FIRST,
    Activation,
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
            spec = layer.spec
            path = module_path(prefix, layer)
            if isinstance(spec, Dropout):
                i += 1
                continue
            if isinstance(spec, Conv):
                i, source = self.conv(layers, i, source, prefix)
                continue
            if isinstance(spec, Pool):
                source = self.add(Stage(layer.name, "pool", f"{layer.name}: {spec.title}",
                                        channels_first(layer.output_shape), (source,), (path,), spec))
            elif isinstance(spec, (BatchNorm, Activation)):
                i, source = self.elementwise(layers, i, source, prefix)
                continue
            else:
                raise TypeError(f"{layer.name}: {type(spec).__name__} cannot come among the feature layers")
            i += 1
        return source

    def conv(self, layers: list[Layer], i: int, source: int, prefix: str) -> tuple[int, int]:
        """A conv with the batch norm and activation right after it (and an activation the plan moved past a
        max pool, put back); returns (index of the next plan layer to read, the stage added)."""
        layer = layers[i]
        modules, steps, norm = [module_path(prefix, layer)], [layer.spec.title], None
        j = i + 1
        pooled: Layer | None = None
        if j < len(layers) and isinstance(layers[j].spec, BatchNorm):
            norm = module_path(prefix, layers[j])
            modules.append(norm)
            steps.append("BatchNorm")
            j += 1
        after = layers[j] if j < len(layers) else None
        following = layers[j + 1] if j + 1 < len(layers) else None
        if (after is not None and isinstance(after.spec, Pool) and after.spec.mode == "max"
                and activation_of(following) in POOL_FIRST):
            pooled, after = after, following  # max then act == act then max: show act with its conv
            j += 1
        activation = activation_of(after)
        if after is not None and activation is not None:
            modules.append(module_path(prefix, after))
            steps.append(activation)
            j += 1
        shape = channels_first(layer.output_shape)
        stage = self.add(Stage(layer.name, "conv", f"{layer.name}: {' → '.join(steps)}", shape, (source,),
                               tuple(modules), layer.spec, norm, activation))
        if pooled is not None:
            if not isinstance(pooled.spec, Pool):
                raise TypeError(f"{pooled.name}: expected a pool after the conv, found {type(pooled.spec).__name__}")
            stage = self.add(Stage(pooled.name, "pool", f"{pooled.name}: {pooled.spec.title}",
                                   channels_first(pooled.output_shape), (stage,), (module_path(prefix, pooled),),
                                   pooled.spec))
        return j, stage

    def elementwise(self, layers: list[Layer], i: int, source: int, prefix: str) -> tuple[int, int]:
        """A batch norm and/or activation not joined to a conv (e.g. after a pool that comes first)."""
        modules: list[str] = []
        steps: list[str] = []
        norm = None
        first = layers[i]
        if isinstance(first.spec, BatchNorm):
            norm = module_path(prefix, first)
            modules.append(norm)
            steps.append("BatchNorm")
            i += 1
        activation = activation_of(layers[i]) if i < len(layers) else None
        if activation is not None:
            modules.append(module_path(prefix, layers[i]))
            steps.append(activation)
            i += 1
        shape = channels_first(first.output_shape)
        return i, self.add(Stage(first.name, "elementwise", f"{first.name}: {' → '.join(steps)}", shape, (source,),
                                 tuple(modules), None, norm, activation))

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

    def head(self, layers: list[Layer], source: int, num_classes: int) -> int:
        i = 0
        while i < len(layers):
            layer, path = layers[i], f"head.{layers[i].name}"
            spec = layer.spec
            if isinstance(spec, GlobalPool):
                source = self.add(Stage(layer.name, "global_pool", f"{layer.name}: {spec.title}",
                                        layer.output_shape, (source,), (path,), spec))
            elif isinstance(spec, Flatten):
                source = self.add(Stage(layer.name, "flatten", f"{layer.name}: {layer.formula}", layer.output_shape,
                                        (source,), (path,)))
            elif isinstance(spec, Dense):
                modules, activation = [path], None
                nxt = layers[i + 1] if i + 1 < len(layers) else None
                activation = activation_of(nxt)
                if nxt is not None and activation is not None:
                    modules.append(f"head.{nxt.name}")
                    i += 1
                title = f"{layer.name}: Dense {spec.in_features} → {spec.units}" + (
                    f" → {activation}" if activation else " (logits)" if layer.name == "classifier" else "")
                source = self.add(Stage(layer.name, "dense", title, layer.output_shape, (source,), tuple(modules),
                                        spec, None, activation))
            elif not isinstance(spec, Dropout):
                raise TypeError(f"{layer.name}: {type(spec).__name__} cannot come in the head")
            i += 1
        return self.add(Stage("softmax", "softmax", f"softmax: the probability of each of the {num_classes} classes",
                              (num_classes,), (source,)))


def explore_stages(model: CNN) -> list[Stage]:
    """The page's stages for a model, in the order they run: input first, softmax last."""
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
    builder.head(list(model.plan.head), source, model.num_classes)
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
