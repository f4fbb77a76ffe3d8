"""--out and other output paths: only a regular file (or nothing yet) is replaced; a symbolic link is
followed to the file it names; anything else is refused with one line, before any work, leaving it as it was."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from use_runs import tiny_run

runner = CliRunner()
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"


def commands(run: Path, out: Path) -> dict[str, list[str]]:
    """The commands that write a file the user names, each writing to `out`."""
    return {
        "convolve": ["convolve", str(IMAGES / "photo.png"), "--kernel", "blur", "--out", str(out)],
        "pool": ["pool", str(IMAGES / "photo.png"), "--out", str(out)],
        "explain": ["explain", "conv", str(IMAGES / "digit.png"), "--steps", "1", "--out", str(out)],
        "show kernels": ["show", "kernels", str(run), "--out", str(out)],
        "show curves": ["show", "curves", str(run), "--out", str(out)],
        "runs compare": ["runs", "compare", str(run), str(run), "--out", str(out)],
        "report": ["report", str(run), "--out", str(out)],
        "explore": ["explore", str(run), "--out", str(out)],
        "export": ["export", str(run), "--format", "torchscript", "--out", str(out)],
        "predict --preview": ["predict", str(run), str(IMAGES / "digit.png"), "--preview", str(out)],
    }


SUFFIX = {"explain": ".gif", "report": ".html", "explore": ".html", "export": ".pt"}
NAMES = list(commands(Path("r"), Path("o")))


def target(tmp_path: Path, command: str, kind: str) -> Path:
    """An output path of the given kind (with the suffix the command wants)."""
    path = tmp_path / f"out{SUFFIX.get(command, '.png')}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "link to a fifo":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    return path


@pytest.mark.parametrize("kind", ["fifo", "directory", "link to a fifo"])
@pytest.mark.parametrize("command", NAMES)
def test_a_target_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path, command, kind):
    out = target(tmp_path, command, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, commands(tiny_run(), out)[command])
    assert result.exit_code == 2, result.output
    assert "cnnlab only replaces regular files" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left either
    assert out.is_dir() if kind == "directory" else (out.resolve().exists() and not out.resolve().is_file())


@pytest.mark.parametrize("command", NAMES)
def test_a_link_to_a_regular_file_is_followed(tmp_path, command):
    real = tmp_path / "real" / f"out{SUFFIX.get(command, '.png')}"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / real.name
    link.symlink_to(real)
    result = runner.invoke(app, commands(tiny_run(), link)[command])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and real.read_bytes() != b"old"  # the file was replaced, the link kept
