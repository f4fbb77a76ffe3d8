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
Every file is written to a temporary name, flushed to disk and renamed into place, so none is ever
half-written, and no tensor holding NaN or inf is ever saved. Model files are read with safetensors
only, never unpickled, and checked against the config before anything is built from them.
"""
from __future__ import annotations

import contextlib
import errno
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
from safetensors.torch import save_file

from cnnlab.config import Config, ConfigError, config_from_dict, read_yaml
from cnnlab.models.cnn import CNN, build_model
from cnnlab.training.engine import Callback, Trainer, TrainingDiverged

DEFAULT_ROOT = Path("runs")
FILES = dict(config="config.yaml", summary="summary.txt", manifest="manifest.json", metrics="metrics.jsonl",
             weights="model.safetensors", checkpoint="checkpoint.safetensors",
             previous_checkpoint="checkpoint.prev.safetensors", test="test.json", confusion="confusion.png",
             report="report.html", skipped="skipped.json", lock=".lock")


class RunError(ValueError):
    """A run directory that is missing, incomplete, busy or unwritable, or a run file that is not what
    cnnlab wrote; the message names it."""


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
def temp_name(target: Path) -> str:
    """The prefix of write_atomic's temporary files for `target` (a killed writer can leave one behind)."""
    return f".{target.name}."


