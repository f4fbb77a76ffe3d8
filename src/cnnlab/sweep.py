"""Hyperparameter sweeps: a W&B-style sweep.yaml run as an Optuna study, each trial a normal run directory.

Parameter keys are cnnlab config keys (what `--set` accepts). The study lives in a journal file under
`runs/sweeps/<name>/` (several local worker processes) or in an RDB such as PostgreSQL (workers on many
machines). Workers claim trials under a study-wide lock, so `trials` is an exact total, and trials whose
worker died are failed and retried instead of staying RUNNING.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from cnnlab import pipeline, runs
from cnnlab.config import Config, ConfigError, load_config
from cnnlab.config.resolve import read_yaml
from cnnlab.data import Dataset
from cnnlab.trainer import Callback, Trainer, TrainingDiverged, TrainingInterrupted

METHODS = ("grid", "random", "bayes")
METRICS = {"val_accuracy": "val_accuracy", "val_acc": "val_accuracy", "accuracy": "val_accuracy",
           "val_loss": "val_loss", "loss": "val_loss"}  # the lesson's W&B names -> our history keys
DISTRIBUTIONS = ("uniform", "int_uniform", "q_uniform", "log_uniform", "log_uniform_values")
SWEEP_KEYS = {"method", "metric", "parameters", "early_terminate", "model", "dataset", "set", "name", "seed",
              "program", "description", "project", "entity", "command"}  # the last five: W&B's, ignored
MAX_RETRY = 2  # times a trial whose worker died is tried again
HEARTBEAT_SECONDS = 10  # RDB storage: how often a running trial says it is alive
GRACE_SECONDS = 60  # RDB storage: silence after which a running trial counts as dead


class SweepError(ValueError):
    """A sweep file or sweep storage problem; the message names the key or file."""


# ------------------------------------------------------------------------------------ sweep file
@dataclass
class Parameter:
    """One searched config key: a list of values, or a range with a W&B distribution name."""

    key: str
    values: list | None = None
    low: float | None = None
    high: float | None = None
    distribution: str | None = None
    q: float | None = None  # step for q_uniform

    def first(self) -> Any:
        """The value used to check, before anything runs, that some trial config reads this key."""
        return self.values[0] if self.values is not None else self.bounds()[0]

    def bounds(self) -> tuple[Any, Any]:
        """The range in the config's own units (log_uniform gives exponents of e)."""
        if self.distribution == "log_uniform":
            return math.exp(self.low), math.exp(self.high)
        return self.low, self.high

    def suggest(self, trial: Trial) -> Any:
        if self.values is not None:
            return trial.suggest_categorical(self.key, self.values)
        low, high = self.bounds()
        if self.distribution == "int_uniform":
            return trial.suggest_int(self.key, int(low), int(high))
        log = self.distribution in ("log_uniform", "log_uniform_values")
        return trial.suggest_float(self.key, float(low), float(high), log=log, step=self.q)


@dataclass
class SweepSpec:
    """A parsed sweep.yaml: how to search, what to optimise, and the cnnlab run every trial starts from."""

    method: str
    metric: str  # a key of the per-epoch history: val_accuracy or val_loss
    goal: str  # maximize or minimize
    parameters: list[Parameter]
    model: str = "seed"
    dataset: str | None = None
    fixed: list[str] = field(default_factory=list)  # `set:` overrides every trial gets, KEY=VALUE
    early_terminate: dict | None = None
    seed: int = 0
    name: str | None = None
    epochs: int | None = None  # of the checked trial config: hyperband's default max_iter

    @property
    def direction(self) -> str:
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> dict[str, list]:
        return {p.key: p.values for p in self.parameters}

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.parameters)


def read_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file; a key no trial's config would read is an error before anything runs."""
    try:
        spec = parse_sweep(read_yaml(path))
    except SweepError as exc:
        raise SweepError(f"{path}: {exc}") from None
    check_keys(spec)
    return spec


def parse_sweep(data: dict[str, Any]) -> SweepSpec:
    """A SweepSpec from the mapping of a sweep file (W&B sweep format plus model, dataset, set)."""
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key {unknown[0]!r} (sweep keys: {', '.join(sorted(SWEEP_KEYS))})")
    method = data.get("method", "random")
    if method not in METHODS:
        raise SweepError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    metric, goal = parse_metric(data.get("metric") or {"name": "val_accuracy", "goal": "maximize"})
    params = data.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise SweepError("parameters: expected a mapping of config key -> {values: [...]} or {min, max}")
    fixed = [f"{k}={v}" if isinstance(v, str) else f"{k}={dump_value(v)}" for k, v in (data.get("set") or {}).items()]
    searched = []
    for key, body in params.items():
        if isinstance(body, dict) and "value" in body:  # W&B's constant parameter
            fixed.append(f"{key}={dump_value(body['value'])}")
        else:
            searched.append(parse_parameter(str(key), body))
    if not searched:
        raise SweepError("parameters: nothing to search (every parameter has a single `value`)")
    if method == "grid" and any(p.values is None for p in searched):
        raise SweepError("method grid needs `values: [...]` for every parameter "
                         f"({', '.join(p.key for p in searched if p.values is None)} give a range)")
    early = data.get("early_terminate")
    if early is not None and (not isinstance(early, dict) or early.get("type") != "hyperband"):
        raise SweepError(f"early_terminate: expected {{type: hyperband, min_iter: 1, eta: 3}}, found {early!r}")
    return SweepSpec(method, metric, goal, searched, data.get("model", "seed"), data.get("dataset"), fixed,
                     early, int(data.get("seed", 0)), data.get("name"))


