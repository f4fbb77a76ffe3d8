"""What a sweep found, as numbers and one picture: which parameters mattered (Optuna's PED-ANOVA
importance, which needs no scikit-learn) and a figure of three panels: each trial's metric, the
importances as bars, and the complete trials' parameters as parallel coordinates coloured by the metric.

Writing the figure (the --plot target, atomically) is `runner.plot_trials`; matplotlib is imported
only when a figure is drawn.
"""
from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METHOD = "PED-ANOVA"  # Optuna's default evaluator; fANOVA and mean-decrease-impurity need scikit-learn
FEW_TRIALS = 10  # below this many complete trials the importances are a rough guide, and say so


# ------------------------------------------------------------------------------------ importance
@dataclass
class Importances:
    """Which parameters mattered: each one's share of the total importance (0-1, most important first).

    `shares` is empty when they cannot be told apart, and `note` says why in one line; `method` says
    in words how they were computed.
    """

    shares: dict[str, float]
    method: str
    note: str
    complete: int  # complete trials they were computed from
    constant: list[str] = field(default_factory=list)  # parameters with one value in every complete trial


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials with a finite objective, by trial number (the ones the sampler and ranking use)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if t.value is not None and math.isfinite(t.value)]


def value_of(trial: FrozenTrial) -> float:
    """A complete trial's objective (`complete_trials` keeps only those that have a finite one)."""
    if trial.value is None:
        raise ValueError(f"trial {trial.number} has no objective value")
    return float(trial.value)


def metric_name(study: optuna.Study) -> str:
    """The metric the sweep optimises (recorded by `cnnlab sweep run`), else Optuna's word for it."""
    return str(study.user_attrs.get("cnnlab.metric") or "objective")


def top_quantile(complete: int) -> float:
    """The share of complete trials PED-ANOVA calls "the best": 10% (Optuna's default) once there are 20,
    else enough for two trials (half of them at most), so a small sweep is not judged by one trial."""
    return max(0.1, min(0.5, 2 / complete))


def param_importances(study: optuna.Study) -> Importances:
    """How much each parameter mattered to reach the best trials, from the complete trials (PED-ANOVA).

    Needs at least 2 complete trials whose parameters and metric differ; otherwise `shares` is empty and
    `note` says what is missing. Parameters absent from some trials are judged on the trials that have them.
    """
    trials = complete_trials(study)
    n = len(trials)
    best = max(1, math.ceil(top_quantile(max(n, 2)) * n))
    method = f"{METHOD}, the best {best} of {n} complete trials against all {n}"
    if n < 2:
        return Importances({}, method, f"needs at least 2 complete trials (this sweep has {n})", n)
    values: dict[str, set[str]] = {}
    for t in trials:
        for key, value in t.params.items():
            values.setdefault(key, set()).add(repr(value))
    varying = sorted(k for k, seen in values.items() if len(seen) > 1)
    constant = sorted(k for k, seen in values.items() if len(seen) == 1)
    if not varying:
        what = (f"each parameter took one value ({', '.join(constant)}) in" if constant else "no parameters in")
        return Importances({}, method, f"nothing to compare: {what} the {n} complete trials", n, constant)
    if len({t.value for t in trials}) == 1:
        return Importances({}, method, f"every complete trial has the same {metric_name(study)}: no parameter "
                           "made a difference", n, constant)
    try:
        with warnings.catch_warnings():  # Optuna's cautions about few trials: said once, in `note`, instead
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=top_quantile(n)),
                params=varying, normalize=False)
    except (ValueError, ArithmeticError, TypeError) as exc:  # the picture and the table go on without them
        return Importances({}, method, f"could not compute them: {' '.join(str(exc).split())}", n, constant)
    total = sum(raw.values())
    if not math.isfinite(total) or total <= 0:
        return Importances({}, method, "no parameter sets the best trials apart from the others", n, constant)
    shares = dict(sorted(((k, v / total) for k, v in raw.items()), key=lambda kv: -kv[1]))
    note = f"only {n} complete trials: a rough guide" if n < FEW_TRIALS else ""
    return Importances(shares, method, note, n, constant)


