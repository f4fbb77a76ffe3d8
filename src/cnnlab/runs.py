"""The run directory: the only module that decides paths and writes run files.

A run is a folder (default runs/<dataset>-<model>-<timestamp>) holding:
  config.yaml         the resolved config the model is rebuilt from
  summary.txt         the layer table
  manifest.json       versions, dataset files and checksums, git commit, command line
  metrics.jsonl       one JSON object per epoch
  model.safetensors   weights only (metadata: input shape, class names), loadable without pickle
  checkpoint.safetensors  resumable state: weights, optimizer, scheduler, RNG, epoch, step
  test.json           final test metrics;  confusion.png  the test confusion matrix
  report.html         the self-contained HTML report, when `cnnlab report` made one
  skipped.json        unreadable images met while training on an image folder (path -> reason), if any
Every file is written to a temporary name and renamed into place, so none is ever half-written.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cnnlab.config import Config, config_from_dict, read_yaml
from cnnlab.models import CNN, build_model
from cnnlab.trainer import Callback, Trainer

DEFAULT_ROOT = Path("runs")
FILES = dict(config="config.yaml", summary="summary.txt", manifest="manifest.json", metrics="metrics.jsonl",
             weights="model.safetensors", checkpoint="checkpoint.safetensors",
             previous_checkpoint="checkpoint.prev.safetensors", test="test.json", confusion="confusion.png",
             report="report.html", skipped="skipped.json", lock=".lock")


class RunError(ValueError):
    """A run directory that is missing, incomplete or busy; the message names it."""


def path(run: str | Path, name: str) -> Path:
    """The path of one of a run's files, by its key in FILES."""
    return Path(run) / FILES[name]


# ---------------------------------------------------------------------------- creating and finding
def default_name(config: Config) -> str:
    """<dataset>-<model>-<time>; an image folder's dataset is named by the folder's last part."""
    dataset = Path(config.data.dataset).name if "/" in config.data.dataset else config.data.dataset
    return f"{dataset}-{config.model.name}-{datetime.now():%Y%m%d-%H%M%S}"


