"""TensorBoard logging for `cnnlab train --tensorboard`: an optional extra (`pip install 'cnnlab[tensorboard]'`).

The event files go inside the run directory (RUN/tensorboard/), so `tensorboard --logdir runs` shows
every run; offline by nature. The step of everything logged is the epoch, so a resumed run goes on
where it stopped. torch.utils.tensorboard imports the tensorboard package: it is imported only when
a tracker starts, so cnnlab without --tensorboard never loads it.
"""
from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from cnnlab.config import Config, dotted_keys
from cnnlab.data.pixels import to_pixels
from cnnlab.inspect.figures import Output, draw_image, grid_shape, new_figure, plot_confusion, save_figure
from cnnlab.runs import layout
from cnnlab.text import to_json
from cnnlab.training.callbacks import Callback, EpochMetrics, Progress

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import FileWriter, SummaryWriter

    from cnnlab.trackers.wandb import FinishedRun
    from cnnlab.training.evaluate import Evaluation

LOG_FOLDER = "tensorboard"  # inside the run directory: `tensorboard --logdir runs` finds every run's
SAMPLE_PREDICTIONS = 32  # test images drawn with their predicted and true class
PREDICTION_COLUMNS = 8  # panels a row in the predictions grid
# metrics.jsonl keys -> TensorBoard tags; train and val side by side under one section each
TAGS = dict(train_loss="loss/train", val_loss="loss/val", train_accuracy="accuracy/train",
            val_accuracy="accuracy/val", lr="lr", seconds="time/epoch_seconds")
HPARAM_METRICS = ("accuracy/val", "loss/val", "test/accuracy", "test/loss")  # columns of the HParams table


def tensorboard_available() -> bool:
    """Whether the tensorboard package is installed (without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key (a key cnnlab does not know keeps its name)."""
    return TAGS.get(key, key)


