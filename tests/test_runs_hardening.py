"""Runs a user or a crash left in a strange state: resumed truthfully, refused with one line, or listed
with their problem, never a false success or a traceback."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.runs import layout
from conftest import tiny_train_args, weights
from use_runs import tiny_run

runner = CliRunner()
DIGIT = Path(__file__).resolve().parents[1] / "docs" / "img" / "digit.png"
SHORT = tiny_train_args("--epochs", "1", "--set", "first_layer_convs=4", "--set", "dense_layer_size=16")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["train", *SHORT, "--runs-dir", str(root), "--name", "done"])
    assert result.exit_code == 0, result.output
    return root / "done"


@pytest.fixture
def copy(finished, tmp_path):
    def make(name: str = "r") -> Path:
        return Path(shutil.copytree(finished, tmp_path / name))
    return make


def resume(run: Path):
    return runner.invoke(app, ["train", "--resume", str(run), "--quiet"])


# ---------------------------------------------------------------- resuming a finished run
def poisoned(run: Path) -> None:
    tensors = {k: v.clone() for k, v in weights(run).items()}
    tensors["head.classifier.bias"][0] = float("nan")
    save_file(tensors, str(layout.path(run, "weights")), metadata={"format": "cnnlab-weights-1",
              "input_shape": "[28, 28, 1]", "classes": json.dumps([str(d) for d in range(10)])})


def replaced(run: Path, other: Path) -> None:
    shutil.copy(layout.path(other, "weights"), layout.path(run, "weights"))


@pytest.mark.parametrize("damage", ["missing", "non-finite", "replaced"])
def test_resuming_a_finished_run_restores_its_model_file_from_the_checkpoint(finished, copy, tmp_path, damage):
    run = copy()
    expected = weights(finished)
    if damage == "missing":
        layout.path(run, "weights").unlink()
    elif damage == "non-finite":
        poisoned(run)
    else:
        trained = runner.invoke(app, ["train", *SHORT, "--seed", "5", "--runs-dir", str(tmp_path / "o"),
                                      "--name", "other"])
        assert trained.exit_code == 0, trained.output
        replaced(run, tmp_path / "o" / "other")
    result = resume(run)
    assert result.exit_code == 0, result.output
    assert "model.safetensors was" in result.output and "rewritten from the checkpoint" in result.output
    restored = weights(run)
    assert all(torch.equal(restored[k], expected[k]) for k in expected)
    predicted = runner.invoke(app, ["predict", str(run), "--json", str(DIGIT)])
    assert predicted.exit_code == 0, predicted.output


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_run_keeps_its_last_checkpoint_only_unless_asked(tmp_path, keep):
    """Two epochs write two checkpoints: a finished run keeps the last (all --resume reads), both with
    --keep-checkpoints; either way --resume still restores a lost model file."""
    flag = ["--keep-checkpoints"] if keep else []
    result = runner.invoke(app, ["train", *SHORT, "--epochs", "2", "--runs-dir", str(tmp_path), "--name", "two", *flag])
    assert result.exit_code == 0, result.output
    run = tmp_path / "two"
    assert layout.path(run, "checkpoint").is_file()
    assert layout.path(run, "previous_checkpoint").is_file() == keep
    assert yaml.safe_load(layout.path(run, "config").read_text())["train"]["keep_checkpoints"] == keep
    expected = weights(run)
    layout.path(run, "weights").unlink()
    result = resume(run)
    assert result.exit_code == 0 and "rewritten from the checkpoint" in result.output, result.output
    restored = weights(run)
    assert all(torch.equal(restored[k], value) for k, value in expected.items())


def test_the_previous_checkpoint_stays_when_the_last_is_unreadable(tmp_path):
    from cnnlab.runs.checkpoints import load_checkpoint, prune_finished

    result = runner.invoke(app, ["train", *SHORT, "--epochs", "2", "--runs-dir", str(tmp_path), "--name", "two",
                                 "--keep-checkpoints"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "two"
    layout.path(run, "checkpoint").write_bytes(b"torn")
    assert not prune_finished(run)
    assert load_checkpoint(run)[0]["epoch"] == 1  # the fallback is still there to resume from


def test_resume_refuses_keep_checkpoints(copy):
    result = runner.invoke(app, ["train", "--resume", str(copy()), "--keep-checkpoints"])
    assert result.exit_code != 0 and "drop --keep-checkpoints" in result.output


def test_resuming_an_intact_finished_run_changes_nothing(copy):
    run = copy()
    before = layout.path(run, "weights").read_bytes()
    result = resume(run)
    assert result.exit_code == 0 and "rewritten" not in result.output
    assert layout.path(run, "weights").read_bytes() == before


@pytest.mark.parametrize("key,value,change", [
    ("epochs", 3, "train.epochs: 1 -> 3"),  # would need a longer one-cycle schedule than the checkpoint has
    ("lookahead", True, "train.lookahead: False -> True"),  # the checkpoint has no slow weights either
])
def test_a_config_edited_since_the_checkpoint_is_refused(copy, key, value, change):
    run = copy()
    config = yaml.safe_load(layout.path(run, "config").read_text())
    config["train"][key] = value
    layout.path(run, "config").write_text(yaml.safe_dump(config))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = resume(run)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: ")
    assert f"config.yaml was edited after the checkpoint was written ({change})" in result.output, result.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_checkpoint_from_before_a_key_existed_resumes(copy):
    """A run written by an older cnnlab has no `train.compile` in its config or checkpoint: at its default, the
    key changes nothing that run trained with, so resuming it is no edit."""
    from cnnlab.runs.checkpoints import read_checkpoint, save_checkpoint

    run = copy()
    config = yaml.safe_load(layout.path(run, "config").read_text())
    del config["train"]["compile"]
    layout.path(run, "config").write_text(yaml.safe_dump(config))
    state = read_checkpoint(layout.path(run, "checkpoint"))
    del state["config"]["train"]["compile"]
    save_checkpoint(run, state)
    result = resume(run)
    assert result.exit_code == 0 and "edited" not in result.output, result.output


def test_a_disk_full_before_the_first_checkpoint_does_not_promise_a_resume(tmp_path, monkeypatch):
    import errno

    import cnnlab.runs.weights as weights_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(weights_module, "save_file", full)
    result = runner.invoke(app, ["train", *SHORT, "--runs-dir", str(tmp_path), "--name", "full"])
    assert result.exit_code == 2
    assert "No space left on device (ENOSPC)" in result.output and "nothing to resume" in result.output
    assert "--resume" not in result.output


# ---------------------------------------------------------------- run names
@pytest.mark.unit
@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", ".hidden", "..", " "])
def test_names_that_leave_the_runs_folder_are_refused(tmp_path, name):
    result = runner.invoke(app, ["train", *SHORT, "--runs-dir", str(tmp_path / "runs"), "--name", name])
    assert result.exit_code == 2 and "error: run name" in result.output and "expected one folder name" in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


def test_a_name_that_is_not_utf8_is_refused(tmp_path):
    done = subprocess.run([os.fsencode(sys.executable), b"-m", b"cnnlab", b"train", *(a.encode() for a in SHORT),
                           b"--runs-dir", os.fsencode(tmp_path / "runs"), b"--name", b"caf\xe9"],
                          capture_output=True, timeout=300)
    assert done.returncode == 2 and b"not valid UTF-8" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


def test_unicode_and_spaces_in_names_work(tmp_path):
    result = runner.invoke(app, ["train", *SHORT, "--runs-dir", str(tmp_path), "--name", "café au lait ☕"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "café au lait ☕" / "model.safetensors").is_file()


# ---------------------------------------------------------------- files left behind
def test_one_bad_run_does_not_hide_the_others(copy, tmp_path):
    copy("good")
    garbled, piped = copy("garbled"), copy("piped")
    layout.path(garbled, "test").write_text('{"accuracy": "high"}')  # the wrong type: shown as unknown
    layout.path(garbled, "metrics").write_text("[1, 2]\n")  # a JSON array where an epoch's object belongs
    layout.path(piped, "config").unlink()
    os.mkfifo(layout.path(piped, "config"))  # would block a reader forever
    result = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["run"]: row for row in json.loads(result.output)}
    assert set(rows) == {"good", "garbled", "piped"}
    assert rows["good"]["error"] is None and rows["good"]["test_accuracy"] is not None
    assert "metrics.jsonl: line 1 is a JSON list" in rows["garbled"]["error"]
    assert "a FIFO (named pipe), not a regular file" in rows["piped"]["error"]
    table = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path)])
    assert table.exit_code == 0 and "problem" in table.output


def test_a_fifo_where_the_weights_belong_is_refused_without_blocking(copy):
    run = copy()
    layout.path(run, "weights").unlink()
    os.mkfifo(layout.path(run, "weights"))
    done = subprocess.run([sys.executable, "-m", "cnnlab", "evaluate", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "model.safetensors: a FIFO (named pipe), not a regular file" in done.stderr


def test_evaluate_on_a_read_only_run_prints_the_evaluation_then_one_line_on_what_was_not_saved(monkeypatch):
    """It printed only the EROFS error. Simulated (the tests run as root): every rename into the run fails."""
    run = tiny_run()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    real_replace = os.replace

    def read_only(source, target, *args, **kwargs):
        if Path(target).parent == run:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only)
    for json_ in ([], ["--json"]):
        done = CliRunner().invoke(app, ["evaluate", str(run), *json_])
        assert done.exit_code == 2
        lines = done.output.strip().splitlines()
        assert lines[-1].startswith(f"error: {run}: the evaluation was not saved (")
        assert "Read-only file system" in lines[-1] and "test.json is as it was" in lines[-1]
        if json_:
            assert json.loads(lines[0])["accuracy"] == json.loads(before["test.json"])["accuracy"]
        else:
            assert any(line.startswith("test accuracy") for line in lines)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing half-written, no temporary file


@pytest.mark.parametrize("line, said", [
    ('{"epoch": "x", "train_loss": 1.0}', 'epoch is "x", expected a whole number'),
    ('{"epoch": 1, "train_loss": "abc"}', 'train_loss is "abc", expected a number'),
])
def test_a_metrics_value_of_the_wrong_type_is_one_line_not_a_traceback(tmp_path, line, said):
    run = shutil.copytree(tiny_run("mnist-sample"), tmp_path / "run")
    layout.path(run, "metrics").write_text(line + "\n")
    for command in (["show", "curves", str(run), "--out", str(tmp_path / "c.png")],
                    ["report", str(run), "--out", str(tmp_path / "r.html")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert f"metrics.jsonl: line 1: {said}" in result.output and "Traceback" not in result.output
