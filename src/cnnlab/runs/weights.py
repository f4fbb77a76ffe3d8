"""A run's model file: weights as safetensors, read back only after checking them against the config.

Never unpickled: a pickle or torch.save file where a model belongs is named as one and refused. The
tensors' names, shapes and dtypes are checked against the model rebuilt (on the meta device, no
memory) from config.yaml before anything is allocated, and no tensor holding NaN or inf is saved or loaded.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cnnlab.config import Config, ConfigError
from cnnlab.files import FileRefused, GiB, check_regular, reason, write_atomic
from cnnlab.models.cnn import CNN, build_model
from cnnlab.runs.layout import RunError, check_run, path
from cnnlab.runs.records import load_config


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
        raise RunError(f"{file} not saved: {problem}: training diverged. Try a lower learning rate "
                               f"or batch norm; the files saved before are kept.")


def save_weights(run: Path, model: CNN, classes: tuple[str, ...]) -> None:
    """Weights as safetensors, with what is needed to use them in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_finite(tensors, path(run, "weights"))
    metadata = dict(input_shape=json.dumps(list(model.input_shape)), classes=json.dumps(list(classes)),
                    format="cnnlab-weights-1")
    write_atomic(path(run, "weights"), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


PICKLE_STARTS = (b"\x80", b"PK\x03\x04")  # a pickle protocol 2+ opcode; a zip archive (torch.save since 1.6)


MAX_MODEL_BYTES = 16 * GiB  # a model file or checkpoint; cnnlab's largest presets write a few MB


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, or a RunError naming it; never unpickles anything.

    Only a regular file of at most MAX_MODEL_BYTES is opened (a FIFO would block the reader forever).
    """
    try:
        size = check_regular(file, "model file").stat().st_size
    except FileRefused as exc:
        raise RunError(str(exc)) from None
    if size > MAX_MODEL_BYTES:
        raise RunError(f"{file}: {size:,} bytes is more than a model file may hold ({MAX_MODEL_BYTES:,})")
    try:  # safetensors says "No such file or directory" for a file it may not read: ask the system first
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise RunError(f"{file}: cannot read it: {reason(exc)}") from None
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


def metadata_json(file: Path, metadata: dict[str, str], key: str, valid: Callable[[Any], bool], expected: str
                  ) -> Any:
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


def read_input_shape(run: str | Path) -> tuple[int, int, int]:
    """The (height, width, channels) a run's model takes, from its model.safetensors metadata."""
    file = path(check_run(run, "weights"), "weights")
    _, meta = read_safetensors(file)
    height, width, channels = metadata_json(file, meta, "input_shape", is_shape, "[height, width, channels]")
    return height, width, channels


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




def weights_problem(run: str | Path, model: CNN) -> str | None:
    """Why the run's model.safetensors is not `model`'s weights ('missing', 'unreadable: ...',
    'different weights'), or None when it holds exactly them."""
    file = path(run, "weights")
    if not file.exists():
        return "missing"
    try:
        saved = load_model(run)[0].state_dict()
    except (RunError, ConfigError) as exc:
        return f"unreadable ({exc})"
    mine = model.state_dict()
    same = saved.keys() == mine.keys() and all(torch.equal(saved[k].cpu(), mine[k].detach().cpu()) for k in mine)
    return None if same else "not the weights the checkpoint holds"
