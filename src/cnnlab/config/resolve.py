"""Resolving a config: preset file -> user file -> `--set` overrides -> knobs -> typed dataclasses.

Knobs are the lesson's plain config keys (filters, kernel width/height, dense size, dropout). A
preset declares them under `knobs:` and its layer list reads them as `$name`, so `--set dropout=0.4`
reshapes the network the way the lesson's `config.dropout = 0.4` did. Unknown keys, and knobs the
user set that no layer reads, are errors naming the nearest valid key.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Collection, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from cnnlab.config.schema import SECTIONS, Config, ConfigError, DataConfig, check_dataset_name, validate
from cnnlab.config.yamlfile import FileRefused, YAMLProblem, parse_yaml, read_yaml_file
from cnnlab.suggest import did_you_mean


# ---------------------------------------------------------------------------------------- presets
def preset_dir() -> Path:
    return Path(str(resources.files("cnnlab.config") / "presets"))


def list_presets() -> list[str]:
    """Names of the shipped presets (each a YAML file a user can copy and edit)."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}{did_you_mean(name, list_presets())} "
                          f"(presets: {', '.join(list_presets())})")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a user's file (`config.yamlfile` rules: bounded regular text file, no repeated
    keys, no alias bombs), with one-line errors that name the file."""
    try:
        data = read_yaml_file(path, "config file")
    except (FileRefused, YAMLProblem) as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, knobs), "
                          f"found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------- loading
def load_config(model: str | None = "seed", file: str | Path | None = None,
                overrides: Sequence[str | tuple[str, Any]] | None = None, base: dict[str, Any] | None = None,
                **section_values: dict[str, Any]) -> Config:
    """Resolve a config: preset `model` (or a whole config as `base`: a run's, to start from), then YAML
    `file`, then `key=value` overrides.

    `section_values` (e.g. data={"dataset": "mnist"}) are applied like overrides, for callers that
    have typed values at hand (the CLI's --dataset, --epochs). A file's `datasets:` block holds
    settings for one dataset (e.g. more epochs on Fashion-MNIST) over that file's general ones.
    """
    preset = copy.deepcopy(base) if base is not None else read_yaml(preset_path(model)) if model else {}
    user = read_yaml(file) if file is not None else {}
    preset_tuned, user_tuned = preset.pop("datasets", None) or {}, user.pop("datasets", None) or {}
    user_keys = {f"knobs.{k}" for k in user.get("knobs") or {}}

    def assemble(base: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
        raw = merge(base, mine)
        for section, values in section_values.items():
            for key, value in values.items():
                set_path(raw, f"{section}.{key}", value)
        for item in overrides or []:
            # text from the command line is parsed as YAML; a (key, value) pair is a value already read (a
            # sweep file's `set:`, a keyword argument), which must not be read a second time as text
            key, value = item if isinstance(item, tuple) else parse_override(item)
            user_keys.add(apply_override(raw, key, value))
        return raw

    raw = assemble(preset, user)
    dataset = check_dataset_name((raw.get("data") or {}).get("dataset", DataConfig.dataset))
    preset_block, user_block = dataset_block(preset_tuned, dataset), dataset_block(user_tuned, dataset)
    if preset_block or user_block:  # each file's block tops that file's general settings
        raw = assemble(merge(preset, preset_block or {}), merge(user, user_block or {}))
    return resolve(raw, user_keys)


def dataset_block(tuned: dict[str, Any], dataset: str) -> dict[str, Any] | None:
    """The settings a file gives for `dataset`; a shipped sample takes those of its full dataset."""
    if not isinstance(tuned, dict):
        raise ConfigError(f"datasets: expected a mapping of dataset name -> settings, found {tuned!r}")
    block = tuned.get(dataset, tuned.get(dataset.removesuffix("-sample")))
    if block is not None and not isinstance(block, dict):
        raise ConfigError(f"datasets.{dataset}: expected a mapping of sections, found {block!r}")
    return block


def resolve(raw: dict[str, Any], user_keys: Collection[str] = frozenset()) -> Config:
    """Substitute knobs and build the typed config; knobs the user set that nothing reads are errors."""
    raw = copy.deepcopy(raw)
    knobs = raw.pop("knobs", None) or {}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown config section {key!r}{did_you_mean(key, [*SECTIONS, 'knobs'])} "
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
            raise ConfigError(f"{node!r} refers to no knob{did_you_mean(name, list(knobs))} "
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
        value = parse_yaml(text) if text.strip() else ""
    except YAMLProblem:  # not YAML (or a nesting bomb): the text itself, which the key's type check judges
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
                raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, valid_keys(raw))} (this model's "
                                  f"knobs: {', '.join(knobs) or 'none'}; other keys take their section, e.g. "
                                  f"train.lr or model.conv.0.filters)")
            key = f"{owners[0]}.{key}"
    elif key.startswith("knobs.") and key[6:] not in knobs:
        raise ConfigError(f"unknown knob {key[6:]!r}{did_you_mean(key[6:], list(knobs))} "
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
        node = node[list_index(node, part, where)] if isinstance(node, list) else node.setdefault(part, {})
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
            raise ConfigError(f"unknown config key '{where}.{key}'{did_you_mean(str(key), names, where + '.')} "
                              f"(valid: {', '.join(names)})")
    return cls(**{key: convert(hints[key], value, f"{where}.{key}") for key, value in data.items()})


def convert(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against a type hint, building nested dataclasses and lists of them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        if args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            return [build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    options = args if origin in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is not str and matches(option, value):
            return float(value) if option is float else value
    if float in options and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string; a number before a word (train.lr: 3e-4 or auto)
            return float(value)
        except ValueError:
            pass
    if str in options and isinstance(value, str):
        return value
    expected = " or ".join(type_name(o) for o in options)
    raise ConfigError(f"{where}: expected {expected}, found {as_written(value)}")


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


TYPE_NAMES = {type(None): "null", bool: "true or false", int: "an int", float: "a number", str: "text"}


def type_name(option: Any) -> str:
    """A type as a config file's reader knows it: `true or false`, not `bool`."""
    if typing.get_origin(option) is list:
        return f"a list of {type_name(typing.get_args(option)[0])}"
    return TYPE_NAMES.get(option) or str(getattr(option, "__name__", option))


def as_written(value: Any) -> str:
    """A value as YAML spells it (true, null), strings quoted."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def dotted_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config dicts and lists as dotted keys: model.conv.0.filters -> 32 (the keys --set takes)."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and node and all(isinstance(v, (dict, list)) for v in node):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(dotted_keys(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
