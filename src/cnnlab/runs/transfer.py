"""Starting a run from another run's weights (`train.init_from`, `cnnlab train --init-from RUN`).

The feature layers are copied as they are; the head is copied too when the new data has the source's
classes, and otherwise keeps its fresh classifier (hidden dense layers are copied when their shapes
fit). A grey network starts a colour one, and the other way round, by adapting the first convolution
so that a grey image gives the same activations either way (timm's `adapt_input_conv` does the same).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.config import Config
from cnnlab.data.folder import IMAGE_EXTENSIONS
from cnnlab.data.registry import dataset_recipe, is_image_folder
from cnnlab.errors import UserError
from cnnlab.images import luminance, read_pixels
from cnnlab.models.cnn import CNN
from cnnlab.models.plan import Conv, Dense
from cnnlab.runs.layout import RunError, path
from cnnlab.runs.weights import load_model


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-layer kernel (O, C, kh, kw) for `channels` input channels.

    1 -> 3: the grey kernel on every colour channel, divided by 3 (an RGB image of a grey picture sums to
    the grey result); 3 -> 1: the colour kernels summed (a grey image seen as R = G = B).
    """
    if weight.shape[1] == channels:
        return weight
    if weight.shape[1] == 1:
        return weight.repeat(1, channels, 1, 1) / channels
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise RunError(f"cannot adapt a first convolution of {weight.shape[1]} input channels to {channels}")


def refuse_unfitted_whitening(model: CNN, trained: CNN, source: str | Path) -> None:
    """A RunError when this config whitens a layer the source run trained: copying its learned kernels
    into a frozen layer would keep them fixed under a name that says they were fitted to the data."""
    for name in model.whitening_layers().keys() - trained.whitening_layers().keys():
        raise RunError(f"--init-from {source}: {name} is a whitening layer here (kernels fitted to the data, "
                       f"frozen) but a trained layer there; set model.conv[0].whiten to false to train on from "
                       "its kernels, or leave out --init-from to fit them")


def start_from(model: CNN, source: str | Path, classes: tuple[str, ...]) -> dict[str, Any]:
    """Copy the source run's weights into `model` (in place); what was copied, for the run's manifest.

    A RunError names the layer whose shapes do not fit, before any training: the architecture must be
    the source's (the feature layers), and a flatten head fits one image size only.
    """
    trained, source_classes, _ = load_model(source)
    refuse_unfitted_whitening(model, trained, source)
    theirs, mine = trained.state_dict(), model.state_dict()
    first_conv = f"features.{model.plan.conv_layers()[0].name}.weight" if model.plan.conv_layers() else None
    dense = [layer.name for layer in model.plan.head if isinstance(layer.spec, Dense)]
    classifier = dense[-1] if dense else None
    same_classes = tuple(source_classes) == tuple(classes)
    copied: dict[str, torch.Tensor] = {}
    adapted = False
    for key, tensor in mine.items():
        where = key.split(".")[0]
        if key not in theirs:
            raise RunError(f"--init-from {source}: it has no {key}: its model is not this one "
                           f"({path(source, 'config')} has the architecture to start from)")
        layer = key.split(".")[1] if where == "head" else None
        if layer == classifier and not same_classes:
            continue  # a new classifier for the new classes, freshly initialised
        value = theirs[key]
        if key == first_conv and value.shape != tensor.shape and value.shape[0] == tensor.shape[0]:
            if model.whitening_layers():
                raise RunError(f"--init-from {source}: its whitening kernels were fitted to {value.shape[1]}-channel "
                               f"images and do not whiten {tensor.shape[1]}-channel ones; set "
                               "model.conv[0].whiten to false to train on from them")
            value, adapted = adapt_input_conv(value, tensor.shape[1]), True
        if value.shape != tensor.shape:
            hint = (f"; a flatten head fits one image size: {source} was trained on "
                    f"{'x'.join(map(str, trained.input_shape))} images, this data is "
                    f"{'x'.join(map(str, model.input_shape))} (use model.pooling global_avg, or that image size)"
                    if where == "head" else "")
            raise RunError(f"--init-from {source}: {key} is {tuple(value.shape)} there, "
                           f"{tuple(tensor.shape)} here{hint}")
        copied[key] = value
    model.load_state_dict({**mine, **copied})
    convs = sum(1 for layer in model.plan.conv_layers() if isinstance(layer.spec, Conv))
    return dict(run=str(source), classes=list(source_classes), head="copied" if same_classes else
                f"new classifier for {len(classes)} classes", tensors_copied=len(copied),
                conv_layers=convs, adapted_input_channels=adapted)


