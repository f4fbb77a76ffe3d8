"""Running a sweep: each trial a normal run directory, pruned on its validation metric, in one or
several worker processes; then the results (summary, best config, plot)."""
from __future__ import annotations

import math
import os
import socket
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from cnnlab import pipeline
from cnnlab.config import ConfigError
from cnnlab.data import Dataset
from cnnlab.data.sources import open_dataset
from cnnlab.runs import layout
from cnnlab.sweep.spec import SweepError, SweepSpec, trial_config
from cnnlab.sweep.study import (
    HEARTBEAT_SECONDS,
    claim_trial,
    is_rdb_url,
    make_pruner,
    make_sampler,
    open_storage,
    retry_callback,
    study_lock,
    sweep_dir,
)
from cnnlab.training.callbacks import Callback
from cnnlab.training.engine import Trainer, TrainingInterrupted


# ---------------------------------------------------------------------------------- running trials
class PruningReporter(Callback):
    """Reports each epoch's metric to the trial and stops training when the pruner says so."""

    def __init__(self, trial: Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        value = metrics[self.metric]
        if math.isnan(value):
            return  # no validation split: nothing to judge the trial by
        self.trial.report(value, step=metrics["epoch"])
        last = metrics["epoch"] >= trainer.config.epochs  # a finished trial is worth keeping
        if not last and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {metrics['epoch']}: {self.metric} {value:.4f}")


class Heartbeat:
    """Records RDB heartbeats for a running trial from a background thread (Optuna does this only in optimize)."""

    def __init__(self, study: optuna.Study, trial: Trial):
        # Typed BaseStorage, used duck-typed: one with heartbeats (see __enter__) also has record_heartbeat
        self.storage: Any = study._storage
        self.trial_id = trial._trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True)

    def beat(self) -> None:
        while not self.stop.is_set():
            self.storage.record_heartbeat(self.trial_id)
            self.stop.wait(HEARTBEAT_SECONDS)

    def __enter__(self) -> Heartbeat:
        # The study's storage is Optuna's cache wrapped around the RDBStorage, not an RDBStorage itself:
        # ask for the heartbeat interval instead of checking the type (a type check never beat).
        interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        if interval:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


@dataclass
class Sweep:
    """What a worker needs: the spec, where the study is, where trial runs go, and how many trials in all."""

    spec: SweepSpec
    name: str
    storage: str
    runs_dir: Path
    trials: int

    def open(self, worker: int = 0) -> optuna.Study:
        """Create or load the study; each worker's sampler gets its own seed so workers don't repeat each other."""
        seed = self.spec.seed + worker + (zlib.crc32(socket.gethostname().encode()) if is_rdb_url(self.storage) else 0)
        with study_lock(self.storage, self.name):  # workers starting together would race to create tables
            return optuna.create_study(study_name=self.name, storage=open_storage(self.storage),
                                       sampler=make_sampler(self.spec, seed), pruner=make_pruner(self.spec),
                                       direction=self.spec.direction, load_if_exists=True)

    def total(self) -> int:
        """Trials in all; a grid stops at its size."""
        return min(self.trials, self.spec.grid_size()) if self.spec.method == "grid" else self.trials