# ---------------------------------------------------------------------------------------- figure
def sweep_figure(study: optuna.Study, importances: Importances | None = None) -> Figure:
    """The sweep in one figure (12 x 8.5 inches): trial history and importance above, parallel coordinates
    below; `importances` are computed unless given."""
    from cnnlab.inspect.figures import new_figure

    if importances is None:
        importances = param_importances(study)
    fig = new_figure(12, 8.5)
    grid = fig.add_gridspec(2, 2, width_ratios=(3, 2), height_ratios=(1, 1.25))
    draw_history(fig.add_subplot(grid[0, 0]), study)
    draw_importances(fig.add_subplot(grid[0, 1]), importances)
    draw_parallel(fig, fig.add_subplot(grid[1, :]), study, list(importances.shares))
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in TrialState
                       if any(t.state == s for t in trials))
    fig.suptitle(f"sweep {study.study_name}: {plural(len(trials), 'trial')} ({counts or 'none yet'}), "
                 f"{study.direction.name.lower()} {metric_name(study)}", fontsize=13)
    return fig


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def draw_history(ax: Axes, study: optuna.Study) -> None:
    """Each trial's final metric by trial number (pruned ones at their last reported value), and the best so far."""
    for state, colour in ((TrialState.COMPLETE, "tab:blue"), (TrialState.PRUNED, "tab:red")):
        points = [(t.number, t.value if t.value is not None else list(t.intermediate_values.values())[-1])
                  for t in study.get_trials(deepcopy=False, states=(state,)) if t.value is not None
                  or t.intermediate_values]
        if points:
            ax.scatter(*zip(*points), color=colour, label=state.name.lower())
    complete = [(t.number, value_of(t)) for t in complete_trials(study)]
    if complete:
        best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
        running = [best(v for _, v in complete[: i + 1]) for i in range(len(complete))]
        ax.step([n for n, _ in complete], running, where="post", color="tab:green", label="best so far")
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    if failed:  # no metric to place them by: a row of crosses along the bottom
        ax.scatter(failed, [0.03] * len(failed), marker="x", color="0.4", transform=ax.get_xaxis_transform(),
                   label="failed (no metric)")
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    if numbers:
        ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    from matplotlib.ticker import MaxNLocator

    if len(numbers) <= 10:  # few trials: a tick at each (the locator would fill a short range with fractions)
        ax.set_xticks(numbers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation metric ({metric_name(study)})")
    ax.set_title("each trial's metric")
    ax.grid(alpha=0.3)
    if ax.collections or ax.lines:
        ax.legend(loc="best", fontsize=8)
    else:
        note(ax, "no trial has reported a metric yet")


def draw_importances(ax: Axes, importances: Importances) -> None:
    """Horizontal bars, most important on top, with each share in percent; a note instead when there are none."""
    ax.set_title("which parameters mattered")
    if not importances.shares:
        note(ax, f"parameter importance: {importances.note}")
        ax.set_yticks([])
        ax.set_xticks([])
        return
    caption = (f"share of importance: how far the best trials' values of each parameter are from those of all "
               f"trials ({importances.method})")
    if importances.note:
        caption += f"; {importances.note}"
    if importances.constant:
        caption += f"; not compared (one value): {', '.join(importances.constant)}"
    ax.set_xlabel("\n".join(textwrap.wrap(caption, 70)), fontsize=8)
    names, shares = list(importances.shares), list(importances.shares.values())
    rows = range(len(names))
    ax.barh(rows, shares, color="tab:purple")
    ax.set_yticks(rows, names)
    ax.invert_yaxis()  # the most important on top
    ax.set_xlim(0, 1.15)  # room for the percentages after the longest bar
    for row, share in zip(rows, shares):
        ax.text(share + 0.02, row, f"{share:.0%}", va="center", fontsize=9)
    from matplotlib.ticker import PercentFormatter

    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))


def note(ax: Axes, text: str) -> None:
    """A panel's message, centred and wrapped, where its picture would be."""
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 45)), ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="0.3")


