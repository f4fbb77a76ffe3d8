"""`cnnlab sweep status`: which parameters mattered (PED-ANOVA importance), and the picture of a sweep
(trial history, importance bars, parallel coordinates). Studies are built in memory from made-up trials
whose metric depends on one parameter only, so the answer is known."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.sweep.plots import param_axis, param_importances, sweep_figure, top_quantile
from cnnlab.sweep.runner import plot_trials
from cnnlab.sweep.study import default_storage, open_storage

DISTS = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "dropout": FloatDistribution(0.0, 0.5),
         "width": CategoricalDistribution([8, 16, 32])}


def made_up_study(n: int, storage: str | None = None, name: str = "made-up", seed: int = 0) -> optuna.Study:
    """`n` complete trials whose accuracy is set by lr alone (best near 1e-2); dropout and width are noise."""
    rng = random.Random(seed)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("cnnlab.metric", "val_accuracy")
    for _ in range(n):
        params = {"lr": 10 ** rng.uniform(-4, -1), "dropout": rng.uniform(0, 0.5), "width": rng.choice([8, 16, 32])}
        accuracy = 0.95 - 0.1 * abs(math.log10(params["lr"]) + 2) + rng.gauss(0, 0.002)
        study.add_trial(create_trial(params=params, distributions=DISTS, value=accuracy))
    return study


@pytest.mark.unit
def test_the_parameter_that_sets_the_metric_is_found_the_most_important():
    importances = param_importances(made_up_study(40))
    assert list(importances.shares)[0] == "lr"
    assert importances.shares["lr"] > 0.6
    assert math.isclose(sum(importances.shares.values()), 1.0)
    assert importances.complete == 40 and importances.note == ""  # enough trials: no caution
    assert "best 4 of 40" in importances.method  # 10%, Optuna's default quantile


@pytest.mark.unit
def test_a_small_sweep_is_judged_by_at_least_two_trials_and_says_it_is_rough():
    assert top_quantile(5) == 0.4 and top_quantile(40) == 0.1 and top_quantile(2) == 0.5
    importances = param_importances(made_up_study(6))
    assert importances.shares and "rough guide" in importances.note and "only 6" in importances.note


@pytest.mark.unit
def test_no_importances_without_two_differing_complete_trials():
    study = made_up_study(1)
    assert param_importances(study).shares == {}
    assert "needs at least 2 complete trials (this sweep has 1)" in param_importances(study).note
    same = optuna.create_study(direction="minimize")
    for dropout in (0.1, 0.2, 0.3):
        same.add_trial(create_trial(params={"dropout": dropout, "width": 8}, value=1.0,
                                    distributions={"dropout": DISTS["dropout"], "width": DISTS["width"]}))
    found = param_importances(same)
    assert found.shares == {} and "same objective" in found.note and found.constant == ["width"]


@pytest.mark.unit
def test_a_parameter_with_one_value_is_not_compared_and_said_so():
    study = optuna.create_study(direction="maximize")
    rng = random.Random(1)
    for _ in range(12):
        lr = 10 ** rng.uniform(-4, -1)
        study.add_trial(create_trial(params={"lr": lr, "width": 16}, value=-abs(math.log10(lr) + 2),
                                     distributions={"lr": DISTS["lr"], "width": DISTS["width"]}))
    found = param_importances(study)
    assert list(found.shares) == ["lr"] and found.constant == ["width"]


@pytest.mark.unit
def test_failed_and_pruned_trials_do_not_count():
    study = made_up_study(3)
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.01}, distributions={"lr": DISTS["lr"]},
                                 intermediate_values={0: 0.5}))
    assert param_importances(study).complete == 3


@pytest.mark.unit
def test_axes_place_values_as_they_were_sampled():
    trials = made_up_study(5).get_trials()
    lr = param_axis("lr", trials)
    assert lr.label == "lr (log)"
    assert lr.position(1e-4) == pytest.approx(0.0) and lr.position(1e-1) == pytest.approx(1.0)
    assert lr.position(1e-2) == pytest.approx(2 / 3)  # log scale: two decades of three
    width = param_axis("width", trials)
    assert [label for _, label in width.ticks] == ["8", "16", "32"]
    assert width.position(16) == 0.5 and math.isnan(width.position(64))
    ints = [create_trial(params={"depth": d}, distributions={"depth": IntDistribution(1, 9)}, value=0.0)
            for d in (1, 5, 9)]
    depth = param_axis("depth", ints)
    assert depth.position(5) == 0.5 and all(label.isdigit() for _, label in depth.ticks)


def figure_pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


@pytest.mark.unit
@pytest.mark.parametrize("trials", [0, 1, 30])
def test_the_figure_draws_for_any_number_of_trials(trials):
    """Three panels always; with no or one trial each says in words what is missing instead of drawing nothing."""
    fig = sweep_figure(made_up_study(trials))
    titles = [ax.get_title() for ax in fig.axes]
    assert "each trial's metric" in titles and "which parameters mattered" in titles
    assert any(title.startswith("parameters of the complete trials") for title in titles)
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    if trials == 0:
        assert "no trial has reported a metric yet" in texts and "no trial completed" in texts
    elif trials == 1:
        assert "needs at least 2 complete trials" in texts.replace("\n", " ")
    else:
        bars = next(ax for ax in fig.axes if ax.get_title() == "which parameters mattered")
        assert [tick.get_text() for tick in bars.get_yticklabels()][0] == "lr"  # most important on top
        parallel = next(ax for ax in fig.axes if ax.get_title().startswith("parameters of"))
        assert [tick.get_text() for tick in parallel.get_xticklabels()][:2] == ["val_accuracy", "lr (log)"]
        assert len(parallel.lines) >= trials  # one line per complete trial (plus the tick marks)
    assert figure_pixels(fig).std() > 0  # something was drawn


def test_status_prints_the_importances_and_plot_writes_the_picture(tmp_path):
    runs = tmp_path / "runs"
    journal = default_storage(runs, "made-up")
    Path(journal).parent.mkdir(parents=True)
    made_up_study(25, storage=open_storage(journal))  # type: ignore[arg-type]
    plot = tmp_path / "sweep.png"
    result = CliRunner().invoke(app, ["sweep", "status", "made-up", "--runs-dir", str(runs), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("parameter importance (PED-ANOVA"))
    first = lines[start + 1].split()
    assert first[0] == "lr" and first[2].startswith("#")  # most important first, with its bar
    assert {lines[start + k].split()[0] for k in (1, 2, 3)} == {"lr", "dropout", "width"}
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (1200, 850)


@pytest.mark.unit
def test_plot_trials_returns_the_importances_it_drew(tmp_path):
    study = made_up_study(8)
    drawn = plot_trials(study, tmp_path / "s.svg")
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")
    assert drawn.shares == param_importances(study).shares
