"""Where a run's files are: names, creating and finding run directories, and the run's lock (no torch).

A run is a folder (default runs/<dataset>-<model>-<timestamp>) holding:
  config.yaml         the resolved config the model is rebuilt from
  summary.txt         the layer table
  manifest.json       versions, dataset files and checksums, git commit, command line
  metrics.jsonl       one JSON object per epoch
  model.safetensors   weights only (metadata: input shape, class names), loadable without pickle
  checkpoint.safetensors  resumable state: weights, optimizer, scheduler, RNG, epoch, step
  test.json           final test metrics;  confusion.png  the test confusion matrix
  predictions.csv     every test image: file (or test index), true and predicted class, confidence, loss
  report.html         the self-contained HTML report, when `cnnlab report` made one
  skipped.json        unreadable images met while training on an image folder (path -> reason), if any
  early_stopping.json with train.early_stopping: the epoch kept, its metric, and why training stopped
  lr_find.json, lr_find.png  with train.lr auto: the learning-rate finder's sweep and its suggestion
  inference.onnx      the model exported for onnxruntime, made by the first predict/serve that runs it (a cache)
  inference.onnx.json what inference.onnx was made from: digests of the weights, config and the ONNX file
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.errors import UserError
from cnnlab.files import FileRefused, check_regular, remove_stale_temps
from cnnlab.text import utf8_text

if TYPE_CHECKING:
    from cnnlab.config import Config

DEFAULT_ROOT = Path("runs")
FILES = dict(config="config.yaml", summary="summary.txt", manifest="manifest.json", metrics="metrics.jsonl",
             weights="model.safetensors", checkpoint="checkpoint.safetensors",
             previous_checkpoint="checkpoint.prev.safetensors", test="test.json", confusion="confusion.png",
             predictions="predictions.csv",
             report="report.html", skipped="skipped.json", early_stopping="early_stopping.json",
             lr_find="lr_find.json", lr_find_plot="lr_find.png", inference_onnx="inference.onnx",
             inference_onnx_record="inference.onnx.json", lock=".lock")


class RunError(UserError, ValueError):
    """A run directory that is missing, incomplete, busy or unwritable, or a run file that is not what
    cnnlab wrote; the message names it."""


def path(run: str | Path, name: str) -> Path:
    """The path of one of a run's files, by its key in FILES."""
    return Path(run) / FILES[name]


def default_name(config: Config) -> str:
    """<dataset>-<model>-<time>; an image folder's dataset is named by the folder's last part."""
    dataset = Path(config.data.dataset).name if "/" in config.data.dataset else config.data.dataset
    return f"{dataset}-{config.model.name}-{datetime.now():%Y%m%d-%H%M%S}"


MAX_NAME_BYTES = 200  # file systems allow 255 bytes a name; "-2", "-3"... may be appended


def check_name(name: str) -> str:
    """`name` if it can name a run folder right under --runs-dir; a RunError saying why not otherwise.

    Any UTF-8 name works (spaces, accents, emoji); a name that would leave --runs-dir ("../x", "/tmp/x",
    "a/b"), be hidden (".x") or be no folder name at all is refused.
    """
    # argv arrives as the locale decoded it: under the C locale a UTF-8 `ñ` holds escaped bytes, which name
    # the same folder; bytes that are no UTF-8 are refused, as output cannot show them
    if utf8_text(name) is None:
        raise RunError(f"run name {name!r}: not valid UTF-8; give a name of letters, digits and punctuation") from None
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise RunError(f"run name {name!r}: expected one folder name (no '/', not '.' or '..', not starting "
                       "with '.'); the run goes under --runs-dir")
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_NAME_BYTES:
        raise RunError(f"run name {name[:40]!r}...: {len(encoded)} bytes is longer than the {MAX_NAME_BYTES} allowed")
    return name


def check_new_run(root: str | Path = DEFAULT_ROOT, name: str | None = None) -> None:
    """RunError now, before any data is read, when a run cannot be made there: `root` is not a folder, or a run
    of that `name` exists."""
    root = Path(root)
    if name is not None:
        check_name(name)
    for above in (root, *root.parents):
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise RunError(f"--runs-dir {root}: {above} is a file, not a folder")
            break
    if name is not None and (root / name).exists():
        raise RunError(f"{root / name}: a run of that name exists; pick another name or --resume it")


def new_run(config: Config, root: str | Path = DEFAULT_ROOT, name: str | None = None, reuse: bool = False) -> Path:
    """Create a fresh, empty run directory; never reuses an existing one unless `reuse` (a restarted job's)."""
    if not reuse:
        check_new_run(root, name)
    elif name is not None:
        check_name(name)
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
    # any kind of config.yaml counts: a broken run (its config a FIFO, say) is listed, and its reader says why
    found = [p for p in root.iterdir() if p.is_dir() and os.path.lexists(path(p, "config"))]
    return sorted(found, key=lambda p: path(p, "config").lstat().st_mtime)


def latest_run(root: str | Path = DEFAULT_ROOT) -> Path:
    found = find_runs(root)
    if not found:
        raise RunError(f"no runs under {root}/: train one with `cnnlab train`")
    return found[-1]


def check_run(run: str | Path, *needed: str) -> Path:
    """`run` if it is a run directory holding the files named by `needed` (keys of FILES)."""
    run = Path(run)
    if not run.is_dir():
        if run.exists():  # a file given where a run directory belongs (an image, the weights file)
            inside = os.path.lexists(run.parent / FILES["config"])
            hint = f"did you mean {run.parent}?" if inside else "give the folder `cnnlab train` made, e.g. runs/NAME"
            raise RunError(f"{run}: not a run directory but a file; {hint}")
        raise RunError(f"{run}: no such run directory")
    for key in needed:
        file = path(run, key)
        if not os.path.lexists(file):
            raise RunError(f"{run}: not a complete run: {FILES[key]} is missing")
        try:
            check_regular(file, "run file")
        except FileRefused as exc:
            raise RunError(str(exc)) from None
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


def remove_stale_files(run: Path) -> list[Path]:
    """Delete temporary files a killed writer left in the run (call with the run's lock held)."""
    stale = remove_stale_temps(run, list(FILES.values()), dead_only=False)
    for file in run.glob(".tmp??????"):  # safetensors' own temporary file (Rust's tempfile) beside the target
        if file.is_file():
            file.unlink(missing_ok=True)
            stale.append(file)
    return stale