def parse_metric(metric: Any) -> tuple[str, str]:
    if not isinstance(metric, dict) or "name" not in metric:
        raise SweepError(f"metric: expected {{name: val_accuracy, goal: maximize}}, found {metric!r}")
    name = METRICS.get(metric["name"])
    if name is None:
        raise SweepError(f"metric {metric['name']!r}: expected one of {', '.join(METRICS)}")
    goal = metric.get("goal", "maximize" if name == "val_accuracy" else "minimize")
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"metric goal {goal!r}: expected maximize or minimize")
    return name, goal


def parse_parameter(key: str, body: Any) -> Parameter:
    """One `parameters:` entry: {values: [...]} or {min, max, distribution?, q?}."""
    if not isinstance(body, dict):
        raise SweepError(f"parameters.{key}: expected {{values: [...]}} or {{min: ..., max: ...}}, found {body!r}")
    if "values" in body:
        if not isinstance(body["values"], list) or not body["values"]:
            raise SweepError(f"parameters.{key}.values: expected a non-empty list")
        return Parameter(key, values=list(body["values"]))
    if "min" not in body or "max" not in body:
        raise SweepError(f"parameters.{key}: expected values, value, or min and max")
    low, high = body["min"], body["max"]
    both_int = isinstance(low, int) and isinstance(high, int)
    distribution = body.get("distribution", "int_uniform" if both_int else "uniform")
    if distribution not in DISTRIBUTIONS:
        raise SweepError(f"parameters.{key}.distribution {distribution!r}: expected one of {', '.join(DISTRIBUTIONS)}")
    return Parameter(key, low=low, high=high, distribution=distribution, q=body.get("q"))


def dump_value(value: Any) -> str:
    """A value as YAML text `--set` reads back as the same type (1e-07 alone would read as a string)."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def trial_overrides(spec: SweepSpec, params: dict[str, Any]) -> list[str]:
    return [*spec.fixed, *(f"{key}={dump_value(value)}" for key, value in params.items())]


def trial_config(spec: SweepSpec, params: dict[str, Any]) -> Config:
    data = {"dataset": spec.dataset} if spec.dataset else {}
    return load_config(spec.model, None, trial_overrides(spec, params), data=data)


def check_keys(spec: SweepSpec) -> None:
    """Resolve a config with every parameter's first (or min) value: an unread key raises ConfigError."""
    spec.epochs = trial_config(spec, {p.key: p.first() for p in spec.parameters}).train.epochs