def hparams(config: Config) -> dict[str, bool | int | float | str]:
    """The config under the dotted names --set takes, as values the HParams plugin holds (lists as JSON)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else to_json(value)
            for key, value in dotted_keys(config.to_dict()).items()}


def add_hparams_summary(writer: SummaryWriter, summary: Any) -> None:
    """Write one of the HParams plugin's summaries into this run's folder, at step 0 (the writer's
    add_hparams would make a new folder, a run of its own, for them)."""
    cast("FileWriter", writer.file_writer).add_summary(summary, 0)  # declared None in torch: set by __init__


def as_text(text: str) -> str:
    """Plain text as the markdown the text plugin renders, kept verbatim in a code block."""
    return f"```\n{text.rstrip()}\n```"


def png_pixels(draw: Callable[[io.BytesIO], object]) -> np.ndarray:
    """Run a plot function into memory; its picture as uint8 RGB (H, W, 3)."""
    from PIL import Image

    buffer = io.BytesIO()
    draw(buffer)
    buffer.seek(0)
    with Image.open(buffer) as picture:
        return np.asarray(picture.convert("RGB"))


def plot_predictions(pictures: Sequence[np.ndarray], labels: np.ndarray, test: Evaluation, out: Output,
                     title: str = "", max_columns: int = PREDICTION_COLUMNS) -> Output:
    """A grid of the first test images, each titled with the predicted class, its probability and the
    true class: green when right, red when wrong."""
    rows, columns = grid_shape(len(pictures), max_columns)
    fig = new_figure(1.5 * columns, 1.7 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for i, (ax, picture) in enumerate(zip(axes, pictures)):
        predicted, true = int(test.predictions[i]), int(labels[i])
        draw_image(ax, picture)
        ax.set_title(f"said {test.classes[predicted]} ({test.probabilities[i, predicted]:.0%})\n"
                     f"true {test.classes[true]}", fontsize=7,
                     color="darkgreen" if predicted == true else "firebrick")
    fig.suptitle(title or f"the first {len(pictures)} test images: predicted (probability) and true class")
    return save_figure(fig, out)


class TensorBoardTracker(Callback):
    """Logs a training run as TensorBoard events: config and layer table (text), hparams, per-epoch
    metrics; `finish` adds the test accuracy and loss, the confusion matrix and sample predictions.

    `root`: write to root/<run name>/ instead of RUN/tensorboard/ (one folder for many runs' logs). The run
    directory is given by `on_run_start` (`cnnlab.pipeline` calls it once the run exists), or as `run`.
    """

    def __init__(self, config: Config, root: Path | None = None, samples: int = SAMPLE_PREDICTIONS,
                 run: Path | None = None):
        self.config, self.root, self.samples, self.run = config, root, samples, run
        self.writer: SummaryWriter | None = None  # from on_train_begin until finish or on_interrupt
        self.epoch = 0  # the last epoch logged: the step of the test results

    def on_run_start(self, run: Path) -> None:
        self.run = run

    def log_dir(self, run: Path) -> Path:
        return run / LOG_FOLDER if self.root is None else Path(self.root) / run.name

    def on_train_begin(self, progress: Progress) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        run = self.run
        if run is None:
            raise ValueError("TensorBoardTracker logs into the run directory: train through cnnlab.pipeline "
                             "(train or resume), which gives it the run, or pass run=")
        log_dir = self.log_dir(run)
        fresh = not any(log_dir.glob("events.out.tfevents.*"))
        history = progress.history
        # Resuming a logged run: the events an earlier session wrote from the checkpoint's last epoch
        # on are hidden (purge_step) and that epoch logged again, in case the session died between its
        # checkpoint and its log line. A run logged for the first time gets its whole history.
        again = history if fresh else history[-1:]
        writer = SummaryWriter(str(log_dir), purge_step=None if fresh else max(progress.epoch, 1))
        self.writer = writer
        if fresh:
            writer.add_text("config", as_text(self.config.to_yaml()), 0)
            summary = layout.path(run, "summary")
            if summary.is_file():
                writer.add_text("model", as_text(summary.read_text()), 0)
            experiment, session_start, _ = hparams_summaries(hparams(self.config), dict.fromkeys(HPARAM_METRICS))
            add_hparams_summary(writer, experiment)
            add_hparams_summary(writer, session_start)
        for metrics in again:
            self.log_epoch(metrics)
        self.epoch = progress.epoch

    def active_writer(self) -> SummaryWriter:
        """The writer on_train_begin opened."""
        if self.writer is None:
            raise RuntimeError("no TensorBoard writer is open: on_train_begin opens one, finish and on_interrupt "
                               "close it")
        return self.writer

    def on_epoch_end(self, progress: Progress, metrics: EpochMetrics) -> None:
        self.log_epoch(metrics)

    def log_epoch(self, metrics: Mapping[str, Any]) -> None:
        """One epoch's metrics as scalars at the epoch's step."""
        writer = self.active_writer()
        step = int(metrics["epoch"])
        for key, value in metrics.items():
            # NaN: an epoch not validated (train.val_every) or no validation split; a point there would break the curve
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not math.isnan(value):
                writer.add_scalar(scalar_tag(key), value, step)
        writer.flush()  # a killed run keeps the epochs it logged
        self.epoch = step

    def on_interrupt(self, progress: Progress) -> None:
        if self.writer is not None:
            self.writer.close()  # a resumed run appends to the same folder
            self.writer = None

    def finish(self, result: FinishedRun) -> None:
        """Log the test results of a finished run at its last epoch, and close the writer."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        test = result.test
        if test is None:  # only rank 0 evaluates, and only rank 0 has a tracker
            raise ValueError(f"{result.run}: the result holds no test evaluation to log")
        writer, step = self.writer, self.epoch
        writer.add_scalar("test/accuracy", test.accuracy, step)
        writer.add_scalar("test/loss", test.loss, step)
        if result.images_per_second:  # 0 when the run had finished already and was only tested again
            writer.add_scalar("time/train_seconds", result.train_seconds, step)
            writer.add_scalar("time/images_per_second", result.images_per_second, step)
        title = f"{result.run.name}: test accuracy {test.accuracy:.2%}"
        writer.add_image("test/confusion_matrix", png_pixels(
            lambda out: plot_confusion(test.confusion, test.classes, out, title=title)), step, dataformats="HWC")
        images, labels = self.test_set()
        pictures = [to_pixels(image) for image in images[:self.samples]]
        writer.add_image("test/predictions", png_pixels(
            lambda out: plot_predictions(pictures, labels.numpy(), test, out)), step, dataformats="HWC")
        _, _, session_end = hparams_summaries(hparams(self.config), dict.fromkeys(HPARAM_METRICS))
        add_hparams_summary(writer, session_end)
        writer.close()
        self.writer = None

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        from cnnlab.data.sources import open_test_set

        return open_test_set(self.config)
