"""A whitening first layer (airbench's): conv kernels computed from the training images, not trained.

Take every kh x kw patch of the training images as a vector of d = kh·kw·C numbers. The eigenvectors
v_i of their covariance are the directions the patches vary in, the eigenvalues λ_i how much. A kernel
v_i / sqrt(λ_i + eps) turns a patch into its coordinate along v_i with unit variance: the layer's
outputs are decorrelated and equally scaled, which is the input gradient descent learns fastest from.
Each direction comes twice, +v_i and -v_i, so that a ReLU or GELU after the layer keeps both signs.
The bias (when the layer has one) starts at minus the mean patch's coordinate, so every output starts
centred; the bias is trained, the kernels stay as fitted.

The fit is a function of the first `WHITEN_IMAGES` training images only, so it is the same on every
data-parallel rank and every run with the same seed; resume and `--init-from` load the fitted kernels
with the rest of the weights.
"""
from __future__ import annotations

import torch
from torch import nn

from cnnlab.data.pixels import to_inputs
from cnnlab.data.sources import Source

WHITEN_IMAGES = 5000  # training images the patch statistics are estimated from (airbench: 5,000)
EPS = 5e-4  # added to each eigenvalue, as a fraction of the mean one: keeps near-constant directions from blowing up
CHUNK = 250  # images per pass over the patches (a colour 32x32 image has 900 patches of 27 numbers)


def patch_moments(images: torch.Tensor, kernel_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum of patches (d,) and of their outer products (d, d), in float64, and the number of patches.

    images: float (N, C, H, W); a patch is flattened channel-major, as conv weights are (C, kh, kw).
    """
    kh, kw = kernel_size
    c = images.shape[1]
    d = c * kh * kw
    total, outer, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
    for chunk in images.split(CHUNK):
        # (n, C, H', W', kh, kw) -> (n·H'·W', C·kh·kw)
        patches = chunk.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d).double()
        total += patches.sum(dim=0)
        outer += patches.T @ patches
        count += len(patches)
    return total, outer, count


def whitening_kernels(images: torch.Tensor, kernel_size: tuple[int, int], filters: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels (filters, C, kh, kw) whitening the patches of images (N, C, H, W), and the bias (filters,)
    that centres their outputs: the filters/2 directions of largest variance, each then its negative."""
    total, outer, count = patch_moments(images, kernel_size)
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    order = eigenvalues.flip(0)[: filters // 2].clamp(min=0)
    directions = eigenvectors.flip(1)[:, : filters // 2].T  # (filters/2, d), largest variance first
    scaled = directions / torch.sqrt(order + EPS * eigenvalues.clamp(min=0).mean()).unsqueeze(1)
    kernels = torch.cat([scaled, -scaled])  # (filters, d)
    c = images.shape[1]
    return kernels.reshape(filters, c, *kernel_size).float(), -(kernels @ mean).float()


def first_images(source: Source, n: int = WHITEN_IMAGES) -> torch.Tensor:
    """The first n images of a split as model inputs: float (n, C, H, W) in [0, 1]."""
    positions = torch.arange(min(n, len(source)))
    parts = [images for images, _ in source.batches(positions.split(CHUNK))]
    return to_inputs(torch.cat(parts)) if parts else torch.zeros(0)


@torch.no_grad()
def fit_whitening(layers: dict[str, nn.Conv2d], train: Source) -> None:
    """Set each whitening layer's kernels (and bias) from the training split's first images."""
    if not layers:
        return
    images = first_images(train)
    if len(images) == 0:
        return  # nothing to fit to: the layer keeps its random kernels (an empty split fails later, with a message)
    for conv in layers.values():
        kernels, bias = whitening_kernels(images, (conv.kernel_size[0], conv.kernel_size[1]), conv.out_channels)
        conv.weight.copy_(kernels)
        if conv.bias is not None:
            conv.bias.copy_(bias)
