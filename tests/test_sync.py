"""`train.sync_every`: the running loss read back from the device every N steps instead of every step.

On a GPU that is what keeps the device busy; here the CPU runs the same code path, so its promises are
tested where they can be: the same arithmetic, stops and interrupts at sync points only, a NaN caught
before it is saved, a bitwise resume. (Two ranks stopping together: tests/test_distributed.py.)
"""
from __future__ import annotations

import pytest
import torch

from cnnlab import pipeline
from cnnlab.runs import layout, records
from cnnlab.training.callbacks import Callback
from cnnlab.training.engine import Trainer, TrainingDiverged, TrainingInterrupted
from cnnlab.training.sampling import steps_in_epoch
from conftest import tiny_config, weights

pytestmark = pytest.mark.slow



def config(*extra: str):
    return tiny_config(*extra)


@pytest.fixture(scope="module")
def every_step(tiny_result):
    return tiny_result  # the suite's shared tiny run: config() reads back every step


@pytest.fixture(scope="module")
def every_third(tmp_path_factory):
    return pipeline.train(config("train.sync_every=3"), tmp_path_factory.mktemp("third"), name="third",
                          progress=False)


def steps_per_epoch() -> int:
    data = pipeline.open_data(config(), progress=False)
    return steps_in_epoch(len(data.train), config().train.batch_size)


def without_time(history):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in history]


class Seen(Callback):
    """The steps at which the trainer reported progress (its sync points)."""

    def __init__(self):
        self.steps: list[tuple[int, int]] = []

    def on_batch_end(self, progress, loss, accuracy):
        self.steps.append((progress.epoch + 1, progress.step))


class StopAfter(Callback):
    """Ask to stop (as Ctrl-C does) when progress is reported after a given step."""

    def __init__(self, step: int):
        self.step = step

    def on_batch_end(self, progress, loss, accuracy):
        if progress.epoch == 0 and progress.step == self.step:
            progress.request_stop()


class PoisonAfter(Callback):
    """Turn a weight into NaN when progress is reported after a given step of the first epoch."""

    def __init__(self, step: int):
        self.step = step

    def on_batch_end(self, progress, loss, accuracy):
        if progress.epoch == 0 and progress.step == self.step:
            with torch.no_grad():
                progress.model.head.classifier.weight[0, 0] = float("nan")


def test_the_cpu_reads_back_every_step_by_default(every_step, tmp_path):
    data = pipeline.open_data(config(), progress=False)
    model = pipeline.new_network(config(), data)
    assert Trainer(model, pipeline.TrainData(data.train, data.val), config().train).sync_every == 1


def test_reading_back_less_often_changes_no_number(every_step, every_third):
    ours, theirs = weights(every_third.run), weights(every_step.run)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # The epoch's totals gather the same steps, read back in fewer pieces: equal up to float64 rounding.
    for a, b in zip(without_time(every_third.history), without_time(every_step.history), strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-12) for k in a)


def test_progress_is_reported_at_sync_points_and_each_epochs_end(tmp_path):
    seen = Seen()
    pipeline.train(config("train.sync_every=3"), tmp_path, name="seen", callbacks=[seen], progress=False)
    n = steps_per_epoch()
    assert seen.steps == [(epoch, step) for epoch in (1, 2) for step in range(1, n + 1) if step % 3 == 0 or step == n]


def test_a_stop_takes_effect_at_the_next_sync_point_and_resumes_bitwise(every_third, tmp_path):
    with pytest.raises(TrainingInterrupted, match=f"after step 6 of {steps_per_epoch()}$"):
        pipeline.train(config("train.sync_every=3"), tmp_path, name="cut", callbacks=[StopAfter(3)],
                       progress=False)
    pipeline.resume(tmp_path / "cut", progress=False)
    ours, theirs = weights(tmp_path / "cut"), weights(every_third.run)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert without_time(records.read_metrics(tmp_path / "cut")) == without_time(every_third.history)


def test_a_nan_between_sync_points_stops_the_run_and_nothing_non_finite_is_saved(tmp_path):
    with pytest.raises(TrainingDiverged, match="in epoch 1 by step 6: training diverged"):
        pipeline.train(config("train.sync_every=3"), tmp_path, name="nan", callbacks=[PoisonAfter(3)],
                       progress=False)
    run = tmp_path / "nan"
    assert not layout.path(run, "weights").exists() and not layout.path(run, "checkpoint").exists()
