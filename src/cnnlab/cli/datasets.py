"""`cnnlab datasets list|where|fetch|verify|info`; `where`, `fetch`, `verify` and `info` also take an image folder's
path."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from cnnlab.cli._app import TRAIN, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import DataDir
from cnnlab.text import command, to_json

datasets_app = typer.Typer(help="List, locate, download and verify datasets.", no_args_is_help=True)

if TYPE_CHECKING:
    from cnnlab.config import Config
    from cnnlab.data.folder import ImageFolder

Name = Annotated[str, typer.Argument(help="Dataset name (see `cnnlab datasets list`) or an image folder's path.")]
AllowMismatch = Annotated[bool, typer.Option(
    "--allow-checksum-mismatch", help="Accept a copy whose checksums differ from the registry's (as training "
    "with this flag would) instead of passing over it.")]


def folder_line(name: str) -> str | None:
    """Where an image folder is and its classes, in one line (folder names only: nothing is read); None when
    `name` is a registered dataset's."""
    import os

    from cnnlab.data.folder_layout import class_names
    from cnnlab.data.registry import is_image_folder

    if not is_image_folder(name):
        return None
    classes = class_names(name)
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes) - 10} more)" if len(classes) > 10 else "")
    return f"{name}: image folder {os.path.abspath(name)}, {len(classes)} classes ({shown})"


def verify_folder(name: str) -> None:
    """Decode every image of an image folder once, a batch at a time: exit status 1 naming the unreadable ones
    (training would skip them), 0 when every image reads."""
    import torch

    from cnnlab.data.folder import open_image_folder

    folder = open_image_folder(name)  # the layout checks: class folders, empty classes, splits
    skipped: dict[str, str] = {}
    total = 0
    for split in (folder.train, folder.val, folder.test):
        for _ in split.batches(torch.arange(len(split)).split(256)):
            pass  # decoded to be checked, then dropped: memory stays at a few batches
        skipped.update(split.skipped)
        total += len(split)
    for path, why in sorted(skipped.items()):
        print(f"UNREADABLE {path}: {why}")
    if skipped:
        raise fail(f"{name}: {len(skipped)} of {total} images cannot be read; training skips them (and lists them "
                   "in the run's skipped.json): fix or remove them", code=1)
    print(f"{name}: all {total} images read in {folder.root} ({len(folder.classes)} classes)")


def warn(lines: list[str] | tuple[str, ...]) -> None:
    """Each copy passed over, one line on stderr."""
    from cnnlab.data.store import notify

    for line in lines:
        notify(line)


@datasets_app.command("list")
@friendly_errors
def list_datasets(data_dir: DataDir = None) -> None:
    """The registered datasets: classes, image shape and which copy would be used (each copy found is verified)."""
    from rich.console import Console
    from rich.table import Table

    from cnnlab.data import DATASETS
    from cnnlab.data.store import find
    table = Table("name", "title", "classes", "shape", "copy used")
    for spec in DATASETS.values():
        found, passed = find(spec, data_dir)
        if found is not None:
            where = f"{found.origin}: {found.directory}" + (f" ({len(passed)} bad copy passed over)" if passed else "")
        else:
            where = "not here (fetch it)"
            if passed:
                where = f"no good copy (see `{command('datasets', 'where', spec.name)}`)"
        table.add_row(spec.name, spec.title, str(spec.num_classes), str(spec.image_shape), where)
    Console(width=200).print(table)


@datasets_app.command("where")
@friendly_errors
def where(name: Name, data_dir: DataDir = None, allow_checksum_mismatch: AllowMismatch = False) -> None:
    """Which copy of a dataset would be used, every place looked in, and each copy passed over and why."""
    from cnnlab.data import get_dataset, search_places
    from cnnlab.data.store import find, unavailable
    if (line := folder_line(name)) is not None:
        print(line)
        return
    spec = get_dataset(name)
    found, passed = find(spec, data_dir, allow_checksum_mismatch)
    for origin, directory in search_places(spec, data_dir):
        mark = "->" if found and found.directory == directory else "  "
        print(f"{mark} {origin:12} {directory}")
    warn(passed)
    if found is None:
        raise unavailable(spec, data_dir, passed=passed)
    print(f"using {found.directory} ({found.origin})")


