"""Lookahead (Zhang et al. 2019), on airbench's schedule: every few steps, the weights are pulled back
toward a slow copy of themselves, and the slow copy follows them.

Every `EVERY` optimiser steps, and at the last one: slow += (1 - decay) · (weights - slow), then
weights = slow. The decay grows with the run, 0.95^5 · (t / T)^3 at step t of T: nothing early on, when
the weights should move freely, and a strong pull late, when the optimiser's noise is what the average
removes. The run ends on the slow weights, which are evaluated and saved. (airbench's last pull has
decay 1, dropping the steps since the previous pull; here the last pull takes them in like any other,
so a run whose length is not a multiple of 5 loses nothing.) A run of fewer than `MIN_STEPS` steps
trains without it: its slow weights would still be the initial ones. Batch-norm statistics are
averaged with the weights, as airbench does (they are float buffers of the same model).
"""
from __future__ import annotations

import torch
from torch import nn

EVERY = 5  # optimiser steps between pulls
PEAK_DECAY = 0.95**EVERY  # the decay of the last pull
MIN_STEPS = 2 * EVERY  # shorter runs train without lookahead


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights and float buffers (batch-norm statistics), by state-dict name."""
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_floating_point()}


def decay_at(step: int, total: int) -> float:
    """The pull's decay after `step` of `total` optimiser steps: 0 at the start, PEAK_DECAY at the end."""
    return PEAK_DECAY * (min(step, total) / total) ** 3


class Lookahead:
    """The slow weights of `model` and the pull toward them."""

    key = "lookahead"  # its checkpoint key (cnnlab.training.averaging's protocol)
    held = "the slow weights train.lookahead keeps"

    def __init__(self, model: nn.Module, total_steps: int):
        self.total_steps = total_steps
        self.slow = {name: tensor.detach().clone() for name, tensor in float_tensors(model).items()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Call after optimiser step number `step` (1-based, counted over the whole run)."""
        if step % EVERY and step < self.total_steps:
            return
        current = [tensor.detach() for tensor in float_tensors(model).values()]
        slow = list(self.slow.values())
        torch._foreach_lerp_(slow, current, 1.0 - decay_at(step, self.total_steps))  # fused over all tensors
        torch._foreach_copy_(current, slow)

    def before_evaluation(self, model: nn.Module) -> None:
        pass  # the slow weights are copied into the model at each pull: nothing of their own to evaluate

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.slow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.slow) - set(state)
        if missing:
            raise ValueError(f"its lookahead state lacks {sorted(missing)[0]!r}")
        for name, tensor in self.slow.items():
            tensor.copy_(state[name])  # into the existing tensors: their memory layout is kept
