"""--out and other output paths: only a regular file (or nothing yet) is replaced; a symbolic link is
followed to the file it names; anything else is refused with one line, before any work, leaving it as it was."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from use_runs import TINY, tiny_run

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


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_written_files_get_the_mode_a_plain_open_would_give(tmp_path, umask_022):
    from cnnlab.files import write_text

    fresh = write_text(tmp_path / "new.json", "{}")
    assert fresh.stat().st_mode & 0o777 == 0o644  # not the temporary file's private 0600
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o640)
    write_text(kept, "new")
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new"  # replacing keeps the old mode


def test_a_run_directory_is_readable_by_others_under_the_usual_umask(tmp_path, umask_022):
    """Every file of a run, the safetensors ones too (their writer replaces the file it is handed)."""
    result = runner.invoke(app, ["train", *TINY, "--epochs", "1", "--runs-dir", str(tmp_path), "--name", "r"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert "model.safetensors" in modes and "checkpoint.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o644)


def test_a_command_output_is_readable_by_others_under_the_usual_umask(tmp_path, umask_022):
    out = tmp_path / "blurred.png"
    result = runner.invoke(app, commands(tiny_run(), out)["convolve"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o644


def test_an_unwritable_folder_is_named_as_the_user_gave_it(tmp_path, monkeypatch):
    import errno
    import tempfile

    def refuse(prefix: str = "", suffix: str = "", dir: str = "") -> tuple[int, str]:
        # what the system says when the folder is not writable (tests may run as root, who can write anywhere)
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "blurred.png"
    result = runner.invoke(app, commands(tiny_run(), out)["convolve"])
    assert result.exit_code == 2 and f"{out}: Permission denied" in result.output, result.output
    assert ".tmp" not in result.output and "Traceback" not in result.output


def test_a_full_disk_while_writing_names_the_file_asked_for_in_one_line(tmp_path, monkeypatch):
    """The writer's own error names no file (a write on an open handle): the user's target is named instead."""
    import errno

    import cnnlab.files as files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    command = commands(tiny_run(), tmp_path / "blurred.png")["convolve"]  # the run trained before the disk fills
    monkeypatch.setattr(files.os, "fsync", full)
    out = tmp_path / "blurred.png"
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {out}: No space left on device (ENOSPC)"
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half written