@datasets_app.command("fetch")
@friendly_errors
def fetch_dataset(name: Name, data_dir: DataDir = None, allow_checksum_mismatch: AllowMismatch = False) -> None:
    """Find a copy that verifies, or download the dataset from its mirrors into the cache, with checksum checks."""
    from cnnlab.data import fetch, get_dataset
    if (line := folder_line(name)) is not None:
        print(f"{line}; nothing to download")
        return
    location = fetch(get_dataset(name), data_dir, allow_mismatch=allow_checksum_mismatch)
    warn(location.passed_over)
    print(f"{name}: {location.directory} ({location.origin})")


@datasets_app.command("verify")
@friendly_errors
def verify_dataset(name: Name, data_dir: DataDir = None) -> None:
    """Check every copy of a dataset, in lookup order, against the registry's SHA-256 checksums until one verifies
    (an image folder: decode every image once and name those that cannot be read)."""
    from cnnlab.data import get_dataset, verify
    from cnnlab.data.registry import is_image_folder
    from cnnlab.data.store import Location, candidates, passed_over_line, unavailable
    if is_image_folder(name):
        verify_folder(name)
        return
    spec = get_dataset(name)
    copies = candidates(spec, data_dir)
    if not copies:
        raise unavailable(spec, data_dir)
    bad: list[tuple[Location, int]] = []  # copies that failed, with how many of their files did
    for location in copies:
        checks = verify(location)
        if len(copies) > 1:
            print(f"{location.origin}: {location.directory}")
        for check in checks:
            if check.problem is not None:
                verdict = f"UNREADABLE ({check.problem})"
            else:
                verdict = "ok" if check.ok else f"MISMATCH (expected {check.expected})"
            print(f"{check.name:28} {check.sha256 or '-':64}  {verdict}")
        failed = sum(not c.ok for c in checks)
        if not failed:
            warn([passed_over_line(copy, f"{n} file(s) differ from the registry or cannot be read") for copy, n in bad])
            print(f"{name}: all {len(checks)} files verified in {location.directory}")
            return
        bad.append((location, failed))
    raise fail("; ".join(f"{copy.directory}: {n} file(s) differ from the registry or cannot be read" for copy, n in bad)
               + "; train on a copy that differs only with --allow-checksum-mismatch", code=1)


@datasets_app.command("info")
@friendly_errors
def info(
    dataset: Annotated[str, typer.Argument(help="An image folder (one sub-folder per class), or a dataset name.")],
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Pixels per side the pictures become; default: what `cnnlab train` would use.")] = None,
    resize: Annotated[str | None, typer.Option(
        help="How a picture meets the square: crop, pad or squish; default: what `cnnlab train` would use.")] = None,
    channels: Annotated[int, typer.Option(help="3: colour, 1: grey.")] = 3,
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """What a dataset holds: for an image folder, files per class per split, the sizes seen, the files that
    cannot be read and why (every file is decoded once), and warnings for what would mislead a run."""

    from cnnlab.data import get_dataset
    from cnnlab.data.registry import is_image_folder, load_config_for

    if not is_image_folder(dataset):
        spec = get_dataset(dataset)
        shown = dict(name=spec.name, title=spec.title, classes=list(spec.classes), image_shape=list(spec.image_shape))
        if json_:
            print(to_json(shown, indent=2))
        else:
            print(f"{spec.name}: {spec.title}; {spec.num_classes} classes ({', '.join(spec.classes)}); images "
                  f"{'x'.join(map(str, spec.image_shape))}")
        return
    from cnnlab.data.summary import summarize

    # The pictures as `cnnlab train --dataset FOLDER` would see them: the folder's default model (a colour
    # folder trains `photos`, 48x48 padded) unless a size or fit is named here.
    given = [("data.image_size", image_size), ("data.resize", resize)]
    config, _ = load_config_for(None, overrides=[("data.channels", channels)] + [(k, v) for k, v in given
                                                                                  if v is not None],
                                data={"dataset": dataset})
    summary = summarize(folder_info(config), train=None)
    if json_:
        print(to_json(summary.to_dict(), indent=2))
        return
    print("\n".join(summary.lines()))
    warn(summary.warnings)


def folder_info(config: Config) -> ImageFolder:
    """The configured folder opened and, when it fits data.memory_mb, decoded (the counts of unreadable files
    are then exact)."""
    from cnnlab.data.folder import open_image_folder
    from cnnlab.data.sources import MB

    d = config.data
    folder = open_image_folder(d.dataset, (d.image_size, d.image_size), d.channels, workers=d.workers,
                               resize=d.resize)
    folder.hold_in_memory(d.memory_mb * MB)
    return folder


app.add_typer(datasets_app, name="datasets", rich_help_panel=TRAIN)
