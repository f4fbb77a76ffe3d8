"""The Optuna side: samplers and pruners for a sweep, storage (journal file or an RDB such as
PostgreSQL), and claiming trials under a study-wide lock so a total is exact and dead workers' trials
are failed and retried.

Over 400 lines on purpose: everything that touches Optuna's storage is here, behind one lock protocol (the journal
file, the RDB, claiming and failing trials), so nothing else in cnnlab depends on Optuna's storage API."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import sys
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.storages.journal._file import get_lock_file
from optuna.trial import FrozenTrial, Trial, TrialState

from cnnlab.files import GiB, MissingFile, check_regular, kind_of, process_alive, reason, write_bytes
from cnnlab.sweep.spec import SweepError, SweepSpec
from cnnlab.sweep.storage import Storage, parse_storage, scrub

MAX_RETRY = 2  # times a trial whose worker died is tried again
# RDB storage: how often a running trial says it is alive, and the silence after which it counts as
# dead (its worker was killed or lost its machine). Environment overrides for slow links, and tests.
HEARTBEAT_ENV, GRACE_ENV = "CNNLAB_SWEEP_HEARTBEAT_SECONDS", "CNNLAB_SWEEP_GRACE_SECONDS"
MAX_JOURNAL_BYTES = 1 * GiB  # a trial takes a few kB of journal; 1 GiB is far beyond any sweep's


# ----------------------------------------------------------------------------------- Optuna parts
class ExhaustibleGridSampler(optuna.samplers.GridSampler):
    """GridSampler that leaves stopping to the sweep's own trial count (its study.stop() needs optimize())."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        pass


