"""Looking inside trained runs: show kernels|features|mistakes|saliency|curves, report, runs [compare]."""
from __future__ import annotations

import base64
import io
import json
import re
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import dotted_keys
from cnnlab.inspect.activations import feature_maps, plot_kernels
from cnnlab.inspect.run_table import config_differences, run_rows
from cnnlab.inspect.show import LoadedRun, choose_input, show_features, show_kernels, show_mistakes, show_saliency
from cnnlab.runs import layout
from cnnlab.training.evaluate import infer
from cnnlab.use.recipes import prepare
from conftest import tiny_train_args

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs on the MNIST sample that differ only in conv1's filters (4 and 6)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        for name, filters in (("a", 4), ("b", 6)):
            result = run("train", *tiny_train_args("--epochs", "1", "--set", "dense_layer_size=8", "--set",
                                                  f"first_layer_convs={filters}"), "--runs-dir", root, "--name", name)
            assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def loaded(trained):
    return LoadedRun(trained / "a")


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ------------------------------------------------------------------------------------ kernels
def test_show_kernels_draws_one_panel_per_filter(trained, tmp_path, loaded):
    result = run("show", "kernels", trained / "a", "--layer", "conv1", "--out", tmp_path / "k.png")
    assert result.exit_code == 0, result.output
    assert "4 filters x 1 input channel(s) in a 1x4 grid" in result.output
    assert (tmp_path / "k.png").read_bytes().startswith(b"\x89PNG")
    grid = show_kernels(loaded, io.BytesIO())
    assert (grid.filters, grid.channels, grid.rows, grid.columns) == (4, 1, 1, 4)


@pytest.mark.unit
def test_colour_kernels_get_a_column_per_input_channel(tmp_path):
    grid = plot_kernels(np.random.default_rng(0).normal(size=(5, 3, 3, 3)), tmp_path / "k.png")
    assert (grid.rows, grid.columns) == (5, 3)
    wide, tall = png_size((tmp_path / "k.png").read_bytes())
    assert tall > wide  # five rows of three


def test_unknown_layer_is_a_clear_error(trained, tmp_path):
    result = runner.invoke(app, ["show", "kernels", str(trained / "a"), "--layer", "conv9", "--out",
                                 str(tmp_path / "k.png")])
    assert result.exit_code == 2
    assert "no conv layer 'conv9'; did you mean 'conv1'? (this model has: conv1)" in result.output


# ------------------------------------------------------------------------------- feature maps
def test_feature_maps_are_the_activated_conv_outputs(loaded):
    image = loaded.test_pixels(0)
    maps = feature_maps(loaded.model, image)
    conv = loaded.model.features.conv1
    expected = torch.relu(conv(torch.from_numpy(image)[None, None].float() / 255))[0]
    assert list(maps.maps) == ["conv1"] and maps.maps["conv1"].shape == (4, 26, 26)
    np.testing.assert_allclose(maps.maps["conv1"], expected.detach().numpy(), atol=1e-6)


