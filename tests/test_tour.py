"""docs/tour.md cannot rot: every `$ cnnlab ...` line of its ```console blocks runs here, in order, and what
the tour shows under a block is what its commands printed.

The commands run through Typer's runner in an empty folder holding the tour's input files
(examples/; the first command, `cnnlab samples .`, writes photo.png, digit.png and trousers.png), exactly as
written in the tour. The plain ``` block right after a console block is its excerpt: each of its lines is one
line the block's commands printed, in order (other lines may come between); `...` alone stands for lines left
out, and a line ending in ` ...` for the start of a longer one. Everything shown is fixed by the seed and the
thread count (one, as here): no times, no load.
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
BLOCK = re.compile(r"^```console\n(.*?)^```\n(?:```\n(.*?)^```\n)?", re.S | re.M)  # commands, their excerpt


def tour_commands(text: str) -> list[str]:
    """The `$ cnnlab ...` lines of every ```console block, in order, without the `$ `."""
    return [line[2:].strip() for block in FENCE.findall(text) for line in block.splitlines()
            if line.startswith("$ cnnlab ")]


def tour_blocks(text: str) -> list[tuple[list[str], list[str]]]:
    """(the commands of each ```console block, the lines of the excerpt shown under it; [] when none)."""
    return [([line[2:].strip() for line in commands.splitlines() if line.startswith("$ cnnlab ")],
             excerpt.splitlines()) for commands, excerpt in BLOCK.findall(text)]


def missing_from(printed: list[str], excerpt: list[str]) -> str | None:
    """The first excerpt line the printed lines do not hold, in order; None when every one is there."""
    lines = iter(line.rstrip() for line in printed)
    for shown in excerpt:
        if shown.strip() == "...":
            continue
        start = shown[:-4].rstrip() if shown.endswith(" ...") else None
        if not any(line == shown.rstrip() or (start is not None and line.startswith(start)) for line in lines):
            return shown
    return None


def test_an_excerpt_matches_lines_in_order_and_ellipses_stand_for_what_is_left_out():
    printed = ["input 5 x 5", "  height: 3", "  width: 3", "output 3 x 3   raw values in [0.5, 2.5]"]
    assert missing_from(printed, ["input 5 x 5", "...", "output 3 x 3 ..."]) is None
    assert missing_from(printed, ["output 3 x 3 ...", "input 5 x 5"]) == "input 5 x 5"  # out of order
    assert missing_from(printed, ["  height: 4"]) == "  height: 4"
    assert missing_from(printed, ["output 3 x 3"]) == "output 3 x 3"  # a cut line needs its " ..."


def test_every_excerpt_belongs_to_a_console_block_and_shows_no_time():
    text = TOUR.read_text()
    shown = [line for _, excerpt in tour_blocks(text) for line in excerpt]
    assert len(shown) >= 60 and sum(1 for _, excerpt in tour_blocks(text) if excerpt) >= 12
    # an excerpt is a plain block right under its console block: none stands alone, where nothing checks it
    bare, typed = len(re.findall(r"^```\n", text, re.M)), len(re.findall(r"^```\w+\n", text, re.M))
    assert (bare - typed) // 2 == sum(1 for _, excerpt in tour_blocks(text) if excerpt)  # plain blocks' two fences
    for line in shown:
        assert not re.search(r"\d+(\.\d+)?\s?s\b|images/s|seconds|this machine is busy", line), line


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


@pytest.fixture
def one_thread():
    """torch on one thread, as the tour's excerpts were made: the deep preset's batch norm sums in another order
    on two (2 epochs: test accuracy 0.9690 there, 0.9680 here), and one is also the fast choice on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_tour_command_runs(tmp_path, monkeypatch, one_thread):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for commands, excerpt in tour_blocks(TOUR.read_text()):
        printed: list[str] = []
        for command in commands:
            args = shlex.split(command)[1:]
            result = runner.invoke(app, args)
            assert result.exit_code == 0, f"$ {command}\n{result.output}\n{result.exception!r}"
            for out in written_files(args):
                assert (tmp_path / out).is_file(), f"$ {command}: {out} not written"
            if args[0] == "train":
                name = args[args.index("--name") + 1]
                assert (tmp_path / "runs" / name / "test.json").is_file(), command
            printed += result.output.splitlines()
        missing = missing_from(printed, excerpt)
        assert missing is None, (f"docs/tour.md shows {missing!r} under `{commands[0]}` ..., which its commands "
                                 "did not print (in that order); they printed:\n" + "\n".join(printed))
    assert "Trouser" in runner.invoke(app, ["predict", "runs/tour-fashion", "trousers.png"]).output
