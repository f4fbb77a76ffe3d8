"""Sweeps under faults: a torn or full journal, resumed and concurrent sweeps, bad sweep files, files that
are not what they should be. Each error is one line naming the file or key, never a traceback or a hang."""
from __future__ import annotations

import contextlib
import errno
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from cnnlab import sweep as sweeps
from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.runs.records import save_config
from cnnlab.sweep.spec import SweepError, parse_sweep, trial_config
from cnnlab.sweep.study import env_seconds, open_storage, trial_sampler

runner = CliRunner()
TINY = {"first_layer_convs": 4, "dense_layer_size": 8, "epochs": 1, "train.threads": 1}
HOOKS = Path(__file__).with_name("sweep_hooks.py")  # cnnlab with test hooks: see that file


def write_sweep(tmp_path: Path, parameters: dict, method: str = "random", **extra) -> Path:
    fixed = extra.pop("set", {})
    data = dict(method=method, metric={"name": "val_acc", "goal": "maximize"}, model="seed",
                dataset="mnist-sample", set=dict(TINY, **fixed) if isinstance(fixed, dict) else fixed,
                parameters=parameters)
    data.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str):
    return runner.invoke(app, ["sweep", *args])


def one_line_error(result, *fragments: str) -> str:
    """The command failed with exit status 2 and exactly one line on stderr, `error: ...`, holding each fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def journal(tmp_path: Path, name: str = "sweep") -> Path:
    return Path(sweeps.default_storage(tmp_path / "runs", name))


def study_of(tmp_path: Path, name: str = "sweep") -> optuna.Study:
    return sweeps.load_study(name, str(journal(tmp_path, name)))


def points(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.get_trials()]


def fake_study(tmp_path: Path, name: str = "fake", config: bool = True) -> Path:
    """A journal study with one complete trial whose run holds a valid config.yaml (no training); its run."""
    run = tmp_path / "runs" / "sweeps" / name / "trial-0"
    run.mkdir(parents=True)
    if config:
        save_config(run, load_config("seed", None, ["epochs=1"], data={"dataset": "mnist-sample"}))
    study = optuna.create_study(study_name=name, storage=open_storage(str(journal(tmp_path, name))),
                                direction="maximize")
    study.add_trial(create_trial(params={"dropout": 0.1}, distributions={"dropout": FloatDistribution(0, 0.5)},
                                 value=0.5, user_attrs={"run": str(run)}))
    return run


def journal_lines_whole(path: Path) -> bool:
    data = path.read_bytes()
    return data.endswith(b"\n") and all(isinstance(yaml.safe_load(line), dict) for line in data.splitlines())


# -------------------------------------------------------------------------- 1. torn and full journals
def full_journal(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Disk full for the journal after `after` of its writes: the next ones land only in part, then fail."""
    real_fsync, count = os.fsync, [0]

    def fsync(fd: int) -> None:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if name.endswith("optuna.journal"):
            count[0] += 1
            if count[0] > after:
                with contextlib.suppress(OSError):  # the disk took only part of the record
                    os.ftruncate(fd, max(0, os.fstat(fd).st_size - 7))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_during_a_sweep_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    file = write_sweep(tmp_path, {"dropout": {"min": 0.0, "max": 0.5}})
    args = ["run", str(file), "--trials", "3", "--runs-dir", str(tmp_path / "runs")]
    full_journal(monkeypatch, after=8)  # mid-trial: the study and trial 0 are recorded, its first epoch is not
    error = one_line_error(cli(*args), str(journal(tmp_path)), "No space left on device (ENOSPC)", "rerun")
    assert "cnnlab sweep run" in error
    assert journal_lines_whole(journal(tmp_path))  # the failed write was cut back off

    monkeypatch.undo()  # space freed
    again = cli(*args)
    assert again.exit_code == 0, again.output
    trials = study_of(tmp_path).get_trials()
    assert [t.state for t in sweeps.counted_trials(trials)] == [TrialState.COMPLETE] * 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert cli("status", "sweep", "--runs-dir", str(tmp_path / "runs")).exit_code == 0
    assert cli("best", "sweep", "--out", str(tmp_path / "best.yaml"), "--runs-dir", str(tmp_path / "runs")
               ).exit_code == 0


