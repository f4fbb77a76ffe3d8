"""Predict classes for your own pictures with a trained run: prepare each image by the dataset's recipe, run the model.

Library functions return data (dicts shaped like `cnnlab predict --json`); the CLI and the web app print or serve them.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlab.data.pixels import images_tensor, to_inputs
from cnnlab.data.registry import dataset_recipe, is_image_folder
from cnnlab.errors import UserError
from cnnlab.files import write_atomic
from cnnlab.images import MAX_PIXELS, ImageFile, ImageReadError
from cnnlab.models.cnn import CNN, count_parameters
from cnnlab.runs.records import read_test_accuracy
from cnnlab.runs.weights import load_model
from cnnlab.use.backends import Backend, Choice, TorchBackend, choose_backend
from cnnlab.use.recipes import BlankImage, prepare


@dataclass
class Predictor:
    """A trained model with what it needs to take raw pictures: its classes and its dataset's recipe."""

    model: CNN
    classes: tuple[str, ...]
    dataset: str
    recipe: str
    run: Path | None = None
    test_accuracy: float | None = None
    name: str = "model"
    resize: str = "crop"  # how a photo meets the model's square input: its folder's data.resize
    inference_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    backend: Backend | None = field(default=None, repr=False, compare=False)  # None: torch eager (`use_backend`)
    # `use_backend_when_needed`: the backend asked for, chosen at the first forward pass, and who is told which
    pending: tuple[str, Callable[[str], None]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = TorchBackend(self.model)

    @classmethod
    def from_run(cls, run: str | Path) -> Predictor:
        """Load a run's weights (safetensors, no pickle) and look up its dataset's recipe; torch runs the model
        until `use_backend` picks another backend."""
        model, classes, config = load_model(run)
        return cls(model, classes, config.data.dataset, dataset_recipe(config.data), Path(run),
                   read_test_accuracy(run), Path(run).name, resize=config.data.resize)

    def use_backend(self, requested: str = "auto") -> Choice:
        """Run forward passes on `requested` ('torch', 'onnx' or 'auto', see `cnnlab.use.backends`); returns
        the choice made, whose `line()` says which and why."""
        choice = choose_backend(self, requested)
        self.backend = choice.backend
        return choice

    def use_backend_when_needed(self, requested: str, announce: Callable[[str], None]) -> None:
        """`use_backend`, but chosen when the first picture is ready for the model, its line given to `announce`:
        a command refused for its input (a file that is no picture) makes no ONNX file in the run. A backend that
        cannot be had at all (`onnx` without onnxruntime) is refused now, before any picture is read."""
        if requested == "onnx":
            from cnnlab.use.export import require

            require("onnx")
            require("onnxruntime")
        self.pending = (requested, announce)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images the model takes."""
        height, width, _ = self.model.input_shape
        return height, width

    @property
    def side(self) -> int:
        """The side of the model's square input, which the recipes make; ValueError for a model that is not square."""
        height, width = self.input_size
        if height != width:
            raise ValueError(f"{self.name}: preprocessing needs a square input, the model takes {height}x{width}")
        return height

    def prepare(self, source: ImageFile, name: str | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """uint8 (H, W), or (H, W, 3) for a colour recipe: the picture as the model must see it."""
        return prepare(source, self.recipe, self.side, name, max_pixels, self.resize)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """float (N, classes) for prepared uint8 images, grey (N, H, W) or colour (N, H, W, C)."""
        x = to_inputs(images_tensor(images))  # (N, C, H, W) in [0, 1]
        channels = self.model.input_shape[2]
        if x.shape[1] != channels:
            if x.shape[1] != 1:
                raise ValueError(f"{self.name}: the model takes {channels} channel(s), the images have {x.shape[1]}")
            x = x.expand(-1, channels, -1, -1)  # a grey picture for a colour model: same value in every channel
        if self.pending is not None:
            requested, announce = self.pending
            self.pending = None
            announce(self.use_backend(requested).line())
        backend = self.backend if self.backend is not None else TorchBackend(self.model)
        # One forward pass at a time: each backend already spreads a pass over all its threads; a web server's
        # concurrent requests running passes side by side would oversubscribe the cores and stretch the slowest.
        with self.inference_lock:
            probabilities = backend.probabilities(x.contiguous().numpy())
        broken = int((~np.isfinite(probabilities).all(axis=1)).sum())
        if broken:  # finite weights can still overflow on some inputs: no class may be read from NaN
            raise ModelOutputError(f"{self.name}: the model's output is not a number (NaN or infinite) for {broken} of "
                                   f"{len(probabilities)} pictures: its weights overflow on them; retrain the run")
        return probabilities

    def describe(self) -> dict:
        """What `GET /api/model` says about this model: never where it lives on disk (the server's callers
        need not know the machine's folders)."""
        # an image folder by its name alone: its path is where it lives on this machine
        dataset = Path(self.dataset).name if is_image_folder(self.dataset) else self.dataset
        return dict(name=self.name, dataset=dataset, recipe=self.recipe,
                    classes=list(self.classes), input_shape=list(self.model.input_shape),
                    parameters=count_parameters(self.model), test_accuracy=self.test_accuracy,
                    conv_layers=list(self.model.conv_layers()))


# ---------------------------------------------------------------------------------- results
@dataclass
class Prediction:
    """One picture's result: the prepared image the model saw and a probability per class."""

    file: str
    image: np.ndarray  # uint8 (H, W), or (H, W, 3) for a colour model
    probabilities: np.ndarray  # float (classes,)
    classes: tuple[str, ...]

    @property
    def label(self) -> int:
        return int(np.argmax(self.probabilities))

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The k most probable (class name, probability), most probable first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.classes[i], float(self.probabilities[i])) for i in order]

    def to_dict(self) -> dict:
        """The JSON of `cnnlab predict --json` and `POST /api/predict`."""
        return {"file": self.file, "label": self.label, "class_name": self.classes[self.label],
                "probabilities": {name: float(p) for name, p in zip(self.classes, self.probabilities)}}


