"""`cnnlab explore`: one self-contained HTML page in which a reader clicks through their own trained network.

The page holds the model's stages and weights (float32, base64) and a few test images as JSON in a
<script>, with its JavaScript and style sheet inline: it runs the forward pass itself, for a shipped
image or one drawn on its canvas, and opens from disk with no server and no network. A drawing is prepared
by recipes.js, a port of `cnnlab.use.recipes` (the dataset's recipe, as `cnnlab predict` uses it). Models whose
weights would make the page too large are refused with a message saying so.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from cnnlab.data.pixels import to_inputs
from cnnlab.data.registry import dataset_recipe
from cnnlab.errors import UserError
from cnnlab.files import write_text
from cnnlab.inspect.explore.stages import Stage, explore_stages
from cnnlab.inspect.show import LoadedRun
from cnnlab.models.cnn import CNN
from cnnlab.models.plan import Conv, GlobalPool, Pool
from cnnlab.runs import layout
from cnnlab.text import to_json

M = TypeVar("M", bound=torch.nn.Module)

MAX_IMAGES = 64  # test images shipped in the page
DEFAULT_IMAGES = 16
MAX_WEIGHT_BYTES = 20 * 2**20  # base64 text of the weights in the page: 20 MiB is about 3.9M parameters
DATA_MARK = "/*CNNLAB-EXPLORE-DATA*/"  # where the JSON goes in the template
RECIPES_MARK = "/*CNNLAB-EXPLORE-RECIPES*/"  # where recipes.js goes


class ExploreError(UserError, ValueError):
    """A run or an option `cnnlab explore` cannot make a page of; the message says why."""


def floats(tensor: torch.Tensor) -> str:
    """A tensor as base64 of its float32 values, little-endian, in torch's (C-contiguous) order."""
    array = tensor.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return base64.b64encode(array.tobytes()).decode("ascii")


def padding_before(conv: Conv) -> tuple[int, int]:
    """Zeros torch adds above and left of the input: 'same' puts (k - 1) // 2 before, the rest after."""
    kh, kw = conv.kernel_size
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        return (kh - 1) // 2, (kw - 1) // 2
    return int(conv.padding), int(conv.padding)


def submodule(model: CNN, path: str, kind: type[M]) -> M:
    """The module at `path`, checked to be a `kind` (the stage list was built from the same model)."""
    module = model.get_submodule(path)
    if not isinstance(module, kind):
        raise TypeError(f"{path}: expected {kind.__name__}, found {type(module).__name__}")
    return module


def stage_json(model: CNN, stage: Stage) -> dict[str, Any]:
    """What the page needs to compute and explain one stage: its kind, shape, inputs and parameters."""
    out: dict[str, Any] = {"name": stage.name, "kind": stage.kind, "title": stage.title, "shape": list(stage.shape),
                           "inputs": list(stage.inputs), "activation": stage.activation, **stage.extra}
    if stage.norm is not None:
        norm = submodule(model, stage.norm, torch.nn.BatchNorm2d)  # the plan builds BatchNorm2d for every BatchNorm
        if norm.running_mean is None or norm.running_var is None:  # eval mode normalises with them
            raise ValueError(f"{stage.norm}: batch norm without running statistics cannot be explained")
        out["norm"] = {"mean": floats(norm.running_mean), "var": floats(norm.running_var), "eps": norm.eps,
                       "gamma": floats(norm.weight), "beta": floats(norm.bias)}
    extra = STAGE_DATA.get(stage.kind)
    if extra is not None:
        out.update(extra(model, stage))
    return out


def conv_data(model: CNN, stage: Stage) -> dict[str, Any]:
    spec = cast(Conv, stage.spec)  # explore_stages gives a conv stage its Conv
    conv = submodule(model, stage.modules[0], torch.nn.Conv2d)
    return {"weight": floats(conv.weight), "weight_shape": list(conv.weight.shape),
            "bias": None if conv.bias is None else floats(conv.bias), "stride": spec.stride,
            "padding": list(padding_before(spec))}


def pool_data(model: CNN, stage: Stage) -> dict[str, Any]:
    spec = cast(Pool, stage.spec)
    return {"mode": spec.mode, "size": spec.size}


def global_pool_data(model: CNN, stage: Stage) -> dict[str, Any]:
    return {"mode": cast(GlobalPool, stage.spec).mode}


def dense_data(model: CNN, stage: Stage) -> dict[str, Any]:
    dense = submodule(model, stage.modules[0], torch.nn.Linear)
    return {"weight": floats(dense.weight), "weight_shape": list(dense.weight.shape), "bias": floats(dense.bias)}


