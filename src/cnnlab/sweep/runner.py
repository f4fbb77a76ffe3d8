"""Running a sweep: each trial a normal run directory, pruned on its validation metric, in one or
several worker processes; then the results (summary, best config, plot).

Over 400 lines on purpose: a trial's life (run, heartbeat, prune, fail, requeue) and the workers that run them are
one protocol with the study's lock (`study`); the results it writes at the end are the rest."""
from __future__ import annotations

import errno
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from cnnlab import pipeline
from cnnlab.config import ConfigError, load_config
from cnnlab.errors import UserError
from cnnlab.files import FileRefused, check_regular, output_target, read_text, reason, write_atomic
from cnnlab.inspect.figures import printable_text
from cnnlab.runs import layout
from cnnlab.sweep.identity import check_found_run, check_same_spec
from cnnlab.sweep.plots import Importances, param_importances, sweep_figure
from cnnlab.sweep.spec import SweepError, SweepSpec, check_counts, check_name, trial_config
from cnnlab.sweep.storage import parse_storage, shown_storage
from cnnlab.sweep.study import (
    JournalWriteError,
    claim_trial,
    heartbeat_seconds,
    make_pruner,
    make_sampler,
    new_session,
    one_line,
    open_storage,
    retry_callback,
    study_lock,
    sweep_dir,
    trial_sampler,
)
from cnnlab.sweep.trial_data import TrialData, check_dataset, resolve_dataset
from cnnlab.text import command
from cnnlab.training.callbacks import Callback, EpochMetrics, Progress
from cnnlab.training.engine import TrainingInterrupted


# ---------------------------------------------------------------------------------- running trials
class PruningReporter(Callback):
    """Reports each epoch's metric to the trial and stops training when the pruner says so."""

    def __init__(self, trial: Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, progress: Progress, metrics: EpochMetrics) -> None:
        value = cast(float, metrics.get(self.metric, math.nan))  # a key of EpochMetrics, by name
        if math.isnan(value):
            return  # no validation split: nothing to judge the trial by
        self.trial.report(value, step=metrics["epoch"])
        last = metrics["epoch"] >= progress.epochs  # a finished trial is worth keeping
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
        seconds = heartbeat_seconds()
        warned = False
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 -- a lost database connection must not kill the thread
                # silently: the trial may be retried by another worker once its heartbeat is stale
                if not warned:
                    print(f"warning: could not record the trial's heartbeat ({one_line(exc)}); if the database "
                          "stays out of reach, another worker may retry this trial", file=sys.stderr)
                    warned = True
            self.stop.wait(seconds)

    def __enter__(self) -> Heartbeat:
        # The study's storage is Optuna's cache wrapped around the RDBStorage, not an RDBStorage itself:
        # ask for the heartbeat interval instead of checking the type (a type check never beat).
        interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        if interval:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


class TrialStopped(SweepError):
    """A trial could not write its run (disk full, read-only, no permission): the sweep stops, resumable."""


