"""Shared fixtures and helpers: an isolated cache and system folder, a tiny dataset written in the test, the
suite's one tiny training config, and a run's weights."""
from __future__ import annotations

import atexit
import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cnnlab import pipeline
from cnnlab.config import Config, load_config
from cnnlab.data import store
from cnnlab.data.idx import encode_idx, write_idx
from cnnlab.data.registry import DatasetSpec, _idx_files
from cnnlab.pipeline import RunResult
from cnnlab.runs import layout
from cnnlab.training.callbacks import Callback

# The suite's one tiny training: the seed network cut to 8 first-layer filters and 32 dense units, 2 epochs of
# batches of 64 on the shipped MNIST sample (4,000 digits, the sample's 500 of them kept for validation): ~85% test
# accuracy in a few seconds. One thread: under load from other processes torch's pool of one thread per core spins,
# and the same training takes 30 s instead of 2. A test changes what it is about with `extra` overrides ("epochs=1").
# No data settings: a run fine-tuned from the shared tiny run on an image folder inherits them.
TINY_TRAINING = {"epochs": 2, "batch_size": 64, "train.threads": 1}
TINY_MODEL = {"first_layer_convs": 8, "dense_layer_size": 32}  # the seed family's knobs: a test may set them again
# Settings `cnnlab train` has a flag for: a test that passes the flag (`--epochs 1`) overrides the tiny value, which
# a `--set` would not (--set is applied after the flags).
TINY_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "train.threads": "--threads"}


def tiny_settings(shrink_model: bool = True) -> dict[str, object]:
    """The tiny training's settings; without shrink_model, the training's alone (for a preset without the seed
    family's knobs, or a run to fine-tune, whose model is given)."""
    return {**TINY_TRAINING, **(TINY_MODEL if shrink_model else {})}


def tiny_overrides(*extra: str, shrink_model: bool = True) -> list[str]:
    """The tiny training as `key=value` overrides, then `extra` (which win)."""
    return [*(f"{key}={value}" for key, value in tiny_settings(shrink_model).items()), *extra]


def tiny_config(*extra: str, model: str = "seed", shrink_model: bool = True, **sections: dict) -> Config:
    """The tiny training of preset `model`, with `extra` overrides and `sections` (data={"dataset": ...})."""
    return load_config(model, overrides=tiny_overrides(*extra, shrink_model=shrink_model), **sections)


def tiny_train_args(*extra: str, shrink_model: bool = True) -> list[str]:
    """`cnnlab train` options for the tiny training of the seed model, quiet, then `extra` (which win)."""
    args = ["--model", "seed"]
    for key, value in tiny_settings(shrink_model).items():
        args += [TINY_FLAGS[key], str(value)] if key in TINY_FLAGS else ["--set", f"{key}={value}"]
    return [*args, "--quiet", *extra]


_trained_root: Path | None = None
_trained: dict[tuple[str, ...], RunResult] = {}


def tiny_trained(dataset: str = "mnist-sample", *extra: str) -> RunResult:
    """The tiny training (with `extra` overrides) on a shipped sample, trained once per test process and shared
    by every test that only reads the run (show, report, evaluate, predict, serve, explore...). A test that
    writes into a run copies it first (shutil.copytree into its tmp_path)."""
    global _trained_root
    key = (dataset, *extra)
    if key not in _trained:
        if _trained_root is None:
            _trained_root = Path(tempfile.mkdtemp(prefix="cnnlab-tiny-runs-"))
            atexit.register(shutil.rmtree, _trained_root, ignore_errors=True)
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as patch:  # its dataset cache outlives the test that trained it
            patch.setenv("XDG_CACHE_HOME", str(_trained_root / "cache"))
            config = tiny_config(*extra, data={"dataset": dataset})
            # named after its dataset ("mnist", what the web app lists), in a folder of its own per key
            root = _trained_root / f"runs-{len(_trained)}"
            _trained[key] = pipeline.train(config, root, name=dataset.removesuffix("-sample"), progress=False)
        torch.set_num_threads(threads)  # train.threads sets it for the whole process; later tests get theirs back
    return _trained[key]


@pytest.fixture(scope="session")
def tiny_result() -> RunResult:
    """The shared tiny run on the MNIST sample, as `pipeline.train` returned it (read only)."""
    return tiny_trained()