def env_seconds(name: str, default: int) -> int:
    """A whole number of seconds >= 1 from the environment variable `name`, else `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise SweepError(f"{name}={text!r}: expected a whole number of seconds >= 1")
    return int(text)


def heartbeat_seconds() -> int:
    return env_seconds(HEARTBEAT_ENV, 10)


def grace_seconds() -> int:
    return env_seconds(GRACE_ENV, 60)


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


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number` of a study seeded `seed`: every trial its own, the same on every rerun."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def trial_sampler(spec: SweepSpec, number: int) -> optuna.samplers.BaseSampler | None:
    """The sampler that suggests trial `number`'s parameters (random, bayes); None for a grid.

    Seeded from (spec seed, trial number), so a resumed sweep, or another invocation on the same study,
    never replays the points of trials it already has, while a given study stays reproducible. A grid
    keeps its own sampler: it visits each unvisited point once, whoever asks.
    """
    return None if spec.method == "grid" else make_sampler(spec, trial_seed(spec.seed, number))


def default_storage(runs_dir: str | Path, name: str) -> str:
    """The journal file of sweep `name`: next to its trial runs, so `status NAME` finds it by name."""
    return str(sweep_dir(runs_dir, name) / "optuna.journal")


def sweep_dir(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir) / "sweeps" / name


# -------------------------------------------------------------------------------- the journal file
class JournalWriteError(SweepError):
    """The journal could not be written (disk full, read-only, no permission): the sweep stops, resumable."""


class SweepJournal(JournalFileBackend):
    """Optuna's journal file, made to survive a torn write.

    The file must be a regular file of at most MAX_JOURNAL_BYTES (a FIFO is refused without being
    opened for reading). Before it is used, a record cut short (a write that failed half way, a
    writer killed mid-record) is cut off, under the journal's own lock, and kept beside it as
    `<journal>.torn-<time>`; everything before it is the study as it was. An append that fails
    (ENOSPC, EROFS, EACCES) is undone and raised as a one-line JournalWriteError.
    """

    def __init__(self, path: str, log: Callable[[str], object] | None = None):
        self.path = Path(path)
        self.log = log or warn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            check_regular(self.path, "sweep journal")
        super().__init__(str(self.path))  # creates a missing journal
        scan = self.scan()
        if scan.cut == 0 and scan.whole_line:  # not a journal cut short: another file; leave it alone
            raise SweepError(f"{self.path}: not an Optuna journal (its first line is no journal record); move it "
                             "away or give another --name or --storage")
        if scan.cut is not None:  # looked at without the lock: only a torn journal takes it
            with get_lock_file(self._lock):
                self.recover()

    # -- reading the file as whole records
    def scan(self) -> JournalScan:
        """Where the journal's whole records end (and where a cut or corrupt record starts, if any)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise SweepError(f"{self.path}: cannot read this sweep journal: {reason(exc)}") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SweepError(f"{self.path}: {kind_of(info.st_mode)}, not a regular file; a sweep journal must "
                                 "be a regular file")
            if info.st_size > MAX_JOURNAL_BYTES:
                raise SweepError(f"{self.path}: {info.st_size:,} bytes is more than a sweep journal may hold "
                                 f"({MAX_JOURNAL_BYTES:,}); start a new sweep (--name)")
            good = records = 0
            for line in handle:
                whole = line.endswith(b"\n")
                if not whole or not is_record(line):
                    return JournalScan(good, records, good, info.st_size, whole)
                good += len(line)
                records += 1
            return JournalScan(good, records, None, good)

    def recover(self) -> None:
        """With the journal locked: keep a copy of what follows the last whole record, then cut it off."""
        scan = self.scan()
        if scan.cut is None:
            return
        torn = free_name(self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}"))
        try:
            with open(self.path, "rb") as handle:
                handle.seek(scan.cut)
                tail = handle.read(scan.size - scan.cut)
            write_bytes(torn, tail)
            os.truncate(self.path, scan.cut)
            fsync_file(self.path)
        except OSError as exc:
            raise JournalWriteError(
                f"{self.path}: its last record was cut short (byte {scan.cut:,} on) and it cannot be repaired: "
                f"{reason(exc)}; free space or make the folder writable, then rerun") from None
        self.log(f"{self.path}: the last record was cut short (a write that failed or a worker killed "
                 f"mid-write); recovered the study to its last whole record ({scan.records:,} records) and kept "
                 f"the cut {scan.size - scan.cut:,} bytes in {torn.name}")

    # -- writing
    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Optuna's append, made atomic: a torn tail left by a killed writer is recovered first, and a
        failed write is cut back off so the journal ends at a whole record."""
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8")
        try:
            self._lock.acquire()  # a symbolic link beside the journal: can fail on a full or read-only disk too
        except OSError as exc:
            raise self.write_error(exc) from None
        try:
            self.append_locked(text)
        finally:
            with contextlib.suppress(RuntimeError):  # taken over after its grace period: nothing to release
                self._lock.release()

    def append_locked(self, text: bytes) -> None:
        try:
            size = os.stat(self.path).st_size
            if size and not ends_with_newline(self.path, size):
                self.recover()
                size = os.stat(self.path).st_size
        except OSError as exc:
            raise self.write_error(exc) from None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            try:
                view = memoryview(text)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):  # undo the part that was written; else the next open recovers
                os.truncate(self.path, size)
            raise self.write_error(exc) from None

    def write_error(self, exc: OSError) -> JournalWriteError:
        return JournalWriteError(
            f"{self.path}: could not record the sweep's progress: {reason(exc)}. The journal is intact up to its "
            "last whole record; free space or make the folder writable, then rerun the same `cnnlab sweep run` "
            "to resume")


@dataclass
class JournalScan:
    good: int  # bytes of whole records from the start
    records: int  # how many
    cut: int | None  # where a cut or corrupt record starts; None when the file ends at a whole record
    size: int
    whole_line: bool = False  # the bad record is a whole line (corrupt), not one cut short


def is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(record, dict) and "op_code" in record


def ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... whichever does not exist yet."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def open_storage(storage: str, log: Callable[[str], object] | None = None) -> optuna.storages.BaseStorage:
    """The storage `--storage` names (`storage.parse_storage`): a database with heartbeats, or a journal
    file (SweepJournal).

    Problems reaching it (a server that is down, a folder that cannot be written) are one-line
    SweepErrors naming the storage, without its password.
    """
    where = parse_storage(storage)
    if where.path is not None and where.kind == "sqlite" and (where.path.exists() or where.path.is_symlink()):
        check_regular(where.path, "sweep database")  # a FIFO there would hang SQLite's first read
    if where.url is not None:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
        import sqlalchemy.exc

        try:
            return optuna.storages.RDBStorage(
                where.url, heartbeat_interval=heartbeat_seconds(), grace_period=grace_seconds(),
                heartbeat_stale_trial_callback=retry_callback())
        except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as exc:
            raise SweepError(f"--storage {where.shown}: cannot open the study database: "
                             f"{scrub(one_line(exc), storage)}") from None
    journal = str(where.path)
    try:
        backend = SweepJournal(journal, log)
    except OSError as exc:
        raise JournalWriteError(f"{journal}: cannot open the sweep journal: {reason(exc)}") from None
    try:
        return JournalStorage(backend)
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError) as exc:
        raise SweepError(f"{journal}: not an Optuna journal this version can read ({type(exc).__name__}: "
                         f"{one_line(exc)}); move it away or give another --name") from None


def one_line(exc: BaseException) -> str:
    """An exception's message as one short line (drivers' messages run over several)."""
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_study(name: str, storage: str) -> optuna.Study:
    """An existing study; a missing one is a SweepError naming the storage."""
    where = parse_storage(storage)
    if where.path is not None:  # a journal or database file: never created by a command that only reads
        try:
            check_regular(where.path, "sweep database" if where.is_rdb else "sweep journal")
        except MissingFile:
            raise SweepError(f"no sweep {name!r}: {where.path} does not exist "
                             "(run `cnnlab sweep run` first, or give --storage)") from None
    opened = open_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        raise SweepError(f"no sweep {name!r} in {where.shown}") from None


# ------------------------------------------------------------------------ claiming trials exactly
@contextlib.contextmanager
def study_lock(storage: str, name: str) -> Iterator[None]:
    """Hold a lock all workers of the study share while one counts trials and claims the next.

    PostgreSQL: an advisory lock (workers on many machines); files: flock next to the journal/database.
    """
    where = parse_storage(storage)
    if where.lock_file is None:
        yield from advisory_lock(where, name)
        return
    lock = where.lock_file
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        # never truncates, never blocks on a FIFO (ENXIO), and a non-regular file is refused below
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise JournalWriteError(f"{lock}: cannot create the sweep's lock file: {reason(exc)}; free space or make "
                                "the folder writable, then rerun") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SweepError(f"{lock}: {kind_of(mode)}, not a regular file; the sweep's lock file must be a "
                             "regular file (remove it)")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def advisory_lock(where: Storage, name: str) -> Iterator[None]:
    """PostgreSQL's advisory lock on the study's name, held while the caller's block runs (workers on many machines)."""
    import sqlalchemy

    key = zlib.crc32(f"cnnlab-sweep:{name}".encode())
    try:
        engine = sqlalchemy.create_engine(str(where.url), poolclass=sqlalchemy.pool.NullPool)
        conn = engine.connect()
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as exc:
        raise SweepError(f"--storage {where.shown}: cannot reach the study database: "
                         f"{scrub(one_line(exc), str(where.url))}") from None
    with conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    engine.dispose()


