"""The sweep file: W&B's format (method, metric, parameters, early_terminate) plus cnnlab's keys,
parsed into a SweepSpec whose parameter keys are checked against the config before anything runs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from optuna.trial import Trial

from cnnlab.config import Config, load_config
from cnnlab.config.resolve import read_yaml
from cnnlab.errors import UserError

METHODS = ("grid", "random", "bayes")
METRICS = {"val_accuracy": "val_accuracy", "val_acc": "val_accuracy", "accuracy": "val_accuracy",
           "val_loss": "val_loss", "loss": "val_loss"}  # the lesson's W&B names -> our history keys
DISTRIBUTIONS = ("uniform", "int_uniform", "q_uniform", "log_uniform", "log_uniform_values")
SWEEP_KEYS = {"method", "metric", "parameters", "early_terminate", "model", "dataset", "set", "name", "seed",
              "program", "description", "project", "entity", "command"}  # the last five: W&B's, ignored


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
    fixed: list[str] = field(default_factory=list)  # `set:` overrides every trial gets, KEY=VALUE
    early_terminate: dict | None = None
    seed: int = 0
    name: str | None = None
    epochs: int | None = None  # of the checked trial config: hyperband's default max_iter

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> dict[str, list[Any]]:
        return {p.key: p.grid_values() for p in self.parameters}

    def grid_size(self) -> int:
        return math.prod(len(p.grid_values()) for p in self.parameters)


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


