"""Reusing what a run learned, and imbalanced classes: `--init-from RUN` (the features copied bitwise, a new
head for new classes, grey <-> colour), frozen and slower feature layers, class weights and balanced sampling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab import pipeline
from cnnlab.cli import app
from cnnlab.config import ConfigError, load_config
from cnnlab.models.cnn import build_model
from cnnlab.runs.layout import RunError
from cnnlab.runs.transfer import adapt_input_conv, start_from
from cnnlab.runs.weights import load_model
from cnnlab.training.callbacks import Callback
from cnnlab.training.optim import parameter_groups
from cnnlab.training.sampling import class_weights, epoch_order, sampling_weights
from conftest import tiny_config, tiny_overrides
from use_runs import tiny_run


class FirstWeights(Callback):
    """The model's weights when training begins, and after the first epoch."""

    def on_train_begin(self, progress):
        self.begin = {k: v.clone() for k, v in progress.model.state_dict().items()}

    def on_epoch_end(self, progress, metrics):
        if progress.epoch == 1:
            self.after_one = {k: v.clone() for k, v in progress.model.state_dict().items()}


def fine_tune_config(source, *overrides: str):
    """What `--init-from` resolves to: the source run's config as the base."""
    base = load_model(source)[2].to_dict()
    base["train"]["init_from"] = str(source)
    return load_config(None, overrides=tiny_overrides("epochs=1", *overrides, shrink_model=False), base=base)


# ---------------------------------------------------------------------------------- --init-from
def test_a_fine_tuned_run_starts_at_the_source_features_bitwise_with_a_new_head(tmp_path):
    source = tiny_run("mnist-sample")
    seen = FirstWeights()
    result = pipeline.train(fine_tune_config(source, "data.dataset=fashion-mnist-sample"), tmp_path, name="ft",
                            callbacks=[seen], progress=False)
    trained = load_model(source)[0].state_dict()
    features = [k for k in trained if k.startswith("features.")]
    assert features and all(torch.equal(seen.begin[k], trained[k]) for k in features)
    assert torch.equal(seen.begin["head.fc1.weight"], trained["head.fc1.weight"])  # hidden dense: same shape
    assert not torch.equal(seen.begin["head.classifier.weight"], trained["head.classifier.weight"])  # new classes
    manifest = json.loads((result.run / "manifest.json").read_text())
    assert manifest["init_from"]["run"] == str(source) and manifest["init_from"]["head"].startswith("new classifier")


def test_the_same_classes_keep_the_whole_head(tmp_path):
    source = tiny_run("mnist-sample")
    model = build_model(load_model(source)[2].model, (28, 28, 1), 10, seed=5)
    record = start_from(model, source, tuple(str(i) for i in range(10)))
    trained = load_model(source)[0].state_dict()
    assert record["head"] == "copied" and all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


@pytest.mark.unit
def test_a_grey_kernel_adapted_to_colour_gives_the_same_output_on_a_grey_picture():
    torch.manual_seed(0)
    grey_kernel, grey = torch.randn(4, 1, 3, 3), torch.rand(2, 1, 8, 8)
    colour = grey.repeat(1, 3, 1, 1)  # R = G = B
    expected = torch.nn.functional.conv2d(grey, grey_kernel)
    assert torch.allclose(torch.nn.functional.conv2d(colour, adapt_input_conv(grey_kernel, 3)), expected, atol=1e-6)
    colour_kernel = torch.randn(4, 3, 3, 3)
    assert torch.allclose(torch.nn.functional.conv2d(grey, adapt_input_conv(colour_kernel, 1)),
                          torch.nn.functional.conv2d(colour, colour_kernel), atol=1e-5)


def test_a_flatten_head_refuses_another_image_size_naming_the_layer_and_leaves_no_run(tmp_path):
    source = tiny_run("mnist-sample")
    model = build_model(load_model(source)[2].model, (32, 32, 1), 10)
    with pytest.raises(RunError, match=r"head.fc1.weight is .* a flatten head fits one image size.*28x28x1"):
        start_from(model, source, tuple("abcdefghij"))


def test_another_architecture_is_refused_naming_the_tensor(tmp_path):
    config = fine_tune_config(tiny_run("mnist-sample"), "model.conv.0.filters=6")
    with pytest.raises(RunError, match="features.conv1.weight is"):
        pipeline.train(config, tmp_path, name="x", progress=False)
    assert not (tmp_path / "x").exists()


