"""A run's checkpoint: the trainer's state in one safetensors file, written so one readable checkpoint
always exists, and read back only as data (no pickle: tensors in safetensors, the rest as JSON).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cnnlab.files import temp_prefix, write_atomic
from cnnlab.runs.layout import RunError, path
from cnnlab.runs.weights import check_finite, non_finite, read_safetensors
from cnnlab.training.state import check_checkpoint


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
            link = previous.with_name(f"{temp_prefix(previous)}link.tmp{previous.suffix}")
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
    check_checkpoint(state)
    problem = non_finite(tensors)
    if problem:
        raise ValueError(problem)
    return state


def prune_finished(run: Path) -> bool:
    """Drop checkpoint.prev.safetensors once a run has finished; whether it was dropped.

    The previous checkpoint is a fallback for a write torn mid-training; a finished run's last checkpoint
    is complete and is all `--resume` of it reads (it restores model.safetensors from it). The previous
    one goes only after the last reads back whole (`read_checkpoint`), so one readable checkpoint stays.
    """
    current, previous = path(run, "checkpoint"), path(run, "previous_checkpoint")
    if not previous.is_file() or not current.is_file():
        return False
    try:
        read_checkpoint(current)
    except (RunError, ValueError):
        return False  # the previous one stays as the fallback; resume says which was unreadable
    try:
        previous.unlink()
    except OSError:
        return False  # a read-only folder: the run is whole all the same, only larger
    return True


def load_checkpoint(run: str | Path, restore: Callable[[dict[str, Any]], object] | None = None
                    ) -> tuple[dict, list[str]]:
    """The newest readable checkpoint of a run, and warnings about any unreadable one skipped.

    `restore(state)` (e.g. Trainer.load_state_dict), when given, is tried on each: a checkpoint it
    rejects (tensors that do not fit the model) counts as unreadable too.
    """
    run = Path(run)
    warnings: list[str] = []
    found: list[Path] = []
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


