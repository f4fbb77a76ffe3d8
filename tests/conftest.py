"""Shared fixtures: an isolated cache and system folder, and a tiny dataset written in the test."""
from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from cnnlab.data import store
from cnnlab.data.idx import encode_idx, write_idx
from cnnlab.data.registry import DatasetSpec, _idx_files
from cnnlab.training.callbacks import Callback


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
