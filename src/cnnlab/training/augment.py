"""Training-time augmentation on whole uint8 batches: random zooms, random rotations, random shifts (a random crop
of the zero-padded image), mirror images and random erasing, with no per-image Python.

Random draws come from torch's global generator, which the trainer seeds and checkpoints, so
augmented runs stay deterministic and resumable.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cnnlab.config import TrainConfig


def random_rotate(images: torch.Tensor, max_degrees: float) -> torch.Tensor:
    """Turn each image (N, C, H, W) about its centre by its own random angle in [-max_degrees, max_degrees],
    bilinear, filling the corners with zeros (the datasets' background). A handwritten 7 leans either way;
    the published 99.7-99.8% MNIST networks train with rotations of 10-15 degrees."""
    if max_degrees <= 0:
        return images
    return rotate(images, (torch.rand(len(images)) * 2 - 1) * math.radians(max_degrees))


def rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) uint8 turned about their centres by angles (N,) in radians, counter-clockwise
    as the image is viewed (row 0 at the top); bilinear, zeros outside."""
    n, _, h, w = images.shape
    cos, sin = angles.cos(), angles.sin()
    # affine_grid works in coordinates normalised to [-1, 1] per axis: the aspect terms keep the turn rigid
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    turned = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return turned.round_().clamp_(0, 255).to(torch.uint8)


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


def random_zoom(images: torch.Tensor, zoom: float) -> torch.Tensor:
    """Scale each image (N, C, H, W) by its own random factor, log-uniform in [1 / (1 + zoom), 1 + zoom], and
    move it by up to zoom / 2 of its size each way, bilinear; the edge pixels are repeated where the picture
    ends (a photo's backdrop goes on, no black bars). Objects in one's own photos come at every size and place."""
    if zoom <= 0:
        return images
    n = len(images)
    scale = (torch.rand(n) * 2 - 1).mul_(math.log1p(zoom)).exp_()  # (N,) output size / input size
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale  # the grid samples the input: a smaller window is a zoom in
    theta[:, :, 2] = (torch.rand(n, 2) * 2 - 1) * zoom  # offsets in [-1, 1] coordinates: zoom / 2 of a side
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    zoomed = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return zoomed.round_().clamp_(0, 255).to(torch.uint8)


def random_colour(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Colour jitter of each image (N, C, H, W): with probability `strength` its colour channels in a random
    order, with probability strength / 4 in grey, and always brightness and contrast scaled by factors in
    [1 - strength / 2, 1 + strength / 2]. The objects in one's own photos come in every colour: a red shoe and
    a blue one are both shoes. A grey batch (C = 1) gets brightness and contrast only."""
    if strength <= 0:
        return images
    n, c = images.shape[:2]
    x = images.float()
    if c == 3:
        order = torch.rand(n, 3).argsort(dim=1)  # a random permutation of the channels per image
        shuffle = torch.rand(n) < strength
        order[~shuffle] = torch.arange(3)
        x = x.gather(1, order[:, :, None, None].expand_as(x))
        grey = (torch.rand(n) < strength / 4)[:, None, None, None]
        luma = (x * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
        x = torch.where(grey, luma.expand_as(x), x)
    spread = strength / 2
    brightness = 1 + (torch.rand(n, 1, 1, 1) * 2 - 1) * spread
    contrast = 1 + (torch.rand(n, 1, 1, 1) * 2 - 1) * spread
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean * brightness
    return x.round_().clamp_(0, 255).to(torch.uint8)


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


def augment(images: torch.Tensor, shift: int = 0, flip: bool = False, erase: float = 0.0,
            rotate: float = 0.0, zoom: float = 0.0, colour: float = 0.0) -> torch.Tensor:
    """Augmentations of a uint8 batch (N, C, H, W): colour, zoom, then rotate, then shift, then mirror, then erase."""
    images = random_colour(images, colour)
    images = random_zoom(images, zoom)
    images = random_rotate(images, rotate)
    images = random_shift(images, shift)
    images = random_flip(images) if flip else images
    return random_erase(images, erase)


def augment_as(images: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The augmentations `config` asks for (the trainer, the LR finder and `show batch` all call this)."""
    return augment(images, config.augment_shift, config.augment_flip, config.augment_erase, config.augment_rotate,
                   config.augment_zoom, config.augment_colour)