# --------------------------------------------------------------------------- parallel coordinates
@dataclass
class ParallelAxis:
    """One vertical axis: where a value sits on it (0 bottom .. 1 top, NaN if the trial lacks it) and its ticks."""

    label: str
    position: Callable[[Any], float]
    ticks: list[tuple[float, str]]  # (position, label)


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def numeric_axis(label: str, low: float, high: float, log: bool, integer: bool) -> ParallelAxis:
    """A linear or log10 axis from `low` to `high`, with a handful of round ticks inside."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    def scale(value: float) -> float:
        return math.log10(value) if log else value

    lo, hi = scale(low), scale(high)

    def position(value: Any) -> float:
        if value is None or isinstance(value, (bool, str)):
            return math.nan
        return 0.5 if hi == lo else (scale(float(value)) - lo) / (hi - lo)

    if hi == lo:
        return ParallelAxis(label, position, [(0.5, format_value(low))])
    if log:
        candidates: Sequence[float] = LogLocator(base=10).tick_values(low, high)
        if sum(low <= v <= high for v in candidates) < 3:  # less than a decade or so: 1, 2, 5 steps
            candidates = LogLocator(base=10, subs=(1.0, 2.0, 5.0)).tick_values(low, high)
    else:
        candidates = MaxNLocator(nbins=5, integer=integer).tick_values(low, high)
    inside = [float(v) for v in candidates if low - 1e-12 * abs(low) <= v <= high + 1e-12 * abs(high)]
    if len(inside) < 2:
        inside = [low, high]
    shown = (lambda v: str(int(round(v)))) if integer else format_value
    return ParallelAxis(label + (" (log)" if log else ""), position, [(position(v), shown(v)) for v in inside])


def param_axis(key: str, trials: list[FrozenTrial]) -> ParallelAxis:
    """The axis of parameter `key`, from its distribution in the trials that have it: log-scaled when it was
    sampled log-uniform, evenly spaced labelled ticks when it was chosen from values."""
    have = [t for t in trials if key in t.params]
    dist = have[-1].distributions[key]
    seen = [t.params[key] for t in have]
    if isinstance(dist, CategoricalDistribution):
        choices: list[Any] = []
        for t in have:
            d = t.distributions[key]
            choices += [c for c in getattr(d, "choices", [t.params[key]]) if c not in choices]
        if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            choices.sort()  # numbers from `values:` in their order, whatever order the file listed them in
        spot = {repr(c): (0.5 if len(choices) == 1 else i / (len(choices) - 1)) for i, c in enumerate(choices)}
        return ParallelAxis(key, lambda v: spot.get(repr(v), math.nan), [(p, format_value(c)) for c, p in
                                                                          zip(choices, spot.values())])
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        numbers = [float(v) for v in seen]
        return numeric_axis(key, min(dist.low, *numbers), max(dist.high, *numbers), dist.log,
                            isinstance(dist, IntDistribution))
    numbers = [float(v) for v in seen if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return numeric_axis(key, min(numbers, default=0.0), max(numbers, default=0.0), False, False)


def draw_parallel(fig: Figure, ax: Axes, study: optuna.Study, order: list[str]) -> None:
    """One line per complete trial through the metric's axis and each parameter's, coloured by the metric
    (brighter is better) with the best trial drawn thick; axes of the most important parameters first."""
    trials = complete_trials(study)
    metric = metric_name(study)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ax.set_title("parameters of the complete trials, one line each, coloured by the metric (brighter is better"
                 + (f"; thick: the best, trial {study.best_trial.number})" if trials else ")"))
    keys = [k for k in order if any(k in t.params for t in trials)]
    keys += sorted({k for t in trials for k in t.params} - set(keys))
    if not trials or not keys:
        note(ax, "parallel coordinates: " + ("no trial completed" if not trials else "the trials have no "
                                             "parameters"))
        ax.set_xticks([])
        ax.set_yticks([])
        return
    values = [value_of(t) for t in trials]
    axes = [numeric_axis(metric, min(values), max(values), False, False)]
    axes += [param_axis(k, trials) for k in keys]
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = colormaps["viridis" if maximize else "viridis_r"]
    spread = max(values) > min(values)
    norm = Normalize(min(values), max(values)) if spread else Normalize(min(values) - 1, min(values) + 1)
    best = study.best_trial
    xs = [float(x) for x in range(len(axes))]
    for t in sorted(trials, key=lambda t: value_of(t) if maximize else -value_of(t)):  # the best drawn last, on top
        ys = [axes[0].position(value_of(t))] + [axis.position(t.params.get(k)) for axis, k in zip(axes[1:], keys)]
        thick = t.number == best.number
        ax.plot(xs, ys, color=cmap(norm(value_of(t))), lw=3.2 if thick else 1.4, alpha=1.0 if thick else 0.8,
                marker="o", ms=4, zorder=3 if thick else 2)
    for x, axis in zip(xs, axes):
        ax.axvline(x, color="0.2", lw=1, zorder=1)
        for y, text in axis.ticks:
            ax.plot([x - 0.02, x], [y, y], color="0.2", lw=1, zorder=1)
            ax.text(x - 0.03, y, text, ha="right", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5}, zorder=4)
    ax.set_xticks(xs, [axis.label for axis in axes], fontsize=9)
    ax.set_xlim(-0.35, len(axes) - 0.8)
    ax.set_ylim(-0.06, 1.06)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    missing = sum(k not in t.params for t in trials for k in keys)
    if missing:
        ax.set_xlabel("a break in a line: that trial has no value for the parameter", fontsize=8)
    if spread:  # one value (or all equal): its tick on the metric's axis says it, a colour scale would not
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric, pad=0.01, fraction=0.03)
