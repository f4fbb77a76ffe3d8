"""Data-parallel fault cases, run by tests/test_distributed.py as real torchrun jobs:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_cases.py CASE OUT_DIR

Each rank writes OUT_DIR/rank<r>.json with what it saw; the test compares the ranks. At exit, after
cnnlab's own exit handler, each rank also writes OUT_DIR/rank<r>-exit.json: the threads still alive.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from cnnlab.config import load_config
from cnnlab.data.sources import TensorSource
from cnnlab.models.cnn import build_model
from cnnlab.training import distributed
from cnnlab.training.callbacks import Callback
from cnnlab.training.engine import TrainData, Trainer, TrainingDiverged
from cnnlab.training.sampling import epoch_order

CONFIG = load_config("seed", None, ["model.conv.0.filters=4", "dense_layer_size=8", "batch_size=16", "epochs=2",
                                    "channels_last=false"])


def random_data(n: int = 200, seed: int = 0) -> TrainData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return TrainData(TensorSource(images, labels), TensorSource(images[:40], labels[:40]))


class PoisonOnRank(Callback):
    """Turns one rank's classifier bias into NaN after a given step: only that rank's loss goes NaN."""

    def __init__(self, context, rank: int, epoch: int, step: int):
        self.poisons, self.epoch, self.step = context.rank == rank, epoch, step

    def on_batch_end(self, progress, loss, accuracy):
        if self.poisons and (progress.epoch + 1, progress.step) == (self.epoch, self.step):
            with torch.no_grad():
                progress.model.head.classifier.bias.fill_(math.nan)


class RecordingSource(TensorSource):
    """A TensorSource that remembers which positions this rank was asked for, batch by batch."""

    def __init__(self, source: TensorSource):
        super().__init__(source.images, source.labels)
        self.asked: list[list[int]] = []

    def batches(self, index_batches):
        for index in index_batches:
            self.asked.append(index.tolist())
            yield self.images[index], self.labels[index]


def trainer(context, data, callbacks=(), **train) -> Trainer:
    model = build_model(CONFIG.model, (28, 28, 1), 10, seed=0)
    return Trainer(model, data, dataclasses.replace(CONFIG.train, **train), list(callbacks), context)


def nan_on_one_rank(context) -> dict:
    run = trainer(context, random_data(), [PoisonOnRank(context, rank=1, epoch=1, step=3)])
    try:
        run.fit()
    except TrainingDiverged as exc:
        return dict(error=str(exc), epoch=run.state.epoch, step=run.state.step)
    return dict(error=None)


def nan_between_sync_points(context) -> dict:
    """Read back every 4 steps: rank 1 turns NaN after step 4 (a sync point); the loss is read at step 8."""
    run = trainer(context, random_data(), [PoisonOnRank(context, rank=1, epoch=1, step=4)], sync_every=4)
    try:
        run.fit()
    except TrainingDiverged as exc:
        return dict(error=str(exc), epoch=run.state.epoch, step=run.state.step)
    return dict(error=None)


def shards(context) -> dict:
    data = random_data()
    recorder = RecordingSource(data.train)
    run = trainer(context, TrainData(recorder, data.val))
    run.fit()
    orders = [epoch_order(len(recorder), CONFIG.train.seed, epoch).tolist() for epoch in range(CONFIG.train.epochs)]
    return dict(asked=recorder.asked, orders=orders, steps_per_epoch=run.steps_per_epoch,
                batch_size=CONFIG.train.batch_size)


def timeout(context, out: Path) -> dict:
    """Rank 1 is stuck in a bug and never reaches the collective: it waits until rank 0 has given up on it
    (or five minutes pass), so rank 0 can only have returned by its collective timing out."""
    if context.rank == 1:
        give_up = time.monotonic() + 300
        while not (out / "rank0.json").exists() and time.monotonic() < give_up:
            time.sleep(0.1)
        return {}
    try:
        context.all_reduce_sum([1.0])
    except Exception as exc:  # noqa: BLE001 -- the point is which error
        return dict(error=f"{type(exc).__name__}: {exc}"[:300])
    return dict(error=None)


def early_stopping(context) -> dict:
    """Random labels: the validation loss soon stops improving; every rank must stop at the same epoch."""
    config = load_config("seed", None, ["model.conv.0.filters=4", "dense_layer_size=8", "batch_size=16",
                                        "epochs=12", "channels_last=false", "train.lr=0.01",
                                        "train.early_stopping.patience=1"])
    model = build_model(config.model, (28, 28, 1), 10, seed=0)
    run = Trainer(model, random_data(), config.train, [], context)
    run.fit()
    return dict(epochs=run.state.epoch, kept=run.kept_epoch, stopped=run.early_stopping.stopped,
                weights=float(sum(p.double().sum() for p in run.evaluated.state_dict().values())))


def bf16_validated_every_2(context) -> dict:
    """bfloat16 steps, validation after epochs 2 and 3 only: the ranks must agree on both (a rank validating
    alone would wait in its all-reduce) and end with the same weights."""
    run = trainer(context, random_data(), precision="bf16-mixed", val_every=2, epochs=3)
    run.fit()
    return dict(validated=[m["epoch"] for m in run.history if not math.isnan(m["val_loss"])],
                weights=float(sum(p.double().sum() for p in run.network.state_dict().values())),
                dtypes=sorted({str(p.dtype) for p in run.network.parameters()}))


CASES = dict(nan_on_one_rank=nan_on_one_rank, nan_between_sync_points=nan_between_sync_points, shards=shards,
             timeout=timeout, early_stopping=early_stopping, bf16_validated_every_2=bf16_validated_every_2)


def thread_names() -> list[str]:
    """The names of this process's threads, as the kernel knows them (gloo names its own)."""
    tasks = Path("/proc/self/task")
    return sorted((tasks / task / "comm").read_text().strip() for task in os.listdir(tasks))


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    # Registered before distributed.init registers its own handler, so it runs after it (last in, first out).
    atexit.register(lambda: (out / f"rank{rank}-exit.json").write_text(json.dumps(dict(threads=thread_names()))))
    context = distributed.init("cpu")
    result = CASES[case](context, out) if case == "timeout" else CASES[case](context)
    (out / f"rank{context.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
