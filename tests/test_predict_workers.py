"""`cnnlab predict RUN DIR` prepares a folder's files in decoding processes while the model runs: the same rows,
in the same order, as one process gives, unreadable files included."""
from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data import load_dataset
from cnnlab.use import predict as predict_module
from cnnlab.use.predict import FileError, Predictor, iter_predictions
from use_runs import tiny_run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 digits in PNG, JPEG and BMP at mixed sizes, in two sub-folders, and three files that are not images."""
    root = tmp_path_factory.mktemp("mixed")
    images = load_dataset("mnist-sample", progress=False).test_images[:40]
    for i, image in enumerate(images):
        side = 28 + 9 * (i % 7)
        picture = Image.fromarray(255 - image).resize((side, side), Image.Resampling.BICUBIC)
        (root / f"part{i % 2}").mkdir(exist_ok=True)
        picture.save(root / f"part{i % 2}" / f"{i:02d}.{('png', 'jpg', 'bmp')[i % 3]}")
    (root / "part0" / "05-text.png").write_text("not a picture")
    (root / "part1" / "17-empty.jpg").write_bytes(b"")
    (root / "part1" / "30-cut.png").write_bytes((root / "part0" / "00.png").read_bytes()[:60])
    return root


def rows(items):
    return [(i.file, i.message) if isinstance(i, FileError) else (i.file, i.image.tobytes(), i.probabilities)
            for i in items]


def test_decoding_processes_give_the_rows_of_one_process(folder, monkeypatch):
    monkeypatch.setattr(predict_module, "SMALL_SET", 8)  # a folder this small would otherwise stay in process
    predictor = Predictor.from_run(tiny_run("mnist-sample"))
    files = sorted(folder.rglob("*.*"))
    alone = rows(iter_predictions(predictor, files, batch_size=16, workers=0))
    together = rows(iter_predictions(predictor, files, batch_size=16, workers=2))
    assert [r[0] for r in together] == [str(f) for f in files]  # every file, in order
    assert [len(r) for r in together] == [len(r) for r in alone]
    for mine, theirs in zip(together, alone):
        assert mine[:2] == theirs[:2]  # the same prepared image (or the same error message)
        if len(mine) == 3:
            np.testing.assert_allclose(mine[2], theirs[2], rtol=0, atol=1e-6)
    errors = [r for r in together if len(r) == 2]
    assert [Path(e[0]).name for e in errors] == ["05-text.png", "17-empty.jpg", "30-cut.png"]


def test_a_folder_with_bad_files_lists_them_and_goes_on(folder, monkeypatch, tmp_path):
    monkeypatch.setattr(predict_module, "SMALL_SET", 8)
    out = tmp_path / "rows.csv"
    result = CliRunner().invoke(app, ["predict", str(tiny_run("mnist-sample")), str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 40 + 3
    bad = [row for row in table if row["error"]]
    assert [Path(row["file"]).name for row in bad] == ["05-text.png", "17-empty.jpg", "30-cut.png"]
    assert all(row["predicted"] == "" and row["error"].startswith(row["file"]) for row in bad)
    assert result.output.count("error: ") == 3 and "predicted 40 files; 3 unreadable" in result.output


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_a_stop_signal_mid_folder_leaves_no_file_and_no_process(signum, tmp_path):
    """`kill PID` (SIGTERM to the main process alone) ended the command on the spot: its temporary --out file
    stayed, and its decoding processes, which leave stop signals to the main process, blocked for good."""
    digit = Image.fromarray(255 - load_dataset("mnist-sample", progress=False).test_images[0])
    (tmp_path / "many").mkdir()
    for i in range(3000):
        digit.save(tmp_path / "many" / f"{i}.png")
    process = subprocess.Popen([sys.executable, "-m", "cnnlab", "predict", str(tiny_run("mnist-sample")), "many",
                                "--out", "rows.csv", "--backend", "torch"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and not list(tmp_path.glob(".rows.csv.*")) and time.monotonic() < deadline:
            time.sleep(0.005)  # until the rows are being written (the decoding processes run by then)
        if process.poll() is not None:
            pytest.skip("the command finished before it could be stopped")
        process.send_signal(signum)  # to the main process only, as `kill` does
        _, stderr = process.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(process.pid), "a decoding process outlived the command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == (143 if signum == signal.SIGTERM else 130), stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many"]  # no rows.csv, no temporary file


def test_a_name_that_is_not_utf8_is_written_to_the_csv_as_its_bytes(tmp_path):
    digit = Image.fromarray(255 - load_dataset("mnist-sample", progress=False).test_images[0])
    (tmp_path / "odd").mkdir()
    digit.save(tmp_path / "odd" / "plain.png")
    digit.save(os.fsdecode(bytes(tmp_path / "odd") + b"/bad\xff.png"))
    result = CliRunner().invoke(app, ["predict", str(tiny_run("mnist-sample")), str(tmp_path / "odd"),
                                      "--out", str(tmp_path / "rows.csv")])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "rows.csv").read_bytes()
    assert b"/bad\xff.png," in written and b"/plain.png," in written


@pytest.mark.unit
def test_a_worker_says_nothing_when_the_main_process_left_mid_hand_over(capsys):
    from cnnlab.data.workers import quiet_when_the_main_process_left

    for gone in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "Connection reset by peer")):
        quiet_when_the_main_process_left(type(gone), gone, None)
    assert capsys.readouterr().err == ""
    quiet_when_the_main_process_left(ValueError, ValueError("a real bug"), None)  # anything else is reported
    assert "ValueError: a real bug" in capsys.readouterr().err


@pytest.mark.unit
def test_a_stop_signal_the_moment_the_temporary_file_exists_leaves_nothing(tmp_path, monkeypatch):
    """The instant between making the temporary file and the `try` that removes it: a Ctrl-C there left it."""
    from cnnlab.files import write_atomic

    real_open = os.open

    def open_then_ctrl_c(file, flags, *args, **kwargs):
        made = real_open(file, flags, *args, **kwargs)
        if flags & os.O_EXCL:  # the temporary file: Ctrl-C the instant it exists
            signal.raise_signal(signal.SIGINT)  # its handler raises KeyboardInterrupt at the next instruction
        return made

    monkeypatch.setattr(os, "open", open_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "rows.csv", lambda tmp: tmp.write_text("a,b\n"))
    assert list(tmp_path.iterdir()) == []
