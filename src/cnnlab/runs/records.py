"""A run's small files: config.yaml, manifest.json, metrics.jsonl, test.json (no torch at import).

Every one is read as cnnlab reads any file a user or a crash can leave behind: a regular file of
bounded size, of the expected shape, or a one-line RunError naming it.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnlab.config import Config, config_from_dict, read_yaml
from cnnlab.files import FileRefused, MiB, MissingFile, read_json, read_text, write_json, write_text
from cnnlab.runs.layout import RunError, check_run, path
from cnnlab.text import from_null, to_json

MAX_CONFIG_BYTES = 1 * MiB  # a resolved config is a few kB
MAX_RECORD_BYTES = 16 * MiB  # test.json, manifest.json: a 1,000-class confusion matrix is 6.7-8.5 MB (tested)
MAX_METRICS_BYTES = 64 * MiB  # metrics.jsonl: ~200 bytes an epoch


def save_config(run: Path, config: Config) -> None:
    write_text(path(run, "config"), config.to_yaml())


def load_config(run: str | Path) -> Config:
    """The resolved config a run was trained with."""
    file = path(check_run(run, "config"), "config")
    return config_from_dict(read_yaml(file), source=str(file))


def write_manifest(run: Path, dataset_files: list[dict[str, Any]], allow_mismatch: bool,
                   extra: dict[str, Any] | None = None) -> None:
    import numpy as np
    import torch

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


def read_record(run: str | Path, key: str) -> dict[str, Any] | None:
    """A run's JSON record (test.json, manifest.json, skipped.json) as a mapping; None when the run has none."""
    try:
        return read_json(path(run, key), MAX_RECORD_BYTES, "run record")
    except MissingFile:
        return None
    except FileRefused as exc:
        raise RunError(str(exc)) from None


def read_test_accuracy(run: str | Path) -> float | None:
    """The accuracy in a run's test.json, or None when it has none (an interrupted run)."""
    test = read_record(run, "test")
    value = test.get("accuracy") if test else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl: one JSON object per epoch ([] when training has not finished an epoch)."""
    file = path(run, "metrics")
    try:
        text = read_text(file, MAX_METRICS_BYTES, "metrics file")
    except MissingFile:
        return []
    except FileRefused as exc:
        raise RunError(str(exc)) from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{file}: line {number} is not JSON ({exc.msg}); expected one object per line") from None
        if not isinstance(row, dict):
            raise RunError(f"{file}: line {number} is a JSON {type(row).__name__}, expected an object per epoch")
        wrong = next((key for key, value in row.items() if not metric_value(key, value)), None)
        if wrong is not None:  # every reader does arithmetic on them: a text epoch ended in a TypeError
            raise RunError(f"{file}: line {number}: {wrong} is {to_json(row[wrong])[:40]}, expected "
                           f"{'a whole number' if wrong == 'epoch' else 'a number or null'}")
        rows.append(from_null(row))  # null: a number that was not finite (an epoch not validated)
    return rows


def metric_value(key: str, value: Any) -> bool:
    """Whether a metrics.jsonl value has the type its readers expect (`engine.EpochMetrics`): the epoch a whole
    number, every other value a number (or null: one that was not finite)."""
    if key == "epoch":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def rewrite_metrics(run: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl as the checkpoint knows it (drops epochs recorded after the checkpoint)."""
    write_text(path(run, "metrics"), "".join(to_json(m) + "\n" for m in history))
