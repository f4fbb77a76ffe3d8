"""Export a trained run for use outside cnnlab (ONNX, TorchScript), and check the export gives the same answers.

The exported model takes float images (N, C, H, W) scaled to [0, 1], prepared by the dataset's recipe
(`cnnlab.use.recipes`), and returns class probabilities (N, classes). Class names, the input shape and the
recipe travel with the file (ONNX metadata, TorchScript extra files).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from cnnlab.data.pixels import images_tensor, to_inputs
from cnnlab.errors import UserError, interrupted
from cnnlab.files import output_target, remove_stale_temps, write_atomic
from cnnlab.models.cnn import CNN
from cnnlab.use.predict import Predictor

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4  # max abs difference in probability accepted between the exported and the original model


class ExportError(UserError, ValueError):
    """An export that cannot be made or checked (unknown format, missing package, outputs that differ)."""


class WithSoftmax(nn.Module):
    """The model followed by softmax: exported files give probabilities, not logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


@dataclass
class ExportResult:
    """Where the export went and how closely it matches the original on real inputs."""

    file: Path
    format: str
    max_abs_difference: float
    images_checked: int

    def to_dict(self) -> dict:
        return dict(file=str(self.file), format=self.format, max_abs_difference=self.max_abs_difference,
                    images_checked=self.images_checked)


def export_run(run: str | Path, format: str = "onnx", out: str | Path | None = None,
               check_images: np.ndarray | None = None) -> ExportResult:
    """Export a run's model to `out` (default <run>/model.onnx or model.pt), then run the file and compare outputs.

    check_images: uint8 (N, H, W) or (N, H, W, C) to compare on; default 64 test images of the run's dataset
    when they are on this machine, else random ink.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r} (known: {', '.join(FORMATS)})")
    out = output_target(Path(out) if out is not None else Path(run) / f"model{FORMATS[format]}")  # before the work
    return export_predictor(Predictor.from_run(run), format, out, check_images)


def export_predictor(predictor: Predictor, format: str, out: Path, check_images: np.ndarray | None = None
                     ) -> ExportResult:
    """Export a loaded model to `out` and check the file's outputs against it (see `export_run`)."""
    remove_stale_temps(out.parent, [out.name])  # left by an export that was killed (its process is gone)
    inputs = example_inputs(predictor, check_images if check_images is not None else dataset_images(predictor))
    wrapped = WithSoftmax(predictor.model).eval()
    with torch.no_grad():
        expected = wrapped(inputs).numpy()
    metadata = export_metadata(predictor)
    differences: list[float] = []

    def write_and_check(tmp: Path) -> None:
        """Write the file, run it, and compare: a file that does not match is never put in place."""
        if format == "onnx":
            write_onnx(wrapped, inputs, tmp, metadata)
            actual = run_onnx(tmp, inputs.numpy())
        else:
            write_torchscript(wrapped, inputs, tmp, metadata)
            actual = run_torchscript(tmp, inputs)
        differences.append(float(np.abs(actual - expected).max()))
        if not differences[0] <= TOLERANCE:
            raise ExportError(f"{out}: the exported model differs from the original by {differences[0]:.2e} "
                              f"(> {TOLERANCE}); nothing was written")

    write_atomic(out, write_and_check)
    return ExportResult(out, format, differences[0], len(inputs))


def example_inputs(predictor: Predictor, images: np.ndarray | None = None, count: int = 64) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1]: the given uint8 images, grey (N, H, W) or colour (N, H, W, C), or sparse
    random ink (closer to real inputs than noise)."""
    model = predictor.model
    return example_inputs_of(model, random_ink(model.input_shape, count) if images is None else images)


def example_inputs_of(model: CNN, images: np.ndarray) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1] for `model` from uint8 images, grey (N, H, W) or colour (N, H, W, C)."""
    channels = model.input_shape[2]
    x = to_inputs(images_tensor(np.asarray(images, dtype=np.uint8)))  # (N, C, H, W)
    return x.expand(-1, channels, -1, -1).contiguous()


