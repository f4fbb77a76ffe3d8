"""`cnnlab show ...` as library calls: load a run, pick the input, compute, draw; each returns what it drew."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.pixels import image_input, to_pixels
from cnnlab.data.registry import dataset_recipe, is_image_folder
from cnnlab.data.sources import LOAD_ALL_BATCH, Data, load_data, open_test_set, with_data_dir
from cnnlab.errors import UserError
from cnnlab.inspect.activations import (
    FeatureMaps,
    KernelGrid,
    conv_weights,
    feature_maps,
    plot_feature_maps,
    plot_kernels,
)
from cnnlab.inspect.embedding import Embedding, embed, plot_embedding
from cnnlab.inspect.figures import Mistake, Output, find_mistakes, plot_curves, plot_mistakes
from cnnlab.inspect.reliability_diagram import plot_reliability
from cnnlab.inspect.saliency import Saliency, plot_saliency, saliency
from cnnlab.runs import layout, records
from cnnlab.runs.predictions import file_names
from cnnlab.runs.weights import load_model
from cnnlab.training.calibration import Calibration
from cnnlab.training.evaluate import Evaluation, batches_with_positions, evaluate
from cnnlab.use.recipes import prepare


class InputError(UserError, ValueError):
    """An input image or class choice that cannot be used; the message says what is allowed."""


class LoadedRun:
    """A run's model, classes and config, with its test set and test predictions loaded on first use."""

    def __init__(self, run: str | Path, data_dir: str | Path | None = None):
        self.run = Path(run)
        self.model, self.classes, self.config = load_model(run)
        self.config = with_data_dir(self.config, data_dir)

    @property
    def name(self) -> str:
        return self.run.resolve().name

    def data(self, hold: bool = True) -> Data:
        """The run's dataset opened again; an image folder checked against the one the run pinned (FolderChanged
        when its classes are not the run's, a warning when its files changed). `hold`: see load_data."""
        pinned = (records.read_record(self.run, "manifest") or {}).get("image_folder")
        return load_data(self.config, progress=False, hold=hold, pinned=pinned, run=str(self.run))

    @cached_property
    def _test_read(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The readable test images, their labels and each one's file (an image folder's relative path, or
        a named dataset's test index), tied by the positions actually read."""
        if not is_image_folder(self.config.data.dataset):
            images, labels = open_test_set(self.config)
            return images, labels, [str(i) for i in range(len(labels))]
        data = self.data(hold=False)  # one split, read once: no need to decode the others
        source = data.test
        parts = list(batches_with_positions(source, list(torch.arange(len(source)).split(LOAD_ALL_BATCH))))
        if not parts:
            raise InputError(f"{self.config.data.dataset}: no readable image in the test split")
        names = file_names(source)
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                [names[i] for p in parts for i in p[2].tolist()])

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's readable test images, uint8 (N, C, H, W), and labels (N,)."""
        return self._test_read[0], self._test_read[1]

    @property
    def test_files(self) -> list[str]:
        """Each of `test_set`'s images by file: its path in the image folder, or its test index."""
        return self._test_read[2]

    @property
    def test_labels(self) -> np.ndarray:
        return self.test_set[1].numpy()

    def test_pixels(self, index: int) -> np.ndarray:
        """Test image `index` for drawing: uint8 (H, W) or (H, W, C)."""
        return to_pixels(self.test_set[0][index])

    @cached_property
    def test_evaluation(self) -> Evaluation:
        # evaluated as the run's test was (channels-last, test-time augmentation), so mistakes agree with test.json
        images, labels = self.test_set
        t = self.config.train
        return evaluate(self.model, images, labels, self.classes, t.eval_batch_size, t.channels_last, t.tta,
                        t.tta_shift)


@dataclass(frozen=True)
class InputImage:
    """One image to explain: uint8 pixels (H, W) or (H, W, C), its true label when known, and where it came from."""

    pixels: np.ndarray
    label: int | None
    source: str


def choose_input(loaded: LoadedRun, image: str | Path | None = None, index: int | None = None) -> InputImage:
    """A user's image file (prepared by the run's dataset recipe) or test image `index` of the run's dataset:
    exactly one of the two."""
    if (image is None) == (index is None):
        raise InputError("give either an image file or a test-set index, not both or neither")
    if image is not None:
        recipe = dataset_recipe(loaded.config.data)
        return InputImage(prepare(image, recipe, loaded.model.input_shape[0], resize=loaded.config.data.resize), None,
                          Path(image).name)
    count = len(loaded.test_labels)
    if index is None or not 0 <= index < count:
        raise InputError(f"--index must be 0..{count - 1} (the {loaded.config.data.dataset} test set), got {index}")
    return InputImage(loaded.test_pixels(index), int(loaded.test_labels[index]), f"test image {index}")