def test_a_journal_cut_mid_record_is_recovered_and_the_sweep_goes_on(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"min": 0.0, "max": 0.5}})
    runs = str(tmp_path / "runs")
    assert cli("run", str(file), "--trials", "2", "--runs-dir", runs).exit_code == 0
    torn = b'{"op_code":4,"worker_id":"a-b-c","trial_id":2,"st'  # what a write cut off by a full disk leaves
    with open(journal(tmp_path), "ab") as handle:
        handle.write(torn)

    again = cli("run", str(file), "--trials", "3", "--runs-dir", runs)
    assert again.exit_code == 0, again.output
    warnings = [line for line in again.stderr.splitlines() if "recovered" in line]
    assert len(warnings) == 1 and str(journal(tmp_path)) in warnings[0]
    kept = list(journal(tmp_path).parent.glob("optuna.journal.torn-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == torn
    assert journal_lines_whole(journal(tmp_path))
    status = cli("status", "sweep", "--runs-dir", runs)
    assert status.exit_code == 0 and "3 trials: 3 complete" in status.output
    best = cli("best", "sweep", "--out", str(tmp_path / "best.yaml"), "--runs-dir", runs)
    assert best.exit_code == 0, best.output


@pytest.mark.unit
def test_a_journal_written_on_after_a_torn_record_is_cut_at_that_record(tmp_path):
    fake_study(tmp_path)
    path = journal(tmp_path, "fake")
    whole = path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    path.write_bytes(whole + b'{"op_code":4,"wor' + last + last)  # an old rerun appended onto a torn line
    status = cli("status", "fake", "--runs-dir", str(tmp_path / "runs"))
    assert status.exit_code == 0, status.output
    assert "recovered" in status.stderr and "1 trials: 1 complete" in status.output
    assert path.read_bytes() == whole
    assert next(path.parent.glob("optuna.journal.torn-*")).read_bytes() == b'{"op_code":4,"wor' + last + last


@pytest.mark.unit
def test_a_file_that_is_no_journal_is_refused_and_left_as_it_is(tmp_path):
    path = journal(tmp_path, "other")
    path.parent.mkdir(parents=True)
    path.write_text('{"epoch": 1, "loss": 0.5}\n')
    one_line_error(cli("status", "other", "--runs-dir", str(tmp_path / "runs")), str(path), "not an Optuna journal")
    assert path.read_text() == '{"epoch": 1, "loss": 0.5}\n' and not list(path.parent.glob("*.torn-*"))


# ------------------------------------------------------------------ 2. resumed and concurrent sweeps
@pytest.mark.parametrize("method", ["random", "bayes"])
def test_a_resumed_sweep_proposes_new_points(tmp_path, method):
    file = write_sweep(tmp_path, {"dropout": {"min": 0.0, "max": 0.5}}, method=method)
    runs = str(tmp_path / "runs")
    assert cli("run", str(file), "--trials", "3", "--runs-dir", runs).exit_code == 0
    assert cli("run", str(file), "--trials", "6", "--runs-dir", runs).exit_code == 0
    study = study_of(tmp_path)
    assert len(study.get_trials()) == 6 and len(set(points(study))) == 6


def test_a_resumed_grid_visits_each_point_once(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"values": [0.0, 0.3]}, "train.lr": {"values": [1e-3, 3e-3]}},
                       method="grid")
    runs = str(tmp_path / "runs")
    assert cli("run", str(file), "--trials", "2", "--runs-dir", runs).exit_code == 0
    assert cli("run", str(file), "--trials", "10", "--runs-dir", runs).exit_code == 0
    assert sorted(points(study_of(tmp_path))) == sorted(
        (("dropout", d), ("train.lr", lr)) for d in (0.0, 0.3) for lr in (1e-3, 3e-3))


@pytest.mark.unit
def test_each_trial_has_its_own_seed_and_a_study_is_reproducible():
    spec = parse_sweep({"method": "random", "parameters": {"dropout": {"min": 0.0, "max": 0.5}}})

    def sample(n: int) -> list[float]:
        study = optuna.create_study()
        values = []
        for _ in range(n):
            trial = study.ask()
            study.sampler = trial_sampler(spec, trial.number)
            values.append(spec.parameters[0].suggest(trial))
            study.tell(trial, 0.5)
        return values

    first = sample(6)
    assert len(set(first)) == 6 and sample(6) == first
    assert trial_sampler(parse_sweep({"method": "grid", "parameters": {"dropout": {"values": [0.1]}}}), 0) is None


@pytest.mark.slow
def test_two_invocations_started_together_share_the_total_and_never_repeat_a_point(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"min": 0.0, "max": 0.5}})
    barrier = tmp_path / "barrier"  # each waits on its first trial until both have one: both propose points
    barrier.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", CNNLAB_TEST_BARRIER=f"{barrier}:2")
    command = [sys.executable, str(HOOKS), "sweep", "run", str(file), "--trials", "6", "--runs-dir",
               str(tmp_path / "runs")]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-4000:] for _, err in outputs]
    trials = study_of(tmp_path).get_trials()
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len(set(points(study_of(tmp_path)))) == 6


