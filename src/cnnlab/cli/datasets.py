"""`cnnlab datasets list|where|fetch|verify`."""
from __future__ import annotations

from typing import Annotated

import typer

from cnnlab.cli._app import TRAIN, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import DataDir

datasets_app = typer.Typer(help="List, locate, download and verify datasets.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="Dataset name (see `cnnlab datasets list`).")]




@datasets_app.command("list")
def list_datasets(data_dir: DataDir = None) -> None:
    """The registered datasets: classes, image shape and where a copy was found."""
    from rich.console import Console
    from rich.table import Table

    from cnnlab.data import DATASETS, locate
    table = Table("name", "title", "classes", "shape", "copy used")
    for spec in DATASETS.values():
        found = locate(spec, data_dir)
        where = f"{found.origin}: {found.directory}" if found else "not here (fetch it)"
        table.add_row(spec.name, spec.title, str(spec.num_classes), str(spec.image_shape), where)
    Console(width=200).print(table)


@datasets_app.command("where")
@friendly_errors
def where(name: Name, data_dir: DataDir = None) -> None:
    """Which copy of a dataset would be used, and every place looked in."""
    from cnnlab.data import get_dataset, locate, search_places
    from cnnlab.data.store import unavailable
    spec = get_dataset(name)
    found = locate(spec, data_dir)
    for origin, directory in search_places(spec, data_dir):
        mark = "->" if found and found.directory == directory else "  "
        print(f"{mark} {origin:12} {directory}")
    if found is None:
        raise unavailable(spec, data_dir)
    print(f"using {found.directory} ({found.origin})")


@datasets_app.command("fetch")
@friendly_errors
def fetch_dataset(name: Name, data_dir: DataDir = None) -> None:
    """Find a dataset or download it from its mirrors into the cache, with checksum checks."""
    from cnnlab.data import fetch, get_dataset
    location = fetch(get_dataset(name), data_dir)
    print(f"{name}: {location.directory} ({location.origin})")


@datasets_app.command("verify")
@friendly_errors
def verify_dataset(name: Name, data_dir: DataDir = None) -> None:
    """Check every file of the copy in use against the registry's SHA-256 checksums."""
    from cnnlab.data import get_dataset, locate, verify
    from cnnlab.data.store import unavailable
    spec = get_dataset(name)
    location = locate(spec, data_dir)
    if location is None:
        raise unavailable(spec, data_dir)
    checks = verify(location)
    for check in checks:
        verdict = "ok" if check.ok else f"MISMATCH (expected {check.expected})"
        print(f"{check.name:28} {check.sha256}  {verdict}")
    if not all(check.ok for check in checks):
        raise fail(f"{location.directory}: {sum(not c.ok for c in checks)} file(s) differ from the registry; "
                   "train on them only with --allow-checksum-mismatch", code=1)
    print(f"{name}: all {len(checks)} files verified in {location.directory}")


app.add_typer(datasets_app, name="datasets", rich_help_panel=TRAIN)