def describe(loaded: LoadedRun, picture: InputImage) -> str:
    """A title naming the input, its true class if known, and the model's prediction."""
    probabilities = loaded.model.predict_proba(image_input(picture.pixels))[0]
    predicted = int(probabilities.argmax())
    truth = f" (true: {loaded.classes[picture.label]})" if picture.label is not None else ""
    return f"{loaded.name}: {picture.source}{truth}, predicted {loaded.classes[predicted]} " \
           f"({float(probabilities[predicted]):.0%})"


# ----------------------------------------------------------------------------------- pictures
def show_kernels(loaded: LoadedRun, out: Output, layer: str = "conv1") -> KernelGrid:
    """The learned kernels of one conv layer as a grid."""
    weights = conv_weights(loaded.model, layer)
    # a whitening layer's kernels are the patches' main directions, largest variance first, not learned;
    # scaled by 1/sqrt(variance), the main ones would look blank on a shared scale
    whitening = layer in loaded.model.whitening_layers()
    kh, kw = weights.shape[2:]
    title = (f"{loaded.name}: {layer}, {weights.shape[0]} {'whitening' if whitening else 'learned'} {kh}x{kw} kernels "
             f"(input channels: {weights.shape[1]}{'; each on its own scale' if whitening else ''})")
    return plot_kernels(weights, out, layer, title=title, each_scaled=whitening)


def show_features(loaded: LoadedRun, out: Output, picture: InputImage, max_maps: int = 16) -> dict[str, int]:
    """The feature maps of every conv stage for one image; returns panels per row group."""
    maps: FeatureMaps = feature_maps(loaded.model, picture.pixels)
    if not maps.maps:
        raise InputError(f"{loaded.run}: the model has no conv layers, so no feature maps")
    return plot_feature_maps(maps, out, title=describe(loaded, picture), max_maps=max_maps)


def show_mistakes(loaded: LoadedRun, out: Output, limit: int = 24) -> list[Mistake]:
    """The most confidently misclassified test images, worst first; returns them in drawing order."""
    result = loaded.test_evaluation
    labels = loaded.test_labels
    mistakes = find_mistakes(labels, result.predictions, result.probabilities, limit, loaded.test_files)
    wrong = int((result.predictions != labels).sum())
    plot_mistakes([loaded.test_pixels(m.index) for m in mistakes], mistakes, loaded.classes, out,
                  title=f"{loaded.name}: the {len(mistakes)} most confident of {wrong} mistakes "
                        f"in {len(result.predictions)} test images (% = confidence in the wrong class)")
    return mistakes


def show_saliency(loaded: LoadedRun, out: Output, picture: InputImage, target: int | None = None,
                  method: str = "gradcam") -> Saliency:
    """A heat map of the pixels the prediction (or class `target`) rests on, over the image."""
    result = saliency(loaded.model, picture.pixels, target, method)
    plot_saliency(result, loaded.classes, out, title=describe(loaded, picture), true_label=picture.label)
    return result


def show_calibration(loaded: LoadedRun, out: Output) -> Calibration:
    """The reliability diagram of the run's test predictions (evaluated as its test was); returns its numbers."""
    result = loaded.test_evaluation
    cal = result.known_calibration()
    plot_reliability(cal, out, title=f"{loaded.name}: calibration on {len(result.predictions)} test images")
    return cal


def show_embedding(loaded: LoadedRun, out: Output, method: str = "pca", count: int = 1000,
                   thumbnails: int = 60) -> Embedding:
    """The map of the first `count` test images by their penultimate features (PCA or t-SNE)."""
    images, labels = loaded.test_set
    images, labels = images[:count], labels[:count]
    emb = embed(loaded.model, images, labels, method, seed=loaded.config.train.seed,
                batch_size=loaded.config.train.eval_batch_size)
    name = "PCA" if method == "pca" else "t-SNE"
    plot_embedding(emb, images, loaded.classes, out, thumbnails,
                   title=f"{loaded.name}: {name} map of {emb.count} test images by what the classifier reads")
    return emb


def show_curves(run: str | Path, out: Output) -> Output:
    """Training and validation loss and accuracy per epoch, from metrics.jsonl."""
    history = records.read_metrics(layout.check_run(run, "metrics"))
    if not history:
        raise layout.RunError(f"{run}: metrics.jsonl holds no finished epoch yet")
    return plot_curves({Path(run).resolve().name: history}, out, title=f"{Path(run).resolve().name}: training curves")


def class_index(classes: tuple[str, ...], name_or_index: str) -> int:
    """A class given by name (case-insensitive), else by index: a name first, so that in a folder of classes
    named 10, 2 and 3 (labels in that order) "2" is the class called 2, not label 2."""
    lowered = {c.lower(): i for i, c in enumerate(classes)}
    if name_or_index.lower() in lowered:
        return lowered[name_or_index.lower()]
    if name_or_index.isdigit() and int(name_or_index) < len(classes):
        return int(name_or_index)
    raise InputError(f"unknown class {name_or_index!r}; classes: {', '.join(classes)} (or 0..{len(classes) - 1})")