class ModelOutputError(UserError, ArithmeticError):
    """The model's forward pass gave NaN or infinite probabilities."""


@dataclass
class FileError:
    """A picture that could not be predicted, and why."""

    file: str
    message: str

    def to_dict(self) -> dict:
        return {"file": self.file, "error": self.message}


@dataclass
class Results:
    """Predictions for several files, in order; `errors` holds the files that failed."""

    predictions: list[Prediction] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


PER_FILE_ERRORS = (ImageReadError, BlankImage, FileNotFoundError, IsADirectoryError, PermissionError)


def predict_image(predictor: Predictor, source: ImageFile, name: str = "image", max_pixels: int = MAX_PIXELS
                  ) -> Prediction:
    """Prepare one picture (path, bytes, file object or PIL image) and predict it."""
    image = predictor.prepare(source, name, max_pixels)
    return Prediction(name, image, predictor.probabilities(image[None])[0], predictor.classes)


FILES_PER_TASK = 64  # files a decoding worker prepares per task: enough to make the hand-over cheap
SMALL_SET = 256  # files prepared in this process whatever `workers` says: starting workers would cost more


def default_workers() -> int:
    """Decoding processes for a folder: as for an image folder's data.workers, min(4, CPUs)."""
    return min(4, os.cpu_count() or 1)