def weights(run: Path) -> dict[str, torch.Tensor]:
    """A run's saved weights (model.safetensors), by parameter name."""
    return load_file(str(layout.path(run, "weights")))


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs saved bitwise-equal weights under the same names."""
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(autouse=True)
def isolated_places(tmp_path_factory, monkeypatch):
    """No test reads or writes the real user cache or /usr/share/datasets."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    monkeypatch.setattr(store, "SYSTEM_ROOT", home / "system")
    return home


def tiny_arrays(n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) % 10).astype(np.uint8),
    }


def gz_bytes(array: np.ndarray) -> bytes:
    return gzip.compress(encode_idx(array), mtime=0)


@pytest.fixture
def tiny():
    """A registered-like spec for a tiny random dataset, its arrays and its .gz bytes by file name."""
    arrays = tiny_arrays()
    blobs = {name: gz_bytes(a) for name, a in arrays.items()}
    digests = {name: (hashlib.sha256(encode_idx(a)).hexdigest(), None) for name, a in arrays.items()}
    spec = DatasetSpec(name="tiny", title="tiny test set", classes=tuple("abcdefghij"), files=_idx_files(digests),
                       mirrors=(), val_size=10)
    return spec, arrays, blobs


def write_dataset(directory, arrays: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(directory / name, array)


class StopAt(Callback):
    """Ask the trainer to stop (as Ctrl-C does) after a given step of a given epoch."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step

    def on_batch_end(self, progress, loss, accuracy):
        if progress.epoch + 1 == self.epoch and progress.step == self.step:
            progress.request_stop()


def whole_and_resumed(config, tmp_path, stop: StopAt):
    """(run trained straight through, run stopped at `stop` and resumed): the pair a bitwise-resume test compares."""
    from cnnlab import pipeline

    reference = pipeline.train(config, tmp_path, name="whole", progress=False).run
    with pytest.raises(pipeline.TrainingInterrupted):
        pipeline.train(config, tmp_path, name="cut", callbacks=[stop], progress=False)
    return reference, pipeline.resume(tmp_path / "cut", progress=False).run


# ------------------------------------------------------------------------ the suite on every core (pytest-xdist)
# `pytest` runs on `-n auto` worker processes (pyproject's addopts, --dist loadscope). A module's tests go to one
# worker, so what they share (a trained run, a started server, a module fixture) is built once. The modules in
# SPREAD share nothing costly between their tests, each a long one (a preset through every command, a minute of
# fuzzing): their tests go one by one to whichever worker is free. Work is handed out in the order collected, which
# `pytest_collection_modifyitems` makes longest first, so the run does not end with one worker alone on a long module.
SPREAD = {"tests/test_every_preset.py", "tests/test_fuzz.py"}
MAX_WORKERS = 4  # each worker holds torch and its own shared tiny runs (~1 GB); the tests start processes of their own


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # xdist's hooks: with the plugin left out pytest would call them unknown
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: a worker per core this process may run on, at most MAX_WORKERS (PYTEST_XDIST_AUTO_NUM_WORKERS,
    when set, is left to xdist's own hook)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return max(1, min(usable_cores(), MAX_WORKERS))


def pytest_configure(config: pytest.Config) -> None:
    """A worker runs torch on its share of the cores (two workers on two cores: a thread each), as `cnnlab serve
    --workers` does: a pool of a thread per core in each worker spins against the other's (a test's own
    train.threads still wins for its run)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput:
        torch.set_num_threads(max(1, usable_cores() // int(workerinput["workercount"])))


def work_unit(nodeid: str) -> str:
    """What one worker runs together: the test's module, or the test alone in a SPREAD module."""
    module = nodeid.split("::", 1)[0]
    return nodeid if module in SPREAD else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadscope with work_unit's units, handed out in collection order (not by their count of tests)."""
    if config.getvalue("dist") != "loadscope":
        return None  # another --dist given on the command line: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # the collection's order is the order wanted (see below)
    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `-n`: the work units longest first, by an estimate (a `slow` test ~20 s, any other ~1 s); a unit's
    tests keep their order. Every worker collects and sorts alike, which xdist requires."""
    if not getattr(config, "workerinput", None):
        return  # not an xdist worker: the order as written
    cost: dict[str, int] = {}
    for item in items:
        unit = work_unit(item.nodeid)
        cost[unit] = cost.get(unit, 0) + (20 if item.get_closest_marker("slow") else 1)
    items.sort(key=lambda item: -cost[work_unit(item.nodeid)])  # stable: a unit's tests stay in order and together