@dataclass
class Sweep:
    """What a worker needs: the spec, where the study is, where trial runs go, how many trials in all, and the
    folder a relative image folder is read from (the sweep file's; `sweep.trial_data`)."""

    spec: SweepSpec
    name: str
    storage: str
    runs_dir: Path
    trials: int
    base: Path = Path()  # the sweep file's folder; the default: the current folder

    def __post_init__(self) -> None:
        check_name(self.name)
        check_counts(self.trials, 1)
        self.base = Path(os.path.abspath(self.base))  # fixed now: spawned workers and later trials read the same folder
        parse_storage(self.storage)  # a URL a sweep cannot use is refused before any study, file or folder

    def open(self, worker: int = 0) -> optuna.Study:
        """Create or load the study, and check that a loaded one searches as this spec does.

        The study's own sampler serves the grid; random and bayes trials get a sampler seeded from the
        trial's number (`trial_sampler`), so `worker` only names the worker.
        """
        with study_lock(self.storage, self.name):  # workers starting together would race to create tables
            study = optuna.create_study(study_name=self.name, storage=open_storage(self.storage),
                                        sampler=make_sampler(self.spec, self.spec.seed), pruner=make_pruner(self.spec),
                                        direction=self.spec.direction, load_if_exists=True)
            self.check_study(study)
        return study

    def check_study(self, study: optuna.Study) -> None:
        """A study resumed from another sweep file would rank trials of two searches together, or by the wrong rule."""
        if len(study.directions) != 1 or study.direction.name.lower() != self.spec.direction:
            found = ", ".join(d.name.lower() for d in study.directions)
            raise SweepError(f"sweep {self.name!r} in {shown_storage(self.storage)} was started to {found} its "
                             f"objective, but this sweep file asks to {self.spec.direction}; give another --name "
                             "for a new sweep")
        check_same_spec(study, self.spec, self.name, shown_storage(self.storage))

    def total(self) -> int:
        """Trials in all; a grid stops at its size."""
        return min(self.trials, self.spec.grid_size()) if self.spec.method == "grid" else self.trials


def trial_run_dir(sweep: Sweep, number: int) -> Path:
    """runs/sweeps/<name>/trial-<n>, or trial-<n>-2, ... when a directory of that name is left over (from a
    journal recovered to an earlier record, whose trial numbers are given out again)."""
    base = sweep_dir(sweep.runs_dir, sweep.name) / f"trial-{number}"
    run, n = base, 1
    while run.exists() or run.is_symlink():
        n += 1
        run = base.with_name(f"{base.name}-{n}")
    return run


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write (disk full, read-only, no permission) if that is what `exc` is or
    was raised from (RunError is raised `from None` but keeps the OSError as its context)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_trial(sweep: Sweep, study: optuna.Study, trial: Trial, datasets: TrialData,
              log: Callable[[str], object] = print) -> TrialState:
    """Train one trial into runs/sweeps/<name>/trial-<n> and tell the study how it ended."""
    sampler = trial_sampler(sweep.spec, trial.number)
    if sampler is not None:  # this trial's own seed: resumed and concurrent sweeps do not repeat points
        study.sampler = sampler
    params = {p.key: p.suggest(trial) for p in sweep.spec.parameters}
    run = trial_run_dir(sweep, trial.number)
    trial.set_user_attr("run", str(run))
    metric = sweep.spec.metric
    try:
        config = resolve_dataset(trial_config(sweep.spec, params), sweep.base)
        data = datasets.open(config)
        with Heartbeat(study, trial):
            result = pipeline.train(config, run.parent, run.name, [PruningReporter(trial, metric)],
                                    progress=False, dataset=data)
    except JournalWriteError:
        raise  # the study cannot be written: nothing more can be recorded; the rerun retries this trial
    except optuna.TrialPruned as exc:
        trial.set_user_attr("pruned", str(exc))
        study.tell(trial, state=TrialState.PRUNED)
        log(f"trial {trial.number} {params}: pruned ({exc})")
        return TrialState.PRUNED
    except (TrainingInterrupted, KeyboardInterrupt):  # Ctrl-C (twice: at once) or SIGTERM: queued again
        trial.set_user_attr("error", "interrupted (Ctrl-C or SIGTERM); queued again for the resumed sweep")
        requeue(study, trial)
        raise
    except (OSError, ConfigError, RuntimeError, ValueError) as exc:
        failure = write_failure(exc)
        if failure is not None:  # the disk is full or read-only: every further trial would fail the same way
            requeue(study, trial)
            where = failure.filename or run
            raise TrialStopped(f"trial {trial.number}: could not write {where}: {reason(failure)}; the sweep "
                               "stopped and the trial will be run again. Free space or make the folder writable, "
                               "then rerun the same `cnnlab sweep run` to resume") from None
        # one bad combination (or a diverged loss: TrainingDiverged is a RuntimeError) must not end the sweep
        trial.set_user_attr("error", one_line(exc))
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number} {params}: failed: {one_line(exc)}")
        return TrialState.FAIL
    value = result.kept.get(metric, math.nan)  # the epoch whose weights the run kept (early stopping's best)
    if not math.isfinite(value):  # NaN or inf would rank as best or worst by accident: a failed trial
        trial.set_user_attr("error", f"the objective {metric} is {value}")
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number} {params}: failed: the objective {metric} is {value}")
        state = TrialState.FAIL
    else:
        study.tell(trial, value)
        log(f"trial {trial.number} {params}: {metric} {value:.4f}  ({run})")
        state = TrialState.COMPLETE
    if result.stop_requested:  # Ctrl-C or SIGTERM while the trial was testing: it is recorded; the sweep stops
        raise TrainingInterrupted(f"stopped after trial {trial.number}, which is recorded")
    return state


