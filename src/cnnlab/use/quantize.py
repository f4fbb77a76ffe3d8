"""int8 ONNX (`cnnlab export --format onnx --quantize int8`): the run's model quantized by onnxruntime, written
only when its test accuracy stays within `max_drop` points of the float32 model's.

Static quantization: weights int8 per output channel, activations uint8 with ranges calibrated (min/max) on
images drawn at random from the run's own training split, in QDQ form (onnxruntime's CPU kernels fuse it into
integer convolutions and matrix products). Both models are then run on the whole test split and timed one
image at a time; the file is written atomically, after the check, or not at all.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.config import Config
from cnnlab.data.pixels import to_inputs
from cnnlab.data.sources import Data, Source, load_all, load_data
from cnnlab.files import output_target, remove_stale_temps, write_atomic
from cnnlab.runs.records import load_config, read_record
from cnnlab.use.backends import onnx_file, onnx_session
from cnnlab.use.export import ExportError, require
from cnnlab.use.predict import Predictor

CALIBRATION_IMAGES = 512  # training images the activation ranges are measured on (more changes little)
MAX_DROP = 0.5  # points of test accuracy int8 may lose against float32 before it is refused
LATENCY_RUNS = 200  # batch-1 passes timed per model; the median is reported
EVAL_BATCH = 256  # test images per pass when measuring accuracy


class AccuracyDropped(ExportError):
    """The int8 model lost more test accuracy than allowed: nothing was written."""


@dataclass
class QuantizeResult:
    """What quantizing gave: the file, its size, test accuracy and batch-1 latency next to float32's."""

    file: Path
    float_bytes: int
    int8_bytes: int
    float_accuracy: float  # fraction of the test split, 0..1
    int8_accuracy: float
    test_images: int
    float_latency_ms: float  # median of LATENCY_RUNS passes on one image
    int8_latency_ms: float
    calibration_images: int

    @property
    def drop_points(self) -> float:
        """Test accuracy lost to int8, in percentage points (negative: int8 did better)."""
        return 100 * (self.float_accuracy - self.int8_accuracy)

    def lines(self) -> list[str]:
        """The report `cnnlab export --quantize int8` prints."""
        return [f"size: {self.int8_bytes / 1e6:.2f} MB (float32 {self.float_bytes / 1e6:.2f} MB, "
                f"{self.float_bytes / self.int8_bytes:.1f}x smaller)",
                f"test accuracy: {self.int8_accuracy:.2%} (float32 {self.float_accuracy:.2%}, "
                f"{100 * (self.int8_accuracy - self.float_accuracy):+.2f} points) on {self.test_images:,} test images",
                f"batch-1 latency: {self.int8_latency_ms:.3f} ms (float32 {self.float_latency_ms:.3f} ms), "
                f"median of {LATENCY_RUNS} passes",
                f"calibrated on {self.calibration_images:,} training images"]

    def to_dict(self) -> dict:
        return dict(file=str(self.file), float_bytes=self.float_bytes, int8_bytes=self.int8_bytes,
                    float_accuracy=self.float_accuracy, int8_accuracy=self.int8_accuracy,
                    drop_points=self.drop_points, test_images=self.test_images,
                    float_latency_ms=self.float_latency_ms, int8_latency_ms=self.int8_latency_ms,
                    calibration_images=self.calibration_images)


def quantize_run(run: str | Path, out: str | Path | None = None, max_drop: float = MAX_DROP,
                 calibration_images: int = CALIBRATION_IMAGES, seed: int = 0) -> QuantizeResult:
    """Quantize a run's model to int8 ONNX at `out` (default <run>/model.int8.onnx); AccuracyDropped, and
    nothing written, when its test accuracy falls more than `max_drop` points below float32's."""
    if not max_drop >= 0:
        raise ExportError(f"--max-drop {max_drop}: expected a number of points >= 0")
    require("onnxruntime.quantization")
    out = output_target(Path(out) if out is not None else Path(run) / "model.int8.onnx")  # before the work
    remove_stale_temps(out.parent, [out.name])
    predictor = Predictor.from_run(run)
    data = run_data(load_config(run), (read_record(run, "manifest") or {}).get("image_folder"), str(run))
    calibration = calibration_inputs(data.train, calibration_images, seed)
    test_x, test_y = test_inputs(data.test)
    with tempfile.TemporaryDirectory(prefix="cnnlab-int8-") as folder:
        float_file = onnx_file(predictor, Path(folder))
        int8_file = Path(folder) / "model.int8.onnx"
        quantize_static(float_file, calibration, int8_file)
        float_session, int8_session = onnx_session(float_file), onnx_session(int8_file)
        result = QuantizeResult(out, float_file.stat().st_size, int8_file.stat().st_size,
                                accuracy(float_session, test_x, test_y), accuracy(int8_session, test_x, test_y),
                                len(test_y), latency_ms(float_session, test_x[:1]),
                                latency_ms(int8_session, test_x[:1]), len(calibration))
        if result.drop_points > max_drop:
            raise AccuracyDropped(f"{out}: the int8 model's test accuracy {result.int8_accuracy:.2%} is "
                                  f"{result.drop_points:.2f} points below float32's {result.float_accuracy:.2%}, "
                                  f"more than --max-drop {max_drop:g}; nothing was written")
        write_atomic(out, lambda tmp: shutil.copyfile(int8_file, tmp))
    return result