# What the page reads of a stage beyond its kind, shape, inputs, batch norm and activation, by stage kind.
STAGE_DATA: dict[str, Callable[[CNN, Stage], dict[str, Any]]] = {
    "conv": conv_data, "pool": pool_data, "global_pool": global_pool_data, "dense": dense_data,
}


def weight_bytes(model: CNN) -> int:
    """Bytes of base64 text the model's parameters and batch-norm statistics take in the page."""
    values = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    return (values * 4 + 2) // 3 * 4


def check_size(model: CNN, run: Path) -> None:
    size = weight_bytes(model)
    if size > MAX_WEIGHT_BYTES:
        raise ExploreError(f"{run}: the model's weights would take {size / 2**20:.1f} MiB in the page, more than "
                           f"the {MAX_WEIGHT_BYTES // 2**20} MiB it may hold (about "
                           f"{MAX_WEIGHT_BYTES * 3 // 16:,} parameters); explore a smaller model, or use "
                           f"`cnnlab show features` and `cnnlab report` for this one")


def check_count(images: int) -> None:
    if not 1 <= images <= MAX_IMAGES:
        raise ExploreError(f"--images must be 1..{MAX_IMAGES} (test images shipped in the page), got {images}")


def spread_indices(labels: np.ndarray, count: int) -> list[int]:
    """`count` test-image indices taking the classes in turn (the first of each class, then the second, ...)."""
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    chosen: list[int] = []
    rank = 0
    while len(chosen) < count and any(rank < len(members) for members in by_class):
        chosen.extend(members[rank] for members in by_class if rank < len(members))
        rank += 1
    return chosen[:count]


def images_json(loaded: LoadedRun, count: int) -> list[dict[str, Any]]:
    """The shipped test images: uint8 pixels (C, H, W) as base64, their label, and torch's logits for them
    (the page compares its own forward pass with these)."""
    images, labels = loaded.test_set
    if len(labels) == 0:
        raise ExploreError(f"{loaded.run}: the run's test set holds no image to ship in the page")
    chosen = spread_indices(labels.numpy(), count)
    batch = images[chosen]  # uint8 (N, C, H, W)
    with torch.no_grad():
        logits = loaded.model.eval()(to_inputs(batch, device=next(loaded.model.parameters()).device)).cpu()
    return [{"index": i, "label": int(labels[i]), "source": f"test image {i}",
             "pixels": base64.b64encode(batch[n].contiguous().numpy().tobytes()).decode("ascii"),
             "logits": [float(v) for v in logits[n]]} for n, i in enumerate(chosen)]


def explore_data(loaded: LoadedRun, count: int = DEFAULT_IMAGES) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data: the model's stages with their weights, classes, images."""
    model = loaded.model
    check_size(model, loaded.run)
    h, w, c = model.input_shape
    return {"format": "cnnlab-explore-1", "run": loaded.name, "dataset": loaded.config.data.dataset,
            "model": loaded.config.model.name, "classes": list(loaded.classes),
            "recipe": dataset_recipe(loaded.config.data),  # how the page prepares a drawing (recipes.js)
            "input": {"height": h, "width": w, "channels": c},
            "params": sum(p.numel() for p in model.parameters()),
            "stages": [stage_json(model, stage) for stage in explore_stages(model)],
            "images": images_json(loaded, count)}


def render(data: dict[str, Any]) -> str:
    """The page: the template with recipes.js inline and the data in its <script type="application/json">."""
    folder = files("cnnlab.inspect.explore")
    template = folder.joinpath("explore.html").read_text(encoding="utf-8")
    recipes = folder.joinpath("recipes.js").read_text(encoding="utf-8")
    # "<" escaped so no class name or run name can close the <script> it sits in
    text = to_json(data, separators=(",", ":")).replace("<", "\\u003c")
    for mark in (DATA_MARK, RECIPES_MARK):
        if template.count(mark) != 1:
            raise RuntimeError(f"explore.html should hold {mark} once")
    if "</script" in recipes.lower():
        raise RuntimeError("recipes.js may not contain </script: it is inlined in a <script>")
    return template.replace(RECIPES_MARK, recipes).replace(DATA_MARK, text)


def write_explorer(run: str | Path, out: str | Path, images: int = DEFAULT_IMAGES,
                   data_dir: str | Path | None = None) -> Path:
    """Write the explorer page of a run to `out` atomically; returns its path."""
    check_count(images)
    run = layout.check_run(run, "config", "weights")
    loaded = LoadedRun(run, data_dir)
    page = render(explore_data(loaded, images))
    write_text(out, page)
    return Path(out)