def requeue(study: optuna.Study, trial: Trial) -> None:
    """Fail a trial that did not get to finish and queue a retry with its parameters."""
    study.tell(trial, state=TrialState.FAIL)
    retry_callback()(study, study._storage.get_trial(trial._trial_id))


def run_worker(sweep: Sweep, worker: int = 0, threads: int | None = None, log: Callable[[str], object] = print
               ) -> int:
    """Claim and run trials until the study has its total; returns how many this worker ran."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    new_session()  # trials an earlier invocation in this process left running are dead, not ours
    study = sweep.open(worker)
    datasets = TrialData()
    done = 0
    while (trial := claim_trial(study, sweep.storage, sweep.total())) is not None:
        run_trial(sweep, study, trial, datasets, log)
        done += 1
    return done


def worker_process(sweep: Sweep, worker: int, threads: int, errors: Any) -> None:
    """A spawned worker: its error goes back to the parent as one line (no traceback), and its exit status
    says how it ended (2: an error, 130: interrupted)."""
    try:
        run_worker(sweep, worker, threads)
    except UserError as exc:
        errors.put((worker, str(exc)))
        sys.exit(2)
    except (TrainingInterrupted, KeyboardInterrupt):
        sys.exit(130)


def run_workers(sweep: Sweep, workers: int, log: Callable[[str], object] = print) -> None:
    """Run `workers` processes on this machine (1: in this process), splitting the CPU cores between them."""
    check_counts(sweep.trials, workers)
    check_dataset(trial_config(sweep.spec, {p.key: p.first() for p in sweep.spec.parameters}), sweep.base)
    if sweep.spec.model_line is not None:
        log(sweep.spec.model_line)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep.open()  # create the study once, before workers race to
    if workers <= 1:
        run_worker(sweep, 0, None, log)
        return
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    errors = context.SimpleQueue()
    procs = [context.Process(target=worker_process, args=(sweep, i, threads, errors)) for i in range(workers)]
    for proc in procs:
        proc.start()
    interrupted = False
    while True:  # Ctrl-C reaches the workers too: they queue their trials again; wait for them to finish
        try:
            for proc in procs:
                proc.join()
            break
        except KeyboardInterrupt:
            interrupted = True
    codes = [p.exitcode for p in procs]
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    if messages:
        worker, message = sorted(messages)[0]
        others = f" ({len(messages) - 1} more workers stopped too)" if len(messages) > 1 else ""
        raise SweepError(f"worker {worker}: {message}{others}")
    if interrupted or any(code in (130, -signal.SIGINT) for code in codes):
        raise TrainingInterrupted()
    bad = [code for code in codes if code]
    if bad:
        raise SweepError(f"{len(bad)} of {workers} workers failed (exit codes {bad}); rerun to resume")


# ---------------------------------------------------------------------------------------- results
@dataclass
class Summary:
    """A study's trials, counts by state and parameter importances, for `cnnlab sweep status`."""

    trials: list[FrozenTrial]
    best: FrozenTrial | None
    counts: dict[str, int]
    direction: str
    importances: Importances