# -------------------------------------------------------------------------------------------- data
def run_data(config: Config, pinned: dict | None = None, run: str = "the run") -> Data:
    """The run's dataset split as in training (the same validation hold-out), image folders streamed and checked
    against the record the run pinned (`sources.load_data`)."""
    return load_data(config, progress=False, hold=False, pinned=pinned, run=run)


def calibration_inputs(train: Source, count: int, seed: int) -> np.ndarray:
    """float32 (N, C, H, W) in [0, 1]: `count` training images drawn at random (seeded), N <= count."""
    if count < 1:
        raise ExportError(f"calibration needs at least one training image, not {count}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(train), generator=generator)[:count].sort().values
    images, _ = load_all_of(train, chosen)
    return to_inputs(images).numpy()


def load_all_of(source: Source, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (M, C, H, W) and labels (M,) of the given indices (unreadable streamed images left out)."""
    parts = list(source.batches(index.split(EVAL_BATCH)))
    if not parts:
        raise ExportError("the run's training split holds no images to calibrate on")
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def test_inputs(test: Source) -> tuple[np.ndarray, np.ndarray]:
    """The whole test split: float32 (N, C, H, W) in [0, 1] and int64 labels (N,)."""
    images, labels = load_all(test)
    if len(labels) == 0:
        raise ExportError("the run's test split holds no images: the accuracy check needs some")
    return to_inputs(images).numpy(), labels.numpy()


# ------------------------------------------------------------------------------- quantize and measure
def quantize_static(float_file: Path, calibration: np.ndarray, out: Path) -> None:
    """onnxruntime's static quantization (QDQ, int8 weights per channel, uint8 activations, min/max ranges)
    after its pre-processing (graph optimisation, shape inference)."""
    quantization = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name("prepared.onnx")
    reader = calibration_reader(quantization.CalibrationDataReader, input_name(float_file), calibration)
    with quiet_quantizer():
        quant_pre_process(str(float_file), str(prepared))
        quantization.quantize_static(str(prepared), str(out), reader, quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8)
    copy_metadata(float_file, out)


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """The quantizer logs warnings through the root logger about what it quantizes per tensor instead of per
    channel (batch norm's 1-D scales, in `fast`): its own choices, not the user's business; errors still show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def calibration_reader(base: type, name: str, calibration: np.ndarray, batch: int = 64) -> Any:
    """A CalibrationDataReader handing the calibration images over `batch` at a time."""

    class Reader(base):  # onnxruntime's class, imported only when needed
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(calibration[i:i + batch]
                                                      for i in range(0, len(calibration), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {name: np.ascontiguousarray(chunk)}

    return Reader()


def input_name(file: Path) -> str:
    return str(onnx_session(file, threads=1).get_inputs()[0].name)


def copy_metadata(source: Path, target: Path) -> None:
    """The float file's metadata (classes, input shape, recipe...) on the int8 file, which quantizing drops."""
    onnx = require("onnx")
    model, quantized = onnx.load(str(source)), onnx.load(str(target))
    have = {entry.key for entry in quantized.metadata_props}
    for entry in model.metadata_props:
        if entry.key not in have:
            added = quantized.metadata_props.add()
            added.key, added.value = entry.key, entry.value
    onnx.save(quantized, str(target))


def accuracy(session: Any, x: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `x` (float32 (N, C, H, W)) the session classes as `labels`, EVAL_BATCH images a pass."""
    name = session.get_inputs()[0].name
    correct = sum(int((session.run(None, {name: x[i:i + EVAL_BATCH]})[0].argmax(1) == labels[i:i + EVAL_BATCH]).sum())
                  for i in range(0, len(x), EVAL_BATCH))
    return correct / len(x)


def latency_ms(session: Any, one: np.ndarray, runs: int = LATENCY_RUNS) -> float:
    """Median milliseconds of a batch-1 pass, after 10 passes of warm-up."""
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(one)}
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