def write_atomic(target: Path, write, before_rename=None) -> None:
    """Call write(tmp_path), flush it to disk, then rename tmp over target: readers see the old file or
    the new one, even after a crash. `before_rename()` runs once the new file is complete."""
    fd, tmp = tempfile.mkstemp(prefix=temp_name(target), suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_stale_temps(run: Path) -> list[Path]:
    """Delete temporary files a killed writer left in the run (call with the run's lock held)."""
    patterns = [f"{temp_name(Path(name))}*.tmp*" for name in FILES.values()]
    patterns.append(".tmp??????")  # safetensors' own temporary file (Rust's tempfile) beside the target
    stale = [p for pattern in patterns for p in run.glob(pattern) if p.is_file()]
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def reason(exc: OSError) -> str:
    """'No space left on device (ENOSPC)': the system's words and the error's name."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


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
    source = Path(__file__).resolve().parents[3]
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
    try:
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{file}: not one JSON object per line ({exc})") from None


def rewrite_metrics(run: Path, history: list[dict]) -> None:
    """metrics.jsonl as the checkpoint knows it (drops epochs recorded after the checkpoint)."""
    write_text(path(run, "metrics"), "".join(json.dumps(m) + "\n" for m in history))


# ------------------------------------------------------------------------------------- weights
def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """'<key> holds nan (or inf) values' for the first float tensor that is not all finite, else None."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"tensor {key!r} holds {'nan' if bool(torch.isnan(tensor).any()) else 'inf'} values"
    return None


def check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse to save NaN or inf: a file that loads but predicts nothing is worse than the previous one."""
    problem = non_finite(tensors)
    if problem:
        raise TrainingDiverged(f"{file} not saved: {problem}: training diverged. Try a lower learning rate "
                               f"or batch norm; the files saved before are kept.")


def save_weights(run: Path, model: CNN, classes: tuple[str, ...]) -> None:
    """Weights as safetensors, with what is needed to use them in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_finite(tensors, path(run, "weights"))
    metadata = dict(input_shape=json.dumps(list(model.input_shape)), classes=json.dumps(list(classes)),
                    format="cnnlab-weights-1")
    write_atomic(path(run, "weights"), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


PICKLE_STARTS = (b"\x80", b"PK\x03\x04")  # a pickle protocol 2+ opcode; a zip archive (torch.save since 1.6)


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, or a RunError naming it; never unpickles anything."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        # Named only once parsing failed: a safetensors header length can start with byte 0x80 too.
        if looks_pickled(file):
            raise RunError(f"{file}: a pickle or torch.save file, not safetensors; cnnlab never unpickles "
                           f"files (unpickling can run any code)") from None
        raise RunError(f"{file}: not a valid safetensors file ({exc})") from None
    return tensors, metadata


def looks_pickled(file: Path) -> bool:
    try:
        with open(file, "rb") as handle:
            return handle.read(4).startswith(PICKLE_STARTS)
    except OSError:
        return False


def metadata_json(file: Path, metadata: dict[str, str], key: str, valid, expected: str) -> Any:
    """One JSON value of a weights file's metadata, checked by `valid`."""
    if key not in metadata:
        raise RunError(f"{file}: not a cnnlab weights file: its metadata has no {key!r}")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError:
        value = None
    if not valid(value):
        raise RunError(f"{file}: metadata {key!r} should be {expected}, found {metadata[key][:80]!r}")
    return value


def check_tensors_fit(file: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                      config_file: Path) -> None:
    """Same keys, shapes and dtypes as the model rebuilt from the config, or a one-line RunError."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise RunError(f"{file}: tensor {missing[0]!r} is missing (the model in {config_file} needs it)")
    if extra:
        raise RunError(f"{file}: tensor {extra[0]!r} is not part of the model in {config_file}")
    for key, want in expected.items():
        have = found[key]
        if have.shape != want.shape:
            raise RunError(f"{file}: tensor {key!r} has shape {tuple(have.shape)}, the model in {config_file} "
                           f"needs {tuple(want.shape)}")
        if have.dtype != want.dtype:
            raise RunError(f"{file}: tensor {key!r} is {have.dtype}, the model needs {want.dtype}")


def is_shape(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 65536 for d in value))


def is_class_list(value: Any) -> bool:
    return (isinstance(value, list) and 1 <= len(value) <= 100_000 and all(isinstance(c, str) for c in value)
            and len(set(value)) == len(value))


def load_model(run: str | Path) -> tuple[CNN, tuple[str, ...], Config]:
    """Rebuild a run's model from its config.yaml and load model.safetensors: (model, classes, config).

    The file is checked before a model is built: a file that is not safetensors (a pickle), metadata
    that does not describe a model, or tensors that do not fit the config give a RunError naming it.
    """
    run = check_run(run, "config", "weights")
    config = load_config(run)
    file, config_file = path(run, "weights"), path(run, "config")
    tensors, meta = read_safetensors(file)
    input_shape = tuple(metadata_json(file, meta, "input_shape", is_shape, "[height, width, channels]"))
    classes = tuple(metadata_json(file, meta, "classes", is_class_list, "a list of distinct class names"))
    try:
        with torch.device("meta"):  # shapes without memory: a huge model in the config allocates nothing
            shapes = build_model(config.model, input_shape, len(classes)).state_dict()
    except ConfigError as exc:
        raise RunError(f"{file}: its input shape {input_shape} does not fit {config_file}: {exc}") from None
    check_tensors_fit(file, shapes, tensors, config_file)
    model = build_model(config.model, input_shape, len(classes))
    problem = non_finite(tensors)
    if problem:
        raise RunError(f"{file}: {problem}; a model with them cannot predict")
    model.load_state_dict(tensors)
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
    """Inverse of flatten_state; a ValueError for a reference to a tensor the file does not hold."""
    if isinstance(node, dict) and "__tensor__" in node:
        key = node["__tensor__"]
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"its state refers to tensor {key!r}, which the file does not hold")
        return tensors[key]
    if isinstance(node, dict) and "__dict__" in node:
        pairs = node["__dict__"]
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError("its state holds a malformed mapping")
        keys = [unflatten_state(k, tensors) for k, _ in pairs]
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in keys):
            raise ValueError("its state holds a mapping with a key that is not a plain value")
        return {k: unflatten_state(v, tensors) for k, (_, v) in zip(keys, pairs)}
    if isinstance(node, dict):
        raise ValueError("its state holds a mapping cnnlab did not write")
    if isinstance(node, list):
        return [unflatten_state(v, tensors) for v in node]
    return node


# The trainer's state (Trainer.state_dict) as a checkpoint must hold it: key -> what is checked.
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


STATE_CHECKS = dict(
    model=("a mapping of tensors", lambda v: isinstance(v, dict) and bool(v)
           and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())),
    optimizer=("a mapping with 'state' and 'param_groups'", lambda v: isinstance(v, dict)
               and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)),
    scheduler=("a mapping", lambda v: isinstance(v, dict)),
    epoch=("a count >= 0", _count),
    step=("a count >= 0", _count),
    running=("[loss sum, correct, seen]", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_number, v))),
    epoch_seconds=("a number", _number),
    history=("a list of per-epoch metrics", lambda v: isinstance(v, list) and all(isinstance(m, dict) for m in v)),
    rng_state=("a uint8 tensor", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8
               and v.dim() in (1, 2)),
)


def check_state(state: Any) -> None:
    """A ValueError naming the first key of the trainer's state that is missing or of the wrong kind."""
    if not isinstance(state, dict):
        raise ValueError("its state is not a mapping")
    for key, (expected, valid) in STATE_CHECKS.items():
        if key not in state:
            raise ValueError(f"its state has no {key!r}")
        if not valid(state[key]):
            raise ValueError(f"its state's {key!r} should be {expected}")


def save_checkpoint(run: Path, state: dict) -> None:
    """Write the trainer's state atomically; the previous checkpoint is kept as a fallback.

    The new file is complete and on disk before anything moves, and checkpoint.safetensors always
    exists (old or new): the previous one is hard-linked to checkpoint.prev.safetensors, then the
    new one renamed over it. A failure at any point leaves at least one readable checkpoint.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(flatten_state(state, tensors))
    current, previous = path(run, "checkpoint"), path(run, "previous_checkpoint")
    check_finite(tensors, current)

    def keep_previous() -> None:
        if current.exists():
            link = previous.with_name(f"{temp_name(previous)}link.tmp{previous.suffix}")
            link.unlink(missing_ok=True)
            os.link(current, link)
            os.replace(link, previous)

    write_atomic(current, lambda tmp: save_file(tensors, str(tmp), metadata={"state": skeleton,
                                                                          "format": "cnnlab-checkpoint-1"}),
                 before_rename=keep_previous)


def read_checkpoint(file: Path) -> dict:
    """A checkpoint's state, checked; RunError for a file that is not safetensors, ValueError for a state
    that is not one the trainer can continue from."""
    tensors, metadata = read_safetensors(file)
    if metadata.get("format") != "cnnlab-checkpoint-1" or "state" not in metadata:
        raise ValueError("not a cnnlab checkpoint (no cnnlab-checkpoint-1 state in its metadata)")
    try:
        skeleton = json.loads(metadata["state"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"its state is not valid JSON ({exc})") from None
    state = unflatten_state(skeleton, tensors)
    check_state(state)
    problem = non_finite(tensors)
    if problem:
        raise ValueError(problem)
    return state


def load_checkpoint(run: str | Path, restore=None) -> tuple[dict, list[str]]:
    """The newest readable checkpoint of a run, and warnings about any unreadable one skipped.

    `restore(state)` (e.g. Trainer.load_state_dict), when given, is tried on each: a checkpoint it
    rejects (tensors that do not fit the model) counts as unreadable too.
    """
    run = Path(run)
    warnings, found = [], []
    for key in ("checkpoint", "previous_checkpoint"):
        file = path(run, key)
        if not file.is_file():
            continue
        found.append(file)
        try:
            state = read_checkpoint(file)
            if restore is not None:
                restore(state)
            return state, warnings
        except (RunError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            detail = " ".join(str(exc).removeprefix(f"{file}: ").split())  # one line: torch's span several
            warnings.append(f"{file} is unreadable ({detail})")
    if not found:
        raise RunError(f"{run}: no checkpoint to resume from: training stopped before the end of its first "
                       f"epoch (or was never started here); train it again under a new name")
    raise RunError(f"{run}: no readable checkpoint to resume from ({'; '.join(warnings)})")


class RunRecorder(Callback):
    """Records a run as it trains: metrics, weights and a checkpoint after every epoch and on interrupt.

    A file that cannot be written (disk full, read-only) stops training with a RunError naming the
    run and the reason; the files written before it, the previous checkpoint included, stay intact.
    """

    def __init__(self, run: Path, classes: tuple[str, ...]):
        self.run, self.classes = run, classes

    def on_train_begin(self, trainer: Trainer) -> None:
        remove_stale_temps(self.run)  # left by a killed trainer; the run's lock is held now

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        where = f"epoch {trainer.epoch}"
        # weights before the checkpoint: a checkpoint of the last epoch means its weights are saved too
        # (resuming a finished run does not write them again)
        self.save("weights", where, save_weights, self.run, trainer.model, self.classes)
        self.save("checkpoint", where, save_checkpoint, self.run, trainer.state_dict())
        # the whole file, atomically (never a half-written line); resume rewrites it from the checkpoint
        self.save("metrics", where, rewrite_metrics, self.run, trainer.history)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.save("checkpoint", f"epoch {trainer.epoch + 1}, step {trainer.step}", save_checkpoint, self.run,
                  trainer.state_dict())

    def save(self, key: str, where: str, save, *args) -> None:
        """Call save(*args); a write that fails (disk full, read-only) becomes a RunError saying so."""
        try:
            save(*args)
        except (OSError, SafetensorError) as exc:
            why = reason(exc) if isinstance(exc, OSError) else str(exc)
            raise RunError(f"{self.run}: could not save {FILES[key]} after {where}: {why}. Training stopped; "
                           f"the files saved before are intact. Free space or make the folder writable, then "
                           f"continue with: cnnlab train --resume {self.run}") from None
