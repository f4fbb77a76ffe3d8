"""One description per layer kind: each spec's shape, parameters and multiply-adds are what its torch module
has; the activation table feeds config, plan and torch; every kind has a module (or is computed without
one) and an explorer stage the page's JavaScript computes; and the learner sees conv -> ReLU -> pool in
the summary, the explorer and `show features` while the network pools first."""
from __future__ import annotations

import re
import typing
from importlib.resources import files

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.config import ACTIVATIONS, ConvBlock, ModelConfig, list_presets, load_config
from cnnlab.config.activations import ACTIVATION_KINDS
from cnnlab.inspect.explore import explore_stages
from cnnlab.inspect.explore.stages import PAGE_KINDS, STAGE_KINDS
from cnnlab.models.cnn import MODULELESS, MODULES, build_model, module_for, run_order
from cnnlab.models.layers import (
    Activation,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    Pool,
    Spec,
    runs_after_pool,
)
from cnnlab.models.summary import format_summary, rows_of

pytestmark = pytest.mark.unit  # no training run, no process: the inner loop

KINDS = typing.get_args(Spec)

# (spec, channels-last input shape): every kind that has a module, in its variants
CASES = [
    (Conv(3, 8, (5, 3), stride=2, padding=1), (20, 17, 3)),
    (Conv(1, 4, (3, 3), padding="same", bias=False), (9, 9, 1)),
    (Conv(2, 6, (2, 2), whiten=True), (7, 8, 2)),
    (BatchNorm(5), (6, 6, 5)),
    *[(Activation(name), (4, 4, 2)) for name in ACTIVATION_KINDS],
    (Pool("max", 2), (7, 9, 3)),
    (Pool("avg", 3), (10, 10, 2)),
    (GlobalPool("avg"), (5, 4, 6)),
    (GlobalPool("max"), (5, 4, 6)),
    (Dropout(0.3), (4, 4, 2)),
    (Flatten(), (3, 4, 5)),
    (Dense(12, 7), (12,)),
]


def channels_last(shape: torch.Size) -> tuple[int, ...]:
    """torch's (N, C, H, W) or (N, n) as the plan writes one image: (H, W, C) or (n,)."""
    return (shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape[1:])


@pytest.mark.parametrize("spec, shape", CASES, ids=[f"{type(s).__name__}-{i}" for i, (s, _) in enumerate(CASES)])
def test_each_kinds_spec_reports_what_its_torch_module_has(spec, shape):
    module = module_for(spec).eval()
    x = torch.rand(1, shape[2], shape[0], shape[1]) if len(shape) == 3 else torch.rand(1, *shape)
    with FlopCounterMode(display=False) as counter:  # torch counts 2 flops per multiply-add
        out = module(x)
    assert channels_last(out.shape) == spec.output_shape(shape)
    assert spec.params == sum(p.numel() for p in module.parameters())
    assert spec.frozen == sum(p.numel() for p in module.parameters() if not p.requires_grad)
    assert spec.macs(shape) == counter.get_total_flops() // 2
    assert spec.title and spec.formula(shape)


def test_every_kind_has_a_torch_module_or_is_computed_without_one():
    assert set(MODULES) | set(MODULELESS) == set(KINDS)
    assert not set(MODULES) & set(MODULELESS)
    assert {type(spec) for spec, _ in CASES} == set(MODULES)


def test_the_activation_table_is_the_configs_choices_and_the_torch_modules():
    assert (*ACTIVATION_KINDS, "none") == ACTIVATIONS
    for name, kind in ACTIVATION_KINDS.items():
        assert type(module_for(Activation(name))).__name__ == kind.torch_module


@pytest.mark.parametrize("name", list(ACTIVATION_KINDS))
def test_an_activation_runs_after_a_max_pool_only_where_that_gives_the_same_values(name):
    act = module_for(Activation(name))
    x = torch.linspace(-4, 4, 801)  # sorted: a non-decreasing function keeps the order
    assert bool((act(x).diff() >= 0).all()) == ACTIVATION_KINDS[name].non_decreasing
    pool = Pool("max", 2)
    maps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    commute = torch.equal(act(module_for(pool)(maps)), module_for(pool)(act(maps)))
    assert runs_after_pool(Activation(name), pool) == ACTIVATION_KINDS[name].non_decreasing
    if runs_after_pool(Activation(name), pool):
        assert commute
    assert not runs_after_pool(Activation(name), Pool("avg", 2))


# ------------------------------------------------------------------------ the explorer's JavaScript
def page_script() -> str:
    return files("cnnlab.inspect.explore").joinpath("explore.html").read_text(encoding="utf-8")


def js_function(script: str, name: str) -> str:
    """The text of `function name(...) {...}` up to the next top-level function."""
    start = script.index(f"function {name}(")
    end = script.find("\nfunction ", start + 1)
    return script[start:end]


