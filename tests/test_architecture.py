"""The layout is the architecture: lower layers never import higher ones, module imports have no
cycles, and the light commands never load torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "cnnlab"

# Rank of each top-level part of the package: a module may import its own rank or lower ones.
RANKS = {
    "cnnlab": 0, "errors": 0, "suggest": 0, "files": 0, "heap": 0, "text": 0, "inline": 0,
    "images": 1, "config": 1, "playground": 1,
    "data": 2,
    "models": 3,
    "training": 4,
    "runs": 5,
    "inspect": 6, "use": 6, "trackers": 6,
    "pipeline": 7, "sweep": 7,
    "cli": 8, "__main__": 8,
}
ONLY_FOR_THE_CLI = ("cnnlab.use.serve",)  # the web server: nothing but the command line starts it


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """'cnnlab.models.plan' -> 'models'; 'cnnlab' -> 'cnnlab'."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "cnnlab"


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported cnnlab module, at module level?) for every import in a file, lazy ones included."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names if name.startswith("cnnlab")]
    return found


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}


def known(name: str) -> str | None:
    """The module an imported name refers to ('cnnlab.runs.layout.path' -> 'cnnlab.runs.layout')."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.unit
def test_no_module_imports_a_higher_layer():
    offenders = []
    for module, path in MODULES.items():
        for name, _ in imports(path):
            target = known(name)
            if target is None:
                continue
            if RANKS[part(target)] > RANKS[part(module)]:
                offenders.append(f"{module} imports {target}")
            if target.startswith(ONLY_FOR_THE_CLI) and not module.startswith(("cnnlab.cli", *ONLY_FOR_THE_CLI)):
                offenders.append(f"{module} imports the server {target}")
    assert offenders == []


@pytest.mark.unit
def test_module_level_imports_have_no_cycles():
    graph = {module: {known(name) for name, top in imports(path) if top and known(name) not in (None, module)}
             for module, path in MODULES.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node] - {None}):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


LIGHT_COMMANDS = [["--help"], ["presets"], ["presets", "seed"], ["summary", "--model", "fast"],
                  ["convolve", "--help"], ["pool", "--help"], ["explain", "conv", "--help"]]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=[" ".join(a) for a in LIGHT_COMMANDS])
def test_light_commands_never_import_torch(argv):
    script = ("import sys\nfrom cnnlab.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as exit:\n"
              "    assert not exit.code, exit.code\nprint('torch' in sys.modules, 'matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch_loaded, matplotlib_loaded = done.stdout.split()[-2:]
    assert torch_loaded == "False" and (matplotlib_loaded == "False" or argv[0] in ("summary",)), done.stdout


def test_the_playground_and_the_config_never_import_torch():
    script = ("import sys\nimport cnnlab.playground.conv, cnnlab.playground.kernels, cnnlab.playground.explain\n"
              "import cnnlab.config, cnnlab.models.plan, cnnlab.models.summary, cnnlab.images, cnnlab.files\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
