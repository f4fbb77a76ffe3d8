"""Hyperparameter sweeps: a W&B-style sweep.yaml run as an Optuna study, each trial a normal run directory.

Parameter keys are cnnlab config keys (what `--set` accepts). The study lives in a journal file under
`runs/sweeps/<name>/` (several local worker processes) or in an RDB such as PostgreSQL (workers on many
machines). Workers claim trials under a study-wide lock, so `trials` is an exact total, and trials whose
worker died are failed and retried instead of staying RUNNING. Each trial's sampler is seeded from the
spec's seed and the trial's number, so resumed sweeps and concurrent workers never replay points. The
journal survives a torn write (it is recovered to its last whole record before use), and a write that
fails (disk full, read-only) stops the sweep with one line; the rerun resumes it.

`spec` reads the sweep file, `storage` parses `--storage` (a URL first, never a path by accident),
`identity` records and compares what a study's sweep file was, `study` holds the Optuna side (samplers,
pruners, storage, claiming trials), `runner` runs trials and workers and reports the results.
"""
from cnnlab.sweep.runner import Summary, Sweep, best_trial, plot_trials, run_workers, summarize, write_best_config
from cnnlab.sweep.spec import SweepError, SweepSpec, parse_metric, read_sweep
from cnnlab.sweep.study import counted_trials, default_storage, load_study

__all__ = ["Summary", "Sweep", "best_trial", "plot_trials", "run_workers", "summarize", "write_best_config",
           "SweepError", "SweepSpec", "parse_metric", "read_sweep", "counted_trials",
           "default_storage", "load_study"]