# ----------------------------------------------------------------------- 3. output files, refused
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # so a write that was not refused cannot block
    yield path
    os.close(reader)


@pytest.mark.unit
@pytest.mark.parametrize("target", ["fifo", "folder", "/dev/null"])
def test_best_out_refuses_what_is_not_a_regular_file(tmp_path, fifo, target):
    fake_study(tmp_path)
    (tmp_path / "folder").mkdir()
    out = target if target.startswith("/") else str(tmp_path / target)
    one_line_error(cli("best", "fake", "--out", out, "--runs-dir", str(tmp_path / "runs")), out)


@pytest.mark.unit
@pytest.mark.parametrize("target", ["fifo", "folder", "sweep.xyz"])
def test_status_plot_refuses_what_it_cannot_write(tmp_path, fifo, target):
    fake_study(tmp_path)
    (tmp_path / "folder").mkdir()
    result = cli("status", "fake", "--plot", str(tmp_path / target), "--runs-dir", str(tmp_path / "runs"))
    one_line_error(result, str(tmp_path / target))
    assert "trial" not in result.stdout  # refused before the study was read


@pytest.mark.unit
def test_best_and_plot_write_whole_files_or_leave_the_old_one(tmp_path, monkeypatch):
    fake_study(tmp_path)
    runs = str(tmp_path / "runs")
    plot = tmp_path / "sweep.png"
    assert cli("status", "fake", "--plot", str(plot), "--runs-dir", runs).exit_code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "best.yaml"
    assert cli("best", "fake", "--out", str(out), "--runs-dir", runs).exit_code == 0
    assert load_config(None, out).data.dataset == "mnist-sample"
    before = out.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    one_line_error(cli("best", "fake", "--out", str(out), "--runs-dir", runs), str(out), "ENOSPC")
    assert out.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


# -------------------------------------------------------------------- 4. range checks in the sweep file
BAD_PARAMETERS = [
    ({"dropout": {"min": 0.5, "max": 0.1}}, "parameters.dropout: min 0.5 is more than max 0.1"),
    ({"dropout": {"min": math.nan, "max": 0.5}}, "parameters.dropout.min"),
    ({"dropout": {"min": 0.0, "max": math.inf}}, "parameters.dropout.max"),
    ({"train.lr": {"min": 0.0, "max": 0.1, "distribution": "log_uniform_values"}}, "parameters.train.lr.min"),
    ({"train.lr": {"min": -1.0, "max": 0.1, "distribution": "log_uniform_values"}}, "parameters.train.lr.min"),
    ({"train.lr": {"min": -5, "max": 1000, "distribution": "log_uniform"}}, "parameters.train.lr"),
    ({"dropout": {"min": 0.0, "max": 0.5, "distribution": "q_uniform", "q": 0}}, "parameters.dropout.q"),
    ({"dropout": {"min": 0.0, "max": 0.5, "distribution": "q_uniform", "q": -0.1}}, "parameters.dropout.q"),
    ({"dropout": {"min": 0.0, "max": 0.5, "q": 0.1}}, "parameters.dropout.q"),
    ({"first_layer_convs": {"min": 2.5, "max": 8, "distribution": "int_uniform"}}, "parameters.first_layer_convs"),
    ({"dropout": {"values": []}}, "parameters.dropout.values"),
    ({"dropout": {"values": 0.1}}, "parameters.dropout.values"),
    ({"dropout": {"values": [{"a": 1}]}}, "parameters.dropout.values"),
    ({"dropout": {"values": [0.1, 0.1]}}, "parameters.dropout.values"),
    ({"dropout": {"min": 0.0, "max": 0.5, "distribtion": "uniform"}}, "parameters.dropout.distribtion"),
    ({"dropout": {"min": "low", "max": 0.5}}, "parameters.dropout.min"),
    ({"dropout": {"values": [0.1], "min": 0.0}}, "parameters.dropout"),
]


@pytest.mark.unit
@pytest.mark.parametrize("parameters, expected", BAD_PARAMETERS)
def test_bad_parameter_ranges_are_one_line_before_anything_runs(tmp_path, parameters, expected):
    file = write_sweep(tmp_path, parameters)
    one_line_error(cli("run", str(file), "--runs-dir", str(tmp_path / "runs")), str(file), expected)
    assert not (tmp_path / "runs").exists()


