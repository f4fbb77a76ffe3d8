"""Sweeps: W&B-style sweep files run as Optuna studies on the shipped sample, each trial a run directory."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from cnnlab import sweep as sweeps
from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.sweep.spec import parse_sweep, trial_config

runner = CliRunner()
TINY = {"first_layer_convs": 4, "dense_layer_size": 8, "epochs": 2, "train.threads": 1}  # ~1 s a trial on mnist-sample


def write_sweep(tmp_path: Path, parameters: dict, method: str = "grid", **extra) -> Path:
    data = dict(method=method, metric={"name": "val_acc", "goal": "maximize"}, model="seed",
                dataset="mnist-sample", set=dict(TINY, **extra.pop("set", {})), parameters=parameters, **extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweep_cli(*args: str):
    return runner.invoke(app, ["sweep", *args], catch_exceptions=False)


def study_of(tmp_path: Path, name: str = "sweep") -> optuna.Study:
    return sweeps.load_study(name, sweeps.default_storage(tmp_path / "runs", name))


def test_grid_sweep_runs_every_point_records_runs_and_writes_the_best_config(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"values": [0.0, 0.3]}, "train.lr": {"values": [1e-3, 3e-3]}})
    result = sweep_cli("run", str(file), "--trials", "10", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    trials = study_of(tmp_path).get_trials()
    assert len(trials) == 4  # the grid's size, though --trials asked for more
    assert {(t.params["dropout"], t.params["train.lr"]) for t in trials} == {(0.0, 1e-3), (0.0, 3e-3), (0.3, 1e-3),
                                                                           (0.3, 3e-3)}
    for t in trials:
        run = Path(t.user_attrs["run"])
        assert run == tmp_path / "runs" / "sweeps" / "sweep" / f"trial-{t.number}" and (run / "test.json").is_file()
        assert load_config(None, run / "config.yaml").train.lr == t.params["train.lr"]
    status = sweep_cli("status", "sweep", "--runs-dir", str(tmp_path / "runs"))
    assert "4 trials: 4 complete" in status.output and "best (maximize): trial" in status.output
    out = tmp_path / "best.yaml"
    best = sweep_cli("best", "sweep", "--out", str(out), "--runs-dir", str(tmp_path / "runs"))
    assert best.exit_code == 0, best.output
    config = load_config(None, out)  # a complete config `cnnlab train --config` accepts
    assert config.model.conv[0].filters == 4 and config.data.dataset == "mnist-sample"


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_sample_ranges_and_stop_at_the_trial_count(tmp_path, method):
    file = write_sweep(tmp_path, {"train.lr": {"min": 1e-4, "max": 1e-2, "distribution": "log_uniform_values"},
                                  "first_layer_convs": {"values": [2, 4]}}, method=method, set={"epochs": 1})
    result = sweep_cli("run", str(file), "--trials", "3", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    trials = study_of(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(1e-4 <= t.params["train.lr"] <= 1e-2 for t in trials)
    assert len({t.params["train.lr"] for t in trials}) == 3


def test_hyperband_prunes_a_hopeless_learning_rate(tmp_path):
    file = write_sweep(tmp_path, {"train.lr": {"values": [1e-3, 1e-7]}, "dropout": {"values": [0.0, 0.2]}},
                       early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2}, set={"epochs": 3})
    result = sweep_cli("run", str(file), "--trials", "4", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    pruned = [t for t in study_of(tmp_path).get_trials() if t.state == TrialState.PRUNED]
    assert pruned and all(t.params["train.lr"] == 1e-7 for t in pruned)
    assert all(not (Path(t.user_attrs["run"]) / "test.json").exists() for t in pruned)  # stopped before testing
    assert "pruned" in result.output


def test_status_says_why_a_trial_failed_and_lists_no_directory_it_never_made(tmp_path):
    # a 29x29 kernel does not fit a 28x28 image: the trial fails before its run directory exists
    file = write_sweep(tmp_path, {"model.conv.0.kernel_size": {"values": [3, 29]}}, set={"epochs": 1})
    assert sweep_cli("run", str(file), "--trials", "2", "--runs-dir", str(tmp_path / "runs")).exit_code == 0
    lines = sweep_cli("status", "sweep", "--runs-dir", str(tmp_path / "runs")).output.splitlines()
    rows = {line.split()[1]: line for line in lines if re.match(r"\s+\d+\s+\w+\s", line)}  # "    0  fail  ..."
    failed, complete = rows["fail"], rows["complete"]
    assert "(no run directory) failed: " in failed and "trial-" not in failed
    assert "kernel" in failed  # the trial's own error
    assert Path(complete.split()[-1]).is_dir()


def test_non_finite_objectives_and_diverged_trials_count_as_failed(tmp_path):
    # val_size=0: no validation split, so the objective is NaN; SGD at lr=1e12 makes the loss diverge.
    file = write_sweep(tmp_path, {"train.lr": {"values": [1e-3, 1e12]}},
                       set={"data.val_size": 0, "train.optimizer": "sgd"})
    result = sweep_cli("run", str(file), "--trials", "2", "--runs-dir", str(tmp_path / "runs"))
    # a sweep none of whose trials completed has no result: an error, not a success
    assert result.exit_code == 2, result.output
    assert "none of its 2 trials completed" in result.stderr and "Traceback" not in result.output
    trials = study_of(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    errors = sorted(t.user_attrs["error"] for t in trials)
    assert "the objective val_accuracy is nan" in errors[1] and "diverged" in errors[0]
    best = sweep_cli("best", "sweep", "--runs-dir", str(tmp_path / "runs"))
    assert best.exit_code != 0  # no trial to call best


@pytest.mark.unit
def test_unknown_key_is_an_error_before_anything_runs(tmp_path):
    file = write_sweep(tmp_path, {"dropotu": {"values": [0.1, 0.2]}})
    result = runner.invoke(app, ["sweep", "run", str(file), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "'dropotu'" in result.output and "did you mean 'dropout'" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_sweep_file_errors_name_the_problem(tmp_path):
    grid_range = write_sweep(tmp_path, {"train.lr": {"min": 1e-4, "max": 1e-2}})
    result = runner.invoke(app, ["sweep", "run", str(grid_range), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "method grid needs `values" in result.output
    missing = runner.invoke(app, ["sweep", "status", "nope", "--runs-dir", str(tmp_path / "runs")])
    assert missing.exit_code == 2 and "no sweep 'nope'" in missing.output


@pytest.mark.unit
def test_metric_names_and_override_values_keep_their_types():
    assert sweeps.parse_metric({"name": "val_acc", "goal": "maximize"}) == ("val_accuracy", "maximize")
    assert sweeps.parse_metric({"name": "val_loss"}) == ("val_loss", "minimize")
    spec = parse_sweep({"method": "random", "metric": {"name": "val_acc"}, "model": "seed",
                        "parameters": {"train.lr": {"min": 1e-8, "max": 1e-6}}})
    assert trial_config(spec, {"train.lr": 1e-7}).train.lr == 1e-7  # as text, "1e-07" read back as a string


@pytest.mark.unit
@pytest.mark.parametrize("extra, model", [
    ({"dataset": "shapes/"}, "photos"),  # a colour folder: what `cnnlab train --dataset shapes/` trains
    ({"dataset": "shapes/", "set": {"data.channels": 1}}, "seed"),  # read in grey
    ({"dataset": "fashion-mnist"}, "seed"),
    ({"dataset": "shapes/", "model": "seed"}, "seed"),  # named: kept
])
def test_a_sweep_that_names_no_model_trains_the_dataset_s_default_as_train_does(extra, model):
    spec = parse_sweep({"method": "random", "metric": {"name": "val_acc"},
                        "parameters": {"train.lr": {"min": 1e-3, "max": 1e-2}}, **extra})
    assert spec.model == model and trial_config(spec, {"train.lr": 0.005}).model.name == model
    assert (spec.model_line is not None) == (model == "photos" and "model" not in extra)


HOOKS = Path(__file__).with_name("sweep_hooks.py")  # cnnlab with test hooks: see that file


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    """Until the hooked process writes `path` (it then holds still), or fails, or a generous bound passes."""
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"the worker did not reach its first epoch (exit status {proc.poll()})"


def test_a_trial_stopped_by_ctrl_c_says_so_in_the_status(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"values": [0.0, 0.1, 0.2]}}, method="random", set={"epochs": 3})
    args = ["sweep", "run", str(file), "--trials", "2", "--runs-dir", str(tmp_path / "runs")]
    held = tmp_path / "held"  # the hook holds the worker after trial 0's first epoch
    proc = subprocess.Popen([sys.executable, str(HOOKS), *args], env=dict(os.environ, CNNLAB_TEST_HOLD=str(held)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(held, proc)
    proc.send_signal(signal.SIGINT)  # the first asks the trial to stop after its step; the hook holds it there
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # the second stops it at once
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    status = CliRunner().invoke(app, ["sweep", "status", "sweep", "--runs-dir", str(tmp_path / "runs")])
    assert "failed: interrupted (Ctrl-C or SIGTERM); queued again" in status.output, status.output
    assert "no error recorded" not in status.output


@pytest.mark.slow
def test_killed_sweep_resumes_and_leaves_no_trial_running(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"values": [0.0, 0.1, 0.2]}}, method="random", set={"epochs": 3})
    args = ["sweep", "run", str(file), "--trials", "2", "--runs-dir", str(tmp_path / "runs")]
    held = tmp_path / "held"  # the hook holds the worker after trial 0's first epoch: killed mid-trial, always
    proc = subprocess.Popen([sys.executable, str(HOOKS), *args], env=dict(os.environ, CNNLAB_TEST_HOLD=str(held)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(held, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    metrics = tmp_path / "runs" / "sweeps" / "sweep" / "trial-0" / "metrics.jsonl"
    assert metrics.is_file()
    assert study_of(tmp_path).get_trials()[0].state == TrialState.RUNNING  # what the kill left behind

    again = subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    trials = study_of(tmp_path).get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trials[0].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == trials[0].params
    assert len(sweeps.counted_trials(trials)) == 3 - 1 + 1 - 1 == 2  # the killed trial is replaced by its retry
    assert [t.state for t in sweeps.counted_trials(trials)] == [TrialState.COMPLETE] * 2


@pytest.mark.slow
def test_local_workers_share_one_journal_study(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"min": 0.0, "max": 0.5}}, method="random", set={"epochs": 1})
    result = sweep_cli("run", str(file), "--trials", "4", "--workers", "2", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    trials = study_of(tmp_path).get_trials()
    # the promise: the exact total, unique numbers, no point proposed twice; not which worker got which trial
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({t.params["dropout"] for t in trials}) == 4
    assert all(t.user_attrs["worker"] for t in trials)
