"""Data-parallel training: real torchrun jobs of 2 processes on localhost (gloo), as a user runs them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import ConfigError, load_config
from cnnlab.training.distributed import DeviceError, resolve_device
from cnnlab.training.sampling import steps_in_epoch
from conftest import tiny_config, tiny_train_args, weights

ONE_EPOCH = tiny_train_args("--epochs", "1", "--set", "data.val_size=200")


def cnnlab(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`cnnlab ARGS` in a fresh process, as from a shell."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ddp")
    done = cnnlab(cwd, "train", *ONE_EPOCH, "--nproc", "2", "--name", "ddp")
    assert done.returncode == 0, done.stdout + done.stderr
    return cwd / "runs" / "ddp"


@pytest.mark.slow  # a torchrun job: 3 Python processes that import torch
def test_two_processes_train_to_the_weights_of_one_with_the_same_global_batch(two_process_run, tmp_path):
    single = cnnlab(tmp_path, "train", *ONE_EPOCH, "--name", "single")
    assert single.returncode == 0, single.stderr
    one, two = weights(tmp_path / "runs" / "single"), weights(two_process_run)
    assert one.keys() == two.keys()
    for key in one:
        # Same images in every global batch, gradients averaged by DDP: equal up to float summation order.
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-3, msg=key)
    moved = (one["features.conv1.weight"] - load_initial_conv1()).abs().max()
    assert moved > 1e-2  # the comparison is between trained weights, not two copies of the initial ones
    (m1,), (m2,) = metrics(tmp_path / "runs" / "single"), metrics(two_process_run)
    assert m2["val_accuracy"] == pytest.approx(m1["val_accuracy"], abs=0.01)  # all-reduced over both ranks
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-3)


def load_initial_conv1() -> torch.Tensor:
    from cnnlab.models.cnn import build_model

    config = tiny_config()
    return build_model(config.model, (28, 28, 1), 10, seed=0).features.conv1.weight.detach()


@pytest.mark.slow  # a torchrun job: 3 Python processes that import torch
def test_only_rank_zero_writes_the_run(two_process_run):
    runs = two_process_run.parent
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    # Each rank would append its own line per epoch if both recorded the run.
    assert [m["epoch"] for m in metrics(two_process_run)] == [1]
    manifest = json.loads((two_process_run / "manifest.json").read_text())
    assert manifest["dataset"] == "mnist-sample"
    assert json.loads((two_process_run / "test.json").read_text())["num_images"] == 1000


@pytest.mark.slow  # a torchrun job: 3 Python processes that import torch
def test_a_worker_killed_mid_epoch_is_restarted_and_the_job_resumes_from_its_checkpoint(tmp_path):
    args = ["train", "--model", "seed", "--epochs", "3", "--set", "data.val_size=200", "--quiet"]
    reference = cnnlab(tmp_path, *args, "--nproc", "2", "--name", "uninterrupted")
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "runs" / "killed"
    job = subprocess.Popen([sys.executable, "-m", "cnnlab", *args, "--nproc", "2", "--max-restarts", "2",
                            "--name", "killed"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert job.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.05)
        workers = children(job.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)  # a rank dies in epoch 2, after the first checkpoint
        output, _ = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert "restart 1: resuming" in output
    assert [m["epoch"] for m in metrics(run)] == [1, 2, 3]
    killed, uninterrupted = weights(run), weights(tmp_path / "runs" / "uninterrupted")
    for key in killed:  # resumed from the epoch-1 checkpoint: the same end state as never stopping
        assert torch.equal(killed[key], uninterrupted[key]), key


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.unit
def test_nproc_refuses_an_existing_run_name_before_launching(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--runs-dir", str(tmp_path / "runs"), "--name", "taken"])
    assert result.exit_code != 0 and "a run of that name exists" in result.output



@pytest.mark.unit
@pytest.mark.parametrize("n, batch, steps", [(100, 32, 4), (97, 32, 4), (96, 32, 3), (1, 32, 1)])
def test_steps_per_epoch_do_not_depend_on_the_number_of_processes(n, batch, steps):
    # A rank whose slice of the short last batch is empty still takes the step (zero loss, zero
    # gradient), so a run can resume with another number of processes on the same schedule.
    assert steps_in_epoch(n, batch) == steps


@pytest.mark.unit
def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="train.device"):
        load_config("seed", None, ["train.device=gpu"])


@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_train_on_cuda_without_a_gpu_says_so(tmp_path):
    result = CliRunner().invoke(app, ["train", "--device", "cuda", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
    assert not (tmp_path / "runs").exists()


def ddp_case(case: str, tmp_path: Path, **env: str) -> list[dict]:
    """Run tests/ddp_cases.py CASE as a 2-rank torchrun job; every rank's JSON report, in rank order."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("ddp_cases.py")), case, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # a torchrun job
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    rank0, rank1 = ddp_case("nan_on_one_rank", tmp_path)
    # Rank 1's weights went NaN after step 3; only its loss is NaN, yet both stop before step 4's update.
    assert (rank0["epoch"], rank0["step"]) == (rank1["epoch"], rank1["step"]) == (0, 3)
    assert "diverged" in rank0["error"] and rank0["error"] == rank1["error"]


