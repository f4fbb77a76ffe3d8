"""Faults while training: SIGKILL at random moments, SIGTERM, a full or read-only disk, weights turning inf.

Whatever happens, a run keeps a readable checkpoint (or says clearly it has none yet), resuming ends
bitwise equal to never stopping, and no file with NaN or inf, and no temporary file, is left behind.
"""
from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cnnlab.files as files_module
import cnnlab.runs.checkpoints as checkpoints_module
import cnnlab.runs.weights as weights_module
from cnnlab import pipeline
from cnnlab.runs import layout, records
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.layout import RunError
from cnnlab.runs.weights import load_model
from cnnlab.training.callbacks import Callback
from cnnlab.training.engine import TrainingDiverged
from conftest import same_weights, tiny_config, tiny_overrides

# about 0.25 s an epoch on one thread: kills land in training, not only in start-up
CLI_SETTINGS = tiny_overrides("epochs=5", "batch_size=32")


def comparable(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in records.read_metrics(run)]


def temp_files(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------------------ killed processes
def start(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *args, "-q"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def train_args(name: str) -> list[str]:
    return ["--dataset", "mnist-sample", "--runs-dir", "runs", "--name", name,
            *[part for item in CLI_SETTINGS for part in ("--set", item)]]


def wait_for(process: subprocess.Popen, ready, timeout: float = 60.0) -> bool:
    """Poll every millisecond until ready() or the process ends; True when ready() came first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.001)
    return False


def lines(run: Path) -> int:
    try:
        return len(layout.path(run, "metrics").read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_when(process: subprocess.Popen, moment: str, run: Path, rng: random.Random) -> None:
    """SIGKILL at `moment`: while a checkpoint is being written, right after an epoch's line, or at random."""
    if moment == "mid-save":  # a temporary checkpoint file exists: a write after the first is under way
        wait_for(process, lambda: lines(run) >= 1)
        wait_for(process, lambda: any(n.startswith(".checkpoint") for n in os.listdir(run)))
    elif moment == "epoch-end":
        first = lines(run)
        wait_for(process, lambda: lines(run) > first)
    else:  # at a random moment of the epoch after the first (before it, resume has nothing: tested apart),
        # measured in that machine's own epochs, so a fast or a busy machine kills inside the run alike
        wait_for(process, lambda: lines(run) >= 1)
        epoch_seconds = json.loads(layout.path(run, "metrics").read_text().splitlines()[-1])["seconds"]
        time.sleep(rng.uniform(0.0, 1.0) * epoch_seconds)
    process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory) -> Path:
    """The uninterrupted run, trained by the same command on this machine."""
    root = tmp_path_factory.mktemp("reference")
    process = start(root, *train_args("ref"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return root / "runs" / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("moments", [("mid-save", "epoch-end"), ("random", "random"), ("epoch-end", "mid-save")],
                         ids=["mid-save-then-epoch-end", "random-twice", "epoch-end-then-mid-save"])
def test_sigkill_then_resume_ends_bitwise_equal(cli_reference, tmp_path, moments):
    """Killed twice (the second time while resuming), then resumed to the end: the same run as never killed."""
    rng = random.Random(f"{moments}")
    run = tmp_path / "runs" / "cut"
    process = start(tmp_path, *train_args("cut"))
    for i, moment in enumerate(moments):
        kill_when(process, moment, run, rng)
        assert process.returncode == -signal.SIGKILL, f"kill {i + 1} came too late: the run had finished"
        state, warnings = load_checkpoint(run)  # always a readable one
        assert not warnings and 1 <= state["epoch"] <= 5
        process = start(tmp_path, "--resume", str(run))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert same_weights(cli_reference, run)
    assert comparable(run) == comparable(cli_reference)
    assert layout.path(run, "test").read_text() == layout.path(cli_reference, "test").read_text()
    assert not temp_files(run)


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_says_there_is_none(tmp_path):
    process = start(tmp_path, *train_args("early"))
    run = tmp_path / "runs" / "early"
    assert wait_for(process, lambda: layout.path(run, "manifest").is_file())
    process.kill()
    process.communicate()
    resumed = start(tmp_path, "--resume", str(run))
    _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 2
    assert stderr.splitlines() == [f"error: {Path('runs/early')}: no checkpoint to resume from: training stopped "
                                   f"before the end of its first epoch (or was never started here); train it "
                                   f"again under a new name"] or "no checkpoint to resume from" in stderr


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_130_and_resumes_bitwise_equal(cli_reference, tmp_path):
    run = tmp_path / "runs" / "term"
    process = start(tmp_path, *train_args("term"))
    wait_for(process, lambda: lines(run) >= 1)  # the handler is installed once training runs
    time.sleep(0.1)  # into epoch 2
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"Continue with: cnnlab train --resume {Path('runs/term')}" in stderr
    state, _ = load_checkpoint(run)
    assert state["step"] > 0 or state["epoch"] >= 2  # mid-epoch, unless the signal met an epoch's end
    resumed = start(tmp_path, "--resume", str(run))
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert same_weights(cli_reference, run) and comparable(run) == comparable(cli_reference)
    assert not temp_files(run)


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc): a folder run's decoding workers while it trains."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_stops_a_folder_run_as_documented(signum, tmp_path):
    """`timeout` and a terminal signal every process of the group, the DataLoader's workers too. A worker
    that died of SIGTERM made the main process fail with torch's "DataLoader worker ... killed by signal"."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / name / f"{i}.png")
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "train", "--dataset", "folder", "--model", "seed", "--runs-dir", "runs",
         "--name", "group", "-q", *[part for item in ("epochs=10000", "batch_size=4", "data.image_size=8",
                                                     "data.workers=2", "data.memory_mb=0", "train.threads=1")
                                    for part in ("--set", item)]],  # streamed: the workers live while it trains
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_for(process, lambda: len(children(process.pid)) == 2, timeout=120), process.communicate()
        os.killpg(process.pid, signum)  # as `timeout` does: the main process and both workers
        _, stderr = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr
    assert f"Continue with: cnnlab train --resume {Path('runs/group')}" in stderr.strip().splitlines()[-1]


@pytest.mark.unit
def test_every_dataloader_in_cnnlab_is_the_one_whose_workers_ignore_stop_signals():
    """The rule behind the test above: no other DataLoader can start workers that die of a group's signal."""
    source = Path(__file__).resolve().parents[1] / "src" / "cnnlab"
    made = [f"{file.relative_to(source)}:{node.lineno}" for file in source.rglob("*.py")
            for node in ast.walk(ast.parse(file.read_text())) if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "DataLoader"]
    assert made == [], f"use cnnlab.data.workers.WorkerLoader instead: {made}"


SIGNAL_IN_THE_TEST_PASS = """
import os, signal, sys
from cnnlab import pipeline
from cnnlab.cli import app
real_test_run = pipeline.test_run
def signalled_test_run(*args, **kwargs):  # the signal arrives as the run's test pass starts
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real_test_run(*args, **kwargs)
pipeline.test_run = signalled_test_run
app(sys.argv[2:])
"""
SWEEP = """
method: grid
metric: {name: val_acc, goal: maximize}
model: seed
dataset: mnist-sample
set: {first_layer_convs: 4, dense_layer_size: 8, epochs: 1}
parameters:
  dropout: {values: [0.0, 0.2]}
"""


def test_a_signal_while_a_sweep_trial_tests_records_the_trial_and_stops_the_sweep(tmp_path):
    import optuna

    from cnnlab import sweep as sweeps

    (tmp_path / "sweep.yaml").write_text(SWEEP)
    done = subprocess.run([sys.executable, "-c", SIGNAL_IN_THE_TEST_PASS, "SIGINT", "sweep", "run",
                           str(tmp_path / "sweep.yaml"), "--trials", "2", "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "stopped after trial 0, which is recorded. Resume with the same command" in done.stderr
    # the command printed resumes this sweep: its options are in it (without them it started a new one)
    assert f"--trials 2 --runs-dir {tmp_path / 'runs'})" in done.stderr
    trials = sweeps.load_study("sweep", sweeps.default_storage(tmp_path / "runs", "sweep")).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]  # the second never started


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_after_the_last_step_lets_the_run_finish_its_test_and_files(tmp_path, name):
    """Training is done; the seconds that test and write the run finish rather than leave it half made."""
    run = tmp_path / "runs" / "late"
    done = subprocess.run([sys.executable, "-c", SIGNAL_IN_THE_TEST_PASS, name, "train", "--set", "epochs=1",
                           "--set", "model.conv.0.filters=4", "--set", "dense_layer_size=16",
                           "--set", "train.threads=1", "--runs-dir", str(tmp_path / "runs"), "--name", "late", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr  # the stop still reaches the caller (a shell loop, a scheduler)
    assert "test accuracy" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == \
        "error: stopped as asked, after the run was complete (its test and files are written)"
    assert all(layout.path(run, key).is_file() for key in ("test", "confusion", "weights", "metrics"))
    assert not temp_files(run)


# ---------------------------------------------------------------------------- full or read-only disk
@pytest.fixture(scope="module")
def reference(tiny_result) -> Path:
    return tiny_result.run  # the suite's shared tiny run: the same config, trained without a fault


def fail_on(monkeypatch, what: str, error: int, at: int) -> None:
    """Make the `at`-th write of `what` fail with `error` after writing half a file (as a full disk does)."""
    seen = []
    if what in ("checkpoint", "weights"):
        real = weights_module.save_file
        wanted = {"checkpoint": "cnnlab-checkpoint-1", "weights": "cnnlab-weights-1"}[what]

        def save_file(tensors, filename, metadata=None):
            if (metadata or {}).get("format") == wanted:
                seen.append(filename)
                if len(seen) == at:
                    Path(filename).write_bytes(b"\0" * 100)
                    raise OSError(error, os.strerror(error))
            return real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(weights_module, "save_file", save_file)
        monkeypatch.setattr(checkpoints_module, "save_file", save_file)
    else:  # the rename that puts a new checkpoint in place
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == "checkpoint.safetensors":
                seen.append(dst)
                if len(seen) == at:
                    raise OSError(error, os.strerror(error), str(dst))
            return real_replace(src, dst)

        monkeypatch.setattr(files_module.os, "replace", replace)


@pytest.mark.parametrize("what, error", [("checkpoint", errno.ENOSPC), ("weights", errno.ENOSPC),
                                         ("rename", errno.EROFS)])
def test_a_failed_save_stops_loudly_and_keeps_the_last_checkpoint(reference, tmp_path, monkeypatch, what, error):
    with monkeypatch.context() as patch:
        fail_on(patch, what, error, at=2)  # the end of epoch 2
        with pytest.raises(RunError) as failure:
            pipeline.train(tiny_config(), tmp_path, name="full", progress=False)
    run = tmp_path / "full"
    message = str(failure.value)
    assert str(run) in message and os.strerror(error) in message and errno.errorcode[error] in message
    assert f"cnnlab train --resume {run}" in message
    assert not temp_files(run)
    state, warnings = load_checkpoint(run)
    assert not warnings and state["epoch"] == 1
    assert layout.path(run, "checkpoint").is_file()  # never moved away, whatever failed
    pipeline.resume(run, progress=False)
    assert same_weights(reference, run) and comparable(run) == comparable(reference)


# ------------------------------------------------------------------------------------ never inf
class Poison(Callback):
    """Turn one weight into inf after the last step of epoch `epoch` (after the optimizer, before saving)."""

    def __init__(self, epoch: int, value: float = float("inf")):
        self.epoch, self.value = epoch, value

    def on_batch_end(self, progress, loss, accuracy):
        if progress.epoch + 1 == self.epoch and progress.step == progress.steps:
            with torch.no_grad():
                progress.model.head.classifier.weight[0, 0] = self.value


def test_weights_that_turn_non_finite_are_never_saved(tmp_path):
    config = tiny_config()
    with pytest.raises(RunError, match=r"model.safetensors not saved: tensor .* holds inf values"):
        pipeline.train(config, tmp_path, name="first", callbacks=[Poison(1)], progress=False)
    first = tmp_path / "first"
    assert not layout.path(first, "checkpoint").exists() and not layout.path(first, "weights").exists()
    assert not layout.path(first, "metrics").exists()
    with pytest.raises(RunError, match="holds nan values"):
        pipeline.train(config, tmp_path, name="second", callbacks=[Poison(2, float("nan"))], progress=False)
    second = tmp_path / "second"
    state, warnings = load_checkpoint(second)
    assert not warnings and state["epoch"] == 1 and [m["epoch"] for m in records.read_metrics(second)] == [1]
    model, _, _ = load_model(second)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not temp_files(second)


def test_a_huge_learning_rate_leaves_only_finite_files(tmp_path):
    config = tiny_config("epochs=1", "train.optimizer=sgd", "train.lr=1e6")
    # diverges as a NaN loss, or as weights that are refused, or not at all: files stay finite
    with contextlib.suppress(TrainingDiverged, RunError):
        pipeline.train(config, tmp_path, name="lr", progress=False)
    for key in ("weights", "checkpoint", "previous_checkpoint"):
        file = layout.path(tmp_path / "lr", key)
        if file.exists():
            assert all(torch.isfinite(t).all() for t in load_file(str(file)).values() if t.is_floating_point())
