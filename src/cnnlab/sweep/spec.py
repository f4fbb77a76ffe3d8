"""The sweep file: W&B's format (method, metric, parameters, early_terminate) plus cnnlab's keys,
parsed into a SweepSpec whose parameter keys are checked against the config before anything runs."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from optuna.trial import Trial

from cnnlab.config import Config, ConfigError, load_config
from cnnlab.config.schema import DataConfig
from cnnlab.config.yamlfile import FileRefused, YAMLProblem, read_yaml_file
from cnnlab.data.registry import DEFAULT_MODEL_LINE, default_model
from cnnlab.errors import UserError
from cnnlab.files import check_regular
from cnnlab.suggest import did_you_mean

METHODS = ("grid", "random", "bayes")
METRICS = {"val_accuracy": "val_accuracy", "val_acc": "val_accuracy", "accuracy": "val_accuracy",
           "val_loss": "val_loss", "loss": "val_loss"}  # the lesson's W&B names -> our history keys
DISTRIBUTIONS = ("uniform", "int_uniform", "q_uniform", "log_uniform", "log_uniform_values")
SWEEP_KEYS = {"method", "metric", "parameters", "early_terminate", "model", "dataset", "set", "name", "seed",
              "program", "description", "project", "entity", "command"}  # the last five: W&B's, ignored
PARAMETER_KEYS = ("values", "value", "min", "max", "distribution", "q")
EARLY_KEYS = ("type", "min_iter", "max_iter", "eta")
MAX_GRID = 100_000  # grid points a sweep may visit (a bigger grid is refused before it is enumerated)
MAX_TRIALS = 100_000  # --trials
MAX_WORKERS = 64  # --workers: processes on one machine
MAX_SEED = 2**32 - 1  # the samplers' seed range
MAX_NAME = 200  # characters of a sweep name (a folder name)
LOG_E_MAX = math.log(sys.float_info.max)  # log_uniform's max: e**max must be a finite float


class SweepError(UserError, ValueError):
    """A sweep file or sweep storage problem; the message names the key or file."""


# ------------------------------------------------------------------------------------ sweep file
@dataclass
class Parameter:
    """One searched config key: a list of values, or a range with a W&B distribution name."""

    key: str
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    distribution: str | None = None
    q: float | None = None  # step for q_uniform

    def first(self) -> Any:
        """The value used to check, before anything runs, that some trial config reads this key."""
        return self.values[0] if self.values is not None else self.bounds()[0]

    def bounds(self) -> tuple[Any, Any]:
        """The range in the config's own units (log_uniform gives exponents of e)."""
        if self.low is None or self.high is None:
            raise SweepError(f"parameters.{self.key}: a list of values has no range (min, max)")
        if self.distribution == "log_uniform":
            return math.exp(self.low), math.exp(self.high)
        return self.low, self.high

    def grid_values(self) -> list[Any]:
        """The values of a grid parameter (parse_sweep checked that a grid gives each a list)."""
        if self.values is None:
            raise SweepError(f"parameters.{self.key}: method grid needs `values: [...]`, not a range")
        return self.values

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
    fixed: list[tuple[str, Any]] = field(default_factory=list)  # `set:` overrides every trial gets, as read
    early_terminate: dict | None = None
    seed: int = 0
    name: str | None = None
    epochs: int | None = None  # of the checked trial config: hyperband's default max_iter
    model_line: str | None = None  # how the model was chosen when the file names none and the dataset's is not seed

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> dict[str, list[Any]]:
        return {p.key: p.grid_values() for p in self.parameters}

    def grid_size(self) -> int:
        return math.prod(len(p.grid_values()) for p in self.parameters)