BAD_KEYS = [
    ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "abc"}, "seed"),
    ({"seed": True}, "seed"),
    ({"early_terminate": {"type": "hyperband", "eta": 1}}, "early_terminate.eta"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 0}}, "early_terminate.min_iter"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 5}}, "early_terminate.min_iter"),  # epochs: 1
    ({"early_terminate": {"type": "hyperband", "min_iter": 2, "max_iter": 1}}, "early_terminate.max_iter"),
    ({"name": "../elsewhere"}, "name"), ({"name": 3}, "name"),
    ({"set": ["dropout", 0.1]}, "set"),
    ({"metric": {"name": ["val_acc"]}}, "metric"),
    ({"method": ["grid"]}, "method"),
]


@pytest.mark.unit
@pytest.mark.parametrize("extra, expected", BAD_KEYS)
def test_bad_sweep_keys_are_one_line_before_anything_runs(tmp_path, extra, expected):
    file = write_sweep(tmp_path, {"dropout": {"values": [0.1, 0.2]}}, **extra)
    one_line_error(cli("run", str(file), "--runs-dir", str(tmp_path / "runs")), str(file), expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_a_grid_too_big_to_visit_is_refused_without_enumerating_it(tmp_path):
    parameters = {f"model.conv.0.{k}": {"values": list(range(20))} for k in ("filters", "kernel_size", "stride")}
    parameters |= {"dropout": {"values": [i / 100 for i in range(20)]}}  # 20**4 = 160,000 points
    file = write_sweep(tmp_path, parameters, method="grid")
    one_line_error(cli("run", str(file), "--runs-dir", str(tmp_path / "runs")), "160,000 points")


@pytest.mark.unit
@pytest.mark.parametrize("option, value", [("--trials", "100001"), ("--workers", "65"), ("--name", "a/b"),
                                           ("--name", "..")])
def test_absurd_counts_and_names_are_refused_before_anything_runs(tmp_path, option, value):
    file = write_sweep(tmp_path, {"dropout": {"values": [0.1, 0.2]}})
    one_line_error(cli("run", str(file), option, value, "--runs-dir", str(tmp_path / "runs")), option)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 5. files a sweep reads
@pytest.mark.unit
def test_a_sweep_file_of_the_wrong_shape_or_kind_is_one_line(tmp_path, fifo):
    as_list = tmp_path / "list.yaml"
    as_list.write_text("- method: grid\n")
    one_line_error(cli("run", str(as_list)), str(as_list), "expected a mapping")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    one_line_error(cli("run", str(empty)), str(empty), "empty")
    one_line_error(cli("run", str(fifo)), str(fifo), "FIFO")
    one_line_error(cli("run", str(tmp_path)), str(tmp_path), "directory")
    one_line_error(cli("run", str(tmp_path / "missing.yaml")), "missing.yaml")


@pytest.mark.unit
def test_a_journal_that_is_a_fifo_or_too_big_is_refused_unread(tmp_path):
    path = journal(tmp_path, "odd")
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    one_line_error(cli("status", "odd", "--runs-dir", str(tmp_path / "runs")), str(path), "FIFO")
    one_line_error(cli("best", "odd", "--out", str(tmp_path / "b.yaml"), "--runs-dir", str(tmp_path / "runs")),
                   "FIFO")
    path.unlink()
    with open(path, "wb") as handle:
        handle.truncate((1 << 30) + 1)  # sparse: takes no space
    one_line_error(cli("status", "odd", "--runs-dir", str(tmp_path / "runs")), str(path), "more than")


@pytest.mark.slow
def test_sweep_run_on_a_fifo_journal_is_refused_without_hanging(tmp_path):
    file = write_sweep(tmp_path, {"dropout": {"values": [0.1, 0.2]}})
    path = journal(tmp_path)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    done = subprocess.run([sys.executable, "-m", "cnnlab", "sweep", "run", str(file), "--runs-dir",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "FIFO" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["missing", "fifo", "folder", "not a config"])
def test_best_needs_the_best_trials_config_as_a_regular_file(tmp_path, damage):
    run = fake_study(tmp_path, config=False)
    config = run / "config.yaml"
    if damage == "fifo":
        os.mkfifo(config)
    elif damage == "folder":
        config.mkdir()
    elif damage == "not a config":
        config.write_text("- 1\n- 2\n")
    one_line_error(cli("best", "fake", "--out", str(tmp_path / "b.yaml"), "--runs-dir", str(tmp_path / "runs")),
                   "best trial 0", str(config))
    assert not (tmp_path / "b.yaml").exists()


@pytest.mark.unit
def test_best_finds_the_trial_run_when_the_study_was_made_from_another_folder(tmp_path):
    fake_study(tmp_path)
    study = study_of(tmp_path, "fake")
    study.add_trial(create_trial(params={"dropout": 0.2}, distributions={"dropout": FloatDistribution(0, 0.5)},
                                 value=0.9, user_attrs={"run": "elsewhere/runs/sweeps/fake/trial-0"}))
    result = cli("best", "fake", "--out", str(tmp_path / "b.yaml"), "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------- 6. and more
@pytest.mark.unit
def test_resuming_with_another_goal_or_method_is_refused(tmp_path):
    fake_study(tmp_path, "fake")  # maximize
    file = write_sweep(tmp_path, {"dropout": {"min": 0.0, "max": 0.5}}, metric={"name": "val_loss"})
    one_line_error(cli("run", str(file), "--name", "fake", "--runs-dir", str(tmp_path / "runs")),
                   "'fake'", "maximize", "--name")
    sweeps.Sweep(parse_sweep({"method": "random", "parameters": {"dropout": {"min": 0.0, "max": 0.5}}}), "fake",
                 str(journal(tmp_path, "fake")), tmp_path / "runs", 2).open()  # records method random
    grid = write_sweep(tmp_path, {"dropout": {"values": [0.1, 0.2]}}, method="grid")
    one_line_error(cli("run", str(grid), "--name", "fake", "--runs-dir", str(tmp_path / "runs")), "method random")


@pytest.mark.unit
def test_a_database_out_of_reach_is_one_line_without_its_password(tmp_path):
    url = "postgresql://user:s3cret@127.0.0.1:1/sweeps"  # port 1: nothing listens
    error = one_line_error(cli("status", "x", "--storage", url))
    assert "s3cret" not in error and "127.0.0.1" in error


@pytest.mark.unit
def test_bad_heartbeat_settings_are_one_line(monkeypatch):
    monkeypatch.setenv("CNNLAB_SWEEP_HEARTBEAT_SECONDS", "0")
    with pytest.raises(SweepError, match="CNNLAB_SWEEP_HEARTBEAT_SECONDS"):
        env_seconds("CNNLAB_SWEEP_HEARTBEAT_SECONDS", 10)
    monkeypatch.setenv("CNNLAB_SWEEP_HEARTBEAT_SECONDS", "ten")
    with pytest.raises(SweepError):
        env_seconds("CNNLAB_SWEEP_HEARTBEAT_SECONDS", 10)


def test_a_trial_that_cannot_write_its_run_stops_the_sweep_for_a_rerun(tmp_path, monkeypatch):
    file = write_sweep(tmp_path, {"dropout": {"min": 0.0, "max": 0.5}})
    args = ["run", str(file), "--trials", "2", "--runs-dir", str(tmp_path / "runs")]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the disk is full for the trial's run directory
        if "/trial-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    one_line_error(cli(*args), "trial 0", "No space left on device (ENOSPC)", "rerun")
    trials = study_of(tmp_path).get_trials()
    assert trials[0].state == TrialState.FAIL and [t.state for t in trials[1:]] == [TrialState.WAITING]

    monkeypatch.undo()
    again = cli(*args)
    assert again.exit_code == 0, again.output
    counted = sweeps.counted_trials(study_of(tmp_path).get_trials())
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 2


@pytest.mark.unit
def test_a_trial_directory_left_over_gets_a_fresh_name(tmp_path):
    spec = parse_sweep({"method": "random", "parameters": {"dropout": {"min": 0.0, "max": 0.5}}})
    sweep = sweeps.Sweep(spec, "s", "unused", tmp_path, 2)
    from cnnlab.sweep.runner import trial_run_dir

    (tmp_path / "sweeps" / "s" / "trial-3").mkdir(parents=True)
    assert trial_run_dir(sweep, 3).name == "trial-3-2" and trial_run_dir(sweep, 4).name == "trial-4"


@pytest.mark.unit
def test_a_string_in_set_arrives_as_that_string(tmp_path):
    """`set:` values were written back as KEY=VALUE text and read again as YAML: the folder "yes" became true,
    "photos #2" became "photos"; a constant `value:` too. Each value now arrives as the sweep file gave it."""
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"}, "model": "seed",
        "set": {"data.dataset": "photos #2", "epochs": 1},
        "parameters": {"dropout": {"values": [0.0, 0.5]}, "data.data_dir": {"value": "yes"}}}))
    spec = sweeps.read_sweep(file)
    config = trial_config(spec, {"dropout": 0.5})
    assert config.data.dataset == "photos #2" and config.data.data_dir == "yes" and config.train.epochs == 1