@pytest.mark.slow  # a torchrun job
def test_read_back_every_4_steps_a_nan_stops_every_rank_at_the_next_sync_point(tmp_path):
    rank0, rank1 = ddp_case("nan_between_sync_points", tmp_path)
    # NaN from step 5 on rank 1; the totals stay on the device until step 8, which stops before its update.
    assert (rank0["epoch"], rank0["step"]) == (rank1["epoch"], rank1["step"]) == (0, 7)
    assert "by step 8: training diverged" in rank0["error"] and rank0["error"] == rank1["error"]


@pytest.mark.slow  # a torchrun job
def test_early_stopping_stops_every_rank_at_the_same_epoch_with_the_same_kept_weights(tmp_path):
    rank0, rank1 = ddp_case("early_stopping", tmp_path)
    assert rank0["stopped"] is not None and rank0["epochs"] < 12  # it did stop early
    assert rank0 == rank1


@pytest.mark.slow  # a torchrun job
def test_bf16_ranks_stay_in_step_and_validate_at_the_same_epochs(tmp_path):
    rank0, rank1 = ddp_case("bf16_validated_every_2", tmp_path)
    assert rank0["validated"] == [2, 3] and rank0["dtypes"] == ["torch.float32"]
    assert rank0 == rank1


@pytest.mark.slow  # a torchrun job
def test_shards_are_disjoint_cover_each_global_batch_and_are_reshuffled_every_epoch(tmp_path):
    rank0, rank1 = ddp_case("shards", tmp_path)
    steps, batch = rank0["steps_per_epoch"], rank0["batch_size"]
    assert len(rank0["asked"]) == len(rank1["asked"]) == 2 * steps
    for i, (mine, theirs) in enumerate(zip(rank0["asked"], rank1["asked"])):
        epoch, step = divmod(i, steps)
        global_batch = rank0["orders"][epoch][step * batch:(step + 1) * batch]
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == sorted(global_batch)
    assert rank0["orders"][0] != rank0["orders"][1]
    assert rank0["asked"][:steps] != rank0["asked"][steps:]  # epoch 2 is not epoch 1 again


@pytest.mark.slow  # a torchrun job
def test_every_rank_joins_the_process_groups_threads_before_the_interpreter_shuts_down(tmp_path):
    # A gloo worker thread left running into interpreter shutdown can die holding a tensor and abort
    # the finished process (SIGABRT, "terminate called without an active exception"): about one job
    # in three, before cnnlab's exit handler destroyed the group and DDP stopped pinning it.
    ddp_case("shards", tmp_path)  # trains with DDP, as a real job does
    for rank in range(2):
        threads = json.loads((tmp_path / f"rank{rank}-exit.json").read_text())["threads"]
        assert not [name for name in threads if "gloo" in name], (rank, threads)


@pytest.mark.slow  # a torchrun job
def test_a_rank_that_never_arrives_fails_the_collective_instead_of_hanging(tmp_path):
    rank0, _ = ddp_case("timeout", tmp_path, CNNLAB_DIST_TIMEOUT="3")
    assert rank0["error"] is not None, rank0  # the straggler waits for this report: no timeout, no report
