"""`cnnlab explore RUN`: one self-contained HTML page to click through a trained network's computations."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnlab.cli._app import LOOK, app
from cnnlab.cli._errors import friendly_errors
from cnnlab.cli._options import DataDir, Run, output_file


@app.command(rich_help_panel=LOOK)
@friendly_errors
def explore(run: Run,
            out: Annotated[Path | None, typer.Option(
                "--out", "--output", "-o", help="HTML file to write (default <run>/explore.html).")] = None,
            images: Annotated[int, typer.Option(
                "--images", help="Test images shipped in the page, the classes taken in turn (1-64).")] = 16,
            data_dir: DataDir = None) -> None:
    """An interactive page of the run's own network: pick a test image or draw one, see every layer's maps, click
    a pixel to see the kernels, products, sum, bias and activation that made it (opens from disk, no network)."""
    from cnnlab.inspect.explore.page import check_count, write_explorer
    from cnnlab.runs import layout

    check_count(images)  # before anything is loaded: a bad option is a one-line error
    if out is None:  # into the run, as `report` and the notebook's run.explore() write theirs
        out = layout.check_run(run, "config", "weights") / "explore.html"
    output_file(out, (".html", ".htm"), "--out")
    page = write_explorer(run, out, images, data_dir)
    print(f"wrote {page} (self-contained: open it in any browser, no network needed)")
