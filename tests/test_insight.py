"""What a practitioner asks of a trained run beyond accuracy: are its probabilities honest (calibration,
ECE), what its features look like (a PCA / t-SNE map of the penultimate layer), and what its training
batches look like (`show batch`, bitwise the trainer's first step)."""
from __future__ import annotations

import io
import json
import re
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
from cnnlab.inspect.batch import first_batch, mosaic
from cnnlab.inspect.embedding import (
    EmbeddingError,
    classifier_layer,
    embed,
    neighbour_agreement,
    pca,
    penultimate,
    tsne,
)
from cnnlab.inspect.show import LoadedRun, show_calibration, show_embedding
from cnnlab.models.cnn import build_model
from cnnlab.training.calibration import calibration
from cnnlab.training.engine import Trainer
from use_runs import tiny_run

runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------ calibration
def two_class(confidence: float, right: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n predictions of class 0 at `confidence`, of which `right` are truly class 0."""
    probabilities = np.tile([confidence, 1 - confidence], (n, 1))
    labels = np.array([0] * right + [1] * (n - right))
    return probabilities, labels


@pytest.mark.unit
def test_honest_probabilities_have_no_calibration_error():
    cal = calibration(*two_class(0.8, 800, 1000))
    assert cal.ece == pytest.approx(0.0, abs=1e-12) and cal.mce == pytest.approx(0.0, abs=1e-12)
    assert cal.verdict == "about right on average"
    assert sum(cal.counts) == 1000 and cal.counts[11] == 1000  # 0.8 is in (11/15, 12/15]


@pytest.mark.unit
def test_an_overconfident_model_is_measured_and_named():
    cal = calibration(*two_class(0.9, 600, 1000))
    assert cal.ece == pytest.approx(0.3) and cal.mce == pytest.approx(0.3)
    assert cal.verdict == "overconfident by 30.0% on average"
    under = calibration(*two_class(0.6, 900, 1000))
    assert under.verdict == "underconfident by 30.0% on average"


@pytest.mark.unit
def test_ece_matches_a_loop_over_the_bins():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 500)
    cal = calibration(probabilities, labels, bins=10)
    confidence, right = probabilities.max(1), probabilities.argmax(1) == labels
    expected = 0.0
    for b in range(10):
        inside = (confidence > b / 10) & (confidence <= (b + 1) / 10)
        if inside.any():
            expected += inside.sum() / 500 * abs(right[inside].mean() - confidence[inside].mean())
    assert cal.ece == pytest.approx(expected)
    assert cal.to_dict()["confidence"][0] is None  # no confidence under 0.25 with 4 classes: an empty bin, null


@pytest.mark.unit
@pytest.mark.parametrize("spread", [(3, 4, 1), (1, 40, 900)])
def test_the_count_axis_reads_in_plain_numbers(spread):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cnnlab.inspect.reliability_diagram import reliability_figure

    few, some, many = spread  # 4 images in a bin read "4" on a few-image run, not "4×10⁰"
    probabilities = np.concatenate([np.tile([p, 1 - p], (n, 1)) for p, n in ((0.55, few), (0.7, some), (0.95, many))])
    labels = np.zeros(len(probabilities), dtype=int)
    figure = reliability_figure(calibration(probabilities, labels))
    FigureCanvasAgg(figure).draw()
    counts = figure.axes[1]
    low, high = counts.get_ylim()
    labels_shown = [t.get_text() for t in counts.get_yticklabels() if low <= t.get_position()[1] <= high]
    minor = [t.get_text() for t in counts.get_yticklabels(minor=True) if t.get_text()]
    assert labels_shown and all(re.fullmatch(r"[\d,]+", text) for text in labels_shown), labels_shown
    assert minor == []
    assert int(labels_shown[-1].replace(",", "")) >= max(spread) / 5  # the ticks reach up to the fullest bin


@pytest.mark.unit
def test_calibration_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="as many labels as predictions"):
        calibration(np.ones((3, 2)) / 2, np.zeros(2, dtype=int))


def test_evaluate_reports_ece_in_the_json_and_the_table():
    run = tiny_run()
    result = cli("evaluate", run, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert 0 <= data["ece"] <= 1 and data["ece"] == data["calibration"]["ece"]
    assert sum(data["calibration"]["counts"]) == data["num_images"]
    table = cli("evaluate", run)
    assert f"calibration: ECE {data['ece']:.4f}" in table.stdout


def test_show_calibration_draws_the_run_s_test_predictions(tmp_path):
    run = tiny_run()
    result = cli("show", "calibration", run, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "test.json").read_text())
    assert f"ECE {recorded['ece']:.4f}" in result.stdout  # the picture's numbers are the run's test numbers
    with Image.open(tmp_path / "c.png") as image:
        assert image.size == (600, 640)
    assert show_calibration(LoadedRun(run), io.BytesIO()).counts == recorded["calibration"]["counts"]


# ------------------------------------------------------------------------------------ the feature map
@pytest.mark.unit
def test_the_penultimate_features_are_what_the_classifier_reads():
    model = build_model(load_config("seed", overrides=["first_layer_convs=4", "dense_layer_size=16"]).model,
                        seed=0)
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    features = penultimate(model, images, batch_size=3)
    assert features.shape == (7, 16)
    model.eval()
    logits = model(images.float() / 255)
    recomputed = classifier_layer(model)(torch.from_numpy(features).float())
    assert torch.allclose(recomputed, logits, atol=1e-5)


@pytest.mark.unit
def test_pca_finds_the_direction_of_most_variance():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(300, 5)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1])
    coords, explained = pca(data)
    assert explained[0] > 0.85 and explained[1] > 0.05
    assert abs(np.corrcoef(coords[:, 0], data[:, 0])[0, 1]) > 0.99


@pytest.mark.unit
def test_neighbour_agreement_tells_separated_classes_from_mixed_ones():
    rng = np.random.default_rng(2)
    apart = np.concatenate([rng.normal(size=(50, 2)), rng.normal(size=(50, 2)) + 100])
    labels = np.array([0] * 50 + [1] * 50)
    assert neighbour_agreement(apart, labels, chunk=7) == 1.0
    mixed = rng.normal(size=(100, 2))
    assert neighbour_agreement(mixed, labels) < 0.75


def test_a_trained_network_separates_its_classes_on_the_map():
    loaded = LoadedRun(tiny_run())
    images, labels = loaded.test_set
    trained = embed(loaded.model, images[:400], labels[:400], "pca")
    untrained = build_model(loaded.config.model, loaded.model.input_shape, 10, seed=1)
    fresh = embed(untrained, images[:400], labels[:400], "pca")
    assert trained.agreement > fresh.agreement + 0.1
    assert trained.count == 400 and len(trained.explained) == 2


def test_tsne_is_seeded_and_needs_scikit_learn(monkeypatch):
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 8])
    assert np.array_equal(tsne(data, seed=0), tsne(data, seed=0))
    assert neighbour_agreement(tsne(data, seed=0), np.array([0] * 30 + [1] * 30)) == 1.0
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # as if not installed
    with pytest.raises(EmbeddingError, match="t-SNE needs scikit-learn"):
        tsne(data)


def test_show_embedding_draws_a_map_and_refuses_a_bad_method(tmp_path):
    run = tiny_run()
    result = cli("show", "embedding", run, "--images", "300", "--thumbnails", "10", "--out", tmp_path / "m.png")
    assert result.exit_code == 0, result.output
    assert "PCA of the 32-number penultimate features" in result.stdout and "300 test images" in result.stdout
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")
    bad = cli("show", "embedding", run, "--method", "umap", "--out", tmp_path / "x.png")
    assert bad.exit_code == 2 and "umap" in bad.output and not (tmp_path / "x.png").exists()
    assert show_embedding(LoadedRun(run), io.BytesIO(), count=50, thumbnails=0).count == 50


# ------------------------------------------------------------------------------------ show batch
def first_step_input(config, tmp_path) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels the trainer's first optimisation step receives for `config`."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_step = Trainer.train_step

    def record(self, images, labels, *rest):
        seen.append((images.clone(), labels.clone()))
        return real_step(self, images, labels, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", record)
        pipeline.train(config, tmp_path, name="recorded", progress=False)
    return seen[0]


@pytest.mark.parametrize("extra", [["train.augment_shift=2", "train.augment_flip=true", "train.augment_erase=0.5"],
                                   ["train.sampling=balanced", "train.augment_shift=1", "train.augment_rotate=12"]])
def test_show_batch_is_bitwise_the_first_training_step(tmp_path, extra):
    config = load_config("seed", overrides=["epochs=1", "first_layer_convs=4", "dense_layer_size=8",
                                            "train.batch_size=48", "train.seed=5", *extra],
                         data={"dataset": "mnist-sample"})
    images, labels = first_step_input(config, tmp_path)
    batch = first_batch(config, pipeline.open_data(config, progress=False))
    assert torch.equal(batch.seen, images) and torch.equal(batch.labels, labels)
    assert not torch.equal(batch.read, batch.seen)  # the augmentation changed something: it is shown as done
    assert batch.augmented and "shift up to" in batch.augmentation
    assert ("rotate up to 12 degrees" in batch.augmentation) == ("train.augment_rotate=12" in extra)


def test_show_batch_from_a_run_or_options_and_refuses_both(tmp_path):
    run = tiny_run()
    result = cli("show", "batch", run, "--out", tmp_path / "b.png", "--limit", "16")
    assert result.exit_code == 0, result.output
    assert "the first batch of 32 training images (16 drawn)" in result.stdout and "augmentation: none" in result.stdout
    with Image.open(tmp_path / "b.png") as image:
        assert image.size[0] > image.size[1]  # 8 columns by 2 rows
    from_options = cli("show", "batch", "--dataset", "fashion-mnist-sample", "--set", "train.augment_flip=true",
                       "--out", tmp_path / "f.png")
    assert from_options.exit_code == 0 and "augmentation: mirror half" in from_options.stdout
    assert "Sneaker" in from_options.stdout or "Bag" in from_options.stdout  # class names, not indices
    both = cli("show", "batch", run, "--set", "dropout=0.1", "--out", tmp_path / "n.png")
    assert both.exit_code == 2 and "drop --set" in both.output and not (tmp_path / "n.png").exists()
    missing = cli("show", "batch", tmp_path / "no-run", "--out", tmp_path / "n.png")
    assert missing.exit_code == 2 and "no-run" in missing.output and "Traceback" not in missing.output


@pytest.mark.unit
def test_a_colour_batch_is_tiled_in_colour(tmp_path):
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (20, 20), tuple(min(255, c + 3 * i) for c in colour)).save(folder / f"{i}.png")
    result = cli("show", "batch", "--dataset", tmp_path / "photos", "--set", "data.image_size=16",
                 "--out", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert "16x16, 3 channel(s)" in result.stdout
    tiles = mosaic(torch.full((3, 3, 4, 4), 200, dtype=torch.uint8), columns=2, band=2)
    assert tiles.shape == (2 * (4 + 2 + 2), 2 * (4 + 2), 3)
    assert (tiles[:4, :4] == 200).all() and (tiles[4:6, :4] == 255).all()  # the image, then its label band


@pytest.mark.unit
def test_show_batch_keeps_the_lesson_s_paths_out_of_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("show", "batch", "--out", "batch.png").exit_code == 0
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["batch.png"]  # no run directory, nothing else