def random_ink(input_shape: tuple[int, ...], count: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C): sparse random strokes for a model taking (H, W, C) inputs."""
    height, width, channels = input_shape
    rng = np.random.default_rng(seed)
    shape = (count, height, width) if channels == 1 else (count, height, width, channels)
    return ((rng.random(shape) < 0.2) * rng.integers(64, 256, shape)).astype(np.uint8)


def dataset_images(predictor: Predictor, count: int = 64) -> np.ndarray | None:
    """The first `count` test images of the run's dataset when they are here already (never downloads; an image
    folder's test split decoded as in training), else None."""
    from cnnlab.data import load_dataset
    from cnnlab.data.registry import is_image_folder

    try:
        if is_image_folder(predictor.dataset):
            return folder_test_images(predictor, count)
        return load_dataset(predictor.dataset, download=False, progress=False).test_images[:count]
    except Exception as exc:  # noqa: BLE001 -- any reason the data is not at hand: the random check inputs will do
        if interrupted(exc):
            raise KeyboardInterrupt from None
        return None


def folder_test_images(predictor: Predictor, count: int) -> np.ndarray:
    """The first `count` readable images of an image folder's test split: uint8 (N, H, W) grey or (N, H, W, C)."""
    from cnnlab.data.folder import open_image_folder

    height, width, channels = predictor.model.input_shape
    test = open_image_folder(predictor.dataset, (height, width), channels, workers=0).test
    images, _ = next(iter(test.batches([torch.arange(min(count, len(test)))])))  # (N, C, H, W)
    return images[:, 0].numpy() if channels == 1 else images.permute(0, 2, 3, 1).numpy()


def export_metadata(predictor: Predictor) -> dict[str, str]:
    return dict(classes=json.dumps(list(predictor.classes)), input_shape=json.dumps(list(predictor.model.input_shape)),
                recipe=predictor.recipe, dataset=predictor.dataset, input="float (N, C, H, W) in [0, 1]",
                output="class probabilities (N, classes)", producer="cnnlab")


# ------------------------------------------------------------------------------------------ ONNX
def write_onnx(model: nn.Module, inputs: torch.Tensor, file: Path, metadata: dict[str, str]) -> None:
    """torch.onnx.export with a dynamic batch axis, then the metadata stored in the file's metadata_props."""
    onnx = require("onnx")
    with quiet_exporter():
        try:
            torch.onnx.export(model, (inputs,), str(file), input_names=["image"], output_names=["probabilities"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                              external_data=False)
        except Exception as exc:
            if interrupted(exc):  # the exporter reports a Ctrl-C as its own failure: it stays a Ctrl-C
                raise KeyboardInterrupt from None
            raise
    proto = onnx.load(str(file))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(file))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter prints progress lines, logs warnings about torchvision ops cnnlab never uses, and warns about
    its own internals' deprecations (torch 2.13): none of it is the user's business."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def run_onnx(file: Path, inputs: np.ndarray) -> np.ndarray:
    """Outputs of an exported ONNX file under onnxruntime (CPU)."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


# ------------------------------------------------------------------------------------ TorchScript
def write_torchscript(model: nn.Module, inputs: torch.Tensor, file: Path, metadata: dict[str, str]) -> None:
    """Traced TorchScript; metadata.json travels inside the archive (torch.jit.load(_extra_files=...)).

    torch 2.13 marks torch.jit deprecated (in favour of torch.export) but still ships it; its warnings are silenced
    here because the file is what the user asked for. ONNX is the format to prefer.
    """
    with torch.no_grad(), jit_deprecation_silenced():
        traced = torch.jit.trace(model, inputs[:2])
        torch.jit.save(traced, str(file), _extra_files={"metadata.json": json.dumps(metadata)})


def run_torchscript(file: Path, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad(), jit_deprecation_silenced():
        return torch.jit.load(str(file), map_location="cpu")(inputs).numpy()


@contextlib.contextmanager
def jit_deprecation_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit", category=DeprecationWarning)
        yield


def require(module: str) -> ModuleType:
    """Import an optional package, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"exporting to ONNX needs {module}: pip install 'cnnlab[export]'") from None
