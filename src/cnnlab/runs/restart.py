"""A data-parallel job that torchrun restarted after a failure, and the run its first attempt started.

torchrun (`--max-restarts`) starts every rank again after one dies; the job finds its run by name and
continues it. What to do is read from the run directory alone: resume from its checkpoint, start over
in it when the failure came before the first checkpoint, or refuse a run that is not this job's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from cnnlab.config import Config
from cnnlab.runs import layout, records

Decision = Literal["new", "resume", "again"]


def restart_decision(config: Config, run: Path, restarts: int) -> Decision:
    """'new' (no run yet, or a first attempt: an existing name is then an error), 'resume' (this job's
    run has a checkpoint) or 'again' (it failed before its first checkpoint)."""
    if restarts == 0 or not run.is_dir():
        return "new"
    if layout.path(run, "test").is_file():
        raise layout.RunError(f"{run} has already finished; this job (same name or rendezvous id) will not retrain it: "
                              "pick another --name or --rdzv-id")
    saved = records.load_config(run).to_dict() if layout.path(run, "config").is_file() else None
    wanted = config.to_dict()
    if saved is not None and wanted["train"]["lr"] == "auto":
        wanted["train"]["lr"] = saved["train"]["lr"]  # the finder's suggestion, recorded by the first attempt
    if saved is not None and saved != wanted:
        raise layout.RunError(f"{run} holds another configuration than this job's: pick another --name or --rdzv-id")
    has_checkpoint = layout.path(run, "checkpoint").is_file() or layout.path(run, "previous_checkpoint").is_file()
    return "resume" if has_checkpoint else "again"
