"""docs/tour.md cannot rot: every `$ cnnlab ...` line of its ```console blocks runs here, in order.

The commands run through Typer's runner in an empty folder holding the tour's input files
(examples/; the first command, `cnnlab samples .`, writes photo.png, digit.png and trousers.png), exactly as
written in the tour.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnlab.cli import app

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "docs" / "tour.md"
FENCE = re.compile(r"^```console\n(.*?)^```", re.S | re.M)


def tour_commands(text: str) -> list[str]:
    """The `$ cnnlab ...` lines of every ```console block, in order, without the `$ `."""
    return [line[2:].strip() for block in FENCE.findall(text) for line in block.splitlines()
            if line.startswith("$ cnnlab ")]


def written_files(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--out", "-o", "--plot")]


@pytest.mark.unit
def test_tour_parses_into_the_lessons_steps():
    text = TOUR.read_text()
    commands = tour_commands(text)
    assert len(commands) >= 25
    assert commands[0] == "cnnlab samples ."  # the pictures the other commands read
    for needed in ("explain conv", "convolve", "--flip", "--stride 2", "pool", "summary --model seed --explain",
                   "--name tour-seed", "--set dropout=0.4", "runs compare", "show curves", "--model deep",
                   "show kernels", "show features", "fashion-mnist-sample", "show mistakes", "predict",
                   "sweep run examples/lesson-sweep.yaml", "--model fast"):
        assert any(needed in command for command in commands), needed
    for command in commands:  # samples only: the full datasets belong in ```bash blocks, not run
        dataset = re.search(r"--dataset (\S+)", command)
        assert dataset is None or dataset.group(1).endswith("-sample"), command
    for picture in re.findall(r"\]\((img/[^)]+)\)", text):
        assert (TOUR.parent / picture).is_file(), picture


def test_every_tour_command_runs(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in tour_commands(TOUR.read_text()):
        args = shlex.split(command)[1:]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"$ {command}\n{result.output}\n{result.exception!r}"
        for out in written_files(args):
            assert (tmp_path / out).is_file(), f"$ {command}: {out} not written"
        if args[0] == "train":
            name = args[args.index("--name") + 1]
            assert (tmp_path / "runs" / name / "test.json").is_file(), command
    assert "Trouser" in runner.invoke(app, ["predict", "runs/tour-fashion", "trousers.png"]).output
