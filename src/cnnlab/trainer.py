"""The training engine: epochs, optimisation, schedules, callbacks. Knows nothing of files or the model.

Data order, dropout and every other random choice come from seeded generators whose state is part
of `Trainer.state_dict()`, so a run resumed from a checkpoint ends bitwise equal to one that never
stopped (same machine, same thread count).
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from cnnlab.augment import augment
from cnnlab.config import TrainConfig
from cnnlab.evaluate import infer, loss_and_accuracy, to_inputs


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a resumable state."""

    run = None  # the run directory, filled in by whoever knows it


class Source(Protocol):
    """One split of the data, read a batch at a time: in memory (`TensorSource`) or streamed from disk.

    `labels` are known up front (the data order is drawn from them); `batches` yields, for each index
    batch asked for, uint8 images (B, C, H, W) and int64 labels (B,). A streamed source may drop an
    unreadable image from its batch (B shrinks) and report it in `skipped` (path -> reason).
    """

    labels: torch.Tensor  # (N,) int64
    skipped: dict[str, str]

    def __len__(self) -> int: ...
    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TensorSource:
    """A split held in memory as uint8 images (N, C, H, W) and int64 labels (N,): no per-image Python."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels, self.skipped = images, labels, {}

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in index_batches:
            yield self.images[index], self.labels[index]


@dataclass
class TrainData:
    """The training split and the validation split (which may be empty)."""

    train: Source
    val: Source


class Callback:
    """Hooks the trainer calls; progress bars, run recording and trackers hang on these."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_epoch_begin(self, trainer: Trainer) -> None: ...
    def on_batch_end(self, trainer: Trainer, loss: float, accuracy: float) -> None: ...
    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_interrupt(self, trainer: Trainer) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; fused (one kernel for all parameters: ~20% faster steps on CPU)."""
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.momentum > 0, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning rate per optimisation step over the whole run."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                   pct_start=0.25)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the training set in a given epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class Trainer:
    """Trains a model on in-memory data for `config.epochs` epochs, calling callbacks on the way."""

    def __init__(self, model: nn.Module, data: TrainData, config: TrainConfig,
                 callbacks: Sequence[Callback] = ()):
        self.model, self.data, self.config = model, data, config
        if config.channels_last:
            model.to(memory_format=torch.channels_last)  # in place: parameters keep their identity
        self.callbacks = list(callbacks)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.optimizer = make_optimizer(model, config)
        self.steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
        self.scheduler = make_scheduler(self.optimizer, config, config.epochs * self.steps_per_epoch)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed steps of the current epoch
        self.running = [0.0, 0, 0]  # loss sum, correct, seen, over the current epoch so far
        self.epoch_seconds = 0.0  # time spent in the current epoch so far (survives resume)
        self.history: list[dict] = []
        self.rng_state = self.initial_rng_state(config.seed)
        self.stop_requested = False

    @staticmethod
    def initial_rng_state(seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.get_rng_state()

    # ---------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train the remaining epochs; returns the per-epoch metrics of the whole run."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.emit("on_train_begin")
        with torch.random.fork_rng(devices=[]), stop_on_signals(self):
            torch.set_rng_state(self.rng_state)  # dropout draws from the global generator
            while self.epoch < self.config.epochs:
                self.run_epoch()
        self.emit("on_train_end")
        return self.history

    def run_epoch(self) -> None:
        self.emit("on_epoch_begin")
        order = epoch_order(len(self.data.train_labels), self.config.seed, self.epoch)
        started = time.perf_counter() - self.epoch_seconds
        self.model.train()
        bs = self.config.batch_size
        while self.step < self.steps_per_epoch:
            index = order[self.step * bs:(self.step + 1) * bs]
            images = augment(self.data.train_images[index], self.config.augment_shift, self.config.augment_flip)
            inputs = to_inputs(images, self.config.channels_last)  # (B, C, H, W) floats in [0, 1]
            loss, correct = self.train_step(inputs, self.data.train_labels[index])
            self.step += 1
            self.running[0] += loss * len(index)
            self.running[1] += correct
            self.running[2] += len(index)
            self.emit("on_batch_end", loss, correct / len(index))
            if self.stop_requested and self.step < self.steps_per_epoch:
                self.epoch_seconds = time.perf_counter() - started
                self.rng_state = torch.get_rng_state()
                self.emit("on_interrupt")
                raise TrainingInterrupted(f"stopped in epoch {self.epoch + 1} after step {self.step} "
                                          f"of {self.steps_per_epoch}")
        self.finish_epoch(time.perf_counter() - started)
        if self.stop_requested and self.epoch < self.config.epochs:
            self.emit("on_interrupt")
            raise TrainingInterrupted(f"stopped after epoch {self.epoch}")

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """One optimisation step; returns the batch's mean loss and number correct."""
        logits = self.model(inputs)  # (B, num_classes)
        loss = self.loss_fn(logits, labels)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss became {value} in epoch {self.epoch + 1}, step {self.step + 1}: training diverged. "
                f"Try a lower learning rate (train.lr is {self.config.lr:g}) or batch norm.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return value, int((logits.argmax(dim=1) == labels).sum())

    def finish_epoch(self, seconds: float) -> None:
        loss_sum, correct, seen = self.running
        val_loss, val_accuracy = self.validate()
        self.epoch += 1
        metrics = dict(epoch=self.epoch, train_loss=loss_sum / seen, train_accuracy=correct / seen,
                       val_loss=val_loss, val_accuracy=val_accuracy, seconds=seconds,
                       lr=self.optimizer.param_groups[0]["lr"])
        self.history.append(metrics)
        self.step, self.running, self.epoch_seconds = 0, [0.0, 0, 0], 0.0
        self.rng_state = torch.get_rng_state()
        self.emit("on_epoch_end", metrics)

    def validate(self) -> tuple[float, float]:
        if len(self.data.val_labels) == 0:
            return math.nan, math.nan
        c = self.config
        logits = infer(self.model, self.data.val_images, c.eval_batch_size, c.channels_last, c.tta)
        return loss_and_accuracy(logits, self.data.val_labels)

    def emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly where training stands."""
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), epoch=self.epoch, step=self.step,
                    running=list(self.running), epoch_seconds=self.epoch_seconds, history=self.history,
                    rng_state=self.rng_state)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.running = [float(state["running"][0]), int(state["running"][1]), int(state["running"][2])]
        self.epoch_seconds = float(state["epoch_seconds"])
        self.history = list(state["history"])
        self.rng_state = state["rng_state"]


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """Ctrl-C or SIGTERM asks the trainer to stop after the current step; a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ProgressBar(Callback):
    """A live bar per epoch (loss and accuracy so far), then one line per epoch."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None

    def on_epoch_begin(self, trainer: Trainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"epoch {trainer.epoch + 1}/{trainer.config.epochs}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                 console=self.console, transient=True, disable=not self.console.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task("train", total=trainer.steps_per_epoch, completed=trainer.step, stats="")

    def on_batch_end(self, trainer: Trainer, loss: float, accuracy: float) -> None:
        if trainer.step % 20 == 0 or trainer.step == trainer.steps_per_epoch:  # redraws cost time
            loss_sum, correct, seen = trainer.running
            self.progress.update(self.task, completed=trainer.step,
                                 stats=f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        self.stop()
        self.console.print(format_epoch(metrics, trainer.config.epochs), highlight=False)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.stop()

    def on_train_end(self, trainer: Trainer) -> None:
        self.stop()


def format_epoch(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f}  "
            f"val loss {m['val_loss']:.4f} acc {m['val_accuracy']:.4f}  {m['seconds']:.1f}s")
