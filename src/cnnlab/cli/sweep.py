"""`cnnlab sweep run|status|best`: hyperparameter search over config keys, one run directory per trial.

`run` is a subcommand (not `cnnlab sweep FILE`) because a Typer group cannot take a positional file
and subcommand names in the same slot without guessing which the user meant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cnnlab.cli._app import SCALE, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import RUNS_DIR
from cnnlab.text import command

sweep_app = typer.Typer(help="Hyperparameter sweeps (W&B sweep files, run offline with Optuna; many machines "
                        "share one study through --storage postgresql://...).", no_args_is_help=True)

Storage = Annotated[str | None, typer.Option(
    "--storage", help="Study storage: postgresql://user@host/db (workers on many machines), sqlite:///file.db, "
    "file:///path or a journal file path (one holding ':' as ./name). Anything with a scheme is a URL, never a "
    "path. Default: <runs-dir>/sweeps/<name>/optuna.journal.")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder that holds run directories; trials go to "
                                       "<runs-dir>/sweeps/<name>/trial-<n>.")]
Name = Annotated[str, typer.Argument(help="Sweep (study) name.")]


TRIALS = 10  # --trials by default


def storage_for(storage: str | None, runs_dir: Path, name: str) -> str:
    from cnnlab.sweep.study import default_storage

    return storage or default_storage(runs_dir, name)


@sweep_app.command("run")
@friendly_errors
def run(
    file: Annotated[Path, typer.Argument(help="Sweep YAML (W&B format plus model, dataset, set).")],
    trials: Annotated[int, typer.Option("--trials", "-n", min=1, help="Trials in the whole study, all workers "
                                        "and machines together.")] = TRIALS,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes on this machine.")] = 1,
    storage: Storage = None,
    name: Annotated[str | None, typer.Option(help="Sweep name; default the file's `name:` or its stem. "
                                                "The same name resumes the sweep, from the sweep file it was "
                                                "started from (another one is refused).")] = None,
    runs_dir: RunsDir = RUNS_DIR,
) -> None:
    """Run (or resume) a sweep until the study has --trials trials; start it on more machines to share the work."""
    from cnnlab import sweep as sweeps
    from cnnlab.sweep.spec import check_counts, check_name
    from cnnlab.sweep.storage import shown_storage
    from cnnlab.training.engine import TrainingInterrupted

    check_counts(trials, workers)  # before the file is read, let alone a trial run
    spec = sweeps.read_sweep(file)
    name = check_name(name or spec.name or file.stem, "--name" if name else "the sweep name")
    # a relative image folder in the file means the one beside the file, for every worker (`sweep.trial_data`)
    sweep = sweeps.Sweep(spec, name, storage_for(storage, runs_dir, name), runs_dir, trials, base=file.parent)
    print(f"sweep {name}: {spec.method} search, {spec.goal} {spec.metric}, {sweep.total()} trials "
          f"in {shown_storage(sweep.storage)}")
    try:
        sweeps.run_workers(sweep, workers)
    except TrainingInterrupted as exc:
        what = str(exc) or "interrupted; the trial will be retried"
        given: list[str] = []  # the options given, so the command resumes this sweep, not a new one
        for flag, value, default in (("--trials", trials, TRIALS), ("--workers", workers, 1),
                                     ("--runs-dir", runs_dir, RUNS_DIR)):
            given += [flag, str(value)] if value != default else []
        given += ["--storage", shown_storage(storage)] if storage else []  # its password hidden, if any
        again = command("sweep", "run", file, "--name", name, *given)
        raise fail(f"{what}. Resume with the same command ({again})", code=130) from None
    summary = print_status(sweeps.load_study(name, sweep.storage))
    if summary.best is None:  # every trial failed (or was pruned): the sweep has no result to give
        raise sweeps.SweepError(f"sweep {name}: none of its {len(summary.trials)} trials completed; see each "
                                f"trial's error above ({command('sweep', 'status', name)})")


@sweep_app.command()
@friendly_errors
def status(name: Name, storage: Storage = None, runs_dir: RunsDir = RUNS_DIR,
           plot: Annotated[Path | None, typer.Option(help="Also draw the sweep to this image (PNG, or the format "
                                                     "its suffix names): each trial's metric, which parameters "
                                                     "mattered, and parallel coordinates of the complete "
                                                     "trials.")] = None
           ) -> None:
    """A table of the sweep's trials, the best so far, how many were pruned or failed, and which parameters mattered."""
    from cnnlab import sweep as sweeps
    from cnnlab.sweep.runner import check_plot_target
    from cnnlab.sweep.spec import check_name

    check_name(name, "the sweep name")  # '../../etc' names no sweep: refused as `run` refuses it
    if plot is not None:
        check_plot_target(plot)  # a FIFO, a device, a folder or an unknown format: refused before reading
    study = sweeps.load_study(name, storage_for(storage, runs_dir, name))
    summary = print_status(study)
    if plot is not None:
        sweeps.plot_trials(study, plot, summary.importances)
        print(f"plot written to {plot}")


