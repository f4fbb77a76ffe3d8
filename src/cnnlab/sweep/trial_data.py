"""How a sweep's trials open their dataset: a registered dataset or an image folder, read once per worker.

A relative image folder (`dataset: photos/` in the sweep file, in its `set:` or among a parameter's values)
means the folder beside the sweep file, whatever folder a worker was started from: every worker process and
every machine that runs the same sweep file reads the same folder, and each trial's config.yaml records the
absolute path, so `cnnlab evaluate` and `cnnlab sweep best` work from anywhere. The study keeps the values
as the sweep file writes them, so machines with the file in different places still share one study.

A worker loads a registered dataset once and splits it per trial (the split is seeded by train.seed); it scans
an image folder once per data settings (the folder's splits are fixed by its file paths, not by a seed), so a
folder of many thousand images is listed once per worker, not once per trial.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cnnlab.config import Config
from cnnlab.data import DATASETS, Dataset
from cnnlab.data.registry import is_image_folder
from cnnlab.data.sources import Data, folder_data, open_dataset, prepare_data
from cnnlab.suggest import did_you_mean
from cnnlab.sweep.spec import SweepError


def folder_dataset(name: str, base: Path) -> str | None:
    """The absolute path of the image folder `name` means in a sweep file kept in `base`, or None when `name`
    is a registered dataset (or names no folder and has no slash: a dataset name, perhaps misspelt)."""
    if name in DATASETS:
        return None
    path = base / Path(name).expanduser()  # an absolute `name` stays itself
    if "/" not in name and not path.is_dir():
        return None
    return os.path.abspath(path)  # "photos/../other" as "/.../other": the same text for every trial


def resolve_dataset(config: Config, base: Path) -> Config:
    """`config` with a relative image folder made absolute against `base`, the sweep file's folder."""
    folder = folder_dataset(config.data.dataset, base)
    if folder is not None:
        config.data.dataset = folder
    return config


def check_dataset(config: Config, base: Path) -> None:
    """Before any trial: the first trial's dataset is registered or an existing folder (SweepError otherwise),
    so a sweep over a misspelt folder stops with one line instead of failing every trial the same way."""
    name = config.data.dataset
    folder = folder_dataset(name, base)
    if folder is not None and not Path(folder).is_dir():
        raise SweepError(f"dataset {name!r}: no such image folder {folder} (a relative folder in a sweep file is "
                         "read from the sweep file's folder)")
    if folder is None and name not in DATASETS:
        raise SweepError(f"dataset {name!r}: not a registered dataset{did_you_mean(name, DATASETS)} (known: "
                         f"{', '.join(DATASETS)}) nor a folder beside the sweep file ({base / name} does not exist)")


class TrialData:
    """The datasets a worker's trials have opened: registered ones by name, image folders by data settings."""

    def __init__(self) -> None:
        self.named: dict[str, Dataset] = {}
        self.folders: dict[str, Data] = {}

    def open(self, config: Config) -> Data:
        """The trial's data, ready to train on (`config.data.dataset` already resolved by `resolve_dataset`)."""
        name = config.data.dataset
        if not is_image_folder(name):
            if name not in self.named:
                self.named[name] = open_dataset(config, progress=False)
            return prepare_data(self.named[name], config)
        key = json.dumps(dataclasses.asdict(config.data), sort_keys=True)  # image size, channels, workers, ...
        if key not in self.folders:
            self.folders[key] = folder_data(config)
        # The same files are unreadable in every trial: a folder held in memory knows them all from the start,
        # a streamed one learns them as its trials meet them, so each trial's skipped list stays whole.
        return self.folders[key]
