"""YAML from users: config files, sweep files, a run's config.yaml (no torch).

`safe_load` builds only plain data, never objects; on top of it a file is refused, with a one-line
error naming it, when it
- is not a regular UTF-8 text file of at most MAX_YAML_BYTES (a FIFO is refused unopened);
- repeats a key in a mapping (YAML takes the last silently; a config would lose a setting);
- nests deeper than MAX_DEPTH, or would expand past MAX_NODES values once its aliases are followed
  (anchors and aliases are fine for sharing a block; a "billion laughs" file is not);
- is not valid YAML (the message gives the line and column).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cnnlab.files import FileRefused, MiB, MissingFile, read_text

MAX_YAML_BYTES = 1 * MiB  # a preset is ~2 kB, a sweep file ~1 kB
MAX_DEPTH = 32  # mappings and lists inside each other; a config needs 4
MAX_NODES = 100_000  # values once every alias is expanded


class YAMLProblem(ValueError):
    """What is wrong with a YAML text, without the file's name (the caller adds it)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise YAMLProblem(f"key {key!r} appears twice in one mapping (line {mark.line + 1}, "
                                  f"column {mark.column + 1}); give each key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """The data of a YAML text, checked as the module docstring says; YAMLProblem otherwise."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass: plain data only
    except RecursionError:
        raise YAMLProblem(f"nested deeper than a config can be (more than {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as exc:  # python/object tags land here too: a SafeLoader never builds objects
        raise YAMLProblem(f"not valid YAML: {yaml_problem(exc)}") from None
    check_size(data)
    return data


def check_size(data: Any) -> None:
    """Refuse data nested deeper than MAX_DEPTH or expanding past MAX_NODES values (aliases followed).

    Shared sub-trees (an alias) are sized once and counted at every use, so a file of nested aliases
    that would expand exponentially is measured in linear time.
    """
    sizes: dict[int, int] = {}

    def size(node: Any, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise YAMLProblem(f"nested deeper than a config can be (more than {MAX_DEPTH} levels)")
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in sizes:
            children = node.values() if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(size(child, depth + 1) for child in children)
            if sizes[id(node)] > MAX_NODES:
                raise YAMLProblem(f"expands to more than {MAX_NODES:,} values once its aliases are followed")
        return sizes[id(node)]

    size(data, 0)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where it is."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def read_yaml_file(path: str | Path, what: str = "YAML file") -> Any:
    """The data of a user's YAML file; FileRefused (MissingFile) or YAMLProblem with the file named."""
    text = read_text(path, MAX_YAML_BYTES, what)
    try:
        return parse_yaml(text)
    except YAMLProblem as exc:
        raise YAMLProblem(f"{path}: {exc}") from None


__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_YAML_BYTES", "FileRefused", "MissingFile", "YAMLProblem", "parse_yaml",
           "read_yaml_file"]
