"""The Optuna side: samplers and pruners for a sweep, storage (journal file or an RDB such as
PostgreSQL), and claiming trials under a study-wide lock so a total is exact and dead workers' trials
are failed and retried."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from cnnlab.sweep.spec import SweepError, SweepSpec

MAX_RETRY = 2  # times a trial whose worker died is tried again
# RDB storage: how often a running trial says it is alive, and the silence after which it counts as
# dead (its worker was killed or lost its machine). Environment overrides for slow links, and tests.
HEARTBEAT_SECONDS = int(os.environ.get("CNNLAB_SWEEP_HEARTBEAT_SECONDS", "10"))
GRACE_SECONDS = int(os.environ.get("CNNLAB_SWEEP_GRACE_SECONDS", "60"))


# ----------------------------------------------------------------------------------- Optuna parts
class ExhaustibleGridSampler(optuna.samplers.GridSampler):
    """GridSampler that leaves stopping to the sweep's own trial count (its study.stop() needs optimize())."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
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
        raise SweepError(f"no sweep {name!r}: {storage} does not exist "
                         "(run `cnnlab sweep run` first, or give --storage)")
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


