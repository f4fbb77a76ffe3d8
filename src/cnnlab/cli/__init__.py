"""Command line: thin commands that parse options and call the library.

Each module registers its commands on the one app and names its help panel (what a user is doing:
learn, train, look inside, use, scale out); the panels are then put in that order here, whatever
order the modules were imported in. Command modules import the library inside each command, so
`cnnlab --help` loads no torch.
"""
import typer

from cnnlab.cli import datasets, explore, inspect, playground, sweep, training, use  # noqa: F401  (each registers)
from cnnlab.cli._app import PANELS, app


def panel_rank(entry: typer.models.CommandInfo | typer.models.TyperInfo) -> int:
    """Where a command's panel comes in `cnnlab --help` (every command names one)."""
    return PANELS.index(str(entry.rich_help_panel))


app.registered_commands.sort(key=panel_rank)  # stable sorts: each module's own order is kept in its panel
app.registered_groups.sort(key=panel_rank)


def main() -> None:
    app()
