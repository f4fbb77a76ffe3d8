"""What a `cnnlab train` process spends besides training: no compiler import, no interpreter teardown.

The seconds themselves live in BENCHMARKS.md ("Start-up and data"); these tests hold the behaviour that
buys them: the optimizer is torch's own arithmetic without torch.compile's wrappers, and the `cnnlab`
script leaves as `sys.exit` would, exit handlers and buffered output included.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cnnlab.config import load_config
from cnnlab.models.cnn import build_model
from cnnlab.training.optim import eager, make_optimizer, make_scheduler

SETTINGS = {torch.optim.Adam: dict(weight_decay=1e-3), torch.optim.AdamW: dict(weight_decay=1e-2),
            torch.optim.SGD: dict(momentum=0.9, nesterov=True, weight_decay=5e-4)}


def run_steps(model, optimizer, scheduler, steps: int, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        images = torch.rand(16, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (16,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.unit
@pytest.mark.parametrize("base", list(SETTINGS), ids=lambda b: b.__name__)
def test_the_eager_optimizer_steps_exactly_as_torchs(base):
    config = load_config("seed", overrides=["model.conv.0.filters=4", "dense_layer_size=16"])
    ours, theirs = build_model(config.model, seed=0), build_model(config.model, seed=0)
    made = {}
    for name, model, cls in (("ours", ours, eager(base)), ("theirs", theirs, base)):
        optimizer = cls(model.parameters(), lr=0.01, fused=True, **SETTINGS[base])
        made[name] = (optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=8))
    assert run_steps(ours, *made["ours"], 6) == run_steps(theirs, *made["theirs"], 6)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    ours_state, theirs_state = made["ours"][0].state_dict(), made["theirs"][0].state_dict()
    assert ours_state["param_groups"] == theirs_state["param_groups"]
    assert all(torch.equal(ours_state["state"][i][k], theirs_state["state"][i][k])
               for i in theirs_state["state"] for k in theirs_state["state"][i])
    assert type(made["ours"][0]).__name__ == base.__name__ and isinstance(made["ours"][0], base)


@pytest.mark.unit
def test_the_eager_optimizer_resumes_from_its_state_dict():
    config = load_config("fast", overrides=["train.epochs=1"])
    model = build_model(config.model, seed=0)
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, total_steps=10)
    run_steps(model, optimizer, scheduler, 4)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    state, schedule = copy.deepcopy(optimizer.state_dict()), scheduler.state_dict()  # it holds the live moments
    straight = run_steps(model, optimizer, scheduler, 4, seed=1)

    model.load_state_dict(saved)
    again = make_optimizer(model, config.train)
    rescheduled = make_scheduler(again, config.train, total_steps=10)
    again.load_state_dict(state)  # the order of Trainer.load_state_dict: the schedule's start is overwritten
    rescheduled.load_state_dict(schedule)
    assert run_steps(model, again, rescheduled, 4, seed=1) == straight


def test_training_never_imports_the_compiler(tmp_path):
    """`cnnlab train` on the sample, in a process of its own: torch._dynamo (about 1 s) is never imported."""
    script = textwrap.dedent("""
        import sys
        from cnnlab.cli import app
        try:
            app(sys.argv[1:])
        except SystemExit as exit:
            assert not exit.code, exit.code
        print("compiler imported:", "torch._dynamo" in sys.modules)
    """)
    argv = ["train", "--dataset", "mnist-sample", "--model", "seed", "--set", "epochs=1", "--set", "data.val_size=100",
            "--runs-dir", str(tmp_path), "-q"]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "compiler imported: False", done.stdout


def leave(body: str, tmp_path) -> subprocess.CompletedProcess:
    """Run `body`, then `cnnlab.cli.exit_now(code)` as the script does, in a fresh process."""
    script = "import atexit, sys, threading, time\nfrom cnnlab.cli import exit_now\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)


def test_the_script_leaves_with_its_exit_code_handlers_and_output(tmp_path):
    done = leave("""
        atexit.register(lambda: open(sys.argv[1] + "/handler-ran", "w").close())
        sys.stdout.write("buffered, not yet flushed")
        exit_now(3)
    """, tmp_path)
    assert done.returncode == 3
    assert done.stdout == "buffered, not yet flushed"
    assert (tmp_path / "handler-ran").exists()


@pytest.mark.parametrize("code, status", [(None, 0), (0, 0), ("a message", 1)])
def test_the_script_leaves_as_sys_exit_would(tmp_path, code, status):
    done = leave(f"exit_now({code!r})", tmp_path)
    assert done.returncode == status
    assert done.stderr.strip() == (code if isinstance(code, str) else "")


def test_the_script_waits_for_a_running_thread(tmp_path):
    done = leave("""
        def finish():
            time.sleep(0.3)
            open(sys.argv[1] + "/thread-finished", "w").close()
        threading.Thread(target=finish).start()
        exit_now(0)
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "thread-finished").exists()


