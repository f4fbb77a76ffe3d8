"""Options several commands share, written once (no library imports: `cnnlab --help` stays fast)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnlab.runs.layout import DEFAULT_ROOT, FILES

Model = Annotated[str, typer.Option("--model", "-m", help="Model preset (see `cnnlab presets`).")]
DefaultModel = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model preset (see `cnnlab presets`); default seed, the lesson's CNN, or photos for a "
    "colour image folder.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config applied over the preset.")]
Overrides = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a key: a knob (dropout=0.4) or a path (train.lr=3e-4, model.conv.0.filters=64). "
    "Repeatable.")]
Dataset = Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name (`cnnlab datasets list`) or "
                                               "a folder with one sub-folder of images per class; "
                                               "default mnist-sample, shipped with cnnlab.")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Folder holding <dataset>/<dataset files>; "
                                                 "default $CNNLAB_DATA, then the user cache, then system copies. "
                                                 "A run trained on an image folder: the folder's new place.")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder that holds run directories.")]
Run = Annotated[Path, typer.Argument(help="Run directory (made by `cnnlab train`).")]
LatestRun = Annotated[Path | None, typer.Argument(help="Run directory; default the latest under --runs-dir.")]
RUNS_DIR = DEFAULT_ROOT


def output_file(path: Path, suffixes: tuple[str, ...], option: str = "--out") -> Path:
    """`path` if a command may write its result there, checked before any work: a name ending in one of
    `suffixes`, and a regular file or nothing yet (cnnlab.files refuses devices, FIFOs and folders)."""
    from cnnlab.files import FileRefused, output_target

    if path.suffix.lower() not in suffixes:
        raise FileRefused(f"{option} {path}: expected a file name ending in {' or '.join(suffixes)}")
    target = output_target(path)
    if target.name in RECORDS and all((target.parent / FILES[key]).is_file() for key in ("config", "manifest")):
        raise FileRefused(f"{option} {path}: {target.name} is one of the run {target.parent}'s own files, which "
                          "other commands read back: give another name")
    return path


# A run's files that commands read back (the weights, its records, the ONNX cache): no --out may replace them.
# Not the pictures and the report, which a user may well want to make again in their place.
RECORDS = frozenset(FILES[key] for key in ("config", "summary", "manifest", "metrics", "weights", "checkpoint",
                                           "previous_checkpoint", "test", "predictions", "skipped", "early_stopping",
                                           "lr_find", "inference_onnx", "inference_onnx_record", "lock"))
