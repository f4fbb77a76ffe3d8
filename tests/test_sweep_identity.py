"""A sweep's identity and where it lives: a second sweep file under a name that exists is refused, not
resumed into one ranking; `--storage` is read as a URL first, so a database URL never becomes a folder
and its password never reaches a message, and storages a sweep cannot work on are refused in one line."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from cnnlab import sweep as sweeps
from cnnlab.sweep.spec import SweepError, parse_sweep
from cnnlab.sweep.storage import masked, parse_storage
from test_sweep_faults import cli, journal, one_line_error, write_sweep

SEARCH = {"train.lr": {"min": 0.001, "max": 0.01}}  # a key every model reads


def open_study(tmp_path: Path, file: Path, name: str = "s", storage: str | None = None) -> sweeps.Sweep:
    """Create (or resume) the study of sweep file `file` without running a trial."""
    spec = sweeps.read_sweep(file)
    sweep = sweeps.Sweep(spec, name, storage or str(journal(tmp_path, name)), tmp_path / "runs", 2)
    sweep.open()
    return sweep


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------- 1. spec identity
@pytest.mark.unit
@pytest.mark.parametrize("change, expected", [
    (dict(model="top", set={"epochs": 1}), "model seed, this file top"),  # top has none of seed's knobs
    (dict(dataset="fashion-mnist-sample"), "dataset mnist-sample, this file fashion-mnist-sample"),
    (dict(set={"epochs": 2}), "set -epochs=1 +epochs=2"),
    (dict(parameters={"train.lr": {"min": 0.001, "max": 0.005}}), "parameters.train.lr"),
    (dict(parameters={"train.weight_decay": {"min": 0.0, "max": 0.001}}),
     "parameters.train.lr; parameters.train.weight_decay"),
    (dict(metric={"name": "val_loss", "goal": "maximize"}), "metric val_accuracy, this file val_loss"),
], ids=["model", "dataset", "set", "range", "parameter", "metric"])
def test_another_sweep_file_under_a_name_that_exists_is_refused_saying_what_differs(tmp_path, change, expected):
    first = write_sweep(tmp_path, SEARCH)
    open_study(tmp_path, first)
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(first.read_text())
    fixed = change.pop("set", None)
    data.update(change)
    if fixed:
        data["set"] = fixed if "model" in change else dict(data["set"], **fixed)
    other.write_text(yaml.safe_dump(data))
    error = one_line_error(cli("run", str(other), "--name", "s", "--runs-dir", str(tmp_path / "runs")),
                           "sweep 's'", "another sweep file", expected, "another --name")
    assert "Traceback" not in error
    assert sweeps.load_study("s", str(journal(tmp_path, "s"))).get_trials() == []  # no trial claimed
    assert not list((tmp_path / "runs" / "sweeps" / "s").glob("trial-*"))
    open_study(tmp_path, first)  # the file it was started from still resumes it


@pytest.mark.unit
def test_what_does_not_change_a_trials_value_still_resumes(tmp_path):
    open_study(tmp_path, write_sweep(tmp_path, SEARCH))
    # another seed, early termination and a description: other points or earlier stops, the same measurement
    open_study(tmp_path, write_sweep(tmp_path, SEARCH, seed=7, description="again",
                                     early_terminate={"type": "hyperband", "min_iter": 1}))


@pytest.mark.unit
def test_a_study_from_before_identities_were_recorded_is_adopted(tmp_path):
    import optuna

    from cnnlab.sweep.study import open_storage

    study = optuna.create_study(study_name="old", storage=open_storage(str(journal(tmp_path, "old"))),
                                direction="maximize")
    study.set_user_attr("cnnlab.method", "random")
    study.set_user_attr("cnnlab.metric", "val_accuracy")
    open_study(tmp_path, write_sweep(tmp_path, SEARCH), "old")
    assert sweeps.load_study("old", str(journal(tmp_path, "old"))).user_attrs["cnnlab.spec"]["model"] == "seed"
    with pytest.raises(SweepError, match="another sweep file"):
        open_study(tmp_path, write_sweep(tmp_path, SEARCH, dataset="fashion-mnist-sample"), "old")


# -------------------------------------------------------------------------- 2. storage URLs
SECRET_URLS = {
    "postgres": "postgres://alice:s3cret@127.0.0.1:1/db",  # port 1: nothing listens
    "postgresql-query": "postgresql://alice@127.0.0.1:1/db?password=s3cret",
    "mysql": "mysql://alice:s3cret@127.0.0.1:1/db",
    "mysql-driver": "mysql+pymysql://alice:s3cret@127.0.0.1:1/db",
    "redis": "redis://:s3cret@127.0.0.1:1/0",
    "http": "http://alice:s3cret@example.invalid/x",
    "file-with-host": "file://alice:s3cret@example.invalid/x.journal",
    "postgres-unknown-driver": "postgresql+asyncpg://alice:s3cret@127.0.0.1:1/db",
    "no-slashes": "postgres:alice:s3cret@host",
}
REFUSED = {"mysql": "MySQL is not supported", "mysql-driver": "MySQL is not supported",
           "redis": "unknown storage scheme 'redis:'", "http": "unknown storage scheme 'http:'",
           "file-with-host": "no host", "postgres-unknown-driver": "unknown PostgreSQL driver 'asyncpg'",
           "postgres": "cannot reach the study database", "postgresql-query": "cannot reach the study database",
           "no-slashes": "not a database URL"}


@pytest.mark.unit
@pytest.mark.parametrize("kind", SECRET_URLS)
def test_a_storage_url_is_never_a_folder_and_its_password_never_shows(tmp_path, monkeypatch, kind):
    url = SECRET_URLS[kind]
    work = tmp_path / "work"
    work.mkdir()
    file = write_sweep(tmp_path, SEARCH)
    monkeypatch.chdir(work)  # a URL taken for a relative path would be made here
    for args in (["run", str(file), "--storage", url], ["status", "s", "--storage", url],
                 ["best", "s", "--storage", url, "--out", str(tmp_path / "best.yaml")]):
        result = cli(*args, "--runs-dir", str(tmp_path / "runs"))
        error = one_line_error(result)
        assert "s3cret" not in result.output and "s3cret" not in result.stderr
        if args[0] == "run":
            assert REFUSED[kind] in error, error
    assert files_under(work) == set() and not (tmp_path / "runs").exists() and not (tmp_path / "best.yaml").exists()


@pytest.mark.unit
@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite:///db?mode=memory&uri=true"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_in_memory_sqlite_study_is_refused_before_any_trial(tmp_path, monkeypatch, url, workers):
    monkeypatch.chdir(tmp_path)
    file = write_sweep(tmp_path, SEARCH)
    one_line_error(cli("run", str(file), "--storage", url, "--workers", workers, "--trials", "4",
                       "--runs-dir", str(tmp_path / "runs")), "in-memory SQLite", "sqlite:///FILE.db")
    assert files_under(tmp_path) == {"sweep.yaml"}


@pytest.mark.unit
@pytest.mark.parametrize("scheme", ["file", "sqlite"])
def test_file_and_sqlite_urls_name_a_file_that_status_finds_again(tmp_path, monkeypatch, scheme):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "studies" / ("s.journal" if scheme == "file" else "s.db")
    url = f"{scheme}://{'' if scheme == 'file' else '/'}{target}"
    open_study(tmp_path, write_sweep(tmp_path, SEARCH), storage=url)
    assert target.is_file() and (target.parent / f"{target.name}.claim-lock").is_file()
    assert files_under(tmp_path) == {"sweep.yaml", "studies", "studies/" + target.name,
                                     f"studies/{target.name}.claim-lock"}
    result = cli("status", "s", "--storage", url, "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0 and "0 trials: none yet" in result.output, result.output
    one_line_error(cli("status", "s", "--storage", f"{scheme}://{'' if scheme == 'file' else '/'}{target}.missing"),
                   "no sweep 's'", "does not exist")  # a command that only reads never creates a study


@pytest.mark.unit
@pytest.mark.parametrize("url", [
    "postgresql://alice:s3cret@host/db", "postgresql://alice:s3cret@host/db?sslmode=require&password=s3cret",
    "postgres://alice:s3/cret@host/db", "postgres://alice:s3cr@t@host/db", "redis://:s3cret@host:6379/0",
    "postgresql://alice:s3%2Fcret@host/db",
])
def test_the_shown_storage_never_holds_the_password(url):
    assert "s3" not in masked(url)
    try:
        shown = parse_storage(url).shown
    except SweepError as exc:  # refused: the message names the storage as shown
        shown = str(exc)
    assert "s3" not in shown and "alice" in shown or url.startswith("redis")


@pytest.mark.unit
def test_a_journal_path_with_a_colon_is_written_as_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SweepError, match="unknown storage scheme 'odd:'"):
        parse_storage("odd:name.journal")
    assert parse_storage("./odd:name.journal").path == Path("odd:name.journal")
    spec = parse_sweep({"parameters": SEARCH})
    sweeps.Sweep(spec, "s", "./odd:name.journal", tmp_path / "runs", 1).open()
    assert os.path.isfile(tmp_path / "odd:name.journal")


@pytest.mark.unit
def test_best_takes_a_trial_folder_found_by_name_only_when_it_holds_that_trials_config(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from cnnlab.config import load_config
    from cnnlab.runs.records import save_config

    sweep = open_study(tmp_path, write_sweep(tmp_path, SEARCH))
    study = sweeps.load_study("s", sweep.storage)
    study.add_trial(create_trial(params={"train.lr": 0.005}, distributions={"train.lr": FloatDistribution(0.001, 0.01)},
                                 value=0.9, user_attrs={"run": "elsewhere/runs/sweeps/s/trial-0"}))
    found = tmp_path / "runs" / "sweeps" / "s" / "trial-0"  # where `best --runs-dir` looks for it by name
    found.mkdir(parents=True)
    args = ("best", "s", "--out", str(tmp_path / "best.yaml"), "--runs-dir", str(tmp_path / "runs"))
    save_config(found, load_config("seed", None, [*sweep.spec.fixed, "train.lr=0.005"],
                                   data={"dataset": "mnist-sample"}))  # this trial's run
    assert cli(*args).exit_code == 0 and load_config(None, tmp_path / "best.yaml").train.lr == 0.005
    save_config(found, load_config("seed", None, [*sweep.spec.fixed, "train.lr=0.002"],
                                   data={"dataset": "mnist-sample"}))  # a folder of that name from another sweep
    one_line_error(cli(*args), "trial 0's run is not at elsewhere/runs/sweeps/s/trial-0", "another configuration")


def test_a_real_sweep_moved_to_another_folder_still_gives_its_best(tmp_path):
    file = write_sweep(tmp_path, SEARCH)
    assert cli("run", str(file), "--name", "s", "--trials", "1", "--runs-dir", str(tmp_path / "runs")).exit_code == 0
    (tmp_path / "runs").rename(tmp_path / "moved")  # the study recorded runs/sweeps/s/trial-0, now elsewhere
    result = cli("best", "s", "--out", str(tmp_path / "best.yaml"), "--runs-dir", str(tmp_path / "moved"))
    assert result.exit_code == 0, result.output
