"""The one DataLoader of cnnlab's decoding workers: workers that leave Ctrl-C and SIGTERM to the main process.

`timeout`, a terminal's Ctrl-C and job control send SIGINT or SIGTERM to every process of the group, the
decoding workers included. A worker that died of SIGTERM made the main process raise "DataLoader worker
... killed by signal" from torch's SIGCHLD handler, a traceback instead of the documented stop (exit 130
and the resume command). The main process alone decides how to stop (`training.engine.stop_on_signals`) and
then ends its workers itself, so workers ignore both signals. Every DataLoader in cnnlab is this one
(`tests/test_signals.py` checks the source).
"""
from __future__ import annotations

import signal
import sys
from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: ignore SIGINT and SIGTERM, then let through what was blocked while the worker started
    (a stop signal that came meanwhile is dropped: it was meant for the main process, which got it too)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    sys.excepthook = quiet_when_the_main_process_left


# A worker hands each batch's shared memory to the main process through multiprocessing's resource sharer, a
# thread that reports its errors through sys.excepthook. When Ctrl-C stops the main process mid-hand-over, the
# sharer's connection breaks and it printed a traceback (BrokenPipeError, ConnectionResetError) into the
# terminal, after the command had said how it stopped.
MAIN_PROCESS_LEFT = (BrokenPipeError, ConnectionResetError, EOFError)


def quiet_when_the_main_process_left(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    if not issubclass(kind, MAIN_PROCESS_LEFT):
        sys.__excepthook__(kind, error, trace)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes never act on Ctrl-C or SIGTERM (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        if "worker_init_fn" in kwargs:
            raise TypeError("WorkerLoader sets worker_init_fn itself")
        kwargs["worker_init_fn"] = ignore_stop_signals
        super().__init__(*args, **kwargs)

    def __iter__(self) -> _BaseDataLoaderIter:
        # Workers start here. Blocked from before their fork until ignore_stop_signals runs in them, the
        # signals cannot reach a worker that has not ignored them yet; in this process they arrive on unblocking.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = super().__iter__()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            raise
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C that came meanwhile is raised here
        except BaseException:
            # ...and the iterator would be lost with its workers running: they ignore SIGTERM, so
            # multiprocessing's exit (terminate, then join) would wait for them for ever
            shut_down(iterator)
            raise
        return iterator


def shut_down(iterator: Any) -> None:
    """End a DataLoader iterator's worker processes now (torch's multi-process iterator; others have none)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
