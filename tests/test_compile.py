"""`train.compile`: the compiled training step against the eager one, its resume, and its fallback.

Compiling takes 10-20 s on 2 CPU cores the first time; the tests share one inductor cache, so the later
ones load the kernels the first one compiled.
"""
from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

from cnnlab import pipeline
from cnnlab.runs import records
from cnnlab.training import compiling
from cnnlab.training.engine import TrainingInterrupted
from conftest import StopAt, tiny_config, weights

pytestmark = pytest.mark.slow

# Dropout on, so that random ops are part of what must match; 1,000 images: 16 steps an epoch, the last short.
def config(*extra: str):
    return tiny_config("data.val_size=200", *extra, model="seed-dropout")


@pytest.fixture(autouse=True)
def shared_compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    return pipeline.train(config(), tmp_path_factory.mktemp("eager"), name="eager", progress=False)


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    from torch._dynamo.utils import counters

    counters.clear()
    said = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(said):
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))
        result = pipeline.train(config("train.compile=true"), tmp_path_factory.mktemp("compiled"), name="compiled",
                                progress=False)
    assert said.getvalue() == ""  # no fallback to eager
    assert counters["stats"]["unique_graphs"] >= 1  # the forward really went through the compiler
    return result


def test_compiled_steps_give_the_eager_losses(eager_run, compiled_run):
    for eager, compiled in zip(eager_run.history, compiled_run.history, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert math.isclose(compiled[key], eager[key], rel_tol=1e-4, abs_tol=1e-5), (key, eager, compiled)
    ours, theirs = weights(compiled_run.run), weights(eager_run.run)
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-5) for k in theirs)


def test_compile_time_is_reported_apart_from_training(compiled_run, eager_run):
    first, second = compiled_run.history
    assert first["compile_seconds"] > 0  # the first full batch and the short last one compiled
    assert second["compile_seconds"] == 0  # every shape already met
    assert compiled_run.compile_seconds == pytest.approx(first["compile_seconds"])
    assert "compile_seconds" not in eager_run.history[0] and eager_run.compile_seconds == 0


@pytest.mark.parametrize("epoch, step", [(1, 5), (2, 1)])
def test_a_compiled_run_resumes_bitwise(compiled_run, tmp_path, epoch, step):
    with pytest.raises(TrainingInterrupted):
        pipeline.train(config("train.compile=true"), tmp_path, name="cut", callbacks=[StopAt(epoch, step)],
                       progress=False)
    pipeline.resume(tmp_path / "cut", progress=False)
    ours, theirs = weights(tmp_path / "cut"), weights(compiled_run.run)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    drop_time = [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in compiled_run.history]
    assert [{k: v for k, v in m.items() if not k.endswith("seconds")}
            for m in records.read_metrics(tmp_path / "cut")] == drop_time


def test_a_failed_compile_trains_eagerly_after_one_line(eager_run, tmp_path, monkeypatch, capsys):
    class Uncompilable(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(the rest of a long report)")

    monkeypatch.setattr(compiling, "compiled", Uncompilable)
    result = pipeline.train(config("train.compile=true"), tmp_path, name="fallback", progress=False)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["train.compile: compiling failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler "
                     "found); training eagerly"]
    ours, theirs = weights(result.run), weights(eager_run.run)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # eager from the first step: the same bits
