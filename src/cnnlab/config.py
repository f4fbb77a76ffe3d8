"""Typed configuration: dataclasses for data, model and training; presets, files and overrides.

Config flows one way: preset file -> user file -> `--set` overrides -> knobs substituted ->
dataclasses (unknown keys are errors) -> builders. The resolved config is saved with every run and
the model is rebuilt from it.

Knobs are the lesson's plain config keys (filters, kernel width/height, dense size, dropout). A
preset declares them under `knobs:` and its layer list reads them as `$name`, so `--set dropout=0.4`
reshapes the network the way the lesson's `config.dropout = 0.4` did.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ACTIVATIONS = ("relu", "gelu", "elu", "leaky_relu", "tanh", "sigmoid", "none")
POOLS = (None, "max", "avg")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "onecycle", "cosine")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what was expected."""


@dataclass
class ConvBlock:
    """Conv2D -> [BatchNorm] -> activation -> [pool] -> [dropout]."""

    filters: int = 32  # output channels (feature maps)
    kernel_size: int | list[int] = 3  # pixels; one int, or [height, width]
    stride: int = 1  # pixels the kernel moves per step
    padding: str | int = "valid"  # "valid" shrinks the image, "same" keeps its size, or zeros per side
    activation: str = "relu"
    batch_norm: bool = False  # normalise each channel over the batch (helps deeper nets train fast)
    pool: str | None = None  # "max", "avg" or None
    pool_size: int = 2  # a 2x2 pool halves each side
    dropout: float = 0.0  # fraction of activations zeroed in training, after the pool


@dataclass
class DenseLayer:
    """[dropout] -> Linear -> activation. Dropout on the layer's input, where the lesson puts it."""

    units: int = 128
    activation: str = "relu"
    dropout: float = 0.0


@dataclass
class ModelConfig:
    """conv blocks -> flatten -> dense layers -> classifier (softmax over the dataset's classes)."""

    name: str = "custom"
    conv: list[ConvBlock] = field(default_factory=list)
    dense: list[DenseLayer] = field(default_factory=list)
    classifier_dropout: float = 0.0  # dropout on the classifier's input


@dataclass
class DataConfig:
    dataset: str = "mnist-sample"  # a registered dataset name (`cnnlab datasets list`)
    data_dir: str | None = None  # folder holding <dataset>/<IDX files>; None: $CNNLAB_DATA, cache, system
    val_size: int | None = None  # training images held out for validation; None: the dataset's default
    allow_checksum_mismatch: bool = False  # use local files whose checksums differ (recorded in the run)


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 32  # images per optimisation step
    optimizer: str = "adam"  # adam, adamw or sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"  # learning rate over the run: constant, onecycle or cosine
    label_smoothing: float = 0.0  # target probability moved from the true class to the others
    seed: int = 0  # seeds the validation split, initial weights, data order and dropout
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    eval_batch_size: int = 1000  # images per forward pass when evaluating (memory, not results)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


# ---------------------------------------------------------------------------------------- presets
def preset_dir() -> Path:
    return Path(str(resources.files("cnnlab") / "presets"))


