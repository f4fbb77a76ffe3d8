"""Why an epoch took a minute where the docs promise a second: other work on the same cores.

The 1-minute load average counts the processes running or waiting for a core. Above the cores this
process may use, training shares them, and several torch threads also wait for each other: on a
2-core machine at load 13, two epochs of the lesson's network took 6 s with one thread and 145 s with
two. The note says so once, after training, instead of leaving a slow run unexplained.
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def one_minute_load() -> float | None:
    """The system's 1-minute load average; None where there is none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_note(threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """'this machine is busy: load 7.9 on 2 cores ...' when other work alone would fill the cores (default: this
    process's), else None. The load (default: now) counts this run's own threads too, up to one per core: a run
    of 2 threads on 2 quiet cores reads about 2.0 and is not busy. `threads`: torch's intra-op threads, for the
    hint that one may be faster."""
    load = one_minute_load() if load is None else load
    cores = usable_cores() if cores is None else cores
    if load is None or load - min(threads, cores) < cores:  # the others' share of the cores is under half
        return None
    note = f"this machine is busy: load {load:.1f} on {cores} core{'s' if cores != 1 else ''}, so training took longer"
    if threads > 1:
        note += f"; its {threads} threads also wait for each other, and train.threads=1 may be faster"
    return note