def write_grey_folder(root, per_class: int = 30):
    """Two classes of 28x28 grey images: a bright left half or a bright right half, with noise."""
    rng = np.random.default_rng(0)
    for name, side in (("left", 0), ("right", 1)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (28, 28), dtype=np.uint8)
            pixels[:, side * 14:(side + 1) * 14] += 180
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_the_command_fine_tunes_on_a_folder_read_at_the_source_image_size(tmp_path):
    source = tiny_run("mnist-sample")
    folder = write_grey_folder(tmp_path / "mine")
    done = CliRunner().invoke(app, ["train", "--init-from", str(source), "--dataset", str(folder), "--epochs", "1",
                                    "--set", "train.freeze_epochs=1", "--threads", "1", "--quiet",
                                    "--runs-dir", str(tmp_path / "runs"), "--name", "mine"])
    assert done.exit_code == 0, done.output
    run = tmp_path / "runs" / "mine"
    model, classes, config = load_model(run)
    assert classes == ("left", "right") and model.input_shape == (28, 28, 1)
    assert config.train.init_from == str(source.resolve())
    refused = CliRunner().invoke(app, ["train", "--init-from", str(source), "--model", "fast", "--quiet",
                                       "--runs-dir", str(tmp_path / "runs")])
    assert refused.exit_code != 0 and "drop --model" in refused.output


def write_colour_photos(root, per_class: int = 12):
    """Two classes of colour photos on a light background: a red or a blue square in the middle."""
    rng = np.random.default_rng(1)
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(200, 256, (40, 40, 3), dtype=np.uint8)
            pixels[10:30, 10:30] = 30
            pixels[10:30, 10:30, channel] = 220
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def fine_tune(source, folder, tmp_path, *extra: str):
    return CliRunner().invoke(app, ["train", "--init-from", str(source), "--dataset", str(folder), "--epochs", "1",
                                    "--threads", "1", "--quiet", "--runs-dir", str(tmp_path / "runs"), *extra])


def test_fine_tuning_a_digits_run_on_colour_photos_says_what_it_converts(tmp_path):
    source = tiny_run("mnist-sample")
    folder = write_colour_photos(tmp_path / "photos")
    done = fine_tune(source, folder, tmp_path, "--name", "grey")
    assert done.exit_code == 0, done.output
    line = done.output.splitlines()[0]
    assert line.startswith(f"fine-tuning from {source} (mnist-sample: grey 28x28, light on black); ")
    assert "16 of 16 sampled images are in colour and are read grey, as it was trained " \
        "(--set data.channels=3 keeps the colour" in line
    assert "images resized to 28x28 (its flatten head fits no other size)" in line
    assert "16 of 16 sampled images are dark on a light background, the opposite of what it learned: invert them " \
        "first" in line
    assert load_model(tmp_path / "runs" / "grey")[0].input_shape == (28, 28, 1)

    colour = fine_tune(source, folder, tmp_path, "--name", "colour", "--set", "data.channels=3")
    assert colour.exit_code == 0, colour.output
    line = colour.output.splitlines()[0]
    assert "channels 1->3: its first convolution's kernels are spread over R, G and B, a third each" in line
    assert "read grey" not in line
    assert load_model(tmp_path / "runs" / "colour")[0].input_shape == (28, 28, 3)


def test_fine_tuning_on_a_registered_dataset_of_the_same_kind_says_only_where_it_starts(tmp_path):
    source = tiny_run("mnist-sample")
    done = CliRunner().invoke(app, ["train", "--init-from", str(source), "--dataset", "fashion-mnist-sample",
                                    "--epochs", "1", "--threads", "1", "--quiet", "--set", "data.val_size=500",
                                    "--runs-dir", str(tmp_path / "runs"), "--name", "clothes"])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0] == f"fine-tuning from {source} (mnist-sample: grey 28x28, light on black)"


# ---------------------------------------------------------------------------------- freezing, slower features
def test_frozen_epochs_keep_the_kernels_and_train_the_head_and_batch_norm(tmp_path):
    config = tiny_config("train.freeze_epochs=1", model="fast", shrink_model=False)
    seen = FirstWeights()
    pipeline.train(config, tmp_path, name="frozen", callbacks=[seen], progress=False)
    begin, after = seen.begin, seen.after_one
    assert torch.equal(begin["features.conv1.weight"], after["features.conv1.weight"])
    assert not torch.equal(begin["features.bn1.weight"], after["features.bn1.weight"])  # batch norm learns
    assert not torch.equal(begin["head.classifier.weight"], after["head.classifier.weight"])
    final = load_model(tmp_path / "frozen")[0].state_dict()
    assert not torch.equal(begin["features.conv1.weight"], final["features.conv1.weight"])  # epoch 2 trains them


