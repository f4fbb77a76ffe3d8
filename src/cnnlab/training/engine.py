"""The training engine: epochs, optimisation, schedules, callbacks. Knows nothing of files or the model.

Data order, dropout and every other random choice come from seeded generators whose state is part
of `Trainer.state_dict()`, so a run resumed from a checkpoint ends bitwise equal to one that never
stopped (same machine, same thread count, same number of processes, on the CPU).

Data-parallel: every rank draws the same global order each epoch and takes its slice of every global
batch (`index[rank::world]`); the loss is scaled so that DistributedDataParallel's gradient average
equals the gradient of the global batch's mean loss, as one process would compute it.
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
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import ConfigError, TrainConfig, peak_lr
from cnnlab.data.pixels import to_inputs
from cnnlab.data.sources import Source
from cnnlab.errors import UserError
from cnnlab.heap import keep_freed_memory
from cnnlab.training.augment import augment_as
from cnnlab.training.callbacks import Callback
from cnnlab.training.compiling import compiled, failure_line
from cnnlab.training.distributed import SINGLE, Context
from cnnlab.training.ema import EMA
from cnnlab.training.evaluate import predict_batches
from cnnlab.training.lookahead import MIN_STEPS, Lookahead
from cnnlab.training.optim import make_optimizer, make_scheduler
from cnnlab.training.precision import autocast, slow_notice
from cnnlab.training.state import Running, TrainState

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


def steps_in_epoch(n: int, batch_size: int) -> int:
    """Global batches per epoch, the last one possibly short. The same for any number of ranks, so a
    run can resume with another (a rank whose slice of the short batch is empty still takes the step)."""
    return math.ceil(n / batch_size)


def epoch_order(n: int, seed: int, epoch: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The order of the training set in a given epoch: a function of (seed, epoch) only.

    Without `weights` a permutation (each image once); with per-image weights (N,), n draws with
    replacement in proportion to them (`train.sampling: balanced`).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is not None:
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class (num_classes,) in a split's labels."""
    return torch.bincount(labels, minlength=num_classes)[:num_classes]


def class_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The loss weight of each class (num_classes,) `train.class_weights` asks for, or None.

    balanced: n / (classes * count), scikit-learn's rule: a class with half the images counts twice.
    """
    if config.class_weights is None:
        return None
    if config.class_weights == "balanced":
        counts = class_counts(labels, num_classes).clamp(min=1).double()
        return (len(labels) / (num_classes * counts)).float()
    if len(config.class_weights) != num_classes:
        raise ConfigError(f"train.class_weights: expected {num_classes} weights, one per class, "
                          f"found {len(config.class_weights)}")
    return torch.tensor(config.class_weights, dtype=torch.float32)


def sampling_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Per-image draw weights (N,) for `train.sampling: balanced` (each class as likely), or None."""
    if config.sampling != "balanced":
        return None
    counts = class_counts(labels, num_classes).clamp(min=1).double()
    return (1.0 / counts)[labels]


