"""`train.precision: bf16-mixed`: the training step's convolutions and matmuls in bfloat16, everything kept in
float32 (weights, gradients, optimizer state, loss), and everything after training in float32."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnlab import pipeline
from cnnlab.config import ConfigError
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.weights import load_model
from cnnlab.training import precision
from conftest import StopAt, tiny_config, whole_and_resumed


def quick(*overrides: str):
    return tiny_config("epochs=1", *overrides)


class ConvOutputs:
    """Records the dtype of every conv layer's output, and whether the model was training."""

    def __init__(self, model: nn.Module):
        self.seen: list[tuple[bool, torch.dtype]] = []
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(lambda m, args, out: self.seen.append((m.training, out.dtype)))


@pytest.mark.unit
def test_an_unknown_precision_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.precision: expected one of float32, bf16-mixed, found 'fp16'"):
        quick("train.precision=fp16")


def test_bf16_mixed_trains_in_bfloat16_and_evaluates_in_float32(tmp_path, monkeypatch):
    hooks: list[ConvOutputs] = []
    build = pipeline.build_model

    def watched(*args, **kwargs):
        model = build(*args, **kwargs)
        hooks.append(ConvOutputs(model))
        return model

    monkeypatch.setattr(pipeline, "build_model", watched)
    result = pipeline.train(quick("train.precision=bf16-mixed"), tmp_path, name="bf16", progress=False)
    seen = [pair for hook in hooks for pair in hook.seen]
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # validation and test
    checkpoint, _ = load_checkpoint(result.run)
    assert all(v.dtype == torch.float32 for v in checkpoint["model"].values() if v.is_floating_point())
    moments = [t for s in checkpoint["optimizer"]["state"].values() for t in s.values() if t.is_floating_point()]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert all(p.dtype == torch.float32 for p in load_model(result.run)[0].parameters())


def test_bf16_mixed_learns_as_float32_does_but_not_bitwise(tmp_path):
    exact = pipeline.train(quick("epochs=2"), tmp_path, name="fp32", progress=False)
    mixed = pipeline.train(quick("epochs=2", "train.precision=bf16-mixed"), tmp_path, name="bf16", progress=False)
    a, b = load_model(exact.run)[0].state_dict(), load_model(mixed.run)[0].state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the arithmetic did change
    assert exact.test is not None and mixed.test is not None
    assert mixed.test.accuracy > 0.8 and abs(mixed.test.accuracy - exact.test.accuracy) < 0.02  # 84.2% in float32


def test_a_bf16_mixed_run_resumes_bitwise_equal(tmp_path):
    config = quick("epochs=2", "dropout=0.2", "train.augment_shift=1", "train.precision=bf16-mixed")
    reference, resumed = whole_and_resumed(config, tmp_path, StopAt(epoch=2, step=11))
    a, b = load_checkpoint(reference)[0]["model"], load_checkpoint(resumed)[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (reference / "test.json").read_text() == (resumed / "test.json").read_text()


@pytest.mark.unit
def test_a_device_without_bfloat16_instructions_gets_one_line(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.slow_notice("float32", cpu) is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    line = precision.slow_notice("bf16-mixed", cpu)
    assert line is not None and "\n" not in line and line.startswith("train.precision: bf16-mixed")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.slow_notice("bf16-mixed", cpu) is None


# ---------------------------------------------------------------------------------- validating less often
def test_val_every_validates_every_nth_epoch_and_the_last(tmp_path):
    result = pipeline.train(quick("epochs=5", "batch_size=256", "train.val_every=2"), tmp_path, name="v",
                            progress=False)
    validated = [m["epoch"] for m in result.history if not math.isnan(m["val_accuracy"])]
    assert validated == [2, 4, 5]
    every = pipeline.train(quick("epochs=5", "batch_size=256"), tmp_path, name="all", progress=False)
    assert [m["val_accuracy"] for m in every.history][1::2] == [m["val_accuracy"] for m in result.history][1::2]
    assert every.test is not None and result.test is not None and every.test.accuracy == result.test.accuracy


def test_early_stopping_judges_only_validated_epochs(tmp_path):
    # patience 1, validated after epochs 3 and 6: epochs 4 and 5 have no number, so they cannot end the run
    config = quick("epochs=6", "batch_size=256", "train.val_every=3", "train.early_stopping.patience=1")
    result = pipeline.train(config, tmp_path, name="es", progress=False)
    assert [m["epoch"] for m in result.history] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in result.history if not math.isnan(m["val_loss"])] == [3, 6]


@pytest.mark.unit
def test_the_epoch_line_leaves_out_a_validation_not_made():
    from cnnlab.training.callbacks import format_epoch

    row = dict(epoch=1, train_loss=0.5, train_accuracy=0.9, val_loss=math.nan, val_accuracy=math.nan, seconds=1.0)
    assert "val" not in format_epoch(row, 3) and "nan" not in format_epoch(row, 3)
    assert "val loss 0.4000 acc 0.9100" in format_epoch({**row, "val_loss": 0.4, "val_accuracy": 0.91}, 3)


@pytest.mark.unit
def test_the_curves_join_the_validated_epochs(monkeypatch, tmp_path):
    from cnnlab.inspect import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out: drawn.append(fig) or out)
    nan = math.nan
    history = [dict(epoch=e, train_loss=1.0 / e, train_accuracy=0.5, val_loss=v, val_accuracy=v)
               for e, v in [(1, nan), (2, 0.8), (3, nan), (4, 0.9)]]
    figures.plot_curves({"run": history}, tmp_path / "curves.png")
    loss_ax, accuracy_ax = drawn[0].axes[:2]
    validation = [line for line in accuracy_ax.get_lines() if line.get_label() == "validation"][0]
    assert list(validation.get_xdata()) == [2, 4] and list(validation.get_ydata()) == [0.8, 0.9]
    train = [line for line in loss_ax.get_lines() if line.get_label() == "train"][0]
    assert list(train.get_xdata()) == [1, 2, 3, 4]


@pytest.mark.unit
@pytest.mark.parametrize("asked", ["bf16", "bfloat16", "fp16", "float16", "half"])
def test_asking_for_16_bits_is_pointed_to_bf16_mixed(asked):
    with pytest.raises(ConfigError, match=r"; did you mean 'bf16-mixed'\?$"):
        quick(f"train.precision={asked}")


def test_the_early_stop_line_gives_the_gap_between_validations(tmp_path, monkeypatch):
    from cnnlab.training.engine import Trainer

    losses = {3: 0.5, 6: 0.6}  # scripted: epoch 3 is best, epoch 6 (the next validation) is worse

    def validate(self):
        return losses[self.state.epoch + 1], 0.5
    monkeypatch.setattr(Trainer, "validate", validate)
    config = quick("epochs=9", "batch_size=256", "train.val_every=3", "train.early_stopping.patience=1")
    result = pipeline.train(config, tmp_path, name="gap", progress=False)
    assert len(result.history) == 6 and result.kept_epoch == 3
    assert "for 3 epoch(s) after epoch 3 (0.5000)" in result.stopped  # the gap, not the patience of 1


@pytest.mark.unit
def test_the_runs_table_shows_the_last_validated_accuracy():
    from cnnlab.inspect.run_table import last_validated

    nan = math.nan
    assert last_validated([dict(val_accuracy=0.5), dict(val_accuracy=0.7), dict(val_accuracy=nan)]) == 0.7
    assert last_validated([dict(val_accuracy=nan)]) is None and last_validated([]) is None
