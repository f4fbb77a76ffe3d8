"""Hooks the trainer calls, what they are shown of training, and the progress display that hangs on them.

Progress bars, run recording (`cnnlab.runs.recorder`), sweeps' pruning and experiment trackers are
all callbacks: the trainer knows none of them, and they see it only through `Progress`, a narrow typed
view (as Keras gives a callback the epoch, its logs and one `stop_training` flag), never the Trainer.
"""
from __future__ import annotations

import html
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from rich.console import Console
    from torch import nn

    from cnnlab.training.state import Running


class _Metrics(TypedDict):
    epoch: int  # 1-based
    train_loss: float  # the mean over the epoch's training images
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float  # the epoch's wall time, validation included, compiling not
    lr: float  # the first parameter group's rate after the epoch's last step


class EpochMetrics(_Metrics, total=False):
    """One completed epoch, as metrics.jsonl holds it. The validation numbers are NaN for an epoch not
    validated (train.val_every) or a run without a validation split."""

    compile_seconds: float  # with train.compile only: this epoch's steps that compiled


@dataclass(frozen=True)
class Progress:
    """What a callback is shown of training: where it stands, the metrics so far, the model that is
    evaluated and saved, and two actions. The same numbers on every rank of a data-parallel job."""

    epoch: int  # epochs completed
    step: int  # steps completed of the current epoch
    steps: int  # steps (global batches) per epoch
    epochs: int  # epochs the run trains (train.epochs), early stopping aside
    running: Running  # the current epoch's training totals so far, over all ranks
    history: list[dict[str, Any]]  # every completed epoch's metrics (EpochMetrics), as far as the run has come
    model: nn.Module  # what is validated, tested and saved (the averaged copy with train.ema)
    early_stopping: dict[str, Any] | None  # early_stopping.json's record once the run kept a best epoch, else None
    checkpoint: Callable[[], dict[str, Any]]  # everything needed to continue exactly from here (Trainer.state_dict)
    request_stop: Callable[[], None]  # stop as Ctrl-C does: at the next sync point, resumable (on_interrupt)


class Callback:
    """Hooks the trainer calls; override the ones you need."""

    # Called by cnnlab.pipeline, not the trainer (which knows no paths), once the run directory exists.
    def on_run_start(self, run: Path) -> None: ...
    def on_train_begin(self, progress: Progress) -> None: ...
    def on_epoch_begin(self, progress: Progress) -> None: ...
    # At each sync point (every step on the CPU; see train.sync_every): the mean loss and accuracy since the last.
    def on_batch_end(self, progress: Progress, loss: float, accuracy: float) -> None: ...
    def on_epoch_end(self, progress: Progress, metrics: EpochMetrics) -> None: ...
    # Training stopped (Ctrl-C, SIGTERM, request_stop) and a checkpoint is due.
    def on_interrupt(self, progress: Progress) -> None: ...
    def on_train_end(self, progress: Progress) -> None: ...


REDRAW_EVERY = 20  # steps between progress-bar redraws: redrawing costs time


def redraw_now(progress: Progress, display: Any) -> bool:
    """Whether a display last drawn REDRAW_EVERY or more steps ago (or at the epoch's end) draws again. Counted
    from its last drawing, since the trainer reports only at sync points (every 3rd step, say)."""
    step, last = progress.step, getattr(display, "drawn_at", 0)
    if step < last or step - last >= REDRAW_EVERY or step == progress.steps:  # (a new epoch restarts)
        display.drawn_at = step
        return True
    return False


class ProgressBar(Callback):
    """A live bar per epoch (loss and accuracy so far), then one line per epoch."""

    def __init__(self, console: Console | None = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress: Any = None
        self.task: Any = None

    def on_epoch_begin(self, progress: Progress) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.progress = Bar(TextColumn(f"epoch {progress.epoch + 1}/{progress.epochs}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                            console=self.console, transient=True, disable=not self.console.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task("train", total=progress.steps, completed=progress.step, stats="")

    def on_batch_end(self, progress: Progress, loss: float, accuracy: float) -> None:
        if redraw_now(progress, self):
            running = progress.running
            self.progress.update(self.task, completed=progress.step,
                                 stats=f"loss {running.loss:.4f} acc {running.accuracy:.4f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch_end(self, progress: Progress, metrics: EpochMetrics) -> None:
        self.stop()
        self.console.print(format_epoch(metrics, progress.epochs), highlight=False, soft_wrap=True)

    def on_interrupt(self, progress: Progress) -> None:
        self.stop()

    def on_train_end(self, progress: Progress) -> None:
        self.stop()


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    validated = not math.isnan(m["val_loss"])  # train.val_every skips some epochs' validation
    return (f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f}  "
            + (f"val loss {m['val_loss']:.4f} acc {m['val_accuracy']:.4f}  " if validated else "")
            + f"{m['seconds']:.1f}s"
            + (f" (+{m['compile_seconds']:.1f}s compiling)" if m.get("compile_seconds") else ""))


# ---------------------------------------------------------------------------------- notebooks
def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel: IPython already loaded (never imported here) and its shell
    has a kernel; a terminal IPython has none."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


class NotebookProgress(Callback):
    """In Jupyter: a live progress bar with a line per finished epoch, and (given `curves`, which makes a
    displayable picture of the history so far) the loss and accuracy curves redrawn after every epoch.

    Two outputs updated in place (IPython.display's display ids): no widgets, and no output when a
    notebook is run without a browser except the final state.
    """

    def __init__(self, curves: Callable[[list[dict[str, Any]]], object] | None = None):
        self.curves = curves
        self.board: Any = None  # the display handle of the bar and the epoch lines
        self.plot: Any = None  # the display handle of the curves
        self.lines: list[str] = []

    def show(self, bar: str, text: str) -> None:
        from IPython.display import display

        rows = "".join(f"<div>{html.escape(line)}</div>" for line in self.lines)
        bundle = {"text/html": f'<div style="font-family:monospace">{rows}{bar}</div>',
                  "text/plain": "\n".join([*self.lines, text])}
        if self.board is None:
            self.board = display(bundle, raw=True, display_id=True)
        else:
            self.board.update(bundle, raw=True)

    def show_step(self, progress: Progress) -> None:
        epoch, epochs, step, steps = progress.epoch + 1, progress.epochs, progress.step, progress.steps
        running = progress.running
        stats = f"loss {running.loss:.4f} acc {running.accuracy:.4f}" if running.seen else ""
        text = f"epoch {epoch}/{epochs}  {step}/{steps}  {stats}"
        self.show(f'<div>epoch {epoch}/{epochs} <progress value="{step}" max="{steps}" style="width:40%">'
                  f"</progress> {step}/{steps} &nbsp; {stats}</div>", text)

    def on_epoch_begin(self, progress: Progress) -> None:
        self.show_step(progress)

    def on_batch_end(self, progress: Progress, loss: float, accuracy: float) -> None:
        if redraw_now(progress, self):
            self.show_step(progress)

    def on_epoch_end(self, progress: Progress, metrics: EpochMetrics) -> None:
        self.lines.append(format_epoch(metrics, progress.epochs))
        self.show("", "")
        if self.curves is None:
            return
        from IPython.display import display

        picture = self.curves(progress.history)
        if self.plot is None:
            self.plot = display(picture, display_id=True)
        else:
            self.plot.update(picture)


def progress_display(curves: Callable[[list[dict[str, Any]]], object] | None = None) -> Callback:
    """The progress display for where this runs: `NotebookProgress` in Jupyter, the terminal's bar elsewhere."""
    return NotebookProgress(curves) if in_notebook() else ProgressBar()