def read_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file; a key no trial's config would read is an error before anything runs.

    The file is read by the config package's YAML reader (a bounded regular UTF-8 file, no repeated
    keys, no alias bombs); every problem is one SweepError line that names the file.
    """
    try:
        check_regular(path, "sweep file")  # a folder first: files.read_bytes lets it through as IsADirectoryError
        data = read_yaml_file(path, "sweep file")
    except (FileRefused, YAMLProblem) as exc:  # both name the file already
        raise SweepError(str(exc)) from None
    if data is None:
        raise SweepError(f"{path}: the sweep file is empty; expected a mapping with method, metric and parameters")
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping of sweep keys (method, metric, parameters, ...), "
                         f"found a YAML {yaml_kind(data)}")
    try:
        spec = parse_sweep(data)
        check_keys(spec)
    except (SweepError, ConfigError) as exc:
        raise SweepError(f"{path}: {exc}") from None
    return spec


def yaml_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value),
                                                                                           type(value).__name__)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (YAML's true is not 1 here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_sweep(data: dict[str, Any]) -> SweepSpec:
    """A SweepSpec from the mapping of a sweep file (W&B sweep format plus model, dataset, set).

    Every value is checked here, before anything runs: ranges, distributions, grid size, seed, early
    termination; a problem is a SweepError naming the key (`parameters.<key>`, `seed`, ...).
    """
    unknown = sorted(str(k) for k in data if k not in SWEEP_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key {unknown[0]!r}{did_you_mean(unknown[0], SWEEP_KEYS)} "
                         f"(sweep keys: {', '.join(sorted(SWEEP_KEYS))})")
    method = data.get("method", "random")
    if not isinstance(method, str) or method not in METHODS:
        raise SweepError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    metric, goal = parse_metric(data.get("metric") or {"name": "val_accuracy", "goal": "maximize"})
    params = data.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise SweepError("parameters: expected a mapping of config key -> {values: [...]} or {min, max}")
    model, dataset, name = (optional_text(data, key) for key in ("model", "dataset", "name"))
    if name is not None:
        check_name(name, "name")
    fixed = parse_set(data.get("set"))
    searched = []
    for key, body in params.items():
        if isinstance(body, dict) and "value" in body:  # W&B's constant parameter
            if len(body) > 1:
                raise SweepError(f"parameters.{key}: a constant `value` takes no other keys, found "
                                 f"{', '.join(sorted(str(k) for k in body if k != 'value'))}")
            fixed.append((str(key), body["value"]))
        else:
            searched.append(parse_parameter(str(key), body))
    if not searched:
        raise SweepError("parameters: nothing to search (every parameter has a single `value`)")
    if method == "grid":
        if any(p.values is None for p in searched):
            raise SweepError("method grid needs `values: [...]` for every parameter "
                             f"({', '.join(p.key for p in searched if p.values is None)} give a range)")
        size = math.prod(len(p.grid_values()) for p in searched)  # counted, never enumerated
        if size > MAX_GRID:
            raise SweepError(f"parameters: the grid has {size:,} points, more than the {MAX_GRID:,} a sweep may "
                             f"visit ({' x '.join(str(len(p.grid_values())) for p in searched)}); use fewer values "
                             "or method random")
    chosen = model or dataset_default_model(dataset, fixed)
    return SweepSpec(method, metric, goal, searched, chosen, dataset, fixed,
                     parse_early_terminate(data.get("early_terminate")), parse_seed(data.get("seed", 0)), name,
                     model_line=None if model or chosen == "seed" else DEFAULT_MODEL_LINE)


def dataset_default_model(dataset: str | None, fixed: list[tuple[str, Any]]) -> str:
    """The model `cnnlab train --dataset DATASET` trains when none is named (photos for a colour image folder)."""
    channels = dict(fixed).get("data.channels", DataConfig.channels)
    data = DataConfig(dataset=dataset or DataConfig.dataset, channels=channels if whole(channels) else 3)
    return default_model(data)


def optional_text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise SweepError(f"{key}: expected a name (text), found {value!r}")
    return value


def parse_set(values: Any) -> list[tuple[str, Any]]:
    """`set:` (overrides every trial gets) as (key, value) pairs: each value as the sweep file's YAML read it
    (as KEY=VALUE text it was read again, and the string "yes" became true, "x #note" became x)."""
    if values is None:
        return []
    if not isinstance(values, dict):
        raise SweepError(f"set: expected a mapping of config key -> value, found a YAML {yaml_kind(values)}")
    return [(str(key), value) for key, value in values.items()]


def parse_seed(seed: Any) -> int:
    if not whole(seed) or not 0 <= seed <= MAX_SEED:
        raise SweepError(f"seed: expected a whole number from 0 to {MAX_SEED}, found {seed!r}")
    return int(seed)


def parse_early_terminate(early: Any) -> dict[str, Any] | None:
    """W&B's {type: hyperband, min_iter, eta, max_iter}, each checked: eta >= 2, 1 <= min_iter <= max_iter."""
    if early is None:
        return None
    if not isinstance(early, dict) or early.get("type") != "hyperband":
        raise SweepError(f"early_terminate: expected {{type: hyperband, min_iter: 1, eta: 3}}, found {early!r}")
    unknown = sorted(str(k) for k in early if k not in EARLY_KEYS)
    if unknown:
        raise SweepError(f"early_terminate.{unknown[0]}: not supported (early_terminate takes "
                         f"{', '.join(sorted(EARLY_KEYS))})")
    checked: dict[str, int] = {}
    for key, default, low in (("min_iter", 1, 1), ("eta", 3, 2), ("max_iter", None, 1)):
        value = early.get(key, default)
        if value is None:
            continue
        if not whole(value) or value < low:
            raise SweepError(f"early_terminate.{key}: expected a whole number >= {low}, found {value!r}")
        checked[key] = int(value)
    if checked.get("max_iter", checked["min_iter"]) < checked["min_iter"]:
        raise SweepError(f"early_terminate.max_iter: {checked['max_iter']} is less than min_iter "
                         f"{checked['min_iter']}")
    return {"type": "hyperband", **checked}


