"""Weight averaging: an exponential moving average of a model's weights, updated after every step.

The averaged network generalises a little better than the last step's (Polyak averaging; timm's
ModelEmaV3), and it is the one evaluated, tested and saved when `train.ema` is on. Early on the
decay is lowered, (1 + t) / (10 + t) at update t, so the average does not remember the random
initialisation for a thousand steps.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """The average of `model`'s weights; batch-norm statistics are copied, they are averages already."""

    key = "ema"  # its checkpoint key (cnnlab.training.averaging's protocol)
    held = "the averaged weights train.ema asks for"

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # same layout (channels-last) as model
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged: list[torch.Tensor] = list(self.model.parameters())
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - decay)  # avg += (1 - decay) * (current - avg), fused
        self.copy_buffers(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.update(model)

    def before_evaluation(self, model: nn.Module) -> None:
        self.copy_buffers(model)  # the statistics validation uses: rank 0's, once broadcast

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return dict(model=self.model.state_dict(), updates=self.updates)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