# ------------------------------------------------------------------ saying what fine-tuning converts
LIGHT_ON_DARK = ("digits", "objects")  # recipes whose images are light on black (MNIST, Fashion-MNIST)
SAMPLED_IMAGES = 16  # images of a folder looked at for colour and background: a second, however big the folder


@dataclass(frozen=True)
class FolderLook:
    """What a few of a folder's images look like: how many were read, in colour, on a light background."""

    read: int
    colour: int
    light_background: int


def sample_images(folder: Path, limit: int = SAMPLED_IMAGES) -> list[Path]:
    """Up to `limit` image files, taken in turn from the first `limit` sub-folders in name order (so from
    several classes), never listing more than those folders."""
    per_folder: list[list[Path]] = []
    for here, folders, files in os.walk(folder):
        folders.sort()
        images = [Path(here) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS][:limit]
        if images:
            per_folder.append(images)
        if len(per_folder) >= limit:
            break
    in_turn = [file for group in zip_longest(*per_folder) for file in group if file is not None]
    return in_turn[:limit]


def look_at_folder(folder: Path) -> FolderLook:
    """Colour and background of a sample of the folder's images, read as training reads them (unreadable
    ones are left out: training reports them)."""
    read = colour = light = 0
    for file in sample_images(folder):
        try:
            pixels = read_pixels(file, (64, 64), 3).astype(np.int16)  # (64, 64, 3)
        except (UserError, OSError, ValueError):
            continue
        read += 1
        colour += int(np.abs(np.diff(pixels, axis=2)).mean() > 4)  # R, G and B differ: not a grey picture
        edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        light += int(np.median(luminance(edge.astype(np.float32))) > 127.5)
    return FolderLook(read, colour, light)


def conversion_line(source: Path, source_config: Config, source_shape: tuple[int, int, int], config: Config,
                    look: FolderLook | None = None) -> str:
    """One line: what `--init-from` does to the new data and the source's first layer, and the setting
    that changes it (channels, image size, polarity). `look`: the folder's sample, when it is one."""
    height, width, channels = source_shape
    recipe = dataset_recipe(source_config.data)
    light_on_dark = recipe in LIGHT_ON_DARK
    learned = (f"{'grey' if channels == 1 else 'colour'} {height}x{width}"
               + (", light on black" if light_on_dark else ""))
    parts = [f"fine-tuning from {source} ({source_config.data.dataset}: {learned})"]
    now = config.data.channels if is_image_folder(config.data.dataset) else None
    if now is not None and now != channels:
        parts.append(f"channels {channels}->{now}: its first convolution's kernels are "
                     + ("spread over R, G and B, a third each" if channels == 1 else "summed into one grey kernel")
                     + " (a grey picture gives the same activations)")
    elif now == 1 and look is not None and look.colour:
        parts.append(f"{look.colour} of {look.read} sampled images are in colour and are read grey, as it was "
                     "trained (--set data.channels=3 keeps the colour: its first kernels are spread over R, G, B)")
    if now is not None:
        fixed = " (its flatten head fits no other size)" if source_config.model.pooling == "flatten" else ""
        parts.append(f"images resized to {config.data.image_size}x{config.data.image_size}{fixed}")
    if light_on_dark and look is not None and look.read and look.light_background * 2 > look.read:
        parts.append(f"{look.light_background} of {look.read} sampled images are dark on a light background, the "
                     f"opposite of what it learned: invert them first, or train without --init-from")
    return "; ".join(parts)