def check_name(name: str, where: str = "--name") -> str:
    """A sweep name is a folder under <runs-dir>/sweeps/: one plain path component."""
    if (not name or name in (".", "..") or len(name) > MAX_NAME or any(c in name for c in "/\\")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise SweepError(f"{where} {name!r}: expected a sweep name of at most {MAX_NAME} characters without "
                         "slashes or control characters (it names the folder <runs-dir>/sweeps/<name>)")
    return name


def check_counts(trials: int, workers: int) -> None:
    """--trials and --workers within what one machine and one study can hold."""
    if not whole(trials) or not 1 <= trials <= MAX_TRIALS:
        raise SweepError(f"--trials {trials!r}: expected a whole number from 1 to {MAX_TRIALS:,}")
    if not whole(workers) or not 1 <= workers <= MAX_WORKERS:
        raise SweepError(f"--workers {workers!r}: expected a whole number from 1 to {MAX_WORKERS} (worker "
                         "processes on this machine; start the sweep on more machines to share a study)")


def parse_metric(metric: Any) -> tuple[str, str]:
    if not isinstance(metric, dict) or "name" not in metric:
        raise SweepError(f"metric: expected {{name: val_accuracy, goal: maximize}}, found {metric!r}")
    unknown = sorted(str(k) for k in metric if k not in ("name", "goal", "target"))
    if unknown:
        raise SweepError(f"metric.{unknown[0]}: not a metric key (expected name and goal)")
    name = METRICS.get(metric["name"]) if isinstance(metric["name"], str) else None
    if name is None:
        raise SweepError(f"metric {metric['name']!r}: expected one of {', '.join(METRICS)}")
    goal = metric.get("goal", "maximize" if name == "val_accuracy" else "minimize")
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"metric goal {goal!r}: expected maximize or minimize")
    return name, goal


