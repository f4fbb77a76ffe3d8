"""Confusion matrices of many classes stay readable and bounded: the picture, `cnnlab evaluate`'s table and
the notebook's show the most confused classes past 30 and say so; test.json keeps every count."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.cli.training import format_evaluation
from cnnlab.files import write_json
from cnnlab.inspect.figures import plot_confusion
from cnnlab.runs import layout
from cnnlab.runs.records import read_record
from cnnlab.training.evaluate import Evaluation

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def evaluation(confusion: np.ndarray, classes: tuple[str, ...]) -> Evaluation:
    """An Evaluation of the given counts (its predictions and probabilities are not what these tests read)."""
    n = len(classes)
    labels = np.repeat(np.arange(n), confusion.sum(axis=1))
    predictions = np.concatenate([np.repeat(np.arange(n), row) for row in confusion])
    probabilities = np.eye(n, dtype=np.float32)[predictions]
    accuracy = float(np.trace(confusion) / confusion.sum())
    return Evaluation(classes, 0.5, accuracy, confusion, predictions, probabilities, labels)


def many_classes(n: int = 1000) -> tuple[np.ndarray, tuple[str, ...]]:
    """n classes of 3 right answers each; every 25th class i takes i / 25 + 1 images for class i + 1."""
    confusion = np.diag(np.full(n, 3))
    for i in range(0, n, 25):
        confusion[i, (i + 1) % n] = i // 25 + 1
    return confusion, tuple(f"species {i:04d} (Latin name of the plant)" for i in range(n))


def test_a_1000_class_picture_is_bounded_and_keeps_the_most_confused(tmp_path):
    confusion, classes = many_classes()
    out = plot_confusion(confusion, classes, tmp_path / "confusion.png", title="run: test accuracy 99%")
    width, height = Image.open(out).size
    assert width <= 2200 and height <= 2200  # 30 cells of 0.6 inch at 100 dpi, not 1000 of them (600 inches)


@pytest.mark.unit
def test_evaluate_text_of_1000_classes_shows_30_rows_and_says_so():
    confusion, classes = many_classes()
    text = format_evaluation(evaluation(confusion, classes))
    matrix = text[text.index("confusion matrix"):text.index("calibration")].strip().splitlines()
    assert matrix[1] == ("showing the 30 most confused of 1000 classes (most mistakes made plus received); "
                         "every count is in test.json")
    rows = matrix[3:]
    assert len(rows) == 30
    # the 30 with most mistakes (made or received): the last 15 pairs, in class order
    shown = [int(re.search(r"species (\d{4})", row).group(1)) for row in rows]
    assert shown == sorted([*range(625, 1000, 25), *range(626, 1000, 25)])
    assert all(len(row.split()) <= 60 for row in rows)


@pytest.mark.unit
def test_a_few_classes_show_whole_with_readable_names():
    confusion = np.diag(np.full(10, 90))
    confusion[6, 0] = 12  # Shirt taken for T-shirt/top
    text = format_evaluation(evaluation(confusion, FASHION))
    matrix = text[text.index("confusion matrix"):text.index("calibration")].strip().splitlines()
    assert matrix[0] == "confusion matrix (rows: true class, columns: predicted, numbered as the rows)"
    assert matrix[1].split() == [str(i) for i in range(1, 11)]
    assert matrix[2].split()[:2] == ["1", "T-shirt/top"] and matrix[8].split()[:3] == ["7", "Shirt", "12"]
    assert matrix[11].startswith("10 Ankle boot")  # whole names, not "Ankle" / "T-shi"
    digits = format_evaluation(evaluation(confusion, tuple("0123456789")))
    assert "confusion matrix (rows: true class, columns: predicted)\n" in digits  # short names head the columns


@pytest.mark.unit
def test_the_notebook_table_of_1000_classes_is_bounded():
    confusion, classes = many_classes()
    page = evaluation(confusion, classes)._repr_html_()
    assert "showing the 30 most confused of 1000 classes" in page
    assert page.count("<tr>") < 1000 + 40  # the per-class table has a row per class; the matrix 31, not 1001


@pytest.mark.unit
def test_test_json_of_1000_classes_is_within_the_record_limit(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 1000, (1000, 1000))  # wide counts everywhere: a worst case for the JSON's size
    result = evaluation(np.diag(np.full(1000, 2)), many_classes()[1])
    result.confusion = confusion
    write_json(layout.path(tmp_path, "test"), result.to_dict())
    record = read_record(tmp_path, "test")
    assert record is not None and np.array_equal(np.array(record["confusion_matrix"]), confusion)


def write_many_class_folder(root: Path, classes: int = 36, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class {c:02d} with a long folder name").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / f"class {c:02d} with a long folder name" / f"{i}.png")
    return root


def test_evaluate_of_a_36_class_folder_run_end_to_end(tmp_path):
    folder = write_many_class_folder(tmp_path / "photos")
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--dataset", str(folder), "--model", "seed", "--epochs", "1", "--quiet",
                                  "--threads", "1", "--set", "data.image_size=8", "--set", "data.workers=0",
                                  "--set", "first_layer_convs=4", "--set", "dense_layer_size=8",
                                  "--runs-dir", str(tmp_path / "runs"), "--name", "many"])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "many"
    confusion = np.array(json.loads(layout.path(run, "test").read_text())["confusion_matrix"])
    assert confusion.shape == (36, 36)
    width, _ = Image.open(layout.path(run, "confusion")).size
    assert width <= 2200
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    text = result.output
    off = confusion - np.diag(np.diag(confusion))
    with_mistakes = int(((off.sum(axis=0) + off.sum(axis=1)) > 0).sum())
    rows = text[text.index("confusion matrix"):text.index("calibration")].strip().splitlines()[3:]
    assert len(rows) == (min(30, with_mistakes) or 30)
    assert all(re.match(r" ?\d+ class \d\d with a long folder name ", row) for row in rows)  # names whole
    assert f"showing the {len(rows)} most confused of 36 classes" in text
