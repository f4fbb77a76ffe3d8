"""Two workers sharing one sweep through a real PostgreSQL server started in a temporary data directory."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from cnnlab import sweep as sweeps

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
HOOKS = Path(__file__).with_name("sweep_hooks.py")  # cnnlab with test hooks: see that file
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BIN, reason="PostgreSQL binaries not found in /usr/lib/postgresql/*/bin "
                       "(apt-get install postgresql; .ci/run does)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(command: list[str]) -> list[str]:
    """Postgres refuses to run as root: run its commands as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway server on 127.0.0.1 and a free port; yields its SQLAlchemy URL."""
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install 'cnnlab[postgres]'")
    bin_dir = Path(BIN[-1])
    base = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))  # not under pytest's tmp: its 0700 parents bar postgres
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        base.chmod(0o755)
    port = free_port()
    subprocess.run(as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]),
                   check=True, capture_output=True)
    options = f"-h 127.0.0.1 -p {port} -k {base}"  # socket in the temp dir: /var/run/postgresql may not exist
    subprocess.run(as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"),
                                "-w", "start"]), check=True, capture_output=True)
    try:
        subprocess.run(as_postgres([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                    "sweeps"]), check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run(as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_share_one_study_with_exact_unique_trials(postgres, tmp_path):
    sweep = dict(method="random", metric={"name": "val_acc", "goal": "maximize"}, model="seed",
                 dataset="mnist-sample", set={"first_layer_convs": 4, "dense_layer_size": 8, "epochs": 1},
                 parameters={"dropout": {"min": 0.0, "max": 0.5}, "train.lr": {"values": [1e-3, 3e-3]}})
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump(sweep))
    command = [sys.executable, str(HOOKS), "sweep", "run", str(file), "--trials", "5", "--name", "shared",
               "--storage", postgres, "--runs-dir", str(tmp_path / "runs")]
    barrier = tmp_path / "barrier"  # each worker waits on its first trial until both have one: both propose
    barrier.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", CNNLAB_TEST_BARRIER=f"{barrier}:2")  # two "machines", one CI box
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-6000:] for _, err in outputs]

    trials = sweeps.load_study("shared", postgres).get_trials()
    assert len(trials) == 5  # exact: neither worker overshoots the shared total
    assert sorted(t.number for t in trials) == list(range(5))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({(t.params["dropout"], t.params["train.lr"]) for t in trials}) == 5  # no point proposed twice
    owners = {int(t.user_attrs["worker"].rpartition(":")[2]) for t in trials}
    assert owners <= {w.pid for w in workers}
    assert len({t.user_attrs["run"] for t in trials}) == 5


def test_a_worker_killed_mid_trial_is_detected_by_its_heartbeat_and_its_trial_retried(postgres, tmp_path):
    sweep = dict(method="random", metric={"name": "val_acc", "goal": "maximize"}, model="seed",
                 dataset="mnist-sample", set={"first_layer_convs": 4, "dense_layer_size": 8, "epochs": 3},
                 parameters={"dropout": {"values": [0.0, 0.1, 0.2]}})
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump(sweep))
    command = [sys.executable, "-m", "cnnlab", "sweep", "run", str(file), "--trials", "2", "--name", "killed",
               "--storage", postgres, "--runs-dir", str(tmp_path / "runs")]
    env = dict(os.environ, CNNLAB_SWEEP_HEARTBEAT_SECONDS="1", CNNLAB_SWEEP_GRACE_SECONDS="3")
    held = tmp_path / "held"  # the hook holds the worker after trial 0's first epoch: killed mid-trial, always
    worker = subprocess.Popen([sys.executable, str(HOOKS), *command[3:]], env=dict(env, CNNLAB_TEST_HOLD=str(held)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not held.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.exists(), f"the worker did not reach its first epoch (exit status {worker.poll()})"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert sweeps.load_study("killed", postgres).get_trials()[0].state == TrialState.RUNNING
    # Not a race: the dead worker's last heartbeat is before the kill, so once more than the grace period
    # has passed its trial is stale for the rerun's first claim, however slow the machine is.
    time.sleep(4)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    trials = sweeps.load_study("killed", postgres).get_trials()
    assert trials[0].state == TrialState.FAIL  # marked failed from its stale heartbeat
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trials[0].params
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # numbers stay unique
    assert [t.state for t in sweeps.counted_trials(trials)] == [TrialState.COMPLETE] * 2


def test_workers_started_from_different_folders_read_the_folder_beside_the_sweep_file(postgres, tmp_path):
    from test_folder_commands import TINY, colour_folder

    folder = colour_folder(tmp_path / "project" / "shapes")
    sweep = dict(method="random", metric={"name": "val_acc", "goal": "maximize"}, model="seed", dataset="shapes",
                 set=TINY, parameters={"dropout": {"min": 0.0, "max": 0.5}})
    file = tmp_path / "project" / "sweep.yaml"
    file.write_text(yaml.safe_dump(sweep))
    barrier = tmp_path / "barrier"  # both workers take part, each from its own folder (two "machines")
    barrier.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", CNNLAB_TEST_BARRIER=f"{barrier}:2")
    workers = []
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        workers.append(subprocess.Popen([sys.executable, str(HOOKS), "sweep", "run", str(file), "--trials", "3",
                                         "--name", "photos", "--storage", postgres, "--runs-dir",
                                         str(tmp_path / "runs")],
                                        cwd=tmp_path / where, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-6000:] for _, err in outputs]

    trials = sweeps.load_study("photos", postgres).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({int(t.user_attrs["worker"].rpartition(":")[2]) for t in trials}) == 2  # both workers trained
    for trial in trials:
        config = yaml.safe_load((Path(trial.user_attrs["run"]) / "config.yaml").read_text())
        assert config["data"]["dataset"] == str(folder)