# ----------------------------------------------------------------------------------- Optuna parts
class ExhaustibleGridSampler(optuna.samplers.GridSampler):
    """GridSampler that leaves stopping to the sweep's own trial count (its study.stop() needs optimize())."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a copy of a trial whose worker died (experimental, stable since 2.8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def make_sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    """grid -> GridSampler, random -> RandomSampler, bayes -> TPESampler; all seeded."""
    if spec.method == "grid":
        return ExhaustibleGridSampler(spec.grid(), seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """W&B's hyperband early termination (min_iter, eta, max_iter in epochs) as Optuna's HyperbandPruner."""
    early = spec.early_terminate
    if early is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.HyperbandPruner(min_resource=int(early.get("min_iter", 1)),
                                          max_resource=early.get("max_iter", spec.epochs or "auto"),
                                          reduction_factor=int(early.get("eta", 3)))


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def default_storage(runs_dir: str | Path, name: str) -> str:
    """The journal file of sweep `name`: next to its trial runs, so `status NAME` finds it by name."""
    return str(sweep_dir(runs_dir, name) / "optuna.journal")


def sweep_dir(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir) / "sweeps" / name


def sqlalchemy_url(storage: str) -> str:
    """The URL with a PostgreSQL driver that is installed: SQLAlchemy 2.1's default is psycopg 3,
    while `cnnlab[postgres]` installs psycopg2."""
    if storage.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + storage.removeprefix("postgresql://")
    return storage


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """An RDB URL (postgresql://, sqlite://) with heartbeats, or a journal file path."""
    if is_rdb_url(storage):
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
        return optuna.storages.RDBStorage(
            sqlalchemy_url(storage), heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=retry_callback())
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def load_study(name: str, storage: str) -> optuna.Study:
    """An existing study; a missing one is a SweepError naming the storage."""
    if not is_rdb_url(storage) and not Path(storage).is_file():
        raise SweepError(f"no sweep {name!r}: {storage} does not exist (run `cnnlab sweep run` first, or give --storage)")
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise SweepError(f"no sweep {name!r} in {storage}") from None


# ------------------------------------------------------------------------ claiming trials exactly
@contextlib.contextmanager
def study_lock(storage: str, name: str) -> Iterator[None]:
    """Hold a lock all workers of the study share while one counts trials and claims the next.

    PostgreSQL: an advisory lock (workers on many machines); files: flock next to the journal/database.
    """
    if storage.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"cnnlab-sweep:{name}".encode())
        engine = sqlalchemy.create_engine(sqlalchemy_url(storage), poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    path = storage.split(":///", 1)[1] if storage.startswith("sqlite:///") else storage
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.claim-lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def replaced_failures(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry stands in for."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward `--trials`: all but failures a retry replaced."""
    replaced = replaced_failures(trials)
    return [t for t in trials if not (t.state == TrialState.FAIL and t.number in replaced)]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, storage: str) -> list[int]:
    """Fail (and queue a retry of) RUNNING trials whose worker is gone; returns their numbers.

    RDB storage uses Optuna's heartbeats; the journal file, whose workers share one machine, checks
    that the worker process recorded on the trial still exists.
    """
    if is_rdb_url(storage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        return sorted(before & {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))})
    failed = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if owner_host != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                failed.append(trial.number)
                retry_callback()(study, study._storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    return failed


def claim_trial(study: optuna.Study, storage: str, total: int) -> Trial | None:
    """Under the study lock: fail dead trials, then start the next trial unless `total` are claimed."""
    with study_lock(storage, study.study_name):
        fail_dead_trials(study, storage)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)  # queued retries already count
        if len(counted_trials(trials)) >= total and not waiting:
            return None
        trial = study.ask()
        trial.set_user_attr("worker", worker_id())
        return trial


# ---------------------------------------------------------------------------------- running trials
class PruningReporter(Callback):
    """Reports each epoch's metric to the trial and stops training when the pruner says so."""

    def __init__(self, trial: Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
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
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True)

    def beat(self) -> None:
        while not self.stop.is_set():
            self.storage.record_heartbeat(self.trial_id)
            self.stop.wait(HEARTBEAT_SECONDS)

    def __enter__(self) -> Heartbeat:
        if isinstance(self.storage, optuna.storages.RDBStorage) and self.storage.get_heartbeat_interval():
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
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
              log=print) -> TrialState:
    """Train one trial into runs/sweeps/<name>/trial-<n> and tell the study how it ended."""
    params = {p.key: p.suggest(trial) for p in sweep.spec.parameters}
    run = sweep_dir(sweep.runs_dir, sweep.name) / f"trial-{trial.number}"
    trial.set_user_attr("run", str(run))
    metric = sweep.spec.metric
    try:
        config = trial_config(sweep.spec, params)
        dataset = datasets.get(config.data.dataset) or pipeline.open_dataset(config, progress=False)
        datasets[config.data.dataset] = dataset
        with Heartbeat(study, trial):
            result = pipeline.train(config, run.parent, run.name, [PruningReporter(trial, metric)],
                                    progress=False, dataset=dataset)
    except (optuna.TrialPruned, TrainingDiverged) as exc:  # a diverged loss is a hopeless trial, not a crash
        trial.set_user_attr("pruned", str(exc))
        study.tell(trial, state=TrialState.PRUNED)
        log(f"trial {trial.number} {params}: pruned ({exc})")
        return TrialState.PRUNED
    except TrainingInterrupted:  # Ctrl-C or SIGTERM: queue the trial again for the resumed sweep
        study.tell(trial, state=TrialState.FAIL)
        retry_callback()(study, study._storage.get_trial(trial._trial_id))
        raise
    except (ConfigError, RuntimeError, ValueError) as exc:  # one bad combination must not end the sweep
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number} {params}: failed: {exc}")
        return TrialState.FAIL
    value = result.history[-1][metric]
    study.tell(trial, value)
    log(f"trial {trial.number} {params}: {metric} {value:.4f}  ({run})")
    return TrialState.COMPLETE


def run_worker(sweep: Sweep, worker: int = 0, threads: int | None = None, log=print) -> int:
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


def run_workers(sweep: Sweep, workers: int, log=print) -> None:
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
    text = runs.path(run, "config").read_text()
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
    complete = sorted((t.number, t.value) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
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
