"""Which pixels a prediction rests on: Grad-CAM (HiResCAM variant) on the last conv stage, or input gradients."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.data.pixels import image_input
from cnnlab.inspect.figures import Output, draw_image, new_figure, save_figure
from cnnlab.models.cnn import CNN

METHODS = {
    "gradcam": "Grad-CAM (HiResCAM): where the last conv layer's maps raise the class score",
    "gradient": "input gradient: how much each pixel changes the class score",
}


@dataclass
class Saliency:
    """A heat map over the input image for one class, with the model's probabilities."""

    image: np.ndarray  # uint8, grey (H, W) or colour (H, W, C)
    heat: np.ndarray  # float (H, W) in [0, 1]; 1 = most important
    target: int  # the class explained
    probabilities: np.ndarray  # (num_classes,)
    method: str


def saliency(model: CNN, image: np.ndarray, target: int | None = None, method: str = "gradcam") -> Saliency:
    """Explain the model's score for `target` (default: its prediction) on one uint8 (H, W) or (H, W, C) image."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose {' or '.join(METHODS)}")
    model.eval()
    x = image_input(image).requires_grad_(True)  # (1, C, H, W)
    if method == "gradcam" and model.conv_layers():
        logits, heat = grad_cam(model, x, target)
    else:  # a model with no conv layer (perceptron, mlp) has no maps: fall back to gradients
        method = "gradient"
        logits = model(x)
        target = int(logits.argmax()) if target is None else target
        logits[0, target].backward()
        heat = gradient_of(x)[0].abs().amax(dim=0)  # (H, W): strongest channel per pixel
    probabilities = torch.softmax(logits.detach()[0], dim=0).numpy()
    target = int(probabilities.argmax()) if target is None else target
    heat_map = heat.detach().numpy()
    heat_map = heat_map / heat_map.max() if heat_map.max() > 0 else heat_map
    return Saliency(image, heat_map.astype(np.float64), target, probabilities, method)


def gradient_of(tensor: torch.Tensor) -> torch.Tensor:
    """The gradient backward() left on a tensor that requires (or retains) it."""
    if tensor.grad is None:
        raise RuntimeError("no gradient reached the tensor: backward() was not called through it")
    return tensor.grad


def grad_cam(model: CNN, x: torch.Tensor, target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the Grad-CAM map (H, W) at the input's size, from the last feature maps the head reads."""
    maps = model.forward_features(x)  # (1, C, h, w)
    maps.retain_grad()
    logits = model.forward_head(maps)
    target = int(logits.argmax()) if target is None else target
    logits[0, target].backward()
    # HiResCAM: gradient x activation at each position, summed over maps. Classic Grad-CAM averages
    # the gradient over positions first, which suits a global-average-pool head but washes out to
    # nothing behind Flatten + Dense (a different weight per position), the lesson's architecture.
    cam = F.relu((gradient_of(maps)[0] * maps[0]).sum(dim=0))  # (h, w): only evidence *for* the class
    cam = F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
    return logits, cam


def plot_saliency(result: Saliency, classes: tuple[str, ...] | list[str], out: Output, title: str = "",
                  true_label: int | None = None, top: int = 5) -> Output:
    """Three panels: the image, the heat map over it, and the top class probabilities."""
    fig = new_figure(11, 3.6)
    image_ax, heat_ax, bar_ax = fig.subplots(1, 3, width_ratios=[1, 1.2, 1.3])
    draw_image(image_ax, result.image)
    image_ax.set_title("input" + (f" (true: {classes[true_label]})" if true_label is not None else ""))
    draw_image(heat_ax, result.image)
    overlay = heat_ax.imshow(result.heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.colorbar(overlay, ax=heat_ax, shrink=0.85, label="importance (1 = most)")
    heat_ax.set_title(f"{'Grad-CAM' if result.method == 'gradcam' else 'gradient'} for "
                      f"'{classes[result.target]}'")
    for ax in (image_ax, heat_ax):
        ax.axis("off")
    order = np.argsort(-result.probabilities)[:top][::-1]
    colours = ["firebrick" if i == result.target else "steelblue" for i in order]
    bar_ax.barh([classes[i] for i in order], result.probabilities[order], color=colours)
    bar_ax.set_xlim(0, 1)
    bar_ax.set_xlabel("probability")
    bar_ax.set_title(f"top {len(order)} classes")
    fig.suptitle(title or METHODS[result.method])
    return save_figure(fig, out)