def parse_parameter(key: str, body: Any) -> Parameter:
    """One `parameters:` entry: {values: [...]} or {min, max, distribution?, q?}, range-checked."""
    where = f"parameters.{key}"
    if not isinstance(body, dict):
        raise SweepError(f"{where}: expected {{values: [...]}} or {{min: ..., max: ...}}, found {body!r}")
    unknown = sorted(str(k) for k in body if k not in PARAMETER_KEYS)
    if unknown:
        raise SweepError(f"{where}.{unknown[0]}: not a parameter key{did_you_mean(unknown[0], PARAMETER_KEYS)} "
                         "(expected values, value, or min, max, distribution and q)")
    if "values" in body:
        extra = sorted(str(k) for k in body if k != "values")
        if extra:
            raise SweepError(f"{where}: `values` takes no {', '.join(extra)}; give a list or a range, not both")
        return Parameter(key, values=parse_values(where, body["values"]))
    if "min" not in body or "max" not in body:
        raise SweepError(f"{where}: expected values, value, or min and max")
    low, high = body["min"], body["max"]
    for bound, value in (("min", low), ("max", high)):
        if not is_number(value) or not math.isfinite(value):
            raise SweepError(f"{where}.{bound}: expected a finite number, found {value!r}")
    if low > high:
        raise SweepError(f"{where}: min {low} is more than max {high}")
    distribution = body.get("distribution", "int_uniform" if whole(low) and whole(high) else "uniform")
    if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
        raise SweepError(f"{where}.distribution {distribution!r}: expected one of {', '.join(DISTRIBUTIONS)}")
    if distribution == "int_uniform":
        if not all(float(v).is_integer() for v in (low, high)):
            raise SweepError(f"{where}: int_uniform needs whole-number min and max, found {low} and {high}")
        low, high = int(low), int(high)
    if distribution == "log_uniform_values" and low <= 0:
        raise SweepError(f"{where}.min: log_uniform_values needs min > 0, found {low}")
    if distribution == "log_uniform" and not (high <= LOG_E_MAX and math.exp(low) > 0):
        raise SweepError(f"{where}: log_uniform's min and max are exponents of e; e**{low} .. e**{high} is not a "
                         "range of positive finite numbers (for the values themselves use log_uniform_values)")
    q = body.get("q", 1.0 if distribution == "q_uniform" else None)  # W&B's default step
    if q is not None:
        if distribution != "q_uniform":
            raise SweepError(f"{where}.q: a step only goes with distribution q_uniform, not {distribution}")
        if not is_number(q) or not math.isfinite(q) or q <= 0:
            raise SweepError(f"{where}.q: expected a finite number > 0, found {q!r}")
        q = float(q)
    return Parameter(key, low=low, high=high, distribution=distribution, q=q)


def parse_values(where: str, values: Any) -> list[Any]:
    """A non-empty list of distinct plain values (text, numbers, booleans, null), as Optuna can store them."""
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}.values: expected a non-empty list, found {values!r}")
    seen: set[tuple[type, Any]] = set()
    for value in values:
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise SweepError(f"{where}.values: {value!r} is a YAML {yaml_kind(value)}; each value must be text, a "
                             "number, a boolean or null (search nested keys one by one, e.g. model.conv.0.filters)")
        if isinstance(value, float) and not math.isfinite(value):
            raise SweepError(f"{where}.values: {value} is not a finite number")
        if (type(value), value) in seen:
            raise SweepError(f"{where}.values: {value!r} appears twice; give each value once")
        seen.add((type(value), value))
    return list(values)


def trial_overrides(spec: SweepSpec, params: dict[str, Any]) -> list[tuple[str, Any]]:
    """What a trial's config is made of: the fixed `set:` and the sampled parameters, values as they are."""
    return [*spec.fixed, *params.items()]


def trial_config(spec: SweepSpec, params: dict[str, Any]) -> Config:
    data = {"dataset": spec.dataset} if spec.dataset else {}
    return load_config(spec.model, None, trial_overrides(spec, params), data=data)


def check_keys(spec: SweepSpec) -> None:
    """Resolve a config with every parameter's first (or min) value: an unread key raises ConfigError.

    Also checks hyperband's min_iter against the trials' epochs (its default max_iter).
    """
    spec.epochs = trial_config(spec, {p.key: p.first() for p in spec.parameters}).train.epochs
    early = spec.early_terminate or {}
    if early and "max_iter" not in early and early["min_iter"] > spec.epochs:
        raise SweepError(f"early_terminate.min_iter: {early['min_iter']} is more than the {spec.epochs} epochs a "
                         "trial trains; lower it or give max_iter")