def new_run(config: Config, root: str | Path = DEFAULT_ROOT, name: str | None = None, reuse: bool = False) -> Path:
    """Create a fresh, empty run directory; never reuses an existing one unless `reuse` (a restarted job's)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if reuse and name is not None:
        (root / name).mkdir(exist_ok=True)
        return root / name
    base = name or default_name(config)
    for attempt in range(1000):
        run = root / (base if attempt == 0 else f"{base}-{attempt + 1}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            if name is not None:
                raise RunError(f"{run}: a run of that name exists; pick another name or --resume it") from None
    raise RunError(f"{root}: could not find a free run name for {base}")


def find_runs(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Run directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / FILES["config"]).is_file()]
    return sorted(runs, key=lambda p: (p / FILES["config"]).stat().st_mtime)


def latest_run(root: str | Path = DEFAULT_ROOT) -> Path:
    runs = find_runs(root)
    if not runs:
        raise RunError(f"no runs under {root}/: train one with `cnnlab train`")
    return runs[-1]


def check_run(run: str | Path, *needed: str) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run}: no such run directory")
    for key in needed:
        if not path(run, key).is_file():
            raise RunError(f"{run}: not a complete run: {FILES[key]} is missing")
    return run


@contextlib.contextmanager
def locked(run: str | Path) -> Iterator[None]:
    """Hold the run's lock: a second training on the same directory refuses instead of corrupting it."""
    with open(path(run, "lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{run}: another process is training in this run directory") from None
        yield


# ---------------------------------------------------------------------------------- atomic writes
def write_atomic(target: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over target: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    write_atomic(target, lambda tmp: tmp.write_text(text))


def write_json(target: Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------ run files
def save_config(run: Path, config: Config) -> None:
    write_text(path(run, "config"), config.to_yaml())


def load_config(run: str | Path) -> Config:
    """The resolved config a run was trained with."""
    file = path(check_run(run, "config"), "config")
    return config_from_dict(read_yaml(file), source=str(file))


def write_manifest(run: Path, dataset_files: list[dict], allow_mismatch: bool, extra: dict | None = None) -> None:
    import cnnlab

    manifest = dict(
        cnnlab=cnnlab.__version__, torch=torch.__version__, numpy=np.__version__,
        python=platform.python_version(), platform=platform.platform(), threads=torch.get_num_threads(),
        git_commit=git_commit(), command=sys.argv, started=datetime.now().isoformat(timespec="seconds"),
        dataset_files=dataset_files, allow_checksum_mismatch=allow_mismatch,
        unverified_files=[f["name"] for f in dataset_files if not f["verified"]], **(extra or {}))
    write_json(path(run, "manifest"), manifest)


def git_commit() -> str | None:
    """The commit of the cnnlab checkout this code runs from, or None when installed from a package."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def append_metrics(run: Path, metrics: dict) -> None:
    with open(path(run, "metrics"), "a") as handle:
        handle.write(json.dumps(metrics) + "\n")


def read_metrics(run: str | Path) -> list[dict]:
    file = path(run, "metrics")
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def rewrite_metrics(run: Path, history: list[dict]) -> None:
    """metrics.jsonl as the checkpoint knows it (drops epochs recorded after the checkpoint)."""
    write_text(path(run, "metrics"), "".join(json.dumps(m) + "\n" for m in history))


# ------------------------------------------------------------------------------------- weights
def save_weights(run: Path, model: CNN, classes: tuple[str, ...]) -> None:
    """Weights as safetensors, with what is needed to use them in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = dict(input_shape=json.dumps(list(model.input_shape)), classes=json.dumps(list(classes)),
                    format="cnnlab-weights-1")
    write_atomic(path(run, "weights"), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_model(run: str | Path) -> tuple[CNN, tuple[str, ...], Config]:
    """Rebuild a run's model from its config.yaml and load model.safetensors: (model, classes, config)."""
    run = check_run(run, "config", "weights")
    config = load_config(run)
    file = path(run, "weights")
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(file))
        input_shape, classes = tuple(json.loads(meta["input_shape"])), tuple(json.loads(meta["classes"]))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise RunError(f"{file}: not a cnnlab weights file ({exc})") from None
    model = build_model(config.model, input_shape, len(classes))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise RunError(f"{file}: weights do not fit the model in {path(run, 'config')}: {exc}") from None
    model.eval()
    return model, classes, config


def learned_kernel(run: str | Path, layer: str, index: int) -> np.ndarray:
    """Filter `index` of conv layer `layer` of a trained run, channels-last: (kh, kw) or (kh, kw, C)."""
    model, _, _ = load_model(run)
    convs = {name: module for name, module in model.features.named_children() if isinstance(module, torch.nn.Conv2d)}
    if layer not in convs:
        raise RunError(f"{run}: no conv layer {layer!r} (conv layers: {', '.join(convs) or 'none'})")
    weight = convs[layer].weight.detach()  # (filters, C, kh, kw)
    if not 0 <= index < weight.shape[0]:
        raise RunError(f"{run}: {layer} has filters 0..{weight.shape[0] - 1}, got {index}")
    kernel = weight[index].permute(1, 2, 0).numpy().astype("float64")  # (kh, kw, C)
    return kernel[:, :, 0] if kernel.shape[2] == 1 else kernel


# ---------------------------------------------------------------------------------- checkpoints
def flatten_state(node: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """Replace every tensor in a nested state by a reference, collecting the tensors by key."""
    if isinstance(node, torch.Tensor):
        tensors[key] = node.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(node, dict):
        return {"__dict__": [[flatten_state(k, tensors, f"{key}.k{i}"), flatten_state(v, tensors, f"{key}.{i}")]
                             for i, (k, v) in enumerate(node.items())]}
    if isinstance(node, (list, tuple)):
        return [flatten_state(v, tensors, f"{key}.{i}") for i, v in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot store {type(node).__name__} at {key} in a checkpoint")


def unflatten_state(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict) and "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if isinstance(node, dict) and "__dict__" in node:
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, list):
        return [unflatten_state(v, tensors) for v in node]
    return node


def save_checkpoint(run: Path, state: dict) -> None:
    """Write the trainer's state atomically; the previous checkpoint is kept as a fallback."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(flatten_state(state, tensors))
    current, previous = path(run, "checkpoint"), path(run, "previous_checkpoint")

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"state": skeleton, "format": "cnnlab-checkpoint-1"})
        if current.exists():
            os.replace(current, previous)

    write_atomic(current, write)


def read_checkpoint(file: Path) -> dict:
    with safe_open(str(file), framework="pt") as handle:
        skeleton = json.loads((handle.metadata() or {})["state"])
    return unflatten_state(skeleton, load_file(str(file)))


def load_checkpoint(run: str | Path) -> tuple[dict, list[str]]:
    """The newest readable checkpoint of a run, and warnings about any unreadable one skipped."""
    warnings = []
    for key in ("checkpoint", "previous_checkpoint"):
        file = path(run, key)
        if not file.is_file():
            continue
        try:
            return read_checkpoint(file), warnings
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            warnings.append(f"{file} is unreadable ({exc}); trying the previous checkpoint")
    raise RunError(f"{run}: no readable checkpoint to resume from" + (f" ({'; '.join(warnings)})" if warnings else ""))


class RunRecorder(Callback):
    """Records a run as it trains: metrics, weights and a checkpoint after every epoch and on interrupt."""

    def __init__(self, run: Path, classes: tuple[str, ...]):
        self.run, self.classes = run, classes

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        append_metrics(self.run, metrics)
        save_weights(self.run, trainer.model, self.classes)
        save_checkpoint(self.run, trainer.state_dict())

    def on_interrupt(self, trainer: Trainer) -> None:
        save_checkpoint(self.run, trainer.state_dict())
