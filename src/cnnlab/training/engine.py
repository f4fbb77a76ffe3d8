"""The training engine: epochs, optimisation, schedules, callbacks. Knows nothing of files or the model.

Data order, dropout and every other random choice come from seeded generators whose state is part
of `Trainer.state_dict()`, so a run resumed from a checkpoint ends bitwise equal to one that never
stopped (same machine, same thread count, same number of processes, on the CPU).

Data-parallel: every rank draws the same global order each epoch and takes its slice of every global
batch (`training.sampling`); the loss is scaled so that DistributedDataParallel's gradient average
equals the gradient of the global batch's mean loss, as one process would compute it.

What a step adds beyond forward, backward and update lives in objects the trainer holds: the compiled
forward (`compiling.TrainingForward`), the averagers (`averaging`: EMA, lookahead), early stopping
(`early_stopping`), the device-side totals read back at sync points (`state.StepTotals`). Callbacks see a
`callbacks.Progress`, never the trainer.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import TrainConfig, peak_lr
from cnnlab.data.pixels import to_inputs
from cnnlab.data.sources import Source
from cnnlab.errors import UserError
from cnnlab.heap import keep_freed_memory
from cnnlab.training.augment import augment_as
from cnnlab.training.averaging import evaluated_model, make_averagers
from cnnlab.training.callbacks import Callback, EpochMetrics, Progress
from cnnlab.training.compiling import TrainingForward
from cnnlab.training.distributed import SINGLE, Context
from cnnlab.training.early_stopping import EarlyStopping
from cnnlab.training.evaluate import predict_batches
from cnnlab.training.optim import make_optimizer, make_scheduler
from cnnlab.training.precision import autocast, slow_notice
from cnnlab.training.sampling import Sampler, class_weights, initial_rng_state
from cnnlab.training.state import Running, StepTotals, Synced, TrainState

# Steps between reading the running loss back on a GPU (the progress bar's redraw cadence). On the CPU every
# step is read: the kernels have already run when .item() asks, so a sync there costs nothing.
SYNC_EVERY_ON_ACCELERATORS = 20


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a resumable state."""

    run: Path | None = None  # the run directory, filled in by whoever knows it


@dataclass
class TrainData:
    """The training split and the validation split (which may be empty)."""

    train: Source
    val: Source


def prepare_process(config: TrainConfig, device: torch.device) -> None:
    """The process-wide settings training wants, made once by whoever owns the process (`cnnlab.pipeline`, the
    learning-rate finder) before training: torch's thread count (`train.threads`), and on the CPU the C heap
    keeping each step's freed tensors for the next (`heap.keep_freed_memory`)."""
    if device.type == "cpu":
        keep_freed_memory()
    if config.threads:
        torch.set_num_threads(config.threads)


