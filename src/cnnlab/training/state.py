"""Where training stands, as one dataclass, and the checkpoint schema defined once beside it; the step totals
kept on the device between sync points (`StepTotals`).

A checkpoint is the model's, the optimizer's and the schedule's own state dicts plus a `TrainState` (and the
parts early stopping and the averagers keep: `Trainer.state_dict`);
`check_checkpoint` is the one description of what a checkpoint must hold, used when reading one
back from a file (`cnnlab.runs.checkpoints`) before the trainer is given it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from cnnlab.training.distributed import Context


@dataclass
class Running:
    """The current epoch's training totals so far, over all ranks."""

    loss_sum: float = 0.0  # summed cross-entropy
    correct: int = 0  # images classified right
    seen: int = 0  # images read

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)

    def add(self, loss_sum: float, correct: int, seen: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.seen += seen


class Synced(NamedTuple):
    """What a sync point reads back: totals of the global batches since the last one, over all ranks."""

    loss_sum: float  # summed cross-entropy
    correct: int
    seen: int
    stop: bool  # whether any rank was asked to stop
    step_seen: float  # images in this step's global batch alone


class StepTotals:
    """The steps' loss sum, correct and seen, added up on the device between sync points (a host sync per step
    is what keeps a GPU waiting), with the stop flag all-reduced beside them."""

    def __init__(self, context: Context):
        self.context = context
        self.pending = torch.zeros(3, dtype=torch.float64, device=context.device)  # loss, correct, seen since a sync

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, stop: bool) -> torch.Tensor:
        """This step's (loss sum, correct, seen, stop asked) over all ranks, as a float64 tensor (4,) on the device;
        the host's numbers go in as fills (a kernel argument), not copies, which would wait for the device."""
        device = self.pending.device
        counts = torch.stack([loss_sum.detach().double(), (logits.argmax(dim=1) == labels).sum().double(),
                              torch.full((), float(len(labels)), dtype=torch.float64, device=device),
                              torch.full((), float(stop), dtype=torch.float64, device=device)])
        self.context.all_reduce_tensor(counts)
        self.pending += counts[:3]
        return counts

    def read(self, counts: torch.Tensor) -> Synced:
        """The totals since the last sync point, and this step's `counts`: a CPU-GPU sync point."""
        total, hits, seen_since = self.pending.tolist()
        seen, stops = counts[2].item(), counts[3].item()
        self.pending.zero_()
        return Synced(total, int(hits), int(seen_since), stops > 0, seen)


@dataclass
class TrainState:
    """Everything about a run's progress that the model, optimizer and schedule do not hold themselves."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of the current epoch
    running: Running = field(default_factory=Running)
    epoch_seconds: float = 0.0  # time spent in the current epoch so far (survives resume)
    history: list[dict] = field(default_factory=list)  # one metrics dict per completed epoch
    rng_states: torch.Tensor = field(default_factory=lambda: torch.zeros((1, 0), dtype=torch.uint8))  # (world, n)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's keys for this state (the layout files have always had; early stopping, the
        averagers and the model add their own: `Trainer.state_dict`)."""
        r = self.running
        return dict(epoch=self.epoch, step=self.step, running=[r.loss_sum, r.correct, r.seen],
                    epoch_seconds=self.epoch_seconds, history=list(self.history), rng_state=self.rng_states)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state of a checked checkpoint (`check_checkpoint`)."""
        loss_sum, correct, seen = data["running"]
        states = data["rng_state"]
        return cls(int(data["epoch"]), int(data["step"]), Running(float(loss_sum), int(correct), int(seen)),
                   float(data["epoch_seconds"]), list(data["history"]),
                   states.unsqueeze(0) if states.dim() == 1 else states)  # one row before data-parallel runs


# ------------------------------------------------------------------------------ the schema
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


CHECKPOINT_SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = dict(
    model=("a mapping of tensors", lambda v: isinstance(v, dict) and bool(v)
           and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())),
    optimizer=("a mapping with 'state' and 'param_groups'", lambda v: isinstance(v, dict)
               and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)),
    scheduler=("a mapping", lambda v: isinstance(v, dict)),
    epoch=("a count >= 0", _count),
    step=("a count >= 0", _count),
    running=("[loss sum, correct, seen]", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_number, v))),
    epoch_seconds=("a number", _number),
    history=("a list of per-epoch metrics", lambda v: isinstance(v, list) and all(isinstance(m, dict) for m in v)),
    rng_state=("a uint8 tensor", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8
               and v.dim() in (1, 2)),
)


# Written by cnnlab's recorder beside the trainer's state, absent from checkpoints made before it was.
OPTIONAL_SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = dict(
    config=("the resolved config as a mapping", lambda v: isinstance(v, dict)),
    ema=("the averaged weights: {model: tensors, updates: count}", lambda v: isinstance(v, dict)
         and isinstance(v.get("model"), dict) and _count(v.get("updates"))),
    lookahead=("the slow weights: a mapping of tensors", lambda v: isinstance(v, dict)
               and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())),
    early_stopping=("{best: {epoch, value, metric}, stopped: text or null}", lambda v: isinstance(v, dict)
                    and isinstance(v.get("best"), dict) and _count(v["best"].get("epoch"))
                    and _number(v["best"].get("value")) and isinstance(v.get("stopped"), (str, type(None)))),
    best_model=("the best epoch's weights: a mapping of tensors", lambda v: isinstance(v, dict)
                and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())),
)


def check_checkpoint(checkpoint: Any) -> None:
    """A ValueError naming the first key of a checkpoint that is missing or of the wrong kind."""
    if not isinstance(checkpoint, dict):
        raise ValueError("its state is not a mapping")
    for key, (expected, valid) in CHECKPOINT_SCHEMA.items():
        if key not in checkpoint:
            raise ValueError(f"its state has no {key!r}")
        if not valid(checkpoint[key]):
            raise ValueError(f"its state's {key!r} should be {expected}")
    for key, (expected, valid) in OPTIONAL_SCHEMA.items():
        if key in checkpoint and not valid(checkpoint[key]):
            raise ValueError(f"its state's {key!r} should be {expected}")
