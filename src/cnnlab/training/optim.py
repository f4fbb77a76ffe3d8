"""The optimizer and the learning-rate schedule a TrainConfig asks for."""
from __future__ import annotations

import functools
import inspect
from typing import Any, TypeVar

import torch
from torch import nn

from cnnlab.config import TrainConfig, peak_lr

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters in groups by how they learn. With the defaults, one group of everything.
    With decay_norms_and_biases off (and weight decay on), the 1-D ones (biases, batch-norm scales) apart,
    without weight decay: shrinking them only fights the normalisation. With norm_bias_lr_scale, the
    batch-norm biases apart, at that multiple of the learning rate (airbench's trick: a bias only shifts
    a channel, so it can move faster than the weights that shape it). Each group's "lr_scale" is its multiple
    of the configured learning rate, which make_scheduler reads. With features_lr_scale, the feature layers
    (`model.features`) learn at that multiple (fine-tuning: the head learns fast, the features slowly)."""
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    skip_decay = bool(config.weight_decay) and not config.decay_norms_and_biases
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = config.norm_bias_lr_scale if id(p) in norm_biases else 1.0
        if name.startswith("features."):
            scale *= config.features_lr_scale
        groups.setdefault((skip_decay and p.dim() <= 1, scale), []).append(p)
    lr = peak_lr(config)
    return [dict(params=params, lr=lr * scale, lr_scale=scale, **({"weight_decay": 0.0} if no_decay else {}))
            for (no_decay, scale), params in groups.items()]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; fused (one kernel for all parameters: ~20% faster steps on CPU)."""
    params, lr = parameter_groups(model, config), peak_lr(config)
    if config.optimizer == "adam":
        return eager(torch.optim.Adam)(params, lr=lr, weight_decay=config.weight_decay, fused=True)
    if config.optimizer == "adamw":
        return eager(torch.optim.AdamW)(params, lr=lr, weight_decay=config.weight_decay, fused=True)
    return eager(torch.optim.SGD)(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                  nesterov=config.momentum > 0, fused=True)


@functools.cache
def eager(base: type[OptimizerT]) -> type[OptimizerT]:
    """`base` without the wrappers that keep torch.compile out of torch.optim's methods.

    Those wrappers import `torch._dynamo` the first time an optimizer is built or stepped, even when nothing
    is compiled: about 1 s of every `cnnlab train`, a quarter of a `fast` run on MNIST (BENCHMARKS.md,
    "Start-up and data"). The engine never hands its optimizer to the compiler, so this subclass calls the
    functions they wrap (`inspect.unwrap`), with gradients off as the step's wrapper does; the arithmetic,
    state dicts and hooks are torch's own (tests/test_startup.py compares them bitwise).
    """
    def plain(name: str) -> Any:
        return inspect.unwrap(getattr(base, name))

    class Eager(base):  # type: ignore[valid-type, misc]
        def add_param_group(self, param_group: dict[str, Any]) -> None:
            plain("add_param_group")(self, param_group)

        def zero_grad(self, set_to_none: bool = True) -> None:
            plain("zero_grad")(self, set_to_none)

        def state_dict(self) -> dict[str, Any]:
            return plain("state_dict")(self)

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            plain("load_state_dict")(self, state_dict)

        def step(self, closure: Any = None) -> Any:
            with torch.no_grad():
                return plain("step")(self, closure)

    Eager.__name__ = Eager.__qualname__ = base.__name__
    return Eager


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning rate per optimisation step over the whole run."""
    if config.schedule == "onecycle" and total_steps >= 2:  # one step has no cycle: the constant rate below
        peaks = [peak_lr(config) * group["lr_scale"] for group in optimizer.param_groups]
        # A quarter of the run warms up; torch divides by that phase's length in steps minus one, so very
        # short runs (<= 4 steps) warm up for 1.5 steps instead of none.
        warm_up = 0.25 if 0.25 * total_steps > 1 else 1.5 / total_steps
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps,
                                                   pct_start=warm_up)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