@sweep_app.command()
@friendly_errors
def best(name: Name, out: Annotated[Path, typer.Option("--out", "-o", help="Write the best trial's config here.")]
         = Path("best.yaml"), storage: Storage = None, runs_dir: RunsDir = RUNS_DIR) -> None:
    """Write the best trial's full config, ready for `cnnlab train --config`."""
    from cnnlab import sweep as sweeps
    from cnnlab.files import output_target
    from cnnlab.sweep.spec import check_name

    check_name(name, "the sweep name")
    output_target(out)  # a FIFO, a device or a folder: refused before the study is read
    trial = sweeps.write_best_config(sweeps.load_study(name, storage_for(storage, runs_dir, name)), out, runs_dir)
    print(f"best trial {trial.number}: value {trial.value:.4f} {trial.params}")
    print(f"config written to {out}; train it with: {command('train', '--config', out)}")


def print_status(study: Any) -> Any:
    """Print the trials table, the best so far and which parameters mattered; returns the Summary."""
    from cnnlab import sweep as sweeps

    summary = sweeps.summarize(study)
    keys = sorted({k for t in summary.trials for k in t.params})
    print(f"{'trial':>5}  {'state':8}  {'value':>8}  " + "  ".join(f"{k:>12}" for k in keys) + "  run")
    for t in summary.trials:
        value = f"{t.value:8.4f}" if t.value is not None else f"{'-':>8}"
        params = "  ".join(f"{format_param(t.params.get(k)):>12}" for k in keys)
        print(f"{t.number:5d}  {t.state.name.lower():8}  {value}  {params}  {run_cell(t)}")
    counts = ", ".join(f"{n} {state}" for state, n in summary.counts.items() if n)
    print(f"\n{len(summary.trials)} trials: {counts or 'none yet'}")
    if summary.best is not None:
        print(f"best ({summary.direction}): trial {summary.best.number}, value {summary.best.value:.4f}, "
              f"{summary.best.params}")
    if keys and summary.best is not None:  # no trial done, or no parameters: nothing to say
        print_importances(summary.importances)
    return summary


def run_cell(trial: Any) -> str:
    """The trial's run directory; for a failed trial, why it failed, and no directory it never made."""
    run = trial.user_attrs.get("run", "")
    if trial.state.name != "FAIL":
        return str(run)
    error = trial.user_attrs.get("error", "no error recorded")
    return f"{run}  failed: {error}" if run and Path(run).is_dir() else f"(no run directory) failed: {error}"


def print_importances(importances: Any) -> None:
    """Each parameter's share of the importance as a bar of #s, most important first; or why there are none."""
    if not importances.shares:
        print(f"parameter importance: {importances.note}")
        return
    caution = f"; {importances.note}" if importances.note else ""
    print(f"\nparameter importance ({importances.method}{caution}):")
    width = max(len(k) for k in importances.shares)
    for key, share in importances.shares.items():
        print(f"  {key:<{width}}  {share:4.0%}  {'#' * round(share * 40)}")
    if importances.constant:
        print(f"  not compared (one value in every complete trial): {', '.join(importances.constant)}")


def format_param(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


app.add_typer(sweep_app, name="sweep", rich_help_panel=SCALE)
