"""`train.early_stopping`: watch a validation metric, keep the best epoch's weights, and say when to stop.

One object owns the rule's whole state (the best epoch, its weights, why the run stopped) and its part
of the checkpoint; the trainer asks it once per epoch and reads one answer, `stopped` (Keras' EarlyStopping
callback and `stop_training` flag). The metric is all-reduced validation, the same number on every rank,
so every rank of a data-parallel job stops at the same epoch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cnnlab.config import EarlyStopping as Rule


class EarlyStopping:
    """The best epoch so far by `rule.metric`, its weights, and the reason training stopped (None until then).

    With `rule.patience` 0 it watches nothing: no best epoch, no weights kept, never a stop.
    """

    def __init__(self, rule: Rule):
        self.rule = rule
        self.best: dict[str, Any] | None = None  # {epoch, value, metric} of the best epoch so far
        self.best_weights: dict[str, torch.Tensor] | None = None  # the evaluated model at that epoch
        self.stopped: str | None = None  # why the run ended before train.epochs, once it has

    def after_epoch(self, epoch: int, metrics: Mapping[str, Any], model: nn.Module) -> None:
        """Judge completed epoch `epoch` (1-based) by its metrics; `model` is the evaluated model, whose
        weights are kept when the epoch is the best so far."""
        rule, best = self.rule, self.best
        if not rule.patience:
            return
        value = metrics[rule.metric]
        if math.isnan(value):  # an epoch not validated (train.val_every) or no validation split: nothing to judge
            return
        lower_is_better = rule.metric.endswith("loss")
        if math.isfinite(value) and (best is None or (value < best["value"] - rule.min_delta if lower_is_better
                                                      else value > best["value"] + rule.min_delta)):
            self.best = dict(epoch=epoch, value=value, metric=rule.metric)
            self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif best is not None and epoch - best["epoch"] >= rule.patience:
            # the gap, not the patience: with train.val_every the first validation past the patience ends the run
            self.stopped = (f"{rule.metric} did not improve by more than {rule.min_delta:g} for "
                            f"{epoch - best['epoch']} epoch(s) after epoch {best['epoch']} ({best['value']:.4f})")

    @property
    def kept_epoch(self) -> int | None:
        """The epoch whose weights the run keeps (None: the last, early stopping being off)."""
        return self.best["epoch"] if self.best is not None and self.best_weights is not None else None

    def restore_best(self, model: nn.Module) -> None:
        """Give the evaluated model the best epoch's weights (at the end of a run)."""
        if self.best_weights is not None:
            model.load_state_dict(self.best_weights)

    def record(self, epochs_trained: int) -> dict[str, Any] | None:
        """early_stopping.json of a finished run that kept an epoch's weights, else None."""
        if self.kept_epoch is None or self.best is None:
            return None
        return dict(kept_epoch=self.kept_epoch, metric=self.best["metric"], value=self.best["value"],
                    epochs_trained=epochs_trained, stopped=self.stopped)

    # ------------------------------------------------------------------ its part of the checkpoint
    def progress_dict(self) -> dict[str, Any]:
        """The checkpoint's `early_stopping` key, once there is a best epoch (beside the trainer's state)."""
        return {} if self.best is None else dict(early_stopping=dict(best=self.best, stopped=self.stopped))

    def weights_dict(self) -> dict[str, Any]:
        """The checkpoint's `best_model` key, once there are weights to keep."""
        return {} if self.best_weights is None else dict(best_model=self.best_weights)

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint (checked by `training.state.check_checkpoint`)."""
        stopping = checkpoint.get("early_stopping") or {}
        self.best, self.stopped = stopping.get("best"), stopping.get("stopped")
        if self.best is not None:
            if "best_model" not in checkpoint:
                raise ValueError("its state has no 'best_model' (the best epoch's weights early stopping keeps)")
            self.best_weights = {k: v.clone() for k, v in checkpoint["best_model"].items()}