def summarize(study: optuna.Study) -> Summary:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return Summary(trials, best, counts, study.direction.name.lower(), param_importances(study))


def best_trial(study: optuna.Study) -> FrozenTrial:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise SweepError(f"sweep {study.study_name!r} has no complete trial yet")
    return study.best_trial


MAX_CONFIG_BYTES = 1 << 20  # a run's config.yaml is ~2 kB


def best_run(study: optuna.Study, best: FrozenTrial, runs_dir: str | Path | None = None) -> Path:
    """The run directory of the best trial: where the study says, or (a relative path recorded from another
    folder) the trial's folder under <runs-dir>/sweeps/<name>/."""
    recorded = best.user_attrs.get("run")
    if not isinstance(recorded, str) or not recorded:
        raise SweepError(f"sweep {study.study_name!r}: trial {best.number} has no run directory recorded "
                         "(was the study made by cnnlab sweep run?)")
    run = Path(recorded)
    if not run.is_dir() and runs_dir is not None:
        near = sweep_dir(runs_dir, study.study_name) / run.name
        if near.is_dir():
            check_found_run(study, best, near)  # a folder of that name, but is it this trial's run?
            return near
    return run


def write_best_config(study: optuna.Study, out: str | Path, runs_dir: str | Path | None = None) -> FrozenTrial:
    """Write the best trial's resolved config (its run's config.yaml) with a header saying where it came from.

    The config is read as a bounded regular file and checked to be a config before `out` is replaced,
    atomically (a FIFO, a device or a folder as `out` is refused).
    """
    output_target(out)  # refused before anything is read
    best = best_trial(study)
    run = best_run(study, best, runs_dir)
    config = layout.path(run, "config")
    try:
        check_regular(config, "trial config")  # a folder first: files.read_bytes lets it through as an OSError
        text = read_text(config, MAX_CONFIG_BYTES, "trial config")
        load_config(None, config)  # a config `cnnlab train --config` accepts
    except (FileRefused, ConfigError) as exc:
        raise SweepError(f"best trial {best.number} of sweep {study.study_name}: {exc}") from None
    header = (f"# best trial {best.number} of sweep {study.study_name}: value {best.value:.4f}\n"
              f"# params: {best.params}\n# run: {run!s}\n# train it again with: {command('train', '--config', out)}\n")
    write_output(out, lambda tmp: tmp.write_text(header + text, encoding="utf-8"))
    return best


def write_output(out: str | Path, write: Callable[[Path], object]) -> Path:
    """files.write_atomic, with a failed write (disk full, read-only) as one SweepError line."""
    try:
        return write_atomic(out, write)
    except OSError as exc:
        raise SweepError(f"{out}: could not write it: {reason(exc)}") from None


def plot_format(out: str | Path) -> str:
    """The image format of `out`, from its suffix (none: png); an unknown one is a SweepError, before plotting."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if suffix not in formats:
        raise SweepError(f"--plot {out}: .{suffix} is not an image format matplotlib writes (expected one of "
                         f"{', '.join('.' + f for f in sorted(formats))})")
    return suffix


def check_plot_target(out: str | Path) -> str:
    """Refuse a --plot target before a study is read: not a regular file, no folder, or an unknown format."""
    output_target(out)
    return plot_format(out)


def plot_trials(study: optuna.Study, out: str | Path, importances: Importances | None = None) -> Importances:
    """Draw the sweep to `out` (one image, format from its suffix): each trial's metric, which parameters
    mattered, and the complete trials' parameters as parallel coordinates (`plots.sweep_figure`).

    Returns the importances drawn (computed unless given), whose `note` says why their panel holds a
    message instead of bars.
    """
    fmt = check_plot_target(out)
    if importances is None:
        importances = param_importances(study)
    fig = sweep_figure(study, importances)
    printable_text(fig)
    write_output(out, lambda tmp: fig.savefig(tmp, format=fmt))
    return importances
