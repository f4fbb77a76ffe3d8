"""`cnnlab show batch`: the first training batch as the network sees it, augmentation included.

The batch is drawn by the trainer's own rule, not an imitation of it: `training.sampling`'s Sampler (the
epoch order with `train.sampling`'s weights, the same images read from the same Source), and `augment`
under the random state the trainer starts from (`sampling.initial_rng_state`). So the picture is bitwise the
first step's input of `cnnlab train` with this config (a single process; a data-parallel job splits
the same global batch between its ranks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cnnlab.config import Config
from cnnlab.data.pixels import to_pixels
from cnnlab.data.sources import Data
from cnnlab.inspect.figures import Output, new_figure, save_figure
from cnnlab.training.augment import augment_as
from cnnlab.training.sampling import Sampler, initial_rng_state


@dataclass
class Batch:
    """The first training batch: the images as read and as augmented, uint8 (B, C, H, W), and labels (B,)."""

    read: torch.Tensor
    seen: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor  # indices in the training split
    augmentation: str  # the augmentations in words ("none" when off)

    @property
    def augmented(self) -> bool:
        return self.augmentation != "none"


def describe_augmentation(config: Config) -> str:
    t = config.train
    parts = [f"colour jitter {t.augment_colour:g}"] if t.augment_colour else []
    parts += [f"zoom {1 / (1 + t.augment_zoom):.2g}x to {1 + t.augment_zoom:.2g}x"] if t.augment_zoom else []
    parts += ([f"rotate up to {t.augment_rotate:g} degrees"] if t.augment_rotate else [])
    parts += ([f"shift up to {t.augment_shift} px"] if t.augment_shift else []) + (["mirror half"] if t.augment_flip
                                                                                    else [])
    if t.augment_erase:
        parts.append(f"erase a rectangle with probability {t.augment_erase:g}")
    return ", ".join(parts) or "none"


def first_batch(config: Config, data: Data) -> Batch:
    """The first global batch of epoch 1 of training `config` on `data`, before and after augmentation."""
    t = config.train
    positions = Sampler(data.train, t, data.num_classes).global_batches(epoch=0)[0]
    read, labels = next(iter(data.train.batches([positions])))
    with torch.random.fork_rng(devices=[]):  # the trainer's generator, as `Trainer.fit` sets it
        torch.set_rng_state(initial_rng_state(t.seed))
        seen = augment_as(read, t)
    return Batch(read, seen, labels, positions, describe_augmentation(config))


def mosaic(images: torch.Tensor, columns: int, gap: int = 2, band: int = 0) -> np.ndarray:
    """uint8 images (B, C, H, W) tiled row by row into one (rows*(H+band+gap), columns*(W+gap)[, C]) picture:
    mid-grey between them, so a black background still shows its edge, and a white band of `band` pixels
    under each image for its label."""
    b, c, h, w = images.shape
    rows = math.ceil(b / columns)
    tall = h + band + gap
    shape = (rows * tall, columns * (w + gap)) + ((c,) if c > 1 else ())
    out = np.full(shape, 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        out[r * tall:r * tall + h, k * (w + gap):k * (w + gap) + w] = to_pixels(image)
        out[r * tall + h:r * tall + h + band, k * (w + gap):k * (w + gap) + w] = 255
    return out


def plot_batch(batch: Batch, classes: tuple[str, ...], out: Output, limit: int = 64, title: str = "") -> int:
    """The first `limit` images of the batch with their labels: as read and as augmented side by side
    when augmentation is on. Returns how many were drawn."""
    shown = min(limit, len(batch.labels))
    columns = min(8, shown)
    rows = math.ceil(shown / columns)
    h, w = batch.read.shape[2:]
    panels = [("as read", batch.read[:shown]), ("as the network sees it", batch.seen[:shown])] \
        if batch.augmented else [("as the network sees it", batch.seen[:shown])]
    cell = 1.1  # inches per image
    fig = new_figure(max(4.0, cell * columns * len(panels) + 0.5), cell * 1.33 * rows + 0.8)
    band = max(6, h // 3)  # pixels under each image for its label
    for ax, (name, images) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        picture = mosaic(images, columns, band=band)
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        for i, label in enumerate(batch.labels[:shown].tolist()):
            r, k = divmod(i, columns)
            ax.text(k * (w + 2) + w / 2, r * (h + band + 2) + h + band / 2, classes[label][:12], ha="center",
                    va="center", fontsize=7, color="black")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(title or f"the first training batch ({shown} of {len(batch.labels)} shown); "
                 f"augmentation: {batch.augmentation}", fontsize=10)
    save_figure(fig, out)
    return shown