def list_presets() -> list[str]:
    """Names of the shipped presets (each a YAML file a user can copy and edit)."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}{nearest(name, list_presets())} "
                          f"(presets: {', '.join(list_presets())})")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with errors that name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, knobs), "
                          f"found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------- loading
def load_config(model: str | None = "seed", file: str | Path | None = None,
                overrides: list[str] | None = None, **section_values: dict[str, Any]) -> Config:
    """Resolve a config: preset `model`, then YAML `file`, then `key=value` overrides.

    `section_values` (e.g. data={"dataset": "mnist"}) are applied like overrides, for callers that
    have typed values at hand (the CLI's --dataset, --epochs).
    """
    raw: dict[str, Any] = read_yaml(preset_path(model)) if model else {}
    user_keys: set[str] = set()
    if file is not None:
        user = read_yaml(file)
        user_keys |= {f"knobs.{k}" for k in user.get("knobs") or {}}
        raw = merge(raw, user)
    for section, values in section_values.items():
        for key, value in values.items():
            set_path(raw, f"{section}.{key}", value)
    for item in overrides or []:
        key, value = parse_override(item)
        user_keys.add(apply_override(raw, key, value))
    return resolve(raw, user_keys)


def resolve(raw: dict[str, Any], user_keys: set[str] = frozenset()) -> Config:
    """Substitute knobs and build the typed config; knobs the user set that nothing reads are errors."""
    raw = copy.deepcopy(raw)
    knobs = raw.pop("knobs", None) or {}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown config section {key!r}{nearest(key, [*SECTIONS, 'knobs'])} "
                          f"(sections: data, model, train, knobs)")
    used: set[str] = set()
    raw = substitute(raw, knobs, used)
    for key in sorted(user_keys):
        if key.startswith("knobs.") and key[6:] not in used:
            raise ConfigError(f"config key {key[6:]!r} is read by nothing in this model: no layer uses it "
                              f"(knobs this model reads: {', '.join(sorted(used)) or 'none'})")
    config = Config(**{name: build(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()})
    validate(config)
    return config


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Rebuild a saved (resolved) config; used to rebuild a run's model from its config.yaml."""
    try:
        return resolve(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two mappings; lists and scalars in `update` replace those in `base`."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def substitute(node: Any, knobs: dict[str, Any], used: set[str]) -> Any:
    """Replace every "$name" string with the value of knob `name`."""
    if isinstance(node, dict):
        return {k: substitute(v, knobs, used) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, knobs, used) for v in node]
    if isinstance(node, str) and node.startswith("$"):
        name = node[1:]
        if name not in knobs:
            raise ConfigError(f"{node!r} refers to no knob{nearest(name, list(knobs))} "
                              f"(knobs: {', '.join(knobs) or 'none'})")
        used.add(name)
        return knobs[name]
    return node


# --------------------------------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); values are parsed as YAML (numbers, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. dropout=0.4 or train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def apply_override(raw: dict[str, Any], key: str, value: Any) -> str:
    """Set one override in the raw config and return the full key it addressed.

    A bare key is a knob if the preset has one of that name, else the one section field of that
    name (`lr` -> `train.lr`); anything else is an error naming the nearest valid key.
    """
    knobs = raw.get("knobs") or {}
    if "." not in key:
        if key in knobs:
            key = f"knobs.{key}"
        else:
            owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
            if len(owners) != 1:
                raise ConfigError(f"unknown config key {key!r}{nearest(key, valid_keys(raw))} (this model's "
                                  f"knobs: {', '.join(knobs) or 'none'}; other keys take their section, e.g. "
                                  f"train.lr or model.conv.0.filters)")
            key = f"{owners[0]}.{key}"
    elif key.startswith("knobs.") and key[6:] not in knobs:
        raise ConfigError(f"unknown knob {key[6:]!r}{nearest(key[6:], list(knobs))} "
                          f"(knobs: {', '.join(knobs) or 'none'})")
    set_path(raw, key, value)
    return key


def valid_keys(raw: dict[str, Any]) -> list[str]:
    keys = list(raw.get("knobs") or {})
    for section, cls in SECTIONS.items():
        keys += [f.name for f in dataclasses.fields(cls)] + [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set raw['a']['b'][0]['c'] for key 'a.b.0.c', creating mappings as needed."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config key {key!r}: {where} is a value, not a section or list")
    last = parts[-1]
    if isinstance(node, list):
        node[list_index(node, last, key)] = value
    else:
        node[last] = value


def list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"config key {where!r}: expected an index 0..{len(node) - 1} into a list of {len(node)}")
    return int(part)


# ------------------------------------------------------------------------------- typed building
def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, found {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{where}.{key}'{nearest(str(key), names, where + '.')} "
                              f"(valid: {', '.join(names)})")
    return cls(**{key: convert(hints[key], value, f"{where}.{key}") for key, value in data.items()})


