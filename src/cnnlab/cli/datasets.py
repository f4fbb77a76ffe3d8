"""`cnnlab datasets list|where|fetch|verify`."""
from __future__ import annotations

from typing import Annotated

import typer

from cnnlab.cli._app import TRAIN, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import DataDir
from cnnlab.text import command

datasets_app = typer.Typer(help="List, locate, download and verify datasets.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="Dataset name (see `cnnlab datasets list`).")]
AllowMismatch = Annotated[bool, typer.Option(
    "--allow-checksum-mismatch", help="Accept a copy whose checksums differ from the registry's (as training "
    "with this flag would) instead of passing over it.")]


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
    location = fetch(get_dataset(name), data_dir, allow_mismatch=allow_checksum_mismatch)
    warn(location.passed_over)
    print(f"{name}: {location.directory} ({location.origin})")


@datasets_app.command("verify")
@friendly_errors
def verify_dataset(name: Name, data_dir: DataDir = None) -> None:
    """Check every copy of a dataset, in lookup order, against the registry's SHA-256 checksums until one verifies."""
    from cnnlab.data import get_dataset, verify
    from cnnlab.data.store import Location, candidates, passed_over_line, unavailable
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


app.add_typer(datasets_app, name="datasets", rich_help_panel=TRAIN)
