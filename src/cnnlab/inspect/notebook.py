"""A run in a notebook: `run.evaluate()`, `run.summary()`, `run.predict(image)` and `run.show.*` pictures.

`cnnlab.train(...)` returns one (a `RunResult` is a `Run`), `open_run(path)` reopens one from its
directory. Every picture is drawn by the same `cnnlab.inspect.show` function as its `cnnlab show`
command, into memory, and comes back as a matplotlib Figure that displays itself inline; the run,
its evaluation and its model summary display as HTML.
"""
from __future__ import annotations

import html
import io
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnlab.data.registry import dataset_recipe
from cnnlab.images import ImageFile
from cnnlab.inspect import show
from cnnlab.inspect.figures import draw_image, new_figure, plot_confusion, plot_curves, save_figure
from cnnlab.inspect.run_table import format_cell, run_row
from cnnlab.models.summary import Summary, format_summary
from cnnlab.runs import layout, records
from cnnlab.training.evaluate import Evaluation
from cnnlab.use.predict import Prediction, Predictor, predict_image
from cnnlab.use.recipes import prepare

if TYPE_CHECKING:  # matplotlib is imported when a picture is drawn, not by `cnnlab train`'s import
    from cnnlab.inline import InlineFigure

Image = ImageFile | int | np.ndarray  # a file, a PIL image or pixels (prepared by the run's recipe), or a test index


def png_figure(draw: Callable[[io.BytesIO], object]) -> InlineFigure:
    """Run a `plot_*`/`show_*` function into memory and hold its PNG in a Figure, pixel for pixel."""
    from PIL import Image as PILImage

    from cnnlab.inline import InlineFigure

    buffer = io.BytesIO()
    draw(buffer)
    buffer.seek(0)
    with PILImage.open(buffer) as opened:
        pixels = np.asarray(opened.convert("RGBA"))  # (H, W, 4)
    dpi = 100
    fig = InlineFigure(figsize=(pixels.shape[1] / dpi, pixels.shape[0] / dpi), dpi=dpi)
    fig.figimage(pixels, resize=False)  # placed at 1:1, not resampled
    return fig


def curves_figure(history: list[dict[str, Any]], title: str = "") -> InlineFigure:
    """Loss and accuracy per epoch so far (the picture `NotebookProgress` redraws after every epoch)."""
    return png_figure(lambda out: plot_curves({"run": history}, out, title=title))


class Run:
    """A run directory, for a notebook: its history, test evaluation, model summary, predictions and pictures."""

    run: Path  # the run directory
    history: list[dict]  # one metrics dict per finished epoch
    test: Evaluation | None  # the test evaluation of this session's training; None until evaluate() on a reopened run

    def __init__(self, run: str | Path, data_dir: str | Path | None = None):
        self.run = layout.check_run(run, "config", "weights")
        self.history = records.read_metrics(self.run)
        self.test = None
        self.data_dir = data_dir

    @property
    def name(self) -> str:
        return self.run.resolve().name

    @cached_property
    def loaded(self) -> show.LoadedRun:
        """The run's model, classes and config (read once), with its test set loaded when a picture needs it."""
        return show.LoadedRun(self.run, getattr(self, "data_dir", None))

    def evaluate(self) -> Evaluation:
        """The test-set evaluation: this session's, or the reopened run's model on its test set (files untouched)."""
        return self.test if self.test is not None else self.loaded.test_evaluation

    def summary(self, explain: bool = False) -> Summary:
        """The layer table of the run's model (`cnnlab summary`), with each layer's arithmetic if `explain`."""
        return format_summary(self.loaded.model.plan, self.loaded.config.model.name, explain)

    @cached_property
    def predictor(self) -> Predictor:
        return Predictor.from_run(self.run)

    def predict(self, image: Image) -> Prediction:
        """One picture (a file, bytes, a PIL image, pixels, or a test index as `show` takes them) prepared as the
        dataset's were, and the model's answer; `.top(3)` gives the three likeliest classes."""
        if isinstance(image, (int, np.integer, np.ndarray)):  # a test image, or pixels: as run.show sees them
            picture = self.show.picture(image)
            pixels = picture.pixels
            return Prediction(picture.source, pixels, self.predictor.probabilities(pixels[None])[0],
                              self.predictor.classes)
        name = Path(image).name if isinstance(image, (str, Path)) else "image"
        return predict_image(self.predictor, image, name)

    @cached_property
    def show(self) -> RunPictures:
        """The pictures of `cnnlab show ...`, as Figures: run.show.mistakes(), .features(image), .kernels(), ..."""
        return RunPictures(self)

    def explore(self, out: str | Path | None = None, images: int = 16) -> ExplorerPage:
        """Write the page of `cnnlab explore` (default `<run>/explore.html`) and show it inline, in a frame."""
        from cnnlab.inspect.explore import write_explorer

        path = Path(out) if out is not None else self.run / "explore.html"
        return ExplorerPage(write_explorer(self.run, path, images, getattr(self, "data_dir", None)))

    def _repr_html_(self) -> str:
        row = run_row(self.run)
        facts = [("dataset", row["dataset"]), ("model", row["model"]), ("parameters", format_cell(row["params"])),
                 ("epochs", f"{row['epochs']} of {row['epochs_planned']}"),
                 ("validation accuracy", format_cell(row["val_accuracy"], "val_accuracy")),
                 ("test accuracy", format_cell(row["test_accuracy"], "test_accuracy")),
                 ("training time (s)", format_cell(row["seconds"], "seconds")), ("directory", str(self.run))]
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                        f"{html.escape(str(v))}</td></tr>" for k, v in facts)
        return f"<p><b>run {html.escape(self.name)}</b></p><table>{cells}</table>"

    def __repr__(self) -> str:
        return f"Run({str(self.run)!r})"


