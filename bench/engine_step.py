"""The engine's training step on random batches: what bench_ceiling, bench_compile and profile_step time.

The model and fused optimizer are the engine's own (`build_model`, `make_optimizer`), at the config's batch
size, on random uint8 images of its dataset's shape (a step's cost does not depend on the pixels), cycling
through `batches` of them, in the config's `train.precision`. Each step ends with `loss.item()`, as the
engine's does on the CPU.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnlab.config import Config
from cnnlab.data.pixels import to_inputs
from cnnlab.data.registry import get_dataset
from cnnlab.models.cnn import CNN, build_model
from cnnlab.training.optim import make_optimizer
from cnnlab.training.precision import autocast


def engine_step(config: Config, batch: int | None = None, channels_last: bool = True, compiled: bool = False,
                batches: int = 8) -> tuple[Callable[[int], None], CNN, int]:
    """(step(i), the model, the batch size): step(i) trains on the i-th random batch (i modulo `batches`)."""
    spec = get_dataset(config.data.dataset)
    batch = batch or config.train.batch_size
    model = build_model(config.model, spec.image_shape, spec.num_classes, seed=0)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config.train)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)
    h, w, c = spec.image_shape
    images = torch.randint(0, 256, (batch * batches, c, h, w), dtype=torch.uint8)
    labels = torch.randint(0, spec.num_classes, (batch * batches,))
    net = torch.compile(model) if compiled else model

    def step(i: int) -> None:
        part = slice((i % batches) * batch, (i % batches + 1) * batch)
        with autocast(config.train.precision, torch.device("cpu")):  # train.precision, as the engine's step
            logits = net(to_inputs(images[part], channels_last)).float()
        loss = loss_fn(logits, labels[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    return step, model, batch