def frozen_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What `train.freeze_epochs` holds fixed: the feature layers' weights, batch norm's excepted
    (fastai's train_bn: the normalisation adapts to the new data while the kernels stay)."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    return [p for name, p in model.named_parameters() if name.startswith("features.") and id(p) not in norms]


class Trainer:
    """Trains a model on a training and a validation Source for `config.epochs` epochs, calling callbacks."""

    def __init__(self, model: nn.Module, data: TrainData, config: TrainConfig,
                 callbacks: Sequence[Callback] = (), context: Context = SINGLE):
        self.model, self.data, self.config, self.context = model, data, config, context
        self.device = context.device
        if self.device.type == "cpu":
            keep_freed_memory()  # each step's large tensors reused from the heap, not faulted in afresh
        model.to(self.device)
        if config.channels_last:
            # In place: parameters keep their identity. torch's stubs leave memory_format out of Module.to's overloads.
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.eager_net = self.wrap_for_data_parallel(model)
        notice = slow_notice(config.precision, self.device)
        if notice and context.rank == 0:
            print(notice, file=sys.stderr)
        self.net = compiled(self.eager_net) if config.compile else self.eager_net  # what the training step calls
        self.shapes_compiled: set[tuple[int, ...]] = set()  # batch shapes the compiled step has met
        self.sync_every = config.sync_every or (1 if self.device.type == "cpu" else SYNC_EVERY_ON_ACCELERATORS)
        self.pending = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, seen since a sync
        self.compile_seconds = 0.0  # this epoch's steps that compiled (the first of each batch shape)
        self.compile_total = 0.0  # every compiling step's seconds in this process
        self.callbacks = list(callbacks)
        num_classes = int(getattr(model, "num_classes", 0)) or int(data.train.labels.max()) + 1
        # Summed, then divided by the global batch size in the step (see the module docstring).
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weights(config, data.train.labels, num_classes),
                                           label_smoothing=config.label_smoothing, reduction="sum")
        self.draw_weights = sampling_weights(config, data.train.labels, num_classes)
        self.frozen = frozen_parameters(model) if config.freeze_epochs else []
        self.optimizer = make_optimizer(model, config)
        self.steps_per_epoch = steps_in_epoch(len(data.train), config.batch_size)
        total_steps = config.epochs * self.steps_per_epoch
        self.scheduler = make_scheduler(self.optimizer, config, total_steps)
        self.ema = EMA(model, config.ema) if config.ema else None  # the averaged weights, when asked for
        self.lookahead = Lookahead(model, total_steps) if config.lookahead and total_steps >= MIN_STEPS else None
        self.rng_state = self.initial_rng_state(config.seed, context.rank)  # this rank's dropout/augment generator
        self.state = TrainState(rng_states=self.rng_state.unsqueeze(0))  # (world, n): as of the last sync point
        self.stop_requested = False
        self.best_weights: dict[str, torch.Tensor] | None = None  # the evaluation model at the best epoch

    def wrap_for_data_parallel(self, model: nn.Module) -> nn.Module:
        if not self.context.parallel:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)  # broadcasts rank 0's weights now

    @staticmethod
    def initial_rng_state(seed: int, rank: int = 0) -> torch.Tensor:
        """The dropout/augmentation generator of a rank: rank 0 draws as a single process would."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1_000_003 * rank)
            return torch.get_rng_state()

    @property
    def evaluation_model(self) -> nn.Module:
        """What is validated, tested and saved: the averaged weights with `train.ema`, else the model itself."""
        return self.ema.model if self.ema is not None else self.model

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metrics of every completed epoch."""
        return self.state.history

    @property
    def finished(self) -> bool:
        """Every epoch trained, or early stopping ended the run."""
        return self.state.epoch >= self.config.epochs or self.state.stopped is not None

    # ---------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the per-epoch metrics of the whole run."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.emit("on_train_begin")
        with torch.random.fork_rng(devices=[]), stop_on_signals(self):
            torch.set_rng_state(self.rng_state)  # dropout draws from the global generator
            while not self.finished:
                self.run_epoch()
        self.keep_best()
        self.emit("on_train_end")
        return self.state.history

    def global_batches(self) -> list[torch.Tensor]:
        """This epoch's remaining global batches: positions in the training split."""
        order = epoch_order(len(self.data.train), self.config.seed, self.state.epoch, self.draw_weights)
        bs = self.config.batch_size
        return [order[step * bs:(step + 1) * bs] for step in range(self.state.step, self.steps_per_epoch)]

    def run_epoch(self) -> None:
        state = self.state
        self.emit("on_epoch_begin")
        started = time.perf_counter() - state.epoch_seconds
        self.compile_seconds = 0.0
        self.model.train()
        rank, world = self.context.rank, self.context.world
        shards = [index[rank::world] for index in self.global_batches()]  # disjoint; together the global batch
        for images, labels in self.data.train.batches(shards):
            images = augment_as(images, self.config)
            sync = (state.step + 1) % self.sync_every == 0 or state.step + 1 == self.steps_per_epoch
            synced = self.train_step(images, labels, sync)
            state.step += 1
            if self.lookahead is not None:
                self.lookahead.after_step(self.model, state.epoch * self.steps_per_epoch + state.step)
            if synced is None:  # totals stay on the device until the next sync point
                continue
            loss_sum, correct, seen, stop = synced
            state.running.add(loss_sum, correct, seen)
            self.emit("on_batch_end", loss_sum / max(seen, 1), correct / max(seen, 1))
            if stop and state.step < self.steps_per_epoch:
                state.epoch_seconds = time.perf_counter() - started - self.compile_seconds
                self.sync_rng_states()
                self.emit("on_interrupt")
                raise TrainingInterrupted(f"stopped in epoch {state.epoch + 1} after step {state.step} "
                                          f"of {self.steps_per_epoch}")
        self.finish_epoch(time.perf_counter() - started - self.compile_seconds)
        if self.stop_agreed() and state.epoch < self.config.epochs:
            self.emit("on_interrupt")
            raise TrainingInterrupted(f"stopped after epoch {state.epoch}")

    @overload
    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   sync: Literal[True] = True) -> tuple[float, int, int, bool]: ...

    @overload
    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   sync: bool) -> tuple[float, int, int, bool] | None: ...

    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   sync: bool = True) -> tuple[float, int, int, bool] | None:
        """One optimisation step on this rank's uint8 images (B, C, H, W).

        With `sync`, returns the loss sum, number correct and number seen of the global batches since the
        last sync point, and whether any rank was asked to stop: the same numbers on every rank, so every
        rank takes the same decision. Without, returns None and reads nothing back from the device: the
        step's numbers are added up there (a host sync per step is what keeps a GPU waiting). A loss that
        turned NaN or infinite is caught at the next sync point, before that step's update; the steps in
        between have updated the weights in memory, but nothing is saved between sync points.
        """
        inputs = to_inputs(images, self.config.channels_last, self.device)  # floats in [0, 1]
        labels = labels.to(self.device)
        compiling = self.net is not self.eager_net and tuple(inputs.shape) not in self.shapes_compiled
        started = time.perf_counter()
        with autocast(self.config.precision, self.device):
            logits = self.forward(inputs, compiling).float()  # (B, num_classes); bf16-mixed computes them in bf16
        loss_sum = self.loss_fn(logits, labels)
        # (loss sum, correct, seen, stop asked) of this rank's slice, summed over ranks on the device; the host's
        # numbers go in as fills (a kernel argument), not copies, which would wait for the device
        counts = torch.stack([loss_sum.detach().double(), (logits.argmax(dim=1) == labels).sum().double(),
                              torch.full((), float(len(labels)), dtype=torch.float64, device=self.device),
                              torch.full((), float(self.stop_requested), dtype=torch.float64, device=self.device)])
        self.context.all_reduce_tensor(counts)
        self.pending += counts[:3]
        if sync:
            total, hits, seen_since = self.pending.tolist()
            seen, stops = counts[2].item(), counts[3].item()
            self.pending.zero_()
            if not math.isfinite(total):  # checked on the all-reduced sum: every rank stops at this step
                raise TrainingDiverged(
                    f"loss became {total / max(seen_since, 1)} in epoch {self.state.epoch + 1} by step "
                    f"{self.state.step + 1}: training diverged. Try a lower learning rate (train.lr is "
                    f"{peak_lr(self.config):g}) or batch norm.")
            scale: float | torch.Tensor = self.context.world / max(seen, 1)
        else:
            scale = (self.context.world / counts[2].clamp(min=1)).float()
        self.optimizer.zero_grad(set_to_none=True)
        # The mean over the images all ranks read (unreadable ones skipped); DDP averages over ranks.
        (loss_sum * scale).backward()
        if self.state.epoch < self.config.freeze_epochs:
            for p in self.frozen:  # no gradient: the optimizer leaves them (and their decay) alone
                p.grad = None
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if compiling:  # torch.compile compiled this shape's forward and backward in this step
            self.shapes_compiled.add(tuple(inputs.shape))
            self.compile_seconds += time.perf_counter() - started
            self.compile_total += time.perf_counter() - started
        return (total, int(hits), int(seen_since), stops > 0) if sync else None

    def forward(self, inputs: torch.Tensor, compiling: bool) -> torch.Tensor:
        """The training forward pass; a step that compiles and fails goes on eagerly, for the rest of the run."""
        if not compiling:
            return self.net(inputs)
        try:
            return self.net(inputs)
        except torch.OutOfMemoryError:
            raise  # the step's size, not the compiler: eager would not fit either
        except Exception as error:  # noqa: BLE001  (whatever the compiler raised: eager may still work)
            rank = f"rank {self.context.rank}: " if self.context.parallel else ""
            print(rank + failure_line(error), file=sys.stderr)
            self.net = self.eager_net
            return self.net(inputs)

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
        metrics = dict(epoch=state.epoch, train_loss=state.running.loss, train_accuracy=state.running.accuracy,
                       val_loss=val_loss, val_accuracy=val_accuracy, seconds=seconds,
                       lr=self.optimizer.param_groups[0]["lr"])
        if self.config.compile:  # the steps that compiled, apart from the training time
            metrics["compile_seconds"] = self.compile_seconds
        state.history.append(metrics)
        state.step, state.running, state.epoch_seconds = 0, Running(), 0.0
        self.track_best(metrics)
        self.sync_rng_states()
        self.emit("on_epoch_end", metrics)

    def validates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) ends with a validation pass: every `train.val_every`-th, and the last."""
        return epoch % self.config.val_every == 0 or epoch >= self.config.epochs

    # ------------------------------------------------------------------------ early stopping
    def track_best(self, metrics: dict[str, Any]) -> None:
        """Remember the best epoch's weights; stop after `patience` epochs without improvement.

        The metric is all-reduced validation, the same number on every rank: all ranks stop together.
        """
        rule = self.config.early_stopping
        if not rule.patience:
            return
        value, best = metrics[rule.metric], self.state.best
        if math.isnan(value):  # an epoch not validated (train.val_every) or no validation split: nothing to judge
            return
        lower_is_better = rule.metric.endswith("loss")
        if math.isfinite(value) and (best is None or (value < best["value"] - rule.min_delta if lower_is_better
                                                      else value > best["value"] + rule.min_delta)):
            self.state.best = dict(epoch=self.state.epoch, value=value, metric=rule.metric)
            self.best_weights = {k: v.detach().clone() for k, v in self.evaluation_model.state_dict().items()}
        elif best is not None and self.state.epoch - best["epoch"] >= rule.patience:
            # the gap, not the patience: with train.val_every the first validation past the patience ends the run
            self.state.stopped = (f"{rule.metric} did not improve by more than {rule.min_delta:g} for "
                                  f"{self.state.epoch - best['epoch']} epoch(s) after epoch {best['epoch']} "
                                  f"({best['value']:.4f})")

    @property
    def kept_epoch(self) -> int | None:
        """The epoch whose weights the run keeps, when early stopping is on (None: the last)."""
        return self.state.best["epoch"] if self.state.best is not None and self.best_weights is not None else None

    def keep_best(self) -> None:
        """Give the evaluation model the best epoch's weights (early stopping's restore)."""
        if self.best_weights is not None:
            self.evaluation_model.load_state_dict(self.best_weights)

    def validate(self) -> tuple[float, float]:
        """Validation loss and accuracy; each rank scores its slice and the sums are all-reduced."""
        if len(self.data.val) == 0:
            return math.nan, math.nan
        self.context.broadcast_buffers(self.model)  # batch-norm statistics: rank 0's, as saved
        if self.ema is not None:
            self.ema.copy_buffers(self.model)
        c = self.config
        positions = torch.arange(len(self.data.val))[self.context.rank::self.context.world]
        loss_sum, correct, seen = 0.0, 0, 0
        for logits, labels in predict_batches(self.evaluation_model, self.data.val, positions, c.eval_batch_size,
                                              c.channels_last, c.tta, c.tta_shift):
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
        total_loss, total_correct, total_seen = self.context.all_reduce_sum([loss_sum, float(correct), float(seen)])
        return (total_loss / total_seen, total_correct / total_seen) if total_seen else (math.nan, math.nan)

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: everything needed to continue exactly where training stands (`training.state`)."""
        checkpoint = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                          scheduler=self.scheduler.state_dict(), **self.state.to_dict())
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self.lookahead is not None:
            checkpoint["lookahead"] = self.lookahead.state_dict()
        if self.best_weights is not None:
            checkpoint["best_model"] = self.best_weights
        return checkpoint

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint (checked by `training.state.check_checkpoint`)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.match_optimizer_state_layout()
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise ValueError("its state has no 'ema' (the averaged weights train.ema asks for)")
            self.ema.load_state_dict(checkpoint["ema"])  # copied into its tensors: their layout is kept
        if self.lookahead is not None:
            if "lookahead" not in checkpoint:
                raise ValueError("its state has no 'lookahead' (the slow weights train.lookahead keeps)")
            self.lookahead.load_state_dict(checkpoint["lookahead"])
        self.state = TrainState.from_dict(checkpoint)
        if self.state.best is not None:
            if "best_model" not in checkpoint:
                raise ValueError("its state has no 'best_model' (the best epoch's weights early stopping keeps)")
            self.best_weights = {k: v.clone() for k, v in checkpoint["best_model"].items()}
        if len(self.state.rng_states) == self.context.world:
            self.rng_state = self.state.rng_states[self.context.rank].clone()
        else:  # resumed with another number of processes: dropout draws restart from the seed
            self.rng_state = self.initial_rng_state(self.config.seed + self.state.epoch, self.context.rank)
            self.state.rng_states = self.context.all_gather(self.rng_state)
        if self.finished:
            self.keep_best()  # a finished run is what it saved: the kept epoch's weights

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
