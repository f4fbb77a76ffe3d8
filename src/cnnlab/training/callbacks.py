"""Hooks the trainer calls, and the progress display that hangs on them.

Progress bars, run recording (`cnnlab.runs.recorder`), sweeps' pruning and experiment trackers are
all callbacks: the trainer knows none of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from cnnlab.training.engine import Trainer


class Callback:
    """Hooks the trainer calls; override the ones you need."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_epoch_begin(self, trainer: Trainer) -> None: ...
    def on_batch_end(self, trainer: Trainer, loss: float, accuracy: float) -> None: ...
    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_interrupt(self, trainer: Trainer) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


REDRAW_EVERY = 20  # steps between progress-bar redraws: redrawing costs time


class ProgressBar(Callback):
    """A live bar per epoch (loss and accuracy so far), then one line per epoch."""

    def __init__(self, console: Console | None = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress: Any = None
        self.task: Any = None

    def on_epoch_begin(self, trainer: Trainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"epoch {trainer.state.epoch + 1}/{trainer.config.epochs}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                 console=self.console, transient=True, disable=not self.console.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task("train", total=trainer.steps_per_epoch, completed=trainer.state.step,
                                           stats="")

    def on_batch_end(self, trainer: Trainer, loss: float, accuracy: float) -> None:
        step = trainer.state.step
        if step % REDRAW_EVERY == 0 or step == trainer.steps_per_epoch:
            running = trainer.state.running
            self.progress.update(self.task, completed=step,
                                 stats=f"loss {running.loss:.4f} acc {running.accuracy:.4f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.stop()
        self.console.print(format_epoch(metrics, trainer.config.epochs), highlight=False)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.stop()

    def on_train_end(self, trainer: Trainer) -> None:
        self.stop()


def format_epoch(m: dict[str, Any], epochs: int) -> str:
    return (f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f}  "
            f"val loss {m['val_loss']:.4f} acc {m['val_accuracy']:.4f}  {m['seconds']:.1f}s")
