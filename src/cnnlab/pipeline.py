"""The main job as named steps: load data, build the model, train, evaluate, record the run."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnlab import runs
from cnnlab.models.plan import plan
from cnnlab.config import Config, ConfigError, TrainConfig
from cnnlab.data import (
    DATASETS,
    Dataset,
    UnknownDataset,
    get_dataset,
    load_dataset,
    split_train_val,
)
from cnnlab.training.distributed import SINGLE, Context
from cnnlab.training.evaluate import Evaluation, evaluate_source
from cnnlab.models.cnn import CNN, build_model
from cnnlab.models.summary import format_summary
from cnnlab.training.engine import (
    Callback,
    Source,
    TensorSource,
    TrainData,
    Trainer,
    TrainingInterrupted,
)
from cnnlab.inspect.figures import plot_confusion


@dataclass
class RunResult:
    """What `train` made: the run directory, the per-epoch history and the test evaluation."""

    run: Path
    history: list[dict]
    test: Evaluation | None  # None on data-parallel ranks other than 0
    train_seconds: float  # wall time of this invocation's training loop, validation included
    images_per_second: float  # training images processed per second of that time (all ranks)
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable images: path -> reason


def images_tensor(images) -> torch.Tensor:
    """uint8 NumPy images, grey (N, H, W) or colour (N, H, W, C) -> uint8 tensor (N, C, H, W).

    Colour images keep their channels-last memory layout (a permuted view, no copy): the layout
    the CPU convolutions want anyway.
    """
    tensor = torch.from_numpy(images)
    return tensor.unsqueeze(1).contiguous() if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)


@dataclass
class Data:
    """A dataset ready to train on: its three splits as Sources, what it is, and where it came from."""

    name: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (H, W, C)
    train: Source
    val: Source
    test: Source
    files: list[dict] = field(default_factory=list)  # dataset files and checksums, for the manifest
    about: dict = field(default_factory=dict)  # where the data came from, for the manifest

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def is_image_folder(name: str) -> bool:
    """A `data.dataset` that names a folder of class sub-folders rather than a registered dataset."""
    return name not in DATASETS and ("/" in name or Path(name).is_dir())


def prepare_data(dataset: Dataset, config: Config) -> Data:
    """A named dataset in memory: the training set split into train/validation (seeded), and the test set."""
    val_size = dataset.spec.val_size if config.data.val_size is None else config.data.val_size
    split = split_train_val(len(dataset.train_labels), val_size, config.train.seed)
    images, labels = images_tensor(dataset.train_images), torch.from_numpy(dataset.train_labels)
    return Data(dataset.spec.name, dataset.classes, dataset.spec.image_shape,
                train=TensorSource(images[split.train], labels[split.train]),
                val=TensorSource(images[split.val], labels[split.val]),
                test=TensorSource(images_tensor(dataset.test_images), torch.from_numpy(dataset.test_labels)),
                files=dataset.files,
                about=dict(dataset=dataset.spec.name, data_origin=dataset.location.origin,
                           data_dir=str(dataset.location.directory)))


def folder_data(config: Config) -> Data:
    """An image folder streamed from disk: 10% of the images held out for validation, 10% for test."""
    from cnnlab.data.folder import open_image_folder

    d = config.data
    if d.val_size is not None:
        raise ConfigError("data.val_size: image folders hold out 10% for validation and 10% for test "
                          "(or use their val/ and test/ sub-folders); remove data.val_size")
    folder = open_image_folder(d.dataset, (d.image_size, d.image_size), d.channels, workers=d.workers)
    return Data(str(folder.root), folder.classes, folder.image_shape, folder.train, folder.val, folder.test,
                about=dict(dataset=str(folder.root), data_origin="image folder", image_folder=folder.describe()))


def open_dataset(config: Config, progress: bool = True) -> Dataset:
    d = config.data
    return load_dataset(d.dataset, d.data_dir, allow_mismatch=d.allow_checksum_mismatch, progress=progress)


def open_data(config: Config, progress: bool = True, context: Context = SINGLE) -> Data:
    """The configured dataset, ready to train on; under data-parallel training rank 0 goes first
    (it may download into the shared cache) and the others follow once it succeeded."""
    def load() -> Data:
        if is_image_folder(config.data.dataset):
            return folder_data(config)
        return prepare_data(open_dataset(config, progress and context.is_main), config)

    return first_on_main(context, load)


def first_on_main(context: Context, work):
    """Run `work` on rank 0, then on the other ranks; a failure on rank 0 is raised on every rank."""
    if not context.parallel:
        return work()
    result = None

    def on_rank_zero() -> str:
        nonlocal result
        result = work()
        return ""

    on_main(context, on_rank_zero)  # the others wait here until rank 0 succeeded (or raise its error)
    return result if context.is_main else work()


def on_main(context: Context, work) -> str:
    """Run `work` (returning a string, e.g. a run path) on rank 0 only; every rank gets its result."""
    if not context.parallel:
        return work()
    if context.is_main:
        try:
            result = work()
        except Exception as exc:
            context.broadcast_text(f"\0{type(exc).__name__}: {exc}")
            raise
        return context.broadcast_text(result)
    answer = context.broadcast_text(None)
    if answer.startswith("\0"):
        raise RankZeroFailed(f"rank 0 failed: {answer[1:]}")
    return answer


class RankZeroFailed(RuntimeError):
    """Rank 0 failed a step the other ranks depend on; they stop with its message."""


def start_run(config: Config, data: Data, model: CNN, root: str | Path, name: str | None,
              reuse: bool = False) -> Path:
    """A new run directory with its config, summary and manifest (`reuse`: an elastic restart's own)."""
    run = runs.new_run(config, root, name, reuse=reuse)
    runs.save_config(run, config)
    summary = format_summary(model.plan, model.input_shape, config.model.name, explain=True)
    runs.write_text(runs.path(run, "summary"), summary + "\n")
    runs.write_manifest(run, data.files, config.data.allow_checksum_mismatch, extra=data.about)
    return run


def train(config: Config, root: str | Path = runs.DEFAULT_ROOT, name: str | None = None,
          callbacks: Sequence[Callback] = (), progress: bool = True, dataset: Dataset | None = None,
          context: Context = SINGLE, reuse: bool = False) -> RunResult:
    """Train a model from a config into a new run directory, then evaluate it on the test set.

    Data and config problems are raised before the run directory is created, so a bad input
    leaves nothing behind. `dataset` skips loading when the caller holds it already (benchmarks).
    Under data-parallel training every rank calls this; only rank 0 writes the run.
    """
    data = prepare_data(dataset, config) if dataset is not None else open_data(config, progress, context)
    model = build_model(config.model, data.image_shape, data.num_classes, seed=config.train.seed)
    run = Path(on_main(context, lambda: str(start_run(config, data, model, root, name, reuse))))
    recorders = [runs.RunRecorder(run, data.classes)] if context.is_main else []
    trainer = Trainer(model, TrainData(data.train, data.val), config.train, [*recorders, *callbacks], context)
    return fit_and_test(run, trainer, data, context)


def resume(run: str | Path, callbacks: Sequence[Callback] = (), progress: bool = True,
           context: Context = SINGLE) -> RunResult:
    """Continue an interrupted run from its newest readable checkpoint, to the same end result."""
    run = runs.check_run(run, "config")
    config = runs.load_config(run)
    data = open_data(config, progress, context)
    model = build_model(config.model, data.image_shape, data.num_classes)
    recorders = [runs.RunRecorder(run, data.classes)] if context.is_main else []
    trainer = Trainer(model, TrainData(data.train, data.val), config.train, [*recorders, *callbacks], context)
    # A checkpoint the model rejects (tensors that do not fit) counts as unreadable: the previous one is tried.
    _, warnings = runs.load_checkpoint(run, restore=trainer.load_state_dict)
    for warning in warnings if context.is_main else ():
        print(f"warning: {warning}")
    if context.is_main:
        runs.rewrite_metrics(run, trainer.history)
    return fit_and_test(run, trainer, data, context)


def fit_and_test(run: Path, trainer: Trainer, data: Data, context: Context = SINGLE) -> RunResult:
    with runs.locked(run) if context.is_main else contextlib.nullcontext():
        steps_before = trainer.epoch * trainer.steps_per_epoch + trainer.step
        started = time.perf_counter()
        try:
            history = trainer.fit()
        except TrainingInterrupted as exc:
            exc.run = run
            raise
        seconds = time.perf_counter() - started
        trained = (trainer.epoch * trainer.steps_per_epoch - steps_before) * trainer.config.batch_size
        skipped = merge_skipped(context, data)
        test = None
        if context.is_main:
            test = test_run(run, trainer.model, data, trainer.config)
            skipped.update(data.test.skipped)
            if skipped:
                runs.write_json(runs.path(run, "skipped"), skipped)
        context.barrier()  # the other ranks return once rank 0's files are complete
    images = min(trained, len(trainer.data.train) * trainer.config.epochs)
    return RunResult(run, history, test, seconds, images / seconds if seconds > 0 else 0.0, skipped)


def merge_skipped(context: Context, data: Data) -> dict[str, str]:
    """Unreadable images met by any rank while training and validating: path -> reason."""
    mine = {**data.train.skipped, **data.val.skipped}
    merged: dict[str, str] = {}
    for part in context.gather_json(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def test_run(run: Path, model: CNN, data: Data, config: TrainConfig) -> Evaluation:
    """Evaluate on the test set and record test.json and confusion.png in the run."""
    result = evaluate_source(model, data.test, data.classes, config.eval_batch_size, config.channels_last,
                             config.tta)
    runs.write_json(runs.path(run, "test"), result.to_dict())
    runs.write_atomic(runs.path(run, "confusion"),
                      lambda tmp: plot_confusion(result.confusion, data.classes, tmp,
                                                 title=f"{run.name}: test accuracy {result.accuracy:.2%}"))
    return result


def evaluate_run(run: str | Path, data_dir: str | Path | None = None, progress: bool = True) -> Evaluation:
    """Reload a run's model from its files and evaluate it on its dataset's test set."""
    model, classes, config = runs.load_model(run)
    if data_dir is not None:
        config.data.data_dir = str(data_dir)
    return test_run(Path(run), model, open_data(config, progress), config.train)


def dataset_recipe(config: Config) -> str:
    """How user pictures are prepared for a model trained on this dataset (`cnnlab.use.recipes` recipes)."""
    if is_image_folder(config.data.dataset):
        return "photos" if config.data.channels == 3 else "photos-grey"
    try:
        return get_dataset(config.data.dataset).recipe
    except UnknownDataset:
        return "digits"  # a dataset registered by a plugin that is not loaded now: MNIST-style is the default


@dataclass
class TestImages:
    """A run's test set as NumPy arrays: uint8 images (N, H, W) or (N, H, W, C), int64 labels (N,)."""

    test_images: np.ndarray
    test_labels: np.ndarray


def open_test_set(config: Config) -> Dataset | TestImages:
    """The test images of a run's dataset in memory, for pictures of mistakes and saliency (an image
    folder's test split is decoded; unreadable files are left out as in training)."""
    if not is_image_folder(config.data.dataset):
        return open_dataset(config, progress=False)
    images, labels = folder_data(config).test.load_all()  # (N, C, H, W)
    pixels = images.permute(0, 2, 3, 1).numpy()
    return TestImages(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, labels.numpy())


def dataset_shape(config: Config) -> tuple[tuple[int, int, int], int]:
    """(image shape (H, W, C), number of classes) of the configured dataset, without loading images."""
    if is_image_folder(config.data.dataset):
        from cnnlab.data.folder import open_image_folder

        d = config.data
        folder = open_image_folder(d.dataset, (d.image_size, d.image_size), d.channels, workers=0)
        return folder.image_shape, len(folder.classes)
    spec = get_dataset(config.data.dataset)
    return spec.image_shape, spec.num_classes


def summarize(config: Config, input_shape=(28, 28, 1), num_classes: int = 10, explain: bool = False) -> str:
    """The layer table of a config, without building or training anything."""
    return format_summary(plan(config.model, input_shape, num_classes), input_shape, config.model.name, explain)
