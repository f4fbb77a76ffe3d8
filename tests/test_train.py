"""Short real trainings on the shipped MNIST sample: runs, determinism, resume, failures."""
from __future__ import annotations

import json

import pytest
import torch

from cnnlab import pipeline
from cnnlab.config import list_presets, load_config
from cnnlab.data import DatasetUnavailable
from cnnlab.runs import layout, records
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.weights import load_model
from cnnlab.training.engine import TrainingDiverged, TrainingInterrupted
from conftest import StopAt, same_weights, tiny_config


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


@pytest.fixture(scope="module")
def reference(tiny_result):
    """One uninterrupted tiny run (the suite's shared one), for the tests that compare against it."""
    return tiny_result


def test_a_run_directory_holds_everything(reference):
    run = reference.run
    for key in ("config", "summary", "manifest", "metrics", "weights", "checkpoint", "test", "confusion"):
        assert layout.path(run, key).is_file(), key
    metrics = records.read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]) >= {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"}
    test = json.loads(layout.path(run, "test").read_text())
    assert test["accuracy"] == reference.test.accuracy and len(test["confusion_matrix"]) == 10
    assert reference.test.accuracy > 0.8  # a real model learned something from 3,500 real digits
    manifest = json.loads(layout.path(run, "manifest").read_text())
    assert manifest["torch"] == torch.__version__ and manifest["dataset"] == "mnist-sample"
    assert all(f["verified"] and len(f["sha256"]) == 64 for f in manifest["dataset_files"])
    assert "693,962" not in layout.path(run, "summary").read_text()  # quick model is smaller
    assert "Total params" in layout.path(run, "summary").read_text()


def test_model_reloads_from_config_and_safetensors(reference):
    model, classes, config = load_model(reference.run)
    assert classes == tuple("0123456789") and config == tiny_config()
    evaluation = pipeline.evaluate_run(reference.run, progress=False)
    assert evaluation.accuracy == reference.test.accuracy


def test_same_seed_same_result(reference, tmp_path):
    again = pipeline.train(tiny_config(), tmp_path, name="again", progress=False)
    assert same_weights(reference.run, again.run)
    assert comparable(again.history) == comparable(reference.history)


@pytest.mark.slow
@pytest.mark.parametrize("epoch, step", [(1, 20), (2, 1), (1, 55)])
def test_resume_after_an_interrupt_ends_bitwise_equal(reference, tmp_path, epoch, step):
    """Stopped mid-epoch (or at an epoch's last step), resumed: same weights and metrics as never stopping."""
    with pytest.raises(TrainingInterrupted):
        pipeline.train(tiny_config(), tmp_path, name="cut", callbacks=[StopAt(epoch, step)], progress=False)
    run = tmp_path / "cut"
    assert not layout.path(run, "test").exists()
    resumed = pipeline.resume(run, progress=False)
    assert same_weights(reference.run, run)
    assert comparable(records.read_metrics(run)) == comparable(records.read_metrics(reference.run))
    assert resumed.test.accuracy == reference.test.accuracy


@pytest.mark.slow
def test_resume_skips_a_corrupt_latest_checkpoint(reference, tmp_path):
    with pytest.raises(TrainingInterrupted):
        pipeline.train(tiny_config(), tmp_path, name="cut", callbacks=[StopAt(2, 10)], progress=False)
    run = tmp_path / "cut"
    layout.path(run, "checkpoint").write_bytes(b"garbage")
    state, warnings = load_checkpoint(run)
    assert warnings and "checkpoint.safetensors is unreadable" in warnings[0]
    assert state["epoch"] == 1 and state["step"] == 0  # the end-of-epoch-1 checkpoint
    pipeline.resume(run, progress=False)
    assert same_weights(reference.run, run)


def test_checkpoints_are_safetensors_not_pickles(reference):
    data = layout.path(reference.run, "checkpoint").read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    assert header["__metadata__"]["format"] == "cnnlab-checkpoint-1"
    assert b"\x80\x04" not in data[:2]  # not a pickle protocol header


def test_a_second_training_in_the_same_run_refuses(reference):
    with layout.locked(reference.run), pytest.raises(layout.RunError, match="another process is training"):
        pipeline.resume(reference.run, progress=False)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    config = tiny_config("train.optimizer=sgd", "train.lr=1e12")
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*train.lr is 1e\+12"):
        pipeline.train(config, tmp_path, name="nan", progress=False)


@pytest.mark.unit
def test_bad_input_leaves_no_run_directory(tmp_path):
    config = tiny_config("data.dataset=mnist")  # not available offline in the test sandbox
    with pytest.raises(DatasetUnavailable):
        pipeline.train(config, tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.unit
def test_run_names_never_collide(tmp_path):
    config = tiny_config()
    first, second = layout.new_run(config, tmp_path, None), layout.new_run(config, tmp_path, None)
    assert first != second and first.is_dir() and second.is_dir()
    with pytest.raises(layout.RunError, match="a run of that name exists"):
        layout.new_run(config, tmp_path, first.name)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_one_short_epoch_on_a_sample(preset, tmp_path):
    """Accuracy claims live in the benchmarks; this proves each preset runs end to end."""
    sample = "fashion-mnist-sample" if preset in ("fast", "best", "top") else "mnist-sample"
    config = load_config(preset, overrides=["epochs=1", "data.val_size=500"], data={"dataset": sample})
    result = pipeline.train(config, tmp_path, name=preset, progress=False)
    assert len(result.history) == 1 and 0.0 <= result.test.accuracy <= 1.0
    assert result.history[0]["train_loss"] == result.history[0]["train_loss"]  # not NaN
