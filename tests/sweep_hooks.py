"""`cnnlab` with test hooks, for sweep tests that run it as a separate process (no tests of its own here).

    python tests/sweep_hooks.py sweep run FILE ...

Hooks, chosen by environment variables, make a test deterministic instead of timed:
- CNNLAB_TEST_BARRIER=DIR:N -- each process, on its first trial, writes DIR/<pid> and waits until N
  processes have, so N processes started together each take part (they then propose points at once);
- CNNLAB_TEST_HOLD=FILE -- after the first epoch of its first trial the process writes FILE and waits
  until it is killed, so a test kills it mid-trial, every time.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

WAIT_SECONDS = 300  # a bound, so a broken partner cannot hang the test run; never reached when all is well


def install_hooks() -> None:
    from cnnlab.sweep import runner

    barrier = os.environ.get("CNNLAB_TEST_BARRIER")
    if barrier:
        folder, _, count = barrier.rpartition(":")
        original_run_trial = runner.run_trial
        first = [True]

        def run_trial(*args: Any, **kwargs: Any) -> Any:
            if first[0]:
                first[0] = False
                (Path(folder) / str(os.getpid())).touch()
                deadline = time.monotonic() + WAIT_SECONDS
                while len(list(Path(folder).iterdir())) < int(count) and time.monotonic() < deadline:
                    time.sleep(0.05)
            return original_run_trial(*args, **kwargs)

        runner.run_trial = run_trial

    hold = os.environ.get("CNNLAB_TEST_HOLD")
    if hold:
        original_epoch_end = runner.PruningReporter.on_epoch_end

        def on_epoch_end(self: Any, progress: Any, metrics: Any) -> None:
            original_epoch_end(self, progress, metrics)
            Path(hold).touch()
            while True:  # until the test kills this process
                time.sleep(1)

        runner.PruningReporter.on_epoch_end = on_epoch_end  # type: ignore[method-assign]


if __name__ == "__main__":
    install_hooks()
    from cnnlab.cli import app

    app(sys.argv[1:], prog_name="cnnlab")
