"""Mistakes you can act on: predictions.csv names every test file, `show mistakes` and the report name files,
`predict DIR` walks a folder, `show label-issues` finds a planted wrong label and a file in two splits."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.inspect.label_issues import class_thresholds, confident_issues
from use_runs import tiny_run

COLOURS = {"blue": 2, "green": 1, "red": 0}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def colour_image(path: Path, channel: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (14, 14, 3), dtype=np.uint8)
    pixels[..., channel] += 170
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A train/val/test colour folder with, in test/: an unreadable file sorted first, a red picture filed as
    blue, and a copy of a training picture; in train/: a blue picture filed as green; and a run trained on it."""
    root = tmp_path_factory.mktemp("mistakes")
    folder = root / "colours"
    for split, count in (("train", 40), ("val", 10), ("test", 10)):
        for name, channel in COLOURS.items():
            (folder / split / name).mkdir(parents=True)
            for i in range(count):
                colour_image(folder / split / name / f"{i}.png", channel, hash((split, name, i)) % 2**32)
    (folder / "test" / "blue" / "0-broken.png").write_bytes(b"not a png")
    colour_image(folder / "test" / "blue" / "planted.png", COLOURS["red"], 7)
    colour_image(folder / "train" / "green" / "planted-train.png", COLOURS["blue"], 11)
    shutil.copy(folder / "train" / "green" / "3.png", folder / "test" / "green" / "copy.png")
    result = run("train", "--dataset", folder, "--model", "seed", "--epochs", "3", "--quiet", "--threads", "1",
                 "--set", "data.image_size=12", "--set", "data.workers=0", "--set", "batch_size=16",
                 "--runs-dir", root / "runs", "--name", "colours")
    assert result.exit_code == 0, result.output
    return folder, root / "runs" / "colours"


