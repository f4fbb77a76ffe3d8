"""Training on a user's image folder, streamed from disk: as a user runs it, with bad files, resume,
two processes, and peak memory that does not grow with the folder."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab import pipeline
from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.training.engine import TrainingInterrupted
from conftest import StopAt, weights

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": 0, "green": 1, "blue": 2}


def write_colour_folder(root: Path, per_class: int = 60, seed: int = 0) -> Path:
    """Three classes of noisy images, each dominated by one colour, in mixed formats and sizes."""
    rng = np.random.default_rng(seed)
    for name, channel in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (20 + i % 9, 18 + i % 5, 3), dtype=np.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.{('png', 'jpg', 'bmp')[i % 3]}")
    return root


def with_bad_files(root: Path) -> list[str]:
    """Unreadable files among the images (and one that is not an image at all)."""
    (root / "red" / "random-bytes.png").write_bytes(np.random.default_rng(1).bytes(300))
    (root / "green" / "empty.jpg").write_bytes(b"")
    good = (root / "blue" / "0.png").read_bytes()
    (root / "blue" / "truncated.png").write_bytes(good[:len(good) // 3])
    (root / "blue" / "notes.txt").write_text("not an image: ignored, not reported")
    return sorted(str(root / p) for p in ("red/random-bytes.png", "green/empty.jpg", "blue/truncated.png"))


SMALL = ["--model", "seed", "--epochs", "2", "--quiet", "--set", "data.image_size=12", "--set", "data.workers=2",
         "--set", "batch_size=16"]


def test_a_folder_with_corrupt_files_trains_and_reports_them(tmp_path):
    folder = write_colour_folder(tmp_path / "colours")
    bad = with_bad_files(folder)
    result = CliRunner().invoke(app, ["train", "--dataset", str(folder), *SMALL, "--runs-dir", str(tmp_path / "runs"),
                                      "--name", "colours"])
    assert result.exit_code == 0, result.output
    assert "3 unreadable image(s) were skipped" in result.output
    run = tmp_path / "runs" / "colours"
    assert sorted(json.loads((run / "skipped.json").read_text())) == bad
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    test = json.loads((run / "test.json").read_text())
    assert test["classes"] == ["blue", "green", "red"]
    assert test["accuracy"] > 0.9  # one colour dominates each class: easy, if the pixels arrive right
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["image_folder"]["classes"] == ["blue", "green", "red"] and manifest["image_folder"]["ignored"] == 1

    again = CliRunner().invoke(app, ["evaluate", str(run), "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["accuracy"] == test["accuracy"]
    summary = CliRunner().invoke(app, ["summary", "--dataset", str(folder), "--set", "data.image_size=12"])
    assert "(12, 12, 3)" in summary.output and summary.output.count("(3,)") == 1  # 3 classes out


def test_show_and_predict_work_on_a_folder_run(tmp_path):
    folder = write_colour_folder(tmp_path / "colours")
    with_bad_files(folder)
    runs_dir = tmp_path / "runs"
    assert CliRunner().invoke(app, ["train", "--dataset", str(folder), *SMALL, "--runs-dir", str(runs_dir),
                                    "--name", "c"]).exit_code == 0
    run = runs_dir / "c"
    green = np.zeros((40, 30, 3), dtype=np.uint8)
    green[..., 1] = 220
    Image.fromarray(green).save(tmp_path / "mine.png")
    predicted = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "mine.png"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    # prepared as in training: RGB, centre square
    assert json.loads(predicted.stdout.splitlines()[0])["class_name"] == "green"
    shows = (("mistakes", []), ("features", ["--index", "0"]), ("saliency", [str(tmp_path / "mine.png")]))
    for command, extra in shows:
        out = tmp_path / f"{command}.png"
        shown = CliRunner().invoke(app, ["show", command, str(run), *extra, "--out", str(out)])
        assert shown.exit_code == 0, (command, shown.output)
        assert Image.open(out).mode in ("RGB", "RGBA")


@pytest.mark.unit
def test_a_folder_that_is_not_one_says_what_is_expected(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    result = CliRunner().invoke(app, ["train", "--dataset", str(tmp_path / "flat"),
                                      "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and str(tmp_path / "flat") in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_folder_run_resumes_mid_epoch_to_the_same_weights(tmp_path, workers):
    folder = write_colour_folder(tmp_path / "colours", per_class=30)
    # Dropout and augmentation draw from the generator that a DataLoader would also draw its seed from.
    config = load_config("seed", None, [f"data.workers={workers}", "data.image_size=12", "batch_size=16", "epochs=2",
                                        "model.conv.0.filters=4", "dense_layer_size=16", "dropout=0.3",
                                        "augment_flip=true"], data=dict(dataset=str(folder)))
    whole = pipeline.train(config, tmp_path / "runs", name="whole", progress=False)
    with pytest.raises(TrainingInterrupted):
        pipeline.train(config, tmp_path / "runs", name="cut", callbacks=[StopAt(2, 2)], progress=False)
    resumed = pipeline.resume(tmp_path / "runs" / "cut", progress=False)
    a, b = weights(whole.run), weights(resumed.run)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a torchrun job of 2 processes
def test_two_processes_train_on_a_folder_and_report_bad_files_from_both(tmp_path):
    folder = write_colour_folder(tmp_path / "colours")
    bad = with_bad_files(folder)
    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--dataset", str(folder), *SMALL,
                           "--set", "data.workers=1", "--nproc", "2", "--name", "ddp"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "runs" / "ddp"
    # Each rank decodes its own half of every batch; the report gathers both ranks' (and the test set's).
    assert sorted(json.loads((run / "skipped.json").read_text())) == bad
    assert json.loads((run / "test.json").read_text())["accuracy"] > 0.9


def load_bench():
    spec = importlib.util.spec_from_file_location("folder_memory", ROOT / "bench" / "folder_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # writes 16,000 JPEGs and trains on them twice
def test_peak_memory_does_not_grow_with_the_folder(tmp_path):
    bench = load_bench()
    size, small, large = 96, 2000, 14000
    peaks = {}
    for count in (small, large):
        bench.write_folder(tmp_path / f"images{count}", count, size)
        peaks[count] = bench.measure(tmp_path / f"images{count}", size, workers=2, runs=tmp_path / f"runs{count}")
    decoded_growth = (large - small) * size * size * 3 / 2**20  # MiB an in-memory copy would add: ~316
    growth = peaks[large]["main_peak_mib"] - peaks[small]["main_peak_mib"]
    assert peaks[large]["trained"] == 1 and peaks[large]["test_images"] > 1000
    # The C heap may grow by up to folder_source.HEAP_SLACK_BYTES (64 MiB) before it is trimmed.
    assert growth < 0.5 * decoded_growth, (peaks, decoded_growth)  # measured: within +-60 MiB
    assert peaks[large]["worker_peak_mib"] - peaks[small]["worker_peak_mib"] < 0.25 * decoded_growth, peaks
