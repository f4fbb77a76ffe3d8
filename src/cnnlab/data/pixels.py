"""Pixels as tensors: uint8 images as torch holds them, and the float inputs every cnnlab model takes.

A model's input is the image's bytes scaled to [0, 1], nothing else (no mean/std normalisation), so
the same conversion serves training, evaluation, pictures and predictions.
"""
from __future__ import annotations

import numpy as np
import torch


def images_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NumPy images, grey (N, H, W) or colour (N, H, W, C) -> uint8 tensor (N, C, H, W).

    Colour images keep their channels-last memory layout (a permuted view, no copy): the layout
    the CPU convolutions want anyway.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return tensor.unsqueeze(1).contiguous() if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)


def to_inputs(images: torch.Tensor, channels_last: bool = False, device: torch.device | str | None = None
              ) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> float (N, C, H, W) in [0, 1], as the model sees them.

    channels_last stores them (N, H, W, C) in memory, the layout CPU convolutions run fastest on.
    The bytes travel to `device` before the conversion: a quarter of the traffic of floats.
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if device is not None:
        images = images.to(device, non_blocking=True)
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def image_input(image: np.ndarray) -> torch.Tensor:
    """One uint8 image, grey (H, W) or colour (H, W, C) -> float (1, C, H, W) in [0, 1]."""
    return to_inputs(images_tensor(np.asarray(image)[None]))


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """One uint8 image tensor (C, H, W) -> NumPy (H, W) for grey or (H, W, C) for colour, for drawing."""
    pixels = image.permute(1, 2, 0).cpu().numpy()
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
