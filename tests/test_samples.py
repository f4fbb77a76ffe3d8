"""`cnnlab samples DIR`: the lesson's pictures from what the package ships (the ones the docs show), without
torch, and never over a file already there unless asked."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
DOCS_PICTURE = {"photo.png": "photo.png", "digit.png": "digit.png", "trousers.png": "tour-trousers.png"}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_samples_writes_the_pictures_the_tour_shows_without_loading_torch(tmp_path):
    script = ("import sys\nfrom cnnlab.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as exit:\n"
              "    assert not exit.code, exit.code\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, "samples", "lesson"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"  # a light command: Pillow and NumPy only
    assert sorted(p.name for p in (tmp_path / "lesson").iterdir()) == sorted(DOCS_PICTURE)
    for name, docs_name in DOCS_PICTURE.items():
        assert f"lesson/{name}: " in done.stdout
        assert np.array_equal(pixels(tmp_path / "lesson" / name), pixels(ROOT / "docs" / "img" / docs_name)), name
    assert pixels(tmp_path / "lesson" / "digit.png").shape == (28, 28)
    assert pixels(tmp_path / "lesson" / "photo.png").shape == (160, 160, 3)


@pytest.mark.unit
def test_the_stand_in_trousers_are_predicted_as_trousers_by_the_recipe(tmp_path):
    from cnnlab.use.recipes import prepare

    assert runner.invoke(app, ["samples", str(tmp_path)]).exit_code == 0
    prepared = prepare(tmp_path / "trousers.png", "objects", 28)  # what predict shows a Fashion-MNIST model
    assert prepared[0, 0] == 0 and prepared[14, 8:20].max() > 100  # light trousers on black, as the dataset's


@pytest.mark.unit
def test_samples_never_overwrites_without_force_and_refuses_a_file(tmp_path):
    mine = tmp_path / "photo.png"
    mine.write_bytes(b"my own picture")
    result = runner.invoke(app, ["samples", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path}: already holds photo.png; pass --force to overwrite, or choose another folder"]
    assert mine.read_bytes() == b"my own picture" and sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    assert runner.invoke(app, ["samples", str(tmp_path), "--force"]).exit_code == 0
    assert pixels(mine).shape == (160, 160, 3)

    result = runner.invoke(app, ["samples", str(mine)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"{mine}: not a folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DOCS_PICTURE)  # no temporary file left
