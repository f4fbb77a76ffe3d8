"""The whitening first layer (`model.conv[0].whiten`): kernels fitted to the training images' patches, frozen."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlab import pipeline
from cnnlab.config import ConfigError, load_config
from cnnlab.data.sources import TensorSource
from cnnlab.models.cnn import build_model
from cnnlab.models.plan import plan
from cnnlab.models.summary import summarize
from cnnlab.models.whitening import fit_whitening, whitening_kernels
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.weights import load_model
from conftest import StopAt

WHITE = ["model.conv.0.whiten=true", "model.conv.0.kernel_size=2", "model.conv.0.filters=8", "epochs=1",
         "batch_size=64", "data.val_size=500", "dense_layer_size=32", "train.threads=1"]


def smooth_images(n: int = 400, channels: int = 1, size: int = 16) -> torch.Tensor:
    """Random images blurred by a 3x3 mean: neighbouring pixels correlated, as in photos."""
    torch.manual_seed(0)
    noise = torch.rand(n, channels, size + 2, size + 2)
    return F.avg_pool2d(noise, 3, stride=1)


@pytest.mark.unit
@pytest.mark.parametrize("channels,kernel", [(1, 2), (1, 3), (3, 2)])
def test_the_fitted_kernels_make_patch_directions_uncorrelated_with_unit_variance(channels, kernel):
    images = smooth_images(channels=channels)
    d = channels * kernel * kernel
    kernels, bias = whitening_kernels(images, (kernel, kernel), 2 * d)
    out = F.conv2d(images, kernels, bias)  # (N, 2d, H', W')
    positive = out[:, :d].permute(0, 2, 3, 1).reshape(-1, d).double()
    assert positive.mean(dim=0).abs().max() < 1e-3  # the bias centres every output
    covariance = positive.T @ positive / len(positive)
    assert torch.allclose(covariance, torch.eye(d, dtype=torch.float64), atol=0.02)
    assert torch.equal(kernels[d:], -kernels[:d])  # each direction, then its negative


@pytest.mark.unit
def test_fewer_filters_keep_the_directions_of_largest_variance():
    images = smooth_images()
    full, _ = whitening_kernels(images, (3, 3), 18)
    some, _ = whitening_kernels(images, (3, 3), 6)
    assert torch.allclose(some[:3].abs(), full[:3].abs(), atol=1e-5)  # eigenvectors up to sign


@pytest.mark.unit
def test_the_plan_counts_the_frozen_kernels_and_the_summary_says_so():
    config = load_config("seed", overrides=WHITE)
    model = build_model(config.model)
    layers = plan(config.model)
    assert layers.params == sum(p.numel() for p in model.parameters())
    assert layers.frozen_params == 2 * 2 * 1 * 8 == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    text = summarize(config, explain=True)
    assert "Conv2D 2x2, whitening" in text and "Non-trainable params: 32" in text
    assert f"Trainable params: {layers.params - 32:,}" in text


def test_training_keeps_the_fitted_kernels_and_trains_their_bias(tmp_path):
    config = load_config("seed", overrides=WHITE)
    result = pipeline.train(config, tmp_path, name="white", progress=False)
    model = load_model(result.run)[0]
    fresh = build_model(config.model, seed=config.train.seed)
    data = pipeline.open_data(config, progress=False)
    fit_whitening(fresh.whitening_layers(), data.train)
    trained, fitted = model.conv_layers()["conv1"], fresh.conv_layers()["conv1"]
    assert torch.equal(trained.weight, fitted.weight)  # fitted before training, never moved
    assert not torch.equal(trained.bias, fitted.bias)  # the bias learns
    assert not torch.equal(fitted.weight, build_model(config.model, seed=config.train.seed).conv_layers()["conv1"]
                           .weight)  # and the fit did replace the random kernels
    assert result.test is not None and result.test.accuracy > 0.5


def test_a_whitened_lookahead_run_resumes_bitwise_equal(tmp_path):
    config = load_config("seed", overrides=[*WHITE, "epochs=2", "train.lookahead=true", "train.schedule=onecycle"])
    reference = pipeline.train(config, tmp_path, name="whole", progress=False).run
    with pytest.raises(pipeline.TrainingInterrupted):
        pipeline.train(config, tmp_path, name="cut", callbacks=[StopAt(epoch=2, step=13)], progress=False)
    resumed = pipeline.resume(tmp_path / "cut", progress=False).run
    a, b = load_checkpoint(reference)[0], load_checkpoint(resumed)[0]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["lookahead"][k], b["lookahead"][k]) for k in a["lookahead"])
    assert (reference / "test.json").read_text() == (resumed / "test.json").read_text()


@pytest.mark.unit
@pytest.mark.parametrize("overrides,field", [
    (["model.conv.1.whiten=true"], "model.conv[1].whiten"),
    (["model.conv.0.whiten=true", "model.conv.0.stride=2"], "model.conv[0].whiten"),
    (["model.conv.0.whiten=true", "model.conv.0.kernel_size=2", "model.conv.0.filters=7"], "model.conv[0].filters"),
    (["model.conv.0.whiten=true", "model.conv.0.kernel_size=2", "model.conv.0.filters=10"], "model.conv[0].filters"),
])
def test_an_impossible_whitening_layer_is_refused_naming_the_key(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config = load_config("deep", overrides=overrides)
        plan(config.model)


@pytest.mark.unit
def test_an_empty_split_leaves_the_random_kernels():
    config = load_config("seed", overrides=WHITE)
    model = build_model(config.model, seed=0)
    before = model.conv_layers()["conv1"].weight.clone()
    fit_whitening(model.whitening_layers(), TensorSource(torch.zeros(0, 1, 28, 28, dtype=torch.uint8),
                                                         torch.zeros(0, dtype=torch.int64)))
    assert torch.equal(model.conv_layers()["conv1"].weight, before)


def test_lr_find_sweeps_the_network_train_would_build(tmp_path):
    """`cnnlab lr-find` and `--lr auto` fit the whitening layer alike, so they suggest the same rate."""
    import json

    from typer.testing import CliRunner

    from cnnlab.cli import app

    overrides = [*WHITE, "train.schedule=onecycle"]
    auto = pipeline.train(load_config("seed", overrides=[*overrides, "train.lr=auto"]), tmp_path, name="auto",
                          progress=False)
    args = ["lr-find", "--model", "seed", "--json"] + [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["suggestion"] == auto.lr_finding.suggestion


def test_init_from_a_run_that_trained_its_first_layer_into_a_whitening_one_is_refused(tmp_path):
    from cnnlab.runs.layout import RunError

    plain = load_config("seed", overrides=[o for o in WHITE if "whiten" not in o])
    source = pipeline.train(plain, tmp_path, name="source", progress=False).run
    whitened = load_config("seed", overrides=[*WHITE, f"train.init_from={source}"])
    with pytest.raises(RunError, match=r"conv1 is a whitening layer here .* but a trained layer there; set "
                                       r"model.conv\[0\].whiten to false"):
        pipeline.train(whitened, tmp_path, name="refused", progress=False)
    assert not (tmp_path / "refused").exists()
    # the other way round is fine: a whitened source's kernels train on in a plain layer
    white_source = pipeline.train(load_config("seed", overrides=WHITE), tmp_path, name="white", progress=False).run
    tuned = pipeline.train(load_config("seed", overrides=[*[o for o in WHITE if "whiten" not in o],
                                                          f"train.init_from={white_source}"]),
                           tmp_path, name="tuned", progress=False)
    assert tuned.test is not None