def convert(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against a type hint, building nested dataclasses and lists of them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        if args and dataclasses.is_dataclass(args[0]):
            return [build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    options = args if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    for option in options:
        if matches(option, value):
            return float(value) if option is float else value
    if float in options and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    expected = " or ".join(type_name(o) for o in options)
    raise ConfigError(f"{where}: expected {expected}, found {value!r}")


def matches(option: Any, value: Any) -> bool:
    if option is type(None):
        return value is None
    if option is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(option) is list:
        return isinstance(value, list) and all(matches(typing.get_args(option)[0], v) for v in value)
    return isinstance(value, option)


def type_name(option: Any) -> str:
    if option is type(None):
        return "null"
    if typing.get_origin(option) is list:
        return f"a list of {type_name(typing.get_args(option)[0])}"
    return getattr(option, "__name__", str(option))


# ------------------------------------------------------------------------------------ validation
def validate(config: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for i, block in enumerate(config.model.conv):
        where = f"model.conv[{i}]"
        positive(block.filters, f"{where}.filters")
        sizes = block.kernel_size if isinstance(block.kernel_size, list) else [block.kernel_size]
        if len(sizes) not in (1, 2):
            raise ConfigError(f"{where}.kernel_size: expected an int or [height, width], found {block.kernel_size}")
        for s in sizes:
            positive(s, f"{where}.kernel_size")
        positive(block.stride, f"{where}.stride")
        if isinstance(block.padding, str) and block.padding not in ("valid", "same"):
            raise ConfigError(f"{where}.padding: expected 'valid', 'same' or an int >= 0, found {block.padding!r}")
        if isinstance(block.padding, int) and block.padding < 0:
            raise ConfigError(f"{where}.padding: expected an int >= 0, found {block.padding}")
        if block.padding == "same" and block.stride != 1:
            raise ConfigError(f"{where}: padding 'same' needs stride 1 in torch; use an int padding with stride > 1")
        choice(block.activation, ACTIVATIONS, f"{where}.activation")
        choice(block.pool, POOLS, f"{where}.pool")
        positive(block.pool_size, f"{where}.pool_size")
        fraction(block.dropout, f"{where}.dropout")
    for i, layer in enumerate(config.model.dense):
        positive(layer.units, f"model.dense[{i}].units")
        choice(layer.activation, ACTIVATIONS, f"model.dense[{i}].activation")
        fraction(layer.dropout, f"model.dense[{i}].dropout")
    fraction(config.model.classifier_dropout, "model.classifier_dropout")
    t = config.train
    for key in ("epochs", "batch_size", "eval_batch_size"):
        positive(getattr(t, key), f"train.{key}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: expected a learning rate > 0, found {t.lr}")
    choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    choice(t.schedule, SCHEDULES, "train.schedule")
    fraction(t.label_smoothing, "train.label_smoothing")
    if t.threads is not None:
        positive(t.threads, "train.threads")
    if config.data.val_size is not None and config.data.val_size < 0:
        raise ConfigError(f"data.val_size: expected an int >= 0, found {config.data.val_size}")


def positive(value: int, where: str) -> None:
    if value < 1:
        raise ConfigError(f"{where}: expected an int >= 1, found {value}")


def fraction(value: float, where: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: expected a fraction in [0, 1), found {value}")


def choice(value: Any, options: tuple, where: str) -> None:
    if value not in options:
        shown = ", ".join("null" if o is None else str(o) for o in options)
        raise ConfigError(f"{where}: expected one of {shown}, found {value!r}"
                          f"{nearest(str(value), [o for o in options if o])}")


def nearest(name: str, options: list[str], prefix: str = "") -> str:
    """'; did you mean X?' for the closest option, or ''."""
    near = difflib.get_close_matches(name, [str(o) for o in options], n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{near[0]}'?" if near else ""