@pytest.mark.unit
def test_the_features_can_learn_at_a_multiple_of_the_learning_rate():
    config = load_config("fast", overrides=["train.features_lr_scale=0.1"])
    model = build_model(config.model)
    groups = parameter_groups(model, config.train)
    scales = {group["lr_scale"]: sum(p.numel() for p in group["params"]) for group in groups}
    features = sum(p.numel() for n, p in model.named_parameters() if n.startswith("features."))
    assert scales == {0.1: features, 1.0: sum(p.numel() for p in model.parameters()) - features}


# ---------------------------------------------------------------------------------- imbalance
LABELS = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)


@pytest.mark.unit
def test_balanced_class_weights_follow_the_n_over_classes_times_count_rule():
    config = load_config("seed", overrides=["train.class_weights=balanced"]).train
    weights = class_weights(config, LABELS, 3)
    assert torch.allclose(weights, torch.tensor([100 / (3 * 80), 100 / (3 * 15), 100 / (3 * 5)]))
    given = load_config("seed", overrides=["train.class_weights=[1, 2, 3]"]).train
    assert class_weights(given, LABELS, 3).tolist() == [1, 2, 3]
    with pytest.raises(ConfigError, match="expected 3 weights"):
        class_weights(load_config("seed", overrides=["train.class_weights=[1, 2]"]).train, LABELS, 3)


def test_class_weights_change_the_loss_the_model_learns_from(tmp_path):
    plain = pipeline.train(tiny_config("epochs=1", "first_layer_convs=4", shrink_model=False), tmp_path, name="a",
                           progress=False)
    weighted = pipeline.train(tiny_config("epochs=1", "first_layer_convs=4",
                                          "train.class_weights=[1, 1, 1, 1, 1, 1, 1, 1, 1, 20]", shrink_model=False),
                              tmp_path, name="b", progress=False)
    # class 9 counts twenty times: the network predicts it more often, its recall rises
    recall = {r.run.name: r.test.per_class[9]["recall"] for r in (plain, weighted)}
    predicted_nine = {r.run.name: int(r.test.confusion[:, 9].sum()) for r in (plain, weighted)}
    assert predicted_nine["b"] > predicted_nine["a"] and recall["b"] >= recall["a"]


@pytest.mark.unit
def test_a_wrong_number_of_class_weights_is_refused_before_a_run_exists(tmp_path):
    with pytest.raises(ConfigError, match="train.class_weights: expected 10 weights"):
        pipeline.train(tiny_config("epochs=1", "train.class_weights=[1, 2]", shrink_model=False), tmp_path, name="x",
                       progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.unit
def test_balanced_sampling_draws_every_class_about_as_often():
    config = load_config("seed", overrides=["train.sampling=balanced"]).train
    order = epoch_order(len(LABELS), 0, 0, sampling_weights(config, LABELS, 3))
    counts = torch.bincount(LABELS[order], minlength=3)
    assert len(order) == 100 and counts.min() >= 20  # shuffled, class 2 would come 5 times in 100
    assert torch.equal(order, epoch_order(len(LABELS), 0, 0, sampling_weights(config, LABELS, 3)))


@pytest.mark.unit
def test_the_per_class_table_flags_classes_with_far_fewer_examples():
    from cnnlab.cli.training import few_examples, format_evaluation
    from cnnlab.training.evaluate import Evaluation

    def evaluation(counts, classes):
        n = sum(counts)
        return Evaluation(classes=classes, loss=0.1, accuracy=1.0, confusion=np.diag(counts),
                          predictions=np.zeros(n, dtype=np.int64), probabilities=np.zeros((n, len(classes))))

    imbalanced = evaluation([90, 85, 80, 10], ("a", "b", "c", "d"))  # class d: 10 images against a median of 85
    assert few_examples(imbalanced.per_class) == ["d"]
    table = format_evaluation(imbalanced)
    assert "d" in [line.split()[0] for line in table.splitlines() if line.endswith("<- few examples")]
    assert "train.class_weights: balanced" in table
    assert few_examples(evaluation([50, 40, 30], ("a", "b", "c")).per_class) == []
    untested = format_evaluation(evaluation([50, 40, 0], ("a", "b", "c")))  # c has no test image at all
    assert "c" in [line.split()[0] for line in untested.splitlines() if line.endswith("<- no test image")]
    assert "no test image: c" in untested and "few examples" not in untested
