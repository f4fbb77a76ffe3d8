"""Training-time augmentation on whole uint8 batches: random shifts (a random crop of the zero-padded image),
mirror images and random erasing, with no per-image Python.

Random draws come from torch's global generator, which the trainer seeds and checkpoints, so
augmented runs stay deterministic and resumable.
"""
from __future__ import annotations

import math

import torch


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Move each image (N, C, H, W) by its own random offset of up to `max_shift` pixels each way,
    filling with zeros (the datasets' background)."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)  # (N, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1))  # top-left corner of each crop in the padded image
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1))
    rows = (dy + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the images left to right (clothes look alike mirrored; digits do not)."""
    flip = torch.rand(len(images)) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


ERASE_AREA = (0.02, 1 / 3)  # fraction of the image a random erasure covers (Zhong et al. 2020: 0.02-0.4)
ERASE_ASPECT = (0.3, 3.3)  # height / width of the erased rectangle, drawn on a log scale


def random_erase(images: torch.Tensor, probability: float) -> torch.Tensor:
    """Replace a random rectangle of each image, with `probability`, by uniform noise (random erasing).

    Whole-batch, no per-image Python: each image draws its rectangle's area, aspect and place, and a
    mask (N, 1, H, W) selects noise or pixel.
    """
    if probability <= 0:
        return images
    n, c, h, w = images.shape
    area = torch.empty(n).uniform_(*ERASE_AREA) * h * w  # pixels per erased rectangle
    aspect = torch.empty(n).uniform_(*map(math.log, ERASE_ASPECT)).exp()
    eh = (area * aspect).sqrt().round().clamp(1, h).long()  # (N,) rectangle heights
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n) * (h - eh + 1)).long()
    left = (torch.rand(n) * (w - ew + 1)).long()
    chosen = torch.rand(n) < probability
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]  # (1, H, 1), (1, 1, W)
    inside = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None]))  # (N, H, W)
    mask = (inside & chosen[:, None, None])[:, None]  # (N, 1, H, W)
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8)
    return torch.where(mask, noise, images)


def augment(images: torch.Tensor, shift: int = 0, flip: bool = False, erase: float = 0.0) -> torch.Tensor:
    """The configured augmentations of a uint8 batch (N, C, H, W): shift, then mirror, then erase."""
    images = random_shift(images, shift)
    images = random_flip(images) if flip else images
    return random_erase(images, erase)
