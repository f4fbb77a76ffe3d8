"""Which images each training step reads, and with what weight: the one rule the trainer, the learning-rate
finder and `cnnlab show batch` all draw by.

An epoch's order is a function of (seed, epoch) only: a permutation, or with `train.sampling: balanced`
draws with replacement in proportion to per-image weights. It is cut into global batches of
`train.batch_size`; a data-parallel rank reads its slice of each (`index[rank::world]`), so every rank
draws the same global order and together they read the global batch one process would.

The dropout/augmentation generator a rank starts from is here too (`initial_rng_state`): what a step
draws is decided by these two things alone.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from cnnlab.config import ConfigError, TrainConfig
from cnnlab.data.sources import Source


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


def initial_rng_state(seed: int, rank: int = 0) -> torch.Tensor:
    """The dropout/augmentation generator of a rank: rank 0 draws as a single process would."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1_000_003 * rank)
        return torch.get_rng_state()


class Sampler:
    """The batches of a training split, epoch by epoch, as one rank of `world` reads them."""

    def __init__(self, train: Source, config: TrainConfig, num_classes: int, rank: int = 0, world: int = 1):
        self.train, self.seed, self.batch_size = train, config.seed, config.batch_size
        self.rank, self.world = rank, world
        self.weights = sampling_weights(config, train.labels, num_classes)  # (N,) or None: a permutation
        self.steps_per_epoch = steps_in_epoch(len(train), config.batch_size)

    def global_batches(self, epoch: int, first_step: int = 0) -> list[torch.Tensor]:
        """Epoch `epoch`'s global batches from step `first_step` on: positions in the training split."""
        order = epoch_order(len(self.train), self.seed, epoch, self.weights)
        bs = self.batch_size
        return [order[step * bs:(step + 1) * bs] for step in range(first_step, self.steps_per_epoch)]

    def slices(self, epoch: int, first_step: int = 0) -> list[torch.Tensor]:
        """This rank's slice of each of those global batches: disjoint; together the global batch."""
        return [index[self.rank::self.world] for index in self.global_batches(epoch, first_step)]

    def batches(self, epoch: int, first_step: int = 0, steps: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 images (B, C, H, W) and labels (B,) of this rank's slices, `steps` of them at most."""
        return self.train.batches(self.slices(epoch, first_step)[:steps])