def replaced_failures(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry stands in for."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward `--trials`: all but failures a retry replaced."""
    replaced = replaced_failures(trials)
    return [t for t in trials if not (t.state == TrialState.FAIL and t.number in replaced)]


SESSION = uuid.uuid4().hex  # this process's current sweep invocation; see new_session


def new_session() -> str:
    """Start a new invocation in this process: trials an earlier one here left running count as dead."""
    global SESSION
    SESSION = uuid.uuid4().hex
    return SESSION


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_gone(trial: FrozenTrial, host: str) -> bool:
    """A RUNNING journal trial's worker is gone: its process no longer exists, or it is this process but an
    earlier invocation in it (that one returned or raised, so it runs nothing any more)."""
    owner_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if owner_host != host or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return trial.user_attrs.get("session") not in (None, SESSION)
    return not process_alive(int(pid))


def fail_dead_trials(study: optuna.Study, storage: str) -> list[int]:
    """Fail (and queue a retry of) RUNNING trials whose worker is gone; returns their numbers.

    RDB storage uses Optuna's heartbeats; the journal file, whose workers share one machine, checks
    that the worker process recorded on the trial still exists.
    """
    if parse_storage(storage).is_rdb:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        return sorted(before & {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))})
    failed = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not owner_gone(trial, host):
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
        trial.set_user_attr("session", SESSION)
        return trial