def test_show_features_for_a_test_image_and_for_a_user_file(trained, tmp_path, loaded):
    result = run("show", "features", trained / "b", "--index", "3", "--out", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    assert "test image 3 (true: " in result.output and "conv1 6" in result.output
    photo = tmp_path / "digit.png"
    drawing = np.full((90, 60), 250, np.uint8)  # a dark bar on white paper, not 28x28
    drawing[20:70, 25:35] = 10
    Image.fromarray(drawing).save(photo)
    result = run("show", "features", trained / "a", photo, "--out", tmp_path / "g.png")
    assert result.exit_code == 0, result.output
    assert "digit.png" in result.output
    panels = show_features(loaded, io.BytesIO(), choose_input(loaded, index=0))
    assert panels == {"input": 1, "conv1": 4}


def test_user_images_are_prepared_by_the_runs_dataset_recipe(loaded, tmp_path):
    drawing = np.full((90, 60), 250, np.uint8)
    drawing[20:70, 25:35] = 10  # a dark "1" on white paper
    Image.fromarray(drawing).convert("RGB").save(tmp_path / "d.jpg")
    picture = choose_input(loaded, tmp_path / "d.jpg")
    np.testing.assert_array_equal(picture.pixels, prepare(tmp_path / "d.jpg", "digits"))
    assert picture.pixels.shape == (28, 28) and picture.pixels[0, 0] < 30 and picture.pixels.max() > 200


def test_image_and_index_together_or_neither_are_refused(trained, tmp_path):
    neither = runner.invoke(app, ["show", "features", str(trained / "a"), "--out", str(tmp_path / "f.png")])
    assert neither.exit_code == 2 and "either an image file or a test-set index" in neither.output
    bad = runner.invoke(app, ["show", "saliency", str(trained / "a"), "--index", "5000"])
    assert bad.exit_code == 2 and "--index must be 0..999" in bad.output


# ----------------------------------------------------------------------------------- mistakes
def test_mistakes_are_misclassified_worst_first(trained, tmp_path, loaded):
    result = run("show", "mistakes", trained / "a", "--limit", "12", "--out", tmp_path / "m.png")
    assert result.exit_code == 0 and (tmp_path / "m.png").is_file()
    mistakes = show_mistakes(loaded, io.BytesIO(), limit=12)
    labels = loaded.test_labels
    probabilities = torch.softmax(infer(loaded.model, loaded.test_set[0]), 1).numpy()
    predictions = probabilities.argmax(1)
    assert 0 < len(mistakes) <= 12
    for m in mistakes:
        assert m.true_label == labels[m.index] != predictions[m.index] == m.predicted_label
        assert m.confidence == pytest.approx(probabilities[m.index, m.predicted_label], abs=1e-6)
    confidences = [m.confidence for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    wrong = predictions != labels
    assert min(confidences) >= np.sort(probabilities[wrong, predictions[wrong]])[-len(mistakes)] - 1e-6
    assert f"#{mistakes[0].index}: true {loaded.classes[mistakes[0].true_label]}" in result.output


# ----------------------------------------------------------------------------------- saliency
@pytest.mark.parametrize("method", ["gradcam", "gradient"])
def test_saliency_heat_map(trained, tmp_path, loaded, method):
    result = run("show", "saliency", trained / "a", "--index", "0", "--method", method, "--target", "7",
                 "--out", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    assert f"{method} for class 7" in result.output
    heat = show_saliency(loaded, io.BytesIO(), choose_input(loaded, index=0), method=method)
    assert heat.heat.shape == (28, 28) and heat.heat.min() >= 0 and heat.heat.max() == pytest.approx(1)
    assert heat.target == int(heat.probabilities.argmax())


# ------------------------------------------------------------------------------------- curves
@pytest.mark.unit
@pytest.mark.parametrize("classes", [2, 3, 10])
def test_the_confusion_matrix_title_is_never_cut_off(classes):
    from cnnlab.inspect.figures import plot_confusion

    out = io.BytesIO()
    names = tuple(f"class {i}" for i in range(classes))
    plot_confusion(np.eye(classes, dtype=int) * 50 + 1, names, out, title="mnist-pair: confusion on 1,000 test images")
    picture = np.asarray(Image.open(out).convert("L"))
    title_band = picture[: picture.shape[0] // 8]  # the title sits above the matrix
    assert (title_band < 128).any()  # it is drawn ...
    assert title_band[:, :2].min() > 200 and title_band[:, -2:].min() > 200  # ... and inside the picture


def test_show_curves_and_compare_overlay(trained, tmp_path):
    assert run("show", "curves", trained / "a", "--out", tmp_path / "c.png").exit_code == 0
    assert png_size((tmp_path / "c.png").read_bytes()) == (1000, 400)
    result = run("runs", "compare", trained / "a", trained / "b", "--out", tmp_path / "both.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "both.png").is_file()


# -------------------------------------------------------------------------------------- report
def test_report_is_one_self_contained_page(trained, tmp_path):
    result = run("report", trained / "a")
    assert result.exit_code == 0, result.output
    page = layout.path(trained / "a", "report").read_text()
    for section in ("summary", "curves", "results", "mistakes", "learned", "config"):
        assert f'<section id="{section}">' in page
    assert "precision" in page and "eval_batch_size" in page and "Total params" in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert all(s.startswith(("data:image/png;base64,", "#")) for s in sources), sources
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = [s for s in sources if s.startswith("data:")]
    # curves, confusion, calibration, mistakes, kernels, 3 x (feature maps, saliency), the PCA and t-SNE maps
    assert len(images) >= (13 if find_spec("sklearn") else 12)
    assert "Calibration" in page and "A map of the learned features" in page
    summary = page.split('<section id="summary">', 1)[1]
    assert "<th></th>" not in page and summary.split("<table>", 1)[1].startswith("<tr><td>dataset</td>")
    for uri in images:
        assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG")
    other = tmp_path / "elsewhere.html"
    assert run("report", trained / "b", "--out", other).exit_code == 0 and other.is_file()


# ---------------------------------------------------------------------------------- runs table
def test_runs_json_rows_and_sorting(trained):
    rows = json.loads(run("runs", "--runs-dir", trained, "--json").output)
    assert [r["run"] for r in rows] == ["a", "b"]
    a = rows[0]
    params = 40 + 13 * 13 * 4 * 8 + 8 + 90
    assert (a["dataset"], a["model"], a["epochs"], a["params"]) == ("mnist-sample", "seed", 1, params)
    assert 0 <= a["test_accuracy"] <= 1 and 0 <= a["val_accuracy"] <= 1 and a["seconds"] > 0
    by_accuracy = run_rows(trained, "test_accuracy")
    assert [r["test_accuracy"] for r in by_accuracy] == sorted((r["test_accuracy"] for r in rows), reverse=True)
    assert [r["run"] for r in run_rows(trained, "run", reverse=True)] == ["b", "a"]
    table = run("runs", "--runs-dir", trained, "--sort", "params")
    assert table.exit_code == 0 and "mnist-sample" in table.output and "1/1" in table.output


@pytest.mark.unit
def test_runs_on_an_empty_folder(tmp_path):
    assert "no runs under" in run("runs", "--runs-dir", tmp_path).output
    assert json.loads(run("runs", "--runs-dir", tmp_path, "--json").output) == []


def test_compare_shows_only_the_keys_that_differ(trained):
    assert config_differences([trained / "a", trained / "b"]) == {"model.conv.0.filters": [4, 6]}
    output = run("runs", "compare", trained / "a", trained / "b").output
    assert "model.conv.0.filters" in output and "train.lr" not in output and "data.dataset" not in output
    assert "test_accuracy" in output


@pytest.mark.unit
def test_dotted_keys_are_the_keys_set_takes():
    assert dotted_keys({"model": {"conv": [{"filters": 4, "kernel_size": [3, 3]}]}, "train": {"lr": 0.1}}) == {
        "model.conv.0.filters": 4, "model.conv.0.kernel_size": [3, 3], "train.lr": 0.1}


def test_a_tall_kernel_grid_says_how_many_filters_it_leaves_out_and_keeps_its_title_inside(tmp_path):
    from cnnlab.inspect.activations import plot_kernels, wrap_title

    weights = np.random.default_rng(0).normal(size=(32, 3, 3, 3))  # a colour layer: a row per filter, 16 drawn
    long_title = "a-colour-run-20261206-001122: conv1, 32 learned 3x3 kernels (input channels: 3)"
    grid = plot_kernels(weights, tmp_path / "k.png", "conv1", title=long_title)
    assert grid.describe() == "conv1: 16 of 32 filters x 3 input channel(s) in a 16x3 grid"
    assert plot_kernels(weights[:4], tmp_path / "all.png").describe() == \
        "conv1: 4 filters x 3 input channel(s) in a 4x3 grid"  # all drawn: no "of"
    wrapped = wrap_title(long_title + "\n(the first 16 of 32 filters shown)", 4.5)  # a 3-column grid's width
    assert wrapped.replace("\n", " ") == long_title + " (the first 16 of 32 filters shown)"
    assert all(len(line) <= 49 for line in wrapped.splitlines())


@pytest.mark.unit
def test_a_class_is_found_by_its_name_before_its_index():
    from cnnlab.inspect.show import class_index

    classes = ("10", "2", "3")  # a folder of classes named by numbers, in label (sorted) order
    assert class_index(classes, "2") == 1 and class_index(classes, "10") == 0
    assert class_index(classes, "0") == 0  # not a name: an index
    assert class_index(("cat", "dog"), "DOG") == 1 and class_index(("cat", "dog"), "1") == 1