def test_the_explorer_page_computes_and_explains_every_stage_kind_the_plan_can_produce():
    script = page_script()
    computed = set(re.findall(r'stage\.kind === "(\w+)"', js_function(script, "compute")))
    details = re.search(r"\(\{([^}]*)\}\)\[stage\.kind\]", script)
    assert details is not None, "explore.html: the table of detail views by stage kind has moved"
    explained = set(re.findall(r"(\w+): \w+Detail", details.group(1)))
    assert set(STAGE_KINDS) == set(KINDS)  # every layer kind becomes a stage, or is left out on purpose
    assert {kind for kind in STAGE_KINDS.values() if kind} <= set(PAGE_KINDS)
    assert computed == set(PAGE_KINDS) - {"input"}  # the input is given, not computed
    assert explained == set(PAGE_KINDS) - {"input", "flatten"}  # neither has a pixel to click


def test_the_explorer_page_computes_every_activation_in_the_table():
    table = re.search(r"const ACTIVATIONS = \{(.*?)\n\};", page_script(), re.S)
    assert table is not None
    assert set(re.findall(r"^\s+(\w+): \[", table.group(1), re.M)) == set(ACTIVATION_KINDS)


@pytest.mark.parametrize("name", list_presets())
def test_every_presets_stages_are_kinds_the_page_computes(name):
    model = build_model(load_config(name).model, (28, 28, 1) if name != "deep-color" else (32, 32, 3), 10)
    assert {stage.kind for stage in explore_stages(model)} <= set(PAGE_KINDS)


# --------------------------------------------------------------- the lesson's order, wherever one looks
@pytest.mark.parametrize("batch_norm", [False, True], ids=["seed", "with-batch-norm"])
def test_relu_is_shown_after_the_conv_and_before_the_pool_everywhere_while_the_network_pools_first(batch_norm):
    config = ModelConfig(conv=[ConvBlock(4, 3, batch_norm=batch_norm, pool="max")])
    model = build_model(config, (10, 10, 1), 3, seed=0).eval()
    before = ["conv1", "bn1"] if batch_norm else ["conv1"]
    # the plan, and the summary built from it: relu on the row of the layer before the pool
    assert [layer.name for layer in model.plan.layers()][:len(before) + 2] == [*before, "relu1", "pool1"]
    rows = {layer.name: activation for layer, activation in rows_of(model.plan)}
    assert rows[before[-1]] is not None and rows[before[-1]].name == "relu1" and rows["pool1"] is None
    lines = str(format_summary(model.plan)).splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(f"{before[-1]} ("))
    assert ", relu)" in lines[row] and lines[row + 1].startswith("pool1 (MaxPool 2x2)   ")
    # the explorer: a conv stage ending in relu at the conv's resolution, then the pool
    stages = explore_stages(model)
    assert [s.name for s in stages[1:3]] == ["conv1", "pool1"]
    assert stages[1].activation == "relu" and stages[1].shape == (4, 8, 8) and stages[1].title.endswith("→ relu")
    # show features: the conv's maps after relu, before the pool
    x = torch.rand(2, 1, 10, 10)
    (row_maps,) = model.feature_maps(x)
    assert row_maps.title == " → ".join(["conv1", *(["batch norm"] if batch_norm else []), "relu"])
    inner = model.features.bn1(model.features.conv1(x)) if batch_norm else model.features.conv1(x)
    assert torch.equal(row_maps.maps, torch.relu(inner))
    # the network: pool first, the one place the speed-up is made, with the same values
    assert list(model.features._modules)[len(before):len(before) + 2] == ["pool1", "relu1"]
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), model.features.pool1(torch.relu(inner)))


def test_run_order_moves_a_max_pool_before_a_never_decreasing_activation_only():
    for activation, pool, moved in (("relu", "max", True), ("gelu", "max", False), ("relu", "avg", False)):
        plan = build_model(ModelConfig(conv=[ConvBlock(2, 3, activation=activation, pool=pool)])).plan
        names = [layer.name for layer in run_order(plan.layers())][:3]
        assert names == (["conv1", "pool1", f"{activation}1"] if moved else ["conv1", f"{activation}1", "pool1"])


def test_show_features_follows_a_config_that_pools_first_as_the_summary_and_explorer_do():
    config = ModelConfig(conv=[ConvBlock(4, 3, batch_norm=True, pool="max", pool_first=True, dropout=0.2)])
    model = build_model(config, (10, 10, 1), 3, seed=0).eval()
    with torch.no_grad():  # batch-norm scales of both signs: a norm drawn before the pool would differ
        model.features.bn1.weight.copy_(torch.tensor([1.5, -1.0, 0.5, -2.0]))
        model.features.bn1.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.rand(2, 1, 10, 10)
    (row,) = model.feature_maps(x)
    assert row.title == "conv1 → MaxPool 2x2 → batch norm → relu"
    with torch.no_grad():
        network = model.features.relu1(model.features.bn1(model.features.pool1(model.features.conv1(x))))
    assert torch.equal(row.maps, network)
    lines = str(format_summary(model.plan)).splitlines()
    assert [line.split(" (")[0] for line in lines if line.startswith(("conv1", "pool1", "bn1"))] == \
        ["conv1", "pool1", "bn1"]
    stages = explore_stages(model)
    assert [(s.name, s.activation) for s in stages[1:4]] == [("conv1", None), ("pool1", None), ("bn1", "relu")]