class ExplorerPage:
    """The explorer page written to `path`; a notebook shows the page itself (it needs no server)."""

    def __init__(self, path: Path):
        self.path = path

    def _repr_html_(self) -> str:
        page = html.escape(self.path.read_text(encoding="utf-8"), quote=True)
        return (f"<p>{html.escape(str(self.path))} (open it in a browser for the full window)</p>"
                f'<iframe srcdoc="{page}" style="width:100%;height:720px;border:1px solid #ccc"></iframe>')

    def __repr__(self) -> str:
        return f"ExplorerPage({str(self.path)!r})"


class RunPictures:
    """`run.show`: each method draws what its `cnnlab show` command saves, and returns it as a Figure."""

    def __init__(self, run: Run):
        self.run = run

    @property
    def loaded(self) -> show.LoadedRun:
        return self.run.loaded

    def picture(self, image: Image) -> show.InputImage:
        """A test index, an image file, or a picture in memory (PIL image, bytes, pixels), as the model sees it."""
        if isinstance(image, (int, np.integer)):
            return show.choose_input(self.loaded, index=int(image))
        if isinstance(image, (str, Path)):
            return show.choose_input(self.loaded, image=image)
        if isinstance(image, np.ndarray):
            from PIL import Image as PILImage

            image = PILImage.fromarray(np.asarray(image, dtype=np.uint8))
        recipe = dataset_recipe(self.loaded.config.data)
        size = self.loaded.model.input_shape[0]
        return show.InputImage(prepare(image, recipe, size, resize=self.loaded.config.data.resize), None, "your image")

    def mistakes(self, limit: int = 24) -> InlineFigure:
        """The most confidently misclassified test images, worst first."""
        return png_figure(lambda out: show.show_mistakes(self.loaded, out, limit))

    def features(self, image: Image = 0, max_maps: int = 16) -> InlineFigure:
        """The feature maps every conv layer computes for one image (default: test image 0)."""
        picture = self.picture(image)
        return png_figure(lambda out: show.show_features(self.loaded, out, picture, max_maps))

    def kernels(self, layer: str = "conv1") -> InlineFigure:
        """The kernels one conv layer learned, as a grid."""
        return png_figure(lambda out: show.show_kernels(self.loaded, out, layer))

    def saliency(self, image: Image = 0, target: str | None = None, method: str = "gradcam") -> InlineFigure:
        """Which parts of one image the prediction (or class `target`, a name or index) rests on."""
        picture = self.picture(image)
        index = show.class_index(self.loaded.classes, target) if target is not None else None
        return png_figure(lambda out: show.show_saliency(self.loaded, out, picture, index, method))

    def confusion(self) -> InlineFigure:
        """The test confusion matrix (the run's confusion.png)."""
        result = self.run.evaluate()
        return png_figure(lambda out: plot_confusion(result.confusion, result.classes, out,
                                                     title=f"{self.run.name}: test accuracy {result.accuracy:.2%}"))

    def curves(self) -> InlineFigure:
        """Training and validation loss and accuracy per epoch."""
        return png_figure(lambda out: show.show_curves(self.run.run, out))

    def calibration(self) -> InlineFigure:
        """The reliability diagram: each confidence bin's test accuracy against the diagonal."""
        return png_figure(lambda out: show.show_calibration(self.loaded, out))

    def embedding(self, method: str = "pca", count: int = 1000) -> InlineFigure:
        """A map of the first `count` test images by the features the classifier reads (PCA or t-SNE)."""
        return png_figure(lambda out: show.show_embedding(self.loaded, out, method, count))

    def prediction(self, image: Image, top_k: int = 5) -> InlineFigure:
        """The picture as the model received it, beside its `top_k` likeliest classes."""
        result = self.run.predict(image)
        top = result.top(top_k)

        def draw(out: io.BytesIO) -> None:
            fig = new_figure(7, 2.6)
            seen, bars = fig.subplots(1, 2, width_ratios=[1, 2])
            draw_image(seen, result.image)
            seen.set_title(f"what the model saw ({result.image.shape[0]}x{result.image.shape[1]})", fontsize=9)
            seen.axis("off")
            bars.barh([name for name, _ in top][::-1], [p for _, p in top][::-1], color="C0")
            bars.set_xlim(0, 1)
            bars.set_title(f"{result.file}: {top[0][0]} ({top[0][1]:.0%})", fontsize=10)
            save_figure(fig, out)

        return png_figure(draw)


def open_run(run: str | Path, data_dir: str | Path | None = None) -> Run:
    """Reopen a trained run from its directory (`data_dir`: where its dataset is, when not the default)."""
    return Run(run, data_dir)
