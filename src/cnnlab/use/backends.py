"""What runs a trained model's forward pass for predict, serve and folder prediction: torch or onnxruntime.

A backend takes float images (N, C, H, W) in [0, 1] as a NumPy array and returns class probabilities
(N, classes). `torch` runs the model in eager mode. `onnx` runs the run's model exported to ONNX under
onnxruntime: the file is made once, the first time a run is used this way, and cached beside the run
(`inference.onnx`, with `inference.onnx.json` recording the digests of the weights, config and ONNX file it
was made from). At each start the cache is checked cheaply (digests, then the answers on a few inputs
against the torch model's); a cache that fails any check is made again, never used.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from cnnlab.errors import UserError, interrupted
from cnnlab.files import FileRefused, write_atomic
from cnnlab.models.cnn import CNN
from cnnlab.runs.layout import path
from cnnlab.text import to_json

if TYPE_CHECKING:
    from cnnlab.use.predict import Predictor

BACKENDS = ("auto", "torch", "onnx")  # auto: onnx when onnxruntime is installed and the export works, else torch
RECORD_FORMAT = "cnnlab-inference-onnx-1"
CHECK_COUNT = 8  # inputs each start compares the cached file's answers on (a few ms)


class Backend(Protocol):
    """A forward pass: float32 (N, C, H, W) in [0, 1] -> float32 probabilities (N, classes)."""

    name: str

    def probabilities(self, x: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    """The model in torch eager mode."""

    name = "torch"

    def __init__(self, model: CNN):
        self.model = model

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.predict_proba(torch.from_numpy(x)).numpy()


class OnnxBackend:
    """An ONNX file under onnxruntime (CPU), using as many threads as torch is set to (`--threads`)."""

    name = "onnx"

    def __init__(self, file: Path):
        self.session = onnx_session(file)
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def onnx_session(file: Path, threads: int | None = None) -> Any:
    """An onnxruntime InferenceSession on the CPU with `threads` (default: torch's count) and no log chatter."""
    from cnnlab.use.export import require

    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1  # the models are one chain of layers: nothing to run side by side
    options.log_severity_level = 3  # errors only
    # No spin-waiting for the next run: onnxruntime's threads otherwise spin ~a ms after every run, which doubled
    # the server's CPU per request (4.5 -> 2.2 ms, one client) and took it from whatever else shares the cores;
    # requests/s and latency are the same or better without (BENCHMARKS.md, "Serving").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


@dataclass
class Choice:
    """The backend a command runs and, for the line it prints, why."""

    backend: Backend
    reason: str

    def line(self) -> str:
        return f"backend: {self.backend.name} ({self.reason})"


def choose_backend(predictor: Predictor, requested: str = "auto") -> Choice:
    """The backend for a run's model: `torch`, `onnx` (a UserError when it cannot be had), or `auto` (onnx
    when onnxruntime is installed and the model exports and checks, else torch, saying why)."""
    model, run = predictor.model, predictor.run
    if requested not in BACKENDS:
        raise UserError(f"--backend {requested}: expected one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return Choice(TorchBackend(model), "as asked")
    if run is None:
        if requested == "onnx":
            raise UserError("the onnx backend needs the model's run folder (its ONNX file is cached there)")
        return Choice(TorchBackend(model), "a model without a run folder")
    try:
        return onnx_choice(predictor, Path(run))
    except Exception as exc:  # noqa: BLE001 -- auto: any reason ONNX is not at hand falls back to torch, said once
        if interrupted(exc):
            raise KeyboardInterrupt from None
        if requested == "onnx":
            if isinstance(exc, UserError):
                raise
            raise UserError(f"{run}: the onnx backend failed ({type(exc).__name__}: {first_line(exc)})") from None
        return Choice(TorchBackend(model), f"onnx unavailable: {first_line(exc)}")


def onnx_choice(predictor: Predictor, run: Path) -> Choice:
    """The run's cached ONNX file under onnxruntime, made (again) first when it is missing or fails a check."""
    from cnnlab.use.export import require

    version = require("onnxruntime").__version__
    cached = cached_backend(predictor.model, run)
    if isinstance(cached, OnnxBackend):
        return Choice(cached, f"onnxruntime {version}, cached {path(run, 'inference_onnx')}")
    try:
        file = build_cache(predictor, run)
    except (OSError, FileRefused) as exc:  # a read-only run folder: made in a temporary folder, not kept
        with tempfile.TemporaryDirectory() as folder:
            backend = OnnxBackend(export_checked(predictor, Path(folder) / "model.onnx"))
        return Choice(backend, f"onnxruntime {version}, made for this session only: could not cache it ({exc})")
    made = "made now" if cached == "missing" else f"made again: {cached}"
    return Choice(OnnxBackend(file), f"onnxruntime {version}, {file} {made}")


def onnx_file(predictor: Predictor, folder: Path) -> Path:
    """A checked float32 ONNX file of the model: the run's cache (made first when it fails a check), or, for a
    model without a run folder or in a run folder that cannot hold it, one exported into `folder`."""
    run = predictor.run
    if run is not None:
        if isinstance(cached_backend(predictor.model, run), OnnxBackend):
            return path(run, "inference_onnx")
        try:
            return build_cache(predictor, run)
        except (OSError, FileRefused):
            pass  # a read-only run folder: exported below instead
    return export_checked(predictor, folder / "model.onnx")


# ----------------------------------------------------------------------------------------- the cache
def file_digest(file: Path) -> str:
    """SHA-256 of a file's bytes (a few ms for cnnlab's model files)."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sources_digests(run: Path) -> dict[str, str]:
    """The digests of what the ONNX file is made from: the weights and the config the model is rebuilt from."""
    return dict(weights_sha256=file_digest(path(run, "weights")), config_sha256=file_digest(path(run, "config")))


def cached_backend(model: CNN, run: Path) -> OnnxBackend | str:
    """The run's cached ONNX file under onnxruntime when its record matches the weights, config and file and
    its answers match `model`'s on CHECK_COUNT inputs; else why not ('missing', 'the run's weights changed...')."""
    from cnnlab.use.export import TOLERANCE  # (cnnlab.use.export imports this module's users: imported late)

    file, record_file = path(run, "inference_onnx"), path(run, "inference_onnx_record")
    if not file.is_file() or not record_file.is_file():
        return "missing"
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            return f"{record_file.name} is not a record cnnlab wrote"
        for key, digest in sources_digests(run).items():
            if record.get(key) != digest:
                return f"the run's {key.split('_')[0]} changed since it was made"
        if record.get("onnx_sha256") != file_digest(file):
            return f"{file.name} is not the file that was made (changed or cut short)"
        backend = OnnxBackend(file)
        difference = answers_difference(model, backend)
    except Exception as exc:  # noqa: BLE001 -- unreadable record or file, a session that fails: made again
        if interrupted(exc):
            raise KeyboardInterrupt from None
        return f"unreadable ({type(exc).__name__}: {first_line(exc)})"
    if not difference <= TOLERANCE:
        return f"its answers differ from the model's by {difference:.1e}"
    return backend


def build_cache(predictor: Predictor, run: Path) -> Path:
    """Export the model to the run's inference.onnx (checked as `cnnlab export` checks), then its record."""
    file = path(run, "inference_onnx")
    sources = sources_digests(run)  # before the export: a change during it shows at the next start
    export_checked(predictor, file)
    record = dict(format=RECORD_FORMAT, **sources, onnx_sha256=file_digest(file))
    write_atomic(path(run, "inference_onnx_record"),
                 lambda tmp: tmp.write_text(to_json(record, indent=1) + "\n", encoding="utf-8"))
    return file


def export_checked(predictor: Predictor, out: Path) -> Path:
    """The model exported to ONNX at `out`, its answers checked against the model's on the export's inputs
    (random ink: the cache never waits for a dataset to load)."""
    from cnnlab.use.export import export_predictor, random_ink

    export_predictor(predictor, "onnx", out, check_images=random_ink(predictor.model.input_shape))
    return out


def answers_difference(model: CNN, backend: Backend, count: int = CHECK_COUNT) -> float:
    """Largest absolute difference in probability between `backend` and the torch model on `count` inputs."""
    from cnnlab.use.export import example_inputs_of, random_ink

    x = example_inputs_of(model, random_ink(model.input_shape, count, seed=1)).numpy()
    return float(np.abs(backend.probabilities(x) - TorchBackend(model).probabilities(x)).max())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
