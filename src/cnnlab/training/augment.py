"""Training-time augmentation on whole uint8 batches: random shifts and mirror images, no per-image Python.

Random draws come from torch's global generator, which the trainer seeds and checkpoints, so
augmented runs stay deterministic and resumable.
"""
from __future__ import annotations

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


def augment(images: torch.Tensor, shift: int = 0, flip: bool = False) -> torch.Tensor:
    """The configured augmentations of a uint8 batch (N, C, H, W)."""
    images = random_shift(images, shift)
    return random_flip(images) if flip else images