def iter_predictions(predictor: Predictor, files: Sequence[str | Path], batch_size: int = 256,
                     workers: int | None = None) -> Generator[Prediction | FileError, None, None]:
    """A Prediction (or a FileError, for an unreadable file) per file, in order, `batch_size` files per forward
    pass. `workers` processes (default min(4, CPUs); 0: this one) prepare the files while this one runs the model:
    memory holds a few batches of prepared images, however many files there are. Close it (contextlib.closing)
    when stopping early: its decoding processes end then."""
    pending: list[tuple[str, np.ndarray] | FileError] = []

    def flush() -> Iterator[Prediction | FileError]:
        ready = [item for item in pending if not isinstance(item, FileError)]
        probabilities = iter(predictor.probabilities(np.stack([image for _, image in ready])) if ready else [])
        for item in pending:
            yield item if isinstance(item, FileError) else \
                Prediction(item[0], item[1], next(probabilities), predictor.classes)
        pending.clear()

    for item in prepared_files(predictor, files, default_workers() if workers is None else workers):
        pending.append(item)
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def prepared_files(predictor: Predictor, files: Sequence[str | Path], workers: int
                   ) -> Iterator[tuple[str, np.ndarray] | FileError]:
    """Each file prepared by the predictor's recipe ((name, uint8 image) or a FileError), in order; in `workers`
    decoding processes (cnnlab's one DataLoader, `WorkerLoader`) when there are enough files to be worth it."""
    preparing = PreparedFiles([str(file) for file in files], predictor.recipe, predictor.side, predictor.resize)
    if workers == 0 or len(files) <= SMALL_SET:
        yield from (preparing[i] for i in range(len(preparing)))
        return
    from cnnlab.data.workers import WorkerLoader, shut_down

    tasks = [range(start, min(start + FILES_PER_TASK, len(files))) for start in range(0, len(files), FILES_PER_TASK)]
    loader = WorkerLoader(preparing, batch_sampler=tasks, num_workers=workers, collate_fn=list, prefetch_factor=2)
    batches = iter(loader)
    try:
        for task in batches:
            yield from task
    finally:  # the consumer failed or stopped early (this generator closed): end the decoding processes now,
        # not at interpreter exit, where workers that ignore SIGTERM blocked the exit for good
        shut_down(batches)


@dataclass(frozen=True)
class PreparedFiles:
    """Files as a dataset of prepared images: item i is (name, uint8 image) or the FileError saying why not."""

    files: list[str]
    recipe: str  # and its arguments, as Predictor.prepare passes them: not the Predictor, whose model
    side: int  # workers need not hold
    resize: str

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray] | FileError:
        file = self.files[i]
        try:
            return file, prepare(file, self.recipe, self.side, file, MAX_PIXELS, self.resize)
        except PER_FILE_ERRORS as exc:
            return FileError(file, file_error_message(file, exc))


def predict_files(predictor: Predictor, files: Sequence[str | Path], batch_size: int = 256) -> Results:
    """Predict every readable file, batched; unreadable ones become FileErrors, the rest still run."""
    results = Results()
    for item in iter_predictions(predictor, files, batch_size):
        if isinstance(item, FileError):
            results.errors.append(item)
        else:
            results.predictions.append(item)
    return results


def file_error_message(file: str | Path, exc: Exception) -> str:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        reason = {FileNotFoundError: "no such file", IsADirectoryError: "a directory, not an image file",
                  PermissionError: "permission denied"}[type(exc)]
        return f"{file}: {reason}"
    text = str(exc)
    return text if text.startswith(str(file)) else f"{file}: {text}"


def predict_arrays(predictor: Predictor, images: np.ndarray, names: list[str] | None = None) -> list[Prediction]:
    """Predict pictures given as arrays (N, H, W) or (N, H, W, 3|4), any size and range 0..255, via the recipe."""
    from PIL import Image

    names = names or [f"image {i}" for i in range(len(images))]
    return [predict_image(predictor, Image.fromarray(np.asarray(a).astype(np.uint8)), n) for a, n in zip(images, names)]


# ---------------------------------------------------------------------------------- preview
def preview_strip(images: list[np.ndarray], columns: int = 10, scale: int = 4, gap: int = 2) -> np.ndarray:
    """uint8 grid of the prepared images, each enlarged `scale` times (nearest), grey gaps between: the model's view.

    Grey images (H, W) give a grey grid, colour ones (H, W, 3) an RGB grid.
    """
    if not images:
        raise ValueError("no images to preview")
    height, width = images[0].shape[:2]
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    cell_h, cell_w = height * scale + gap, width * scale + gap
    grid = np.full((rows * cell_h + gap, columns * cell_w + gap, *images[0].shape[2:]), 96, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = gap + r * cell_h, gap + c * cell_w
        grid[top:top + height * scale, left:left + width * scale] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


PREVIEW_IMAGES = 500  # at most this many in --preview: a folder of 3,000 made a 113-megapixel PNG (and 1 GB more)


def save_preview(images: list[np.ndarray], out: str | Path) -> Path:
    """Write the preview grid of the first PREVIEW_IMAGES images as a PNG (atomically)."""
    from PIL import Image

    out = Path(out)
    grid = preview_strip(images[:PREVIEW_IMAGES])
    write_atomic(out, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return out