PAGE_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from cnnlab.config import load_config
    from cnnlab.data.sources import TensorSource
    from cnnlab.models.cnn import build_model
    from cnnlab.training.engine import TrainData, Trainer, prepare_process
    config = load_config("seed")  # the lesson's model: a 2.8 MB gradient for its dense layer every step
    images = torch.randint(0, 256, (32 * 40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32 * 40,))
    data = TrainData(TensorSource(images, labels), TensorSource(images[:32], labels[:32]))
    trainer = Trainer(build_model(config.model, seed=0), data, config.train)
    prepare_process(config.train, trainer.device)
    batches = [(images[i * 32:(i + 1) * 32], labels[i * 32:(i + 1) * 32]) for i in range(40)]
    for batch in batches[:10]:
        trainer.train_step(*batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for batch in batches[10:]:
        trainer.train_step(*batch)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_training_steps_reuse_their_memory_instead_of_faulting_it_in(monkeypatch):
    """Page faults are counted, not timed: each one is the kernel handing a fresh page to a tensor the
    previous step had just freed (in a fresh process: 1,675 faults per `seed` step without the setting, none
    with it)."""
    def faults_per_step(switch: str) -> float:
        monkeypatch.setenv("CNNLAB_MALLOC_TUNING", switch)
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.split()[-1])

    tuned, untuned = faults_per_step("on"), faults_per_step("off")
    assert tuned < 50, tuned  # a few pages a step: the step's tensors come back from the heap
    assert untuned > 5 * tuned, (untuned, tuned)  # the switch is what makes the difference


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["at exit", "mid-command"])
def test_output_to_a_full_disk_is_one_line_not_a_traceback(unbuffered, monkeypatch):
    """Buffered, the output fails when the script flushes it at exit; unbuffered, on the command's first print."""
    monkeypatch.setenv("PYTHONUNBUFFERED", unbuffered)
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "cnnlab", "presets"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: cannot write the output: No space left on device"


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` in sh, with "cnnlab" standing for this interpreter running the package."""
    script = command.replace("cnnlab", f"{sys.executable} -m cnnlab")
    return subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["cnnlab presets >&-", "cnnlab presets <&- >&-", "cnnlab --help >&-",
                                     "cnnlab datasets list >&-", "cnnlab presets 2>&- && echo ok"])
def test_a_closed_standard_stream_is_no_error(command, tmp_path):
    """`>&-` used to end every command in `AttributeError: 'NoneType' object has no attribute 'flush'`."""
    done = shell(command, tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.endswith("ok\n") if "echo" in command else done.stdout == ""


def test_a_training_with_its_output_closed_writes_its_run_and_nothing_strays_into_its_files(tmp_path):
    """A closed descriptor 1 would be the next file opened, and the decoding workers' stdout: the null
    device takes its place first."""
    from PIL import Image
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(8):
            colour = (40 * i, 200 if name == "a" else 0, 0)
            Image.new("RGB", (8, 8), colour).save(tmp_path / "folder" / name / f"{i}.png")
    done = shell("cnnlab train --dataset folder --model seed --runs-dir runs --name closed --set epochs=2 "
                 "--set data.image_size=8 --set data.workers=2 --set train.threads=1 >&- 2>&-", tmp_path)
    assert done.returncode == 0
    run = tmp_path / "runs" / "closed"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "test.json").read_text())["classes"] == ["a", "b"]


def test_a_deleted_working_directory_is_one_line(tmp_path):
    """It was MKL's "FATAL ERROR: Cannot load libtorch_cpu.so" for every command that loads torch."""
    for command in ("cnnlab evaluate runs/x", "cnnlab presets", "cnnlab train --dataset mnist-sample"):
        done = shell(f"mkdir gone && cd gone && rmdir ../gone && {command}", tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr == "error: the current directory no longer exists (it was deleted): cd to one that does\n"