def test_predictions_file_has_a_row_per_test_file_on_the_right_file(folder_run):
    folder, run = folder_run
    with open(run / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = sorted(p.relative_to(folder).as_posix() for p in (folder / "test").rglob("*.png"))
    assert [r["file"] for r in rows] == files
    broken = rows[0]
    assert broken["file"] == "test/blue/0-broken.png" and broken["predicted"] == "" and broken["problem"]
    for row in rows[1:]:
        assert row["true"] == row["file"].split("/")[1]
        assert 0 < float(row["confidence"]) <= 1 and float(row["loss"]) >= 0
    # the rows after the unreadable file did not shift: each picture's colour is its prediction
    by_file = {r["file"]: r["predicted"] for r in rows}
    assert by_file["test/blue/planted.png"] == "red"
    assert sum(by_file[f] == f.split("/")[1] for f in files[1:] if "planted" not in f) >= 28


def test_show_mistakes_and_the_report_name_the_files(folder_run, tmp_path):
    _, run_dir = folder_run
    shown = run("show", "mistakes", run_dir, "--out", tmp_path / "m.png")
    assert shown.exit_code == 0, shown.output
    assert "test/blue/planted.png: true blue, predicted red" in shown.output
    page = run("report", run_dir, "--out", tmp_path / "r.html")
    assert page.exit_code == 0, page.output
    assert "<td>test/blue/planted.png</td><td>blue</td><td>red</td>" in (tmp_path / "r.html").read_text()


def test_predict_walks_a_folder_lists_bad_files_and_sums_up(folder_run, tmp_path):
    folder, run_dir = folder_run
    result = run("predict", run_dir, folder / "test")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 33 and lines[-1].startswith("predicted 32 files; 1 unreadable")
    assert lines[0] == f"{folder / 'test' / 'blue' / '0.png'}: blue ({lines[0].split('(')[1]}"
    backend, *problems = result.stderr.splitlines()  # which backend runs the model, then the files it could not read
    assert backend.startswith("backend: ")
    assert problems[0].startswith(f"error: {folder / 'test' / 'blue' / '0-broken.png'}: not a readable image")

    out = tmp_path / "rows.csv"
    written = run("predict", run_dir, folder / "test", "--out", out)
    assert written.exit_code == 0 and f"saved {out}" in written.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 33 and rows[0]["error"] and rows[0]["predicted"] == ""
    assert {r["predicted"] for r in rows[1:]} <= set(COLOURS) and set(rows[0]) >= {"p_blue", "p_green", "p_red"}
    listed = run("predict", run_dir, folder / "test", "--out", tmp_path / "rows.json")
    assert listed.exit_code == 0
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 33

    (tmp_path / "nothing").mkdir()
    empty = run("predict", run_dir, tmp_path / "nothing")
    assert empty.exit_code == 2 and "no image files in this folder" in empty.output
    clash = run("predict", run_dir, folder / "test", "--out", tmp_path / "x.csv", "--json")
    assert clash.exit_code == 2 and "--out" in clash.output and not (tmp_path / "x.csv").exists()


def test_label_issues_find_the_planted_label_and_the_copy_across_splits(folder_run):
    _, run_dir = folder_run
    result = run("show", "label-issues", run_dir, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    labels = [o for o in found if o["kind"] == "label"]
    assert labels[0]["file"] == "test/blue/planted.png"
    assert (labels[0]["given"], labels[0]["suggested"]) == ("blue", "red")
    assert all({"file", "split", "given", "suggested", "score"} <= set(o) for o in found)
    assert [o["score"] for o in labels] == sorted((o["score"] for o in labels), reverse=True)
    duplicates = [o for o in found if o["kind"] == "duplicate"]
    assert [(d["file"], d["duplicate_of"], d["duplicate_split"]) for d in duplicates] == \
        [("test/green/copy.png", "train/green/3.png", "train")]

    text = run("show", "label-issues", run_dir)
    assert text.exit_code == 0
    assert "held out from training" in text.output and "test/blue/planted.png  blue -> red" in text.output
    assert "test: test/green/copy.png (green) = train: train/green/3.png (green)" in text.output


def test_folds_check_the_training_images_too(folder_run, tmp_path):
    _, run_dir = folder_run
    held_out_only = json.loads(run("show", "label-issues", run_dir, "--json", "--limit", "0").stdout)
    assert not any(o["split"] == "train" for o in held_out_only if o["kind"] == "label")
    before = sorted(p.name for p in run_dir.parent.iterdir())
    result = run("show", "label-issues", run_dir, "--json", "--limit", "0", "--folds", "2")
    assert result.exit_code == 0, result.output
    labels = [o for o in json.loads(result.stdout) if o["kind"] == "label"]
    planted = [o for o in labels if o["file"] == "train/green/planted-train.png"]
    assert planted and (planted[0]["split"], planted[0]["given"], planted[0]["suggested"]) == ("train", "green", "blue")
    assert labels[0]["file"] in ("train/green/planted-train.png", "test/blue/planted.png")
    assert sorted(p.name for p in run_dir.parent.iterdir()) == before  # the fold runs left nothing behind
    text = run("show", "label-issues", run_dir, "--folds", "2")
    assert "fold 1/2: training on" in text.output and "fold 2/2: training on" in text.output
    summary = next(line for line in text.output.splitlines() if "possible label issue" in line)
    # 40 training pictures a class and the planted one; the test split's planted picture and copy, not the broken one
    assert "among the 121 train and 30 validation and 32 test images (each judged by a model that did not " \
           "train on it: the training images by 2 runs of its folds)" in summary

    refused = run("show", "label-issues", run_dir, "--folds", "1")
    assert refused.exit_code == 2 and "--folds: 2 or more" in refused.output
    too_many = run("show", "label-issues", run_dir, "--folds", "500")  # 121 training images: empty folds
    assert too_many.exit_code == 2 and "--folds 500: expected 2 to 121" in too_many.output
    assert "Traceback" not in too_many.output


@pytest.mark.unit
def test_confident_learning_against_a_hand_worked_example():
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1, 0])
    # class 0's images give class 0 on average (0.9 + 0.7 + 0.1) / 3; class 1's give class 1 (0.8 + 0.4) / 2
    assert np.allclose(class_thresholds(probabilities, labels), [1.7 / 3, 0.6])
    indices, suggested, scores = confident_issues(probabilities, labels)
    # image 4 (labelled 0, p1 0.9 >= 0.6) and image 3 (labelled 1, p0 0.6 >= 0.567); image 1 (p1 0.3) is not
    assert indices.tolist() == [4, 3] and suggested.tolist() == [1, 0]
    assert np.allclose(scores, [0.8, 0.2])


def test_a_named_dataset_names_its_test_images_by_index():
    run_dir = tiny_run("mnist-sample")
    with open(run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = json.loads((run_dir / "test.json").read_text())
    assert [r["file"] for r in rows] == [str(i) for i in range(test["num_images"])]
    assert np.isclose(np.mean([r["true"] == r["predicted"] for r in rows]), test["accuracy"])


@pytest.mark.unit
def test_two_pictures_of_one_shape_in_two_colours_are_not_duplicates():
    from cnnlab.inspect.label_issues import duplicate_pairs, thumbnails

    disc = np.zeros((32, 32), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    disc[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = 200
    red, green = np.zeros((2, 3, 32, 32), np.uint8)
    red[0], green[1] = disc, disc  # the same disc, in red and in green: equal in grey
    copy = red.copy()
    thumbs = thumbnails(torch.from_numpy(np.stack([red, green, copy])))
    pairs = duplicate_pairs(thumbs, np.array([0, 2, 2]))  # red in train; green and red's copy in test
    assert [(i, j) for i, j, _ in pairs] == [(0, 2)]  # the copy, not the green disc
