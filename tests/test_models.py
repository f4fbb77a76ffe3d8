import pytest
import torch

from cnnlab.config import ConvBlock, DenseLayer, ModelConfig, list_presets, load_config
from cnnlab.models.cnn import build_model, count_parameters, run_order
from cnnlab.models.plan import Activation, Pool, plan
from cnnlab.models.summary import format_summary

pytestmark = pytest.mark.unit  # every test here is in-process and quick

DOCUMENTED_PARAMS = {"perceptron": 7_850, "mlp": 101_770, "seed": 693_962, "seed-dropout": 693_962,
                     "deep": 234_410}


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)], ids=["grey-28", "colour-32"])
@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_and_runs_a_batch(name, shape):
    h, w, c = shape
    model = build_model(load_config(name).model, shape, 10, seed=0)
    logits = model(torch.rand(4, c, h, w))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    probabilities = model.predict_proba(torch.rand(3, c, h, w))
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(3))


@pytest.mark.parametrize("name", list_presets())
def test_planned_parameters_equal_torch_count(name):
    model = build_model(load_config(name).model)
    assert model.plan.params == count_parameters(model)
    if name in DOCUMENTED_PARAMS:
        assert count_parameters(model) == DOCUMENTED_PARAMS[name]


@pytest.mark.parametrize("config, shape, classes", [
    (ModelConfig(conv=[ConvBlock(8, [5, 3], stride=2, padding=1, pool="avg", pool_size=3)], dense=[DenseLayer(20)]),
     (32, 32, 3), 7),
    (ModelConfig(conv=[ConvBlock(4, 3, padding="same", batch_norm=True, activation="gelu", dropout=0.2),
                       ConvBlock(6, 1, pool="max")]), (28, 28, 1), 10),
])
def test_planned_shapes_match_torch_for_other_configs(config, shape, classes):
    model = build_model(config, shape, classes)
    assert model.plan.params == count_parameters(model)
    x = torch.rand(2, shape[2], shape[0], shape[1])
    features = model.forward_features(x)
    h, w, c = model.plan.feature_shape
    assert tuple(features.shape[1:]) == (c, h, w)
    assert planned_shapes(model) == torch_shapes(model, x)
    assert model(x).shape == (2, classes)


def test_seed_summary_matches_the_lesson():
    model = build_model(load_config("seed").model)
    text = format_summary(model.plan, "seed", explain=True)
    assert "(26, 26, 32)" in text and "(13, 13, 32)" in text and "(5408,)" in text
    assert "Total params: 693,962" in text
    assert "(3·3·1+1)·32 = 320" in text and "(5,408+1)·128 = 692,352" in text
    assert "fc1 holds 692,352 of the 693,962 parameters (99.8%)" in text


def test_a_kernel_too_big_for_the_image_is_a_clear_error():
    config = ModelConfig(conv=[ConvBlock(4, 9, pool="max")] * 3)
    with pytest.raises(ValueError, match=r"model.conv\[2\]: a 9x9 kernel does not fit the \(1, 1, 4\) input"):
        plan(config)


def test_same_seed_same_initial_weights():
    a = build_model(load_config("seed").model, seed=3)
    b = build_model(load_config("seed").model, seed=3)
    c = build_model(load_config("seed").model, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.features.conv1.weight, c.features.conv1.weight)


def planned_shapes(model) -> dict[str, tuple[int, ...]]:
    """Plan layer name -> output shape, for the layers that are torch modules (not the adds); an activation the
    network runs after its max pool (`run_order`) outputs the pooled shape."""
    shapes, previous = {}, None
    for layer in run_order(model.plan.layers()):
        moved = isinstance(layer.spec, Activation) and previous is not None and isinstance(previous.spec, Pool)
        if layer.title != "Add":
            shapes[layer.name] = previous.output_shape if moved else layer.output_shape
        previous = layer
    return shapes


def torch_shapes(model, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Module name -> the shape torch computed, channels-last like the plan: (H, W, C) or (n,)."""
    from cnnlab.models.cnn import ResidualBlock

    shapes, hooks = {}, []
    for section in (model.features, model.head):
        for name, module in section.named_modules():
            if name and not isinstance(module, ResidualBlock):
                hooks.append(module.register_forward_hook(
                    lambda m, i, out, name=name: shapes.__setitem__(
                        name, tuple(out.shape[2:]) + (out.shape[1],) if out.dim() == 4 else tuple(out.shape[1:]))))
    model.eval()
    model(x)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("name", list_presets())
def test_every_planned_layer_shape_is_what_torch_computes(name):
    model = build_model(load_config(name).model, (28, 28, 1), 10)
    assert planned_shapes(model) == torch_shapes(model, torch.rand(2, 1, 28, 28))
