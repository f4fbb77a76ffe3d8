"""Runs side by side: one summary row per run directory, and the config keys in which runs differ.

Reads only the small files (config.yaml, metrics.jsonl, test.json, manifest.json, the weights'
header), so listing many runs is quick and needs no dataset.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnlab.config import Config, dotted_keys
from cnnlab.errors import UserError
from cnnlab.models.plan import plan
from cnnlab.runs import layout, records

COLUMNS = ("run", "dataset", "model", "params", "epochs", "val_accuracy", "test_accuracy", "seconds", "started")
TEXT_COLUMNS = ("run", "dataset", "model", "started")  # sorted A-Z; the numeric ones biggest first


def weights_metadata(run: Path) -> dict[str, str]:
    """The metadata in model.safetensors' header (input shape, class names), without reading the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(layout.path(run, "weights")), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def count_run_params(run: Path, config: Config) -> int | None:
    """Trainable parameters of a run's model, from its config and the input shape in its weights file."""
    meta = weights_metadata(run)
    try:
        input_shape = tuple(json.loads(meta["input_shape"]))
        num_classes = len(json.loads(meta["classes"]))
    except (KeyError, json.JSONDecodeError):
        from cnnlab.data.registry import dataset_shape  # a registered dataset or an image folder
        from cnnlab.errors import UserError

        try:
            input_shape, num_classes = dataset_shape(config.data)
        except UserError:  # a dataset registered by a plugin not loaded now, or a folder moved away
            return None
    return plan(config.model, input_shape, num_classes).params


def run_row(run: str | Path) -> dict[str, Any]:
    """One run's summary: dataset, model, parameters, epochs done, last validation and test accuracy, time."""
    run = Path(run)
    config = records.load_config(run)
    history = records.read_metrics(run)
    test = records.read_record(run, "test") or {}
    manifest = records.read_record(run, "manifest") or {}
    started = manifest.get("started")
    return dict(
        run=run.name, path=str(run), dataset=config.data.dataset, model=config.model.name,
        params=count_run_params(run, config), epochs=len(history), epochs_planned=config.train.epochs,
        val_accuracy=last_validated(history),
        test_accuracy=finite(test.get("accuracy")), test_loss=finite(test.get("loss")),
        seconds=round(sum(finite(m.get("seconds")) or 0.0 for m in history), 2) if history else None,
        started=started if isinstance(started, str) else None, error=None)


def last_validated(history: list[dict[str, Any]]) -> float | None:
    """The validation accuracy of the last epoch that has one (train.val_every skips some; a run stopped early
    may end on an epoch without), or None."""
    return next((value for m in reversed(history) if (value := finite(m.get("val_accuracy"))) is not None), None)


def broken_row(run: Path, error: Exception) -> dict[str, Any]:
    """The row of a run that cannot be read: its name and why, every other column unknown."""
    row: dict[str, Any] = {column: None for column in COLUMNS}
    return {**row, "run": run.name, "path": str(run), "epochs": 0, "epochs_planned": None, "test_loss": None,
            "error": str(error)}


def finite(value: Any) -> float | None:
    """A number from a file a user or a crash can leave behind, or None when it is anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def run_rows(root: str | Path = layout.DEFAULT_ROOT, sort: str | None = None, reverse: bool = False) -> list[dict]:
    """Rows for every run under root: oldest first, or by `sort` (text A-Z, numbers biggest first; runs
    missing it last)."""
    rows = []
    for run in layout.find_runs(root):
        try:
            rows.append(run_row(run))
        except UserError as exc:  # one bad run must not hide the others
            rows.append(broken_row(run, exc))
    if sort is None:
        return rows[::-1] if reverse else rows
    if sort not in COLUMNS:
        raise ValueError(f"cannot sort by {sort!r}; columns: {', '.join(COLUMNS)}")
    present = [r for r in rows if r[sort] is not None]
    missing = [r for r in rows if r[sort] is None]
    descending = sort not in TEXT_COLUMNS
    present.sort(key=lambda r: r[sort], reverse=descending != reverse)
    return present + missing


# ----------------------------------------------------------------------------------- compare
def config_differences(run_dirs: Sequence[str | Path]) -> dict[str, list[Any]]:
    """The config keys whose values are not the same in every run: key -> one value per run (None: absent)."""
    flats = [dotted_keys(records.load_config(run).to_dict()) for run in run_dirs]
    keys = sorted(set().union(*flats), key=lambda k: (k.split(".")[0] != "data", k))
    differences = {}
    for key in keys:
        values = [flat.get(key) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            differences[key] = values
    return differences


def format_cell(value: Any, column: str = "") -> str:
    """A table cell: accuracies as percentages, seconds rounded, thousands separated, '-' when unknown."""
    if value is None:
        return "-"
    if column.endswith("accuracy"):
        return f"{value:.2%}"
    if column == "seconds":
        return f"{value:.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