def frozen_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What `train.freeze_epochs` holds fixed: the feature layers' weights, batch norm's excepted
    (fastai's train_bn: the normalisation adapts to the new data while the kernels stay)."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    return [p for name, p in model.named_parameters() if name.startswith("features.") and id(p) not in norms]


def data_parallel(model: nn.Module, context: Context) -> nn.Module:
    """`model` as the step calls it: wrapped in DistributedDataParallel in a data-parallel job (which
    broadcasts rank 0's weights now and averages the gradients in backward), else itself."""
    if not context.parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


class Trainer:
    """Trains a model on a training and a validation Source for `config.epochs` epochs, calling callbacks.

    `network` is the module trained; `evaluated` the one validated, tested and saved (EMA's average of
    `network` with `train.ema`, else `network` itself). Call `prepare_process` once before `fit`.
    """

    def __init__(self, model: nn.Module, data: TrainData, config: TrainConfig,
                 callbacks: Sequence[Callback] = (), context: Context = SINGLE):
        self.network, self.data, self.config, self.context = model, data, config, context
        self.device = context.device
        self.callbacks = list(callbacks)
        model.to(self.device)
        if config.channels_last:
            # In place: parameters keep their identity. torch's stubs leave memory_format out of Module.to's overloads.
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        notice = slow_notice(config.precision, self.device)
        if notice and context.rank == 0:
            print(notice, file=sys.stderr)
        self.forward = TrainingForward(data_parallel(model, context), config.compile,
                                       f"rank {context.rank}: " if context.parallel else "")
        num_classes = int(getattr(model, "num_classes", 0)) or int(data.train.labels.max()) + 1
        # Summed, then divided by the global batch size in the step (see the module docstring).
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weights(config, data.train.labels, num_classes),
                                           label_smoothing=config.label_smoothing, reduction="sum")
        self.sampler = Sampler(data.train, config, num_classes, context.rank, context.world)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.frozen = frozen_parameters(model) if config.freeze_epochs else []
        self.optimizer = make_optimizer(model, config)
        self.scheduler = make_scheduler(self.optimizer, config, config.epochs * self.steps_per_epoch)
        self.averagers = make_averagers(model, config, config.epochs * self.steps_per_epoch)
        self.evaluated = evaluated_model(model, self.averagers)
        self.early_stopping = EarlyStopping(config.early_stopping)
        self.totals = StepTotals(context)
        self.sync_every = config.sync_every or (1 if self.device.type == "cpu" else SYNC_EVERY_ON_ACCELERATORS)
        self.rng_state = initial_rng_state(config.seed, context.rank)  # this rank's dropout/augment generator
        self.state = TrainState(rng_states=self.rng_state.unsqueeze(0))  # (world, n): as of the last sync point
        self.stop_requested = False  # Ctrl-C, SIGTERM or a callback: stop at the next sync point, resumable

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metrics of every completed epoch."""
        return self.state.history

    @property
    def finished(self) -> bool:
        """Every epoch trained, or early stopping ended the run."""
        return self.state.epoch >= self.config.epochs or self.early_stopping.stopped is not None

    @property
    def kept_epoch(self) -> int | None:
        """The epoch whose weights the run keeps, when early stopping is on (None: the last)."""
        return self.early_stopping.kept_epoch

    def progress(self) -> Progress:
        """What callbacks see of training now."""
        state = self.state
        return Progress(state.epoch, state.step, self.steps_per_epoch, self.config.epochs, state.running,
                        state.history, self.evaluated, self.early_stopping.record(state.epoch), self.state_dict,
                        self.request_stop)

    def request_stop(self) -> None:
        self.stop_requested = True

    def emit(self, hook: str, *args: Any) -> None:
        progress = self.progress()
        for callback in self.callbacks:
            getattr(callback, hook)(progress, *args)

    # ---------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the per-epoch metrics of the whole run."""
        self.emit("on_train_begin")
        with torch.random.fork_rng(devices=[]), stop_on_signals(self):
            torch.set_rng_state(self.rng_state)  # dropout draws from the global generator
            while not self.finished:
                self.run_epoch()
        self.early_stopping.restore_best(self.evaluated)
        self.emit("on_train_end")
        return self.state.history

    def run_epoch(self) -> None:
        state = self.state
        self.emit("on_epoch_begin")
        started = time.perf_counter() - state.epoch_seconds
        self.forward.epoch_seconds = 0.0
        self.network.train()
        for images, labels in self.sampler.batches(state.epoch, state.step):
            images = augment_as(images, self.config)
            synced = self.train_step(images, labels, self.sync_due(state.step + 1))
            state.step += 1
            if synced is None:  # totals stay on the device until the next sync point
                continue
            state.running.add(synced.loss_sum, synced.correct, synced.seen)
            self.emit("on_batch_end", synced.loss_sum / max(synced.seen, 1), synced.correct / max(synced.seen, 1))
            if synced.stop and state.step < self.steps_per_epoch:
                state.epoch_seconds = time.perf_counter() - started - self.forward.epoch_seconds
                self.interrupt(f"stopped in epoch {state.epoch + 1} after step {state.step} of {self.steps_per_epoch}")
        self.finish_epoch(time.perf_counter() - started - self.forward.epoch_seconds)
        if self.stop_agreed() and state.epoch < self.config.epochs:
            self.interrupt(f"stopped after epoch {state.epoch}")

    def sync_due(self, step: int) -> bool:
        """Whether step `step` (1-based, in its epoch) reads the totals back: every `sync_every`-th, and the last."""
        return step % self.sync_every == 0 or step == self.steps_per_epoch

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, sync: bool = True) -> Synced | None:
        """One optimisation step on this rank's uint8 images (B, C, H, W) and labels (B,).

        With `sync`, returns the totals since the last sync point, the same on every rank, so every rank takes
        the same decision; without, None, reading nothing back from the device. A loss that turned NaN or
        infinite is caught at the next sync point, before that step's update (the steps in between have
        updated the weights in memory, but nothing is saved between sync points).
        """
        inputs = to_inputs(images, self.config.channels_last, self.device)  # floats in [0, 1]
        labels = labels.to(self.device)
        step = self.state.epoch * self.steps_per_epoch + self.state.step + 1  # this step's number in the run
        with self.forward.step(tuple(inputs.shape)):
            with autocast(self.config.precision, self.device):
                logits = self.forward(inputs).float()  # (B, num_classes); bf16-mixed computes them in bf16
            loss_sum = self.loss_fn(logits, labels)
            counts = self.totals.add(loss_sum, logits, labels, self.stop_requested)  # (4,), summed over ranks
            synced = self.totals.read(counts) if sync else None  # note: this is a CPU-GPU sync point
            if synced is not None and not math.isfinite(synced.loss_sum):  # every rank stops at this step
                self.diverged(synced)
            # The mean over the images all ranks read (unreadable ones skipped); DDP averages over ranks.
            scale = (self.context.world / max(synced.step_seen, 1) if synced is not None
                     else (self.context.world / counts[2].clamp(min=1)).float())
            self.optimizer.zero_grad(set_to_none=True)
            (loss_sum * scale).backward()
            for p in self.frozen_at(self.state.epoch):  # no gradient: the optimizer leaves them (and their decay)
                p.grad = None
            self.optimizer.step()
            self.scheduler.step()
            for averager in self.averagers:
                averager.after_step(self.network, step)
        return synced

    def frozen_at(self, epoch: int) -> list[nn.Parameter]:
        """The parameters `train.freeze_epochs` holds fixed in epoch `epoch` (0-based): none after them."""
        return self.frozen if epoch < self.config.freeze_epochs else []

    def diverged(self, synced: Synced) -> NoReturn:
        raise TrainingDiverged(
            f"loss became {synced.loss_sum / max(synced.seen, 1)} in epoch {self.state.epoch + 1} by step "
            f"{self.state.step + 1}: training diverged. Try a lower learning rate (train.lr is "
            f"{peak_lr(self.config):g}) or batch norm.")

    def interrupt(self, why: str) -> NoReturn:
        """Stop where every rank agreed to: record the generators, let callbacks save a checkpoint, raise."""
        self.sync_rng_states()
        self.emit("on_interrupt")
        raise TrainingInterrupted(why)

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (an all-reduce: every rank gets the same answer)."""
        return self.context.all_reduce_sum([float(self.stop_requested)])[0] > 0

    def sync_rng_states(self) -> None:
        """Record every rank's generator state (for checkpoints); a collective at sync points only."""
        self.rng_state = torch.get_rng_state()
        self.state.rng_states = self.context.all_gather(self.rng_state)

    def finish_epoch(self, seconds: float) -> None:
        state = self.state
        val_loss, val_accuracy = self.validate() if self.validates(state.epoch + 1) else (math.nan, math.nan)
        state.epoch += 1
        metrics = EpochMetrics(epoch=state.epoch, train_loss=state.running.loss,
                               train_accuracy=state.running.accuracy, val_loss=val_loss, val_accuracy=val_accuracy,
                               seconds=seconds, lr=self.optimizer.param_groups[0]["lr"])
        if self.config.compile:  # the steps that compiled, apart from the training time
            metrics["compile_seconds"] = self.forward.epoch_seconds
        state.history.append(cast(dict[str, Any], metrics))
        state.step, state.running, state.epoch_seconds = 0, Running(), 0.0
        self.early_stopping.after_epoch(state.epoch, metrics, self.evaluated)
        self.sync_rng_states()
        self.emit("on_epoch_end", metrics)

    def validates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) ends with a validation pass: every `train.val_every`-th, and the last."""
        return epoch % self.config.val_every == 0 or epoch >= self.config.epochs

    def validate(self) -> tuple[float, float]:
        """Validation loss and accuracy; each rank scores its slice and the sums are all-reduced."""
        if len(self.data.val) == 0:
            return math.nan, math.nan
        self.context.broadcast_buffers(self.network)  # batch-norm statistics: rank 0's, as saved
        for averager in self.averagers:
            averager.before_evaluation(self.network)
        c = self.config
        positions = torch.arange(len(self.data.val))[self.context.rank::self.context.world]
        loss_sum, correct, seen = 0.0, 0, 0
        for logits, labels in predict_batches(self.evaluated, self.data.val, positions, c.eval_batch_size,
                                              c.channels_last, c.tta, c.tta_shift):
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
        total_loss, total_correct, total_seen = self.context.all_reduce_sum([loss_sum, float(correct), float(seen)])
        return (total_loss / total_seen, total_correct / total_seen) if total_seen else (math.nan, math.nan)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: everything needed to continue exactly where training stands (`training.state`)."""
        return dict(model=self.network.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), **self.state.to_dict(),
                    **self.early_stopping.progress_dict(),
                    **{averager.key: averager.state_dict() for averager in self.averagers},
                    **self.early_stopping.weights_dict())

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint (checked by `training.state.check_checkpoint`)."""
        self.network.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.match_optimizer_state_layout()
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        for averager in self.averagers:
            if averager.key not in checkpoint:
                raise ValueError(f"its state has no {averager.key!r} ({averager.held})")
            averager.load_state_dict(checkpoint[averager.key])  # copied into its tensors: their layout is kept
        self.state = TrainState.from_dict(checkpoint)
        self.early_stopping.load_state_dict(checkpoint)
        if len(self.state.rng_states) == self.context.world:
            self.rng_state = self.state.rng_states[self.context.rank].clone()
        else:  # resumed with another number of processes: dropout draws restart from the seed
            self.rng_state = initial_rng_state(self.config.seed + self.state.epoch, self.context.rank)
            self.state.rng_states = self.context.all_gather(self.rng_state)
        if self.finished:
            self.early_stopping.restore_best(self.evaluated)  # a finished run is what it saved: the kept epoch's

    def match_optimizer_state_layout(self) -> None:
        """Give loaded moment buffers their parameter's memory layout (channels-last conv weights).

        Checkpoints store tensors contiguous; fused optimizers walk parameter and state memory in
        step, so a contiguous buffer beside a channels-last weight would pair the wrong elements
        (with 3 input channels, not with 1, where both layouts coincide).
        """
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """Ctrl-C or SIGTERM asks the trainer to stop after the current step; a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
