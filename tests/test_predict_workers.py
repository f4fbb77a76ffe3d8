"""`cnnlab predict RUN DIR` prepares a folder's files in decoding processes while the model runs: the same rows,
in the same order, as one process gives, unreadable files included."""
from __future__ import annotations

import csv
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