def run_trial(sweep: Sweep, study: optuna.Study, trial: Trial, datasets: dict[str, Dataset],
              log: Callable[[str], object] = print) -> TrialState:
    """Train one trial into runs/sweeps/<name>/trial-<n> and tell the study how it ended."""
    params = {p.key: p.suggest(trial) for p in sweep.spec.parameters}
    run = sweep_dir(sweep.runs_dir, sweep.name) / f"trial-{trial.number}"
    trial.set_user_attr("run", str(run))
    metric = sweep.spec.metric
    try:
        config = trial_config(sweep.spec, params)
        dataset = datasets.get(config.data.dataset) or open_dataset(config, progress=False)
        datasets[config.data.dataset] = dataset
        with Heartbeat(study, trial):
            result = pipeline.train(config, run.parent, run.name, [PruningReporter(trial, metric)],
                                    progress=False, dataset=dataset)
    except optuna.TrialPruned as exc:
        trial.set_user_attr("pruned", str(exc))
        study.tell(trial, state=TrialState.PRUNED)
        log(f"trial {trial.number} {params}: pruned ({exc})")
        return TrialState.PRUNED
    except TrainingInterrupted:  # Ctrl-C or SIGTERM: queue the trial again for the resumed sweep
        study.tell(trial, state=TrialState.FAIL)
        retry_callback()(study, study._storage.get_trial(trial._trial_id))
        raise
    except (ConfigError, RuntimeError, ValueError) as exc:  # one bad combination (or a diverged loss:
        # TrainingDiverged is a RuntimeError) must not end the sweep
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number} {params}: failed: {exc}")
        return TrialState.FAIL
    value = result.history[-1][metric]
    if not math.isfinite(value):  # NaN or inf would rank as best or worst by accident: a failed trial
        trial.set_user_attr("error", f"the objective {metric} is {value}")
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number} {params}: failed: the objective {metric} is {value}")
        return TrialState.FAIL
    study.tell(trial, value)
    log(f"trial {trial.number} {params}: {metric} {value:.4f}  ({run})")
    return TrialState.COMPLETE


def run_worker(sweep: Sweep, worker: int = 0, threads: int | None = None, log: Callable[[str], object] = print
               ) -> int:
    """Claim and run trials until the study has its total; returns how many this worker ran."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = sweep.open(worker)
    datasets: dict[str, Dataset] = {}
    done = 0
    while (trial := claim_trial(study, sweep.storage, sweep.total())) is not None:
        run_trial(sweep, study, trial, datasets, log)
        done += 1
    return done


def run_workers(sweep: Sweep, workers: int, log: Callable[[str], object] = print) -> None:
    """Run `workers` processes on this machine (1: in this process), splitting the CPU cores between them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep.open()  # create the study once, before workers race to
    if workers <= 1:
        run_worker(sweep, 0, None, log)
        return
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    procs = [context.Process(target=run_worker, args=(sweep, i, threads)) for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise SweepError(f"{len(bad)} of {workers} workers failed (exit codes {bad}); rerun to resume")


# ---------------------------------------------------------------------------------------- results
@dataclass
class Summary:
    """A study's trials and counts by state, for `cnnlab sweep status`."""

    trials: list[FrozenTrial]
    best: FrozenTrial | None
    counts: dict[str, int]
    direction: str


def summarize(study: optuna.Study) -> Summary:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return Summary(trials, best, counts, study.direction.name.lower())


def best_trial(study: optuna.Study) -> FrozenTrial:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise SweepError(f"sweep {study.study_name!r} has no complete trial yet")
    return study.best_trial


def write_best_config(study: optuna.Study, out: str | Path) -> FrozenTrial:
    """Write the best trial's resolved config (its run's config.yaml) with a header saying where it came from."""
    best = best_trial(study)
    run = Path(best.user_attrs["run"])
    text = layout.path(run, "config").read_text()
    header = (f"# best trial {best.number} of sweep {study.study_name}: value {best.value:.4f}\n"
              f"# params: {best.params}\n# run: {run}\n# train it again with: cnnlab train --config {out}\n")
    Path(out).write_text(header + text)
    return best


def plot_trials(study: optuna.Study, out: str | Path) -> None:
    """A small PNG: each trial's final metric by trial number (pruned ones at their last reported value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for state, colour in ((TrialState.COMPLETE, "tab:blue"), (TrialState.PRUNED, "tab:red")):
        points = [(t.number, t.value if t.value is not None else list(t.intermediate_values.values())[-1])
                  for t in study.get_trials(deepcopy=False, states=(state,)) if t.value is not None
                  or t.intermediate_values]
        if points:
            ax.scatter(*zip(*points), color=colour, label=state.name.lower())
    complete = sorted((t.number, t.value) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if t.value is not None)  # a complete single-objective trial always has its value
    if complete:
        best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
        running = [best(v for _, v in complete[: i + 1]) for i in range(len(complete))]
        ax.step([n for n, _ in complete], running, where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation metric")
    ax.set_title(f"sweep {study.study_name}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
