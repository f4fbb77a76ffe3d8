"""Early stopping (train.early_stopping): patience on a validation metric, the best epoch's weights kept,
recorded in the run, resumable bitwise, and what sweeps rank a trial by."""
from __future__ import annotations

import json

import pytest
import torch

from cnnlab import pipeline
from cnnlab.config import ConfigError
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.weights import load_model
from cnnlab.training.callbacks import Callback
from cnnlab.training.engine import Trainer
from conftest import StopAt, tiny_config

VAL_LOSSES = [1.0, 0.8, 0.9, 0.95, 0.7, 0.6]  # epoch 2 is best until epoch 5; patience 2 stops after epoch 4


def quick(*overrides: str):
    return tiny_config("epochs=6", *overrides)


@pytest.fixture
def scripted_validation(monkeypatch):
    """Validation returns VAL_LOSSES[epoch] as the loss (and 1 - it as the accuracy), whatever the weights."""
    def validate(self: Trainer) -> tuple[float, float]:
        loss = VAL_LOSSES[self.state.epoch]
        return loss, 1.0 - loss
    monkeypatch.setattr(Trainer, "validate", validate)


class WeightsPerEpoch(Callback):
    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, progress, metrics):
        self.weights[progress.epoch] = {k: v.clone() for k, v in progress.model.state_dict().items()}


def test_training_stops_after_patience_and_keeps_the_best_epochs_weights(tmp_path, scripted_validation):
    seen = WeightsPerEpoch()
    result = pipeline.train(quick("train.early_stopping.patience=2"), tmp_path, name="es", callbacks=[seen],
                            progress=False)
    assert len(result.history) == 4 and result.kept_epoch == 2  # epochs 3 and 4 did not beat epoch 2
    assert "did not improve" in result.stopped and result.kept["val_loss"] == 0.8
    saved = load_model(result.run)[0].state_dict()
    assert all(torch.equal(saved[k], seen.weights[2][k]) for k in saved)
    assert not all(torch.equal(saved[k], seen.weights[4][k]) for k in saved)
    record = json.loads((result.run / "early_stopping.json").read_text())
    assert record == dict(kept_epoch=2, metric="val_loss", value=0.8, epochs_trained=4, stopped=result.stopped)
    # the test set was evaluated on the kept weights
    again = pipeline.evaluate_run(result.run, progress=False)
    assert again.accuracy == result.test.accuracy and again.loss == pytest.approx(result.test.loss)


def test_accuracy_is_watched_upwards_and_small_changes_do_not_count(tmp_path, scripted_validation):
    # accuracies 0.0, 0.2, 0.1, 0.05, 0.3, 0.4: with min_delta 0.15, epoch 2 (+0.2) counts and epoch 5 (+0.1) not
    config = quick("train.early_stopping.patience=3", "train.early_stopping.metric=val_accuracy",
                   "train.early_stopping.min_delta=0.15")
    result = pipeline.train(config, tmp_path, name="acc", progress=False)
    assert result.kept_epoch == 2 and len(result.history) == 5


def test_without_patience_every_epoch_is_trained_and_nothing_is_recorded(tmp_path, scripted_validation):
    result = pipeline.train(quick("epochs=3"), tmp_path, name="plain", progress=False)
    assert len(result.history) == 3 and result.kept_epoch is None and result.stopped is None
    assert result.kept == result.history[-1] and not (result.run / "early_stopping.json").exists()


def test_a_run_that_never_stops_early_still_keeps_its_best_epoch(tmp_path, scripted_validation):
    result = pipeline.train(quick("epochs=4", "train.early_stopping.patience=5"), tmp_path, name="all",
                            progress=False)
    assert len(result.history) == 4 and result.stopped is None and result.kept_epoch == 2


def test_an_early_stopped_run_resumes_bitwise_equal(tmp_path, scripted_validation):
    config = quick("train.early_stopping.patience=2", "dropout=0.2")
    whole = pipeline.train(config, tmp_path, name="whole", progress=False)
    with pytest.raises(pipeline.TrainingInterrupted):  # cut in epoch 4: after the best, before the stop
        pipeline.train(config, tmp_path, name="cut", callbacks=[StopAt(epoch=4, step=20)], progress=False)
    resumed = pipeline.resume(tmp_path / "cut", progress=False)
    assert resumed.kept_epoch == whole.kept_epoch == 2 and resumed.stopped == whole.stopped
    a, b = load_checkpoint(whole.run)[0], load_checkpoint(resumed.run)[0]
    for key in ("model", "best_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert (whole.run / "test.json").read_text() == (resumed.run / "test.json").read_text()
    assert (whole.run / "early_stopping.json").read_text() == (resumed.run / "early_stopping.json").read_text()
    # resuming the finished run trains nothing and keeps the same weights
    finished = pipeline.resume(tmp_path / "cut", progress=False)
    assert finished.images_per_second == 0 and finished.kept_epoch == 2
    saved, kept = load_model(whole.run)[0].state_dict(), load_model(resumed.run)[0].state_dict()
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


@pytest.mark.unit
def test_early_stopping_without_a_validation_split_is_refused_before_a_run_exists(tmp_path):
    with pytest.raises(ConfigError, match="train.early_stopping.*validation split"):
        pipeline.train(quick("data.val_size=0", "train.early_stopping.patience=2"), tmp_path, name="x",
                       progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    ("train.early_stopping.metric=val_acc", "train.early_stopping.metric"),
    ("train.early_stopping.patience=-1", "train.early_stopping.patience"),
    ("train.early_stopping.min_delta=-0.1", "train.early_stopping.min_delta"),
    ("train.early_stopping.patient=2", "train.early_stopping.patient"),
])
def test_bad_early_stopping_keys_name_themselves(override, message):
    with pytest.raises(ConfigError, match=message):
        quick(override)


def test_a_sweep_trial_with_lr_auto_and_early_stopping_is_ranked_by_its_kept_epoch(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from cnnlab import sweep as sweeps
    from cnnlab.cli import app

    spec = dict(method="grid", metric={"name": "val_loss", "goal": "minimize"}, model="seed", dataset="mnist-sample",
                set={"first_layer_convs": 4, "dense_layer_size": 8, "epochs": 4, "train.lr": "auto",
                     "train.early_stopping.patience": 1, "train.threads": 1},
                parameters={"dropout": {"values": [0.0, 0.3]}})
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump(spec))
    done = CliRunner().invoke(app, ["sweep", "run", str(file), "--runs-dir", str(tmp_path / "runs")])
    assert done.exit_code == 0, done.output
    study = sweeps.load_study("sweep", sweeps.default_storage(tmp_path / "runs", "sweep"))
    for trial in study.get_trials():
        run = tmp_path / "runs" / "sweeps" / "sweep" / f"trial-{trial.number}"
        assert (run / "lr_find.json").is_file()
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        kept = json.loads((run / "early_stopping.json").read_text())["kept_epoch"]
        assert trial.value == history[kept - 1]["val_loss"] == min(m["val_loss"] for m in history)
