"""The learning-rate finder: train a copy of the model for a few steps at exponentially growing rates
and suggest one from where the loss falls fastest (Smith's range test, as fastai's `lr_find` and
Lightning's `LearningRateFinder` run it).

What the peers' users hit, and what this does instead: the model handed in is never trained (a deep
copy is; Lightning#6675, #9672 left the weights changed), the random state is the run's own and the
global one is untouched (the same suggestion on every call: fastai#3295), a NaN or exploding loss
ends the sweep and its points are left out of the suggestion (fastai#3476), and `train.lr: auto`
applies the suggestion (Lightning#21068).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from cnnlab.config import TrainConfig
from cnnlab.errors import UserError
from cnnlab.training.augment import augment_as
from cnnlab.training.distributed import SINGLE, Context
from cnnlab.training.engine import Synced, TrainData, Trainer, TrainingDiverged, prepare_process
from cnnlab.training.sampling import Sampler

START_LR = 1e-6  # the sweep's first rate
END_LR = 10.0  # its last; few networks train above 1, so the loss has exploded before this
STEPS = 80  # optimisation steps: ~11 rates per decade; under a tenth of an MNIST epoch at batch 64
SMOOTHING = 0.9  # the running average that watches for an explosion (bias-corrected, ~10 steps' memory)
WINDOW = 7  # points in the centred average the suggestion reads: no lag, unlike fastai's running average
EXPLODED = 4.0  # the sweep stops once the running average of the loss is this many times its minimum
RULES = ("auto", "steepest", "peak", "minimum")


class FinderFailed(UserError, RuntimeError):
    """The sweep could not suggest a rate (the loss never fell, or exploded at once)."""


@dataclass
class Finding:
    """The sweep's points, why it ended, and the suggested rate with the rule that chose it."""

    lrs: list[float]  # the rate of each step taken (peak rate: groups with an lr multiple scale it)
    losses: list[float]  # that step's mean training loss
    smoothed: list[float]  # the centred moving average of the losses, what the rule reads
    suggestion: float
    rule: str
    why: str  # the rule in words, with the numbers it read
    ended: str  # why the sweep stopped
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def finder_config(config: TrainConfig) -> TrainConfig:
    """The run's training settings for the sweep: its optimizer, batch, augmentation and loss, with a
    constant rate the finder sets each step, no averaging (nor lookahead), no early stopping, and no frozen layers."""
    return dataclasses.replace(config, lr=START_LR, schedule="constant", ema=0.0, lookahead=False, freeze_epochs=0,
                               compile=False,
                               early_stopping=dataclasses.replace(config.early_stopping, patience=0))


def rule_for(config: TrainConfig, rule: str = "auto") -> str:
    """`auto`: peak for a one-cycle schedule (its peak is held briefly: Smith's choice, the edge of the fall),
    steepest for a constant or cosine one (the rate the whole run starts at)."""
    if rule not in RULES:
        raise FinderFailed(f"lr-find rule: expected one of {', '.join(RULES)}, found {rule!r}")
    if rule != "auto":
        return rule
    return "peak" if config.schedule == "onecycle" else "steepest"


