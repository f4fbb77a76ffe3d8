"""Weight averagers: what `train.ema` and `train.lookahead` add to a step, behind one small protocol.

The trainer holds them in a list and walks it after every optimiser step, and when it saves or loads a
checkpoint; it knows neither by name. Each keeps its own state under its own checkpoint key.
"""
from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from cnnlab.config import TrainConfig
from cnnlab.training.ema import EMA
from cnnlab.training.lookahead import MIN_STEPS, Lookahead


class Averager(Protocol):
    """Something that follows the weights step by step and is saved with the checkpoint."""

    key: str  # its checkpoint key
    held: str  # what it keeps, in words, for the error when a checkpoint lacks it

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after optimiser step number `step` (1-based, over the whole run) of `model`."""

    def before_evaluation(self, model: nn.Module) -> None:
        """Called before a validation pass, once `model`'s batch-norm statistics are the ones saved."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def make_averagers(model: nn.Module, config: TrainConfig, total_steps: int) -> list[Averager]:
    """The averagers a config asks for, in the order they act after a step: the EMA averages the step's
    weights, then lookahead pulls them toward its slow copy. A run too short for lookahead trains without it."""
    averagers: list[Averager] = []
    if config.ema:
        averagers.append(EMA(model, config.ema))
    if config.lookahead and total_steps >= MIN_STEPS:
        averagers.append(Lookahead(model, total_steps))
    return averagers


def evaluated_model(model: nn.Module, averagers: list[Averager]) -> nn.Module:
    """What is validated, tested and saved: the EMA's averaged copy with `train.ema`, else `model` itself
    (lookahead's slow weights are copied into `model` at its pulls)."""
    return next((a.model for a in averagers if isinstance(a, EMA)), model)
