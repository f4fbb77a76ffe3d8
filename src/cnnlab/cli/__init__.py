"""Command line: thin commands that parse options and call the library.

Each module registers its commands on the one app and names its help panel (what a user is doing:
learn, train, look inside, use, scale out); the panels are then put in that order here, whatever
order the modules were imported in. Command modules import the library inside each command, so
`cnnlab --help` loads no torch.
"""
import atexit
import contextlib
import os
import sys
import threading

import typer

from cnnlab.cli import datasets, explore, inspect, playground, sweep, training, use  # noqa: F401  (each registers)
from cnnlab.cli._app import PANELS, app


def panel_rank(entry: typer.models.CommandInfo | typer.models.TyperInfo) -> int:
    """Where a command's panel comes in `cnnlab --help` (every command names one)."""
    return PANELS.index(str(entry.rich_help_panel))


app.registered_commands.sort(key=panel_rank)  # stable sorts: each module's own order is kept in its panel
app.registered_groups.sort(key=panel_rank)


def main() -> None:
    """The `cnnlab` script: run the command, then leave without tearing the interpreter down."""
    try:
        app()  # click's standalone mode: always ends in SystemExit
    except SystemExit as done:
        exit_now(done.code)


def exit_now(code: int | str | None) -> None:
    """End the process as `sys.exit(code)` would, minus the module teardown.

    Tearing down torch's modules takes 0.4-0.9 s at the end of every `cnnlab train` (BENCHMARKS.md, "Start-up
    and data"), and nothing in it is ours: every file the command writes is closed (and renamed into place)
    before it returns. The exit handlers still run and the standard streams are flushed; with a thread still
    running (a server's, a tracker's) Python's own exit waits for it as usual.
    """
    if threading.active_count() > 1 or not hasattr(atexit, "_run_exitfuncs"):
        raise SystemExit(code)
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`cnnlab ... | head`): nothing more to say
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