def find_lr(model: nn.Module, data: TrainData, config: TrainConfig, steps: int = STEPS, start: float = START_LR,
            end: float = END_LR, rule: str = "auto", context: Context = SINGLE) -> Finding:
    """Sweep the learning rate from `start` to `end` over `steps` steps of the run's own training, on a
    copy of `model`; the rate suggested by `rule` (steepest: where the smoothed loss falls fastest per
    decade; peak: the rate at the lowest loss, Smith's one-cycle peak; minimum: a tenth of that, fastai's
    `minimum`; auto: peak for one-cycle, else steepest)."""
    rule = rule_for(config, rule)
    if not (0 < start < end) or steps < 8:
        raise FinderFailed(f"lr-find: expected 0 < start < end and at least 8 steps, found start {start:g}, "
                           f"end {end:g}, {steps} steps")
    started = time.perf_counter()
    prepare_process(config, context.device)
    trainer = Trainer(copy.deepcopy(model), data, finder_config(config), context=context)
    rates = [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]
    lrs: list[float] = []
    losses: list[float] = []
    running: list[float] = []
    ended = f"reached {end:g}"
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(trainer.rng_state)  # the run's own draws: the same sweep on every call
        trainer.network.train()
        for lr, (images, labels) in zip(rates, first_batches(trainer.sampler, steps)):
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]  # the constant schedule resets it after each step
            images = augment_as(images, config)
            try:
                synced = cast(Synced, trainer.train_step(images, labels))  # synced by default: every step's loss
            except TrainingDiverged:
                ended = f"the loss became non-finite at {lr:.3g}"
                break
            loss = synced.loss_sum / max(synced.seen, 1)
            lrs.append(lr)
            losses.append(loss)
            running.append(smooth(running, loss, len(losses)))
            if len(running) > 5 and running[-1] > EXPLODED * min(running):
                ended = f"the loss exploded at {lr:.3g} (over {EXPLODED:g}x its lowest)"
                break
    smoothed = centred_average(losses)
    suggestion, why = suggest(lrs, smoothed, rule)
    return Finding(lrs, losses, smoothed, suggestion, rule, why, ended, time.perf_counter() - started)


def first_batches(sampler: Sampler, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's first `steps` training batches, in its own epoch order (epoch after epoch if needed)."""
    taken, epoch = 0, 0
    while taken < steps:
        slices = sampler.slices(epoch)[:steps - taken]
        yield from sampler.train.batches(slices)
        taken += len(slices)
        epoch += 1  # the next epoch's order, should the sweep outlast one


def smooth(previous: list[float], loss: float, n: int) -> float:
    """The bias-corrected exponential moving average after the n-th loss."""
    if not previous:
        return loss
    raw = previous[-1] * (1 - SMOOTHING ** (n - 1))  # undo the last correction
    return (SMOOTHING * raw + (1 - SMOOTHING) * loss) / (1 - SMOOTHING ** n)


def centred_average(values: list[float], window: int = WINDOW) -> list[float]:
    """Each value averaged with its neighbours, `window` points wide (narrower at the ends)."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def suggest(lrs: list[float], smoothed: list[float], rule: str) -> tuple[float, str]:
    """The rate `rule` reads off the smoothed curve, and the reason in words."""
    if len(smoothed) < 8:
        raise FinderFailed(f"lr-find: the loss exploded after {len(smoothed)} steps (at {lrs[-1] if lrs else 0:.3g}); "
                           f"nothing to suggest from. Try a smaller start rate, or check the data")
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    if rule == "peak":
        return lrs[lowest], f"the rate at the lowest smoothed loss ({smoothed[lowest]:.3f}), one-cycle's peak"
    if rule == "minimum":
        return lrs[lowest] / 10, (f"a tenth of {lrs[lowest]:.3g}, the rate at the lowest smoothed loss "
                                  f"({smoothed[lowest]:.3f})")
    # steepest: the most negative slope of the smoothed loss against log10(rate), before the lowest point,
    # leaving out the first few points (the average is still settling there)
    logs = [math.log10(lr) for lr in lrs]
    first = min(3, lowest)
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(max(first, 1), lowest)]
    if not slopes or min(slopes) >= 0:
        raise FinderFailed("lr-find: the loss never fell over the sweep; nothing to suggest. Try a wider range "
                           "(--start, --end) or more steps")
    best = max(first, 1) + min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[best], (f"the steepest fall of the smoothed loss, {slopes[best - max(first, 1)]:.3f} per decade "
                       f"at {lrs[best]:.3g} (lowest loss {smoothed[lowest]:.3f} at {lrs[lowest]:.3g})")
