"""`cnnlab train --tensorboard`: event files in the run directory, read back as TensorBoard reads them;
resume, data-parallel, no tensorboard import without the flag, and the message when it is missing."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab import pipeline
from cnnlab.cli import app
from cnnlab.cli.training import training_callbacks
from cnnlab.config import load_config
from cnnlab.trackers.tensorboard import HPARAM_METRICS, TAGS, TensorBoardTracker
from cnnlab.training.engine import TrainingInterrupted
from conftest import StopAt, tiny_config, tiny_train_args

TINY_SET = ["first_layer_convs=4", "dense_layer_size=8"]  # the 4 filters the logged hyperparameters are checked for
TINY = ["train", *tiny_train_args("--set", TINY_SET[0], "--set", TINY_SET[1])]


def events(log_dir: Path):
    """Everything TensorBoard shows of a log folder (all its event files, purged steps hidden)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return accumulator.Reload()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_scalars_are_the_metrics(accumulator, run: Path) -> None:
    """Each metrics.jsonl value once, at its epoch, under its tag (float32 in the event file)."""
    rows = metrics(run)
    for key, tag in TAGS.items():
        logged = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        assert [step for step, _ in logged] == [row["epoch"] for row in rows], tag
        assert [value for _, value in logged] == pytest.approx([row[key] for row in rows], rel=1e-6), tag


def picture(accumulator, tag: str) -> tuple[int, Image.Image]:
    [event] = accumulator.Images(tag)
    return event.step, Image.open(io.BytesIO(event.encoded_image_string))


def test_train_with_tensorboard_logs_metrics_test_results_pictures_and_config(tmp_path):
    result = CliRunner().invoke(app, [*TINY, "--epochs", "2", "--runs-dir", str(tmp_path), "--name", "t",
                                      "--tensorboard"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "t"
    [_] = (run / "tensorboard").glob("events.out.tfevents.*")
    logged = events(run / "tensorboard")
    assert_scalars_are_the_metrics(logged, run)
    test = json.loads((run / "test.json").read_text())
    assert [(e.step, e.value) for e in logged.Scalars("test/accuracy")] == [(2, pytest.approx(test["accuracy"]))]
    assert [(e.step, e.value) for e in logged.Scalars("test/loss")] == [(2, pytest.approx(test["loss"]))]
    step, confusion = picture(logged, "test/confusion_matrix")
    assert step == 2 and confusion.format == "PNG" and min(confusion.size) > 300
    step, predictions = picture(logged, "test/predictions")
    assert step == 2 and predictions.width > predictions.height > 300  # 8 columns by 4 rows of 32 images
    [config] = logged.Tensors("config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert "dataset: mnist-sample" in text and "filters: 4" in text
    assert "Total params" in logged.Tensors("model/text_summary")[0].tensor_proto.string_val[0].decode()

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = logged.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["train.lr"].number_value == pytest.approx(0.001)
    assert hparams["data.dataset"].string_value == "mnist-sample"
    assert hparams["model.conv.0.filters"].number_value == 4
    assert "_hparams_/session_end_info" in content


def test_tensorboard_dir_holds_a_folder_per_run(tmp_path):
    logs = tmp_path / "logs"
    result = CliRunner().invoke(app, [*TINY, "--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--name", "d",
                                      "--tensorboard-dir", str(logs)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "d" / "tensorboard").exists()
    assert_scalars_are_the_metrics(events(logs / "d"), tmp_path / "runs" / "d")


def test_epochs_not_validated_log_no_validation_points(tmp_path):
    result = CliRunner().invoke(app, [*TINY, "--epochs", "3", "--set", "train.val_every=2", "--runs-dir",
                                      str(tmp_path), "--name", "v", "--tensorboard"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    logged = events(tmp_path / "v" / "tensorboard")
    assert [e.step for e in logged.Scalars("accuracy/val")] == [2, 3]  # not a NaN at epoch 1
    assert [e.step for e in logged.Scalars("accuracy/train")] == [1, 2, 3]


@pytest.mark.parametrize("logged_before", [True, False], ids=["logged-before", "first-logged-on-resume"])
def test_resume_appends_and_continues_by_epoch(tmp_path, logged_before):
    """Stopped in epoch 2 of 3, resumed from the command line: every epoch once, at its own step."""
    config = tiny_config(*TINY_SET, "epochs=3")
    first = [StopAt(2, 5), *([TensorBoardTracker(config)] if logged_before else [])]
    with pytest.raises(TrainingInterrupted):
        pipeline.train(config, tmp_path, name="cut", callbacks=first, progress=False)
    run = tmp_path / "cut"
    if logged_before:
        assert [e.step for e in events(run / "tensorboard").Scalars("loss/train")] == [1]
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet", "--tensorboard"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == (2 if logged_before else 1)
    logged = events(run / "tensorboard")
    assert [row["epoch"] for row in metrics(run)] == [1, 2, 3]
    assert_scalars_are_the_metrics(logged, run)
    assert [e.step for e in logged.Scalars("test/accuracy")] == [3]
    assert len(logged.Tensors("config/text_summary")) == 1  # the config is logged once, not per session


@pytest.mark.unit
def test_only_the_main_process_gets_trackers():
    """Under data-parallel training the other ranks log nothing (and print nothing)."""
    config = load_config("seed")
    worker = SimpleNamespace(is_main=False)
    assert training_callbacks(worker, False, config, None, True) == ([], [])  # type: ignore[arg-type]
    callbacks, trackers = training_callbacks(SimpleNamespace(is_main=True), True, config, None, True)  # type: ignore[arg-type]
    assert callbacks == trackers and [type(t) for t in trackers] == [TensorBoardTracker]


@pytest.mark.slow  # a torchrun job: 3 Python processes that import torch
def test_a_data_parallel_run_logs_once(tmp_path):
    args = [*TINY, "--epochs", "2", "--set", "data.val_size=200", "--nproc", "2", "--name", "ddp", "--tensorboard"]
    done = subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "runs" / "ddp"
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's writer only
    logged = events(run / "tensorboard")
    assert_scalars_are_the_metrics(logged, run)
    assert len(logged.Images("test/predictions")) == 1


def test_without_the_flag_tensorboard_is_never_imported(tmp_path):
    script = f"""
import sys
from typer.testing import CliRunner
from cnnlab.cli import app
result = CliRunner().invoke(app, {[*TINY, "--epochs", "1", "--runs-dir", str(tmp_path), "--name", "n"]!r})
assert result.exit_code == 0, result.output
print("loaded:", sorted(m for m in sys.modules if m.startswith(("tensorboard", "torch.utils.tensorboard",
                                                                 "cnnlab.trackers"))))
"""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout
    assert (tmp_path / "n" / "test.json").is_file() and not (tmp_path / "n" / "tensorboard").exists()


@pytest.mark.unit
@pytest.mark.parametrize("extra", [[], ["--nproc", "2"], ["--tensorboard-dir", "logs"]])
def test_without_the_package_one_line_says_how_to_install_it_before_any_run_exists(tmp_path, monkeypatch, extra):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec and import fail
    flag = [] if "--tensorboard-dir" in extra else ["--tensorboard"]
    result = CliRunner().invoke(app, [*TINY, "--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--name", "m",
                                      *flag, *extra])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: --tensorboard needs the tensorboard package: pip install 'cnnlab[tensorboard]'"]
    assert not (tmp_path / "runs").exists()
