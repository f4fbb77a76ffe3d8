"""The main job as named steps: load data, build the model, train, evaluate, record the run."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab import runs
from cnnlab.architecture import plan
from cnnlab.config import Config, TrainConfig
from cnnlab.data import Dataset, load_dataset, split_train_val
from cnnlab.evaluate import Evaluation, evaluate
from cnnlab.models import CNN, build_model
from cnnlab.summary import format_summary
from cnnlab.trainer import Callback, TrainData, Trainer, TrainingInterrupted
from cnnlab.visualize import plot_confusion


@dataclass
class RunResult:
    """What `train` made: the run directory, the per-epoch history and the test evaluation."""

    run: Path
    history: list[dict]
    test: Evaluation
    train_seconds: float  # wall time of this invocation's training loop, validation included
    images_per_second: float  # training images processed per second of that time


def images_tensor(images) -> torch.Tensor:
    """uint8 NumPy images, grey (N, H, W) or colour (N, H, W, C) -> uint8 tensor (N, C, H, W).

    Colour images keep their channels-last memory layout (a permuted view, no copy): the layout
    the CPU convolutions want anyway.
    """
    tensor = torch.from_numpy(images)
    return tensor.unsqueeze(1).contiguous() if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)


def prepare_data(dataset: Dataset, config: Config) -> TrainData:
    """Split the training set into train/validation (seeded) as in-memory uint8 tensors."""
    val_size = dataset.spec.val_size if config.data.val_size is None else config.data.val_size
    split = split_train_val(len(dataset.train_labels), val_size, config.train.seed)
    images, labels = images_tensor(dataset.train_images), torch.from_numpy(dataset.train_labels)
    return TrainData(images[split.train], labels[split.train], images[split.val], labels[split.val])


def open_dataset(config: Config, progress: bool = True) -> Dataset:
    d = config.data
    return load_dataset(d.dataset, d.data_dir, allow_mismatch=d.allow_checksum_mismatch, progress=progress)


def start_run(config: Config, dataset: Dataset, model: CNN, root: str | Path, name: str | None) -> Path:
    """A new run directory with its config, summary and manifest."""
    run = runs.new_run(config, root, name)
    runs.save_config(run, config)
    summary = format_summary(model.plan, model.input_shape, config.model.name, explain=True)
    runs.write_text(runs.path(run, "summary"), summary + "\n")
    runs.write_manifest(run, dataset.files, config.data.allow_checksum_mismatch,
                        extra=dict(dataset=dataset.spec.name, data_origin=dataset.location.origin,
                                   data_dir=str(dataset.location.directory)))
    return run


def train(config: Config, root: str | Path = runs.DEFAULT_ROOT, name: str | None = None,
          callbacks: Sequence[Callback] = (), progress: bool = True, dataset: Dataset | None = None) -> RunResult:
    """Train a model from a config into a new run directory, then evaluate it on the test set.

    Data and config problems are raised before the run directory is created, so a bad input
    leaves nothing behind. `dataset` skips loading when the caller holds it already (benchmarks).
    """
    dataset = dataset or open_dataset(config, progress)
    data = prepare_data(dataset, config)
    model = build_model(config.model, dataset.spec.image_shape, dataset.spec.num_classes, seed=config.train.seed)
    run = start_run(config, dataset, model, root, name)
    trainer = Trainer(model, data, config.train, [runs.RunRecorder(run, dataset.classes), *callbacks])
    return fit_and_test(run, trainer, dataset)


def resume(run: str | Path, callbacks: Sequence[Callback] = (), progress: bool = True) -> RunResult:
    """Continue an interrupted run from its newest readable checkpoint, to the same end result."""
    run = runs.check_run(run, "config")
    config = runs.load_config(run)
    state, warnings = runs.load_checkpoint(run)
    for warning in warnings:
        print(f"warning: {warning}")
    dataset = open_dataset(config, progress)
    model = build_model(config.model, dataset.spec.image_shape, dataset.spec.num_classes)
    trainer = Trainer(model, prepare_data(dataset, config), config.train,
                      [runs.RunRecorder(run, dataset.classes), *callbacks])
    trainer.load_state_dict(state)
    runs.rewrite_metrics(run, trainer.history)
    return fit_and_test(run, trainer, dataset)


def fit_and_test(run: Path, trainer: Trainer, dataset: Dataset) -> RunResult:
    with runs.locked(run):
        steps_before = trainer.epoch * trainer.steps_per_epoch + trainer.step
        started = time.perf_counter()
        try:
            history = trainer.fit()
        except TrainingInterrupted as exc:
            exc.run = run
            raise
        seconds = time.perf_counter() - started
        trained = (trainer.epoch * trainer.steps_per_epoch - steps_before) * trainer.config.batch_size
        test = test_run(run, trainer.model, dataset, trainer.config)
    images = min(trained, len(trainer.data.train_labels) * trainer.config.epochs)
    return RunResult(run, history, test, seconds, images / seconds if seconds > 0 else 0.0)


def test_run(run: Path, model: CNN, dataset: Dataset, config: TrainConfig) -> Evaluation:
    """Evaluate on the test set and record test.json and confusion.png in the run."""
    result = evaluate(model, images_tensor(dataset.test_images), torch.from_numpy(dataset.test_labels),
                      dataset.classes, config.eval_batch_size, config.channels_last, config.tta)
    runs.write_json(runs.path(run, "test"), result.to_dict())
    runs.write_atomic(runs.path(run, "confusion"),
                      lambda tmp: plot_confusion(result.confusion, dataset.classes, tmp,
                                                 title=f"{run.name}: test accuracy {result.accuracy:.2%}"))
    return result


def evaluate_run(run: str | Path, data_dir: str | Path | None = None, progress: bool = True) -> Evaluation:
    """Reload a run's model from its files and evaluate it on its dataset's test set."""
    model, classes, config = runs.load_model(run)
    if data_dir is not None:
        config.data.data_dir = str(data_dir)
    dataset = open_dataset(config, progress)
    return test_run(Path(run), model, dataset, config.train)


def summarize(config: Config, input_shape=(28, 28, 1), num_classes: int = 10, explain: bool = False) -> str:
    """The layer table of a config, without building or training anything."""
    return format_summary(plan(config.model, input_shape, num_classes), input_shape, config.model.name, explain)
