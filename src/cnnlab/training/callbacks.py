"""Hooks the trainer calls, and the progress display that hangs on them.

Progress bars, run recording (`cnnlab.runs.recorder`), sweeps' pruning and experiment trackers are
all callbacks: the trainer knows none of them.
"""
from __future__ import annotations

import html
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from cnnlab.training.engine import Trainer


class Callback:
    """Hooks the trainer calls; override the ones you need."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_epoch_begin(self, trainer: Trainer) -> None: ...
    # At each sync point (every step on the CPU; see train.sync_every): the mean loss and accuracy since the last.
    def on_batch_end(self, trainer: Trainer, loss: float, accuracy: float) -> None: ...
    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_interrupt(self, trainer: Trainer) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


REDRAW_EVERY = 20  # steps between progress-bar redraws: redrawing costs time


def redraw_now(trainer: Trainer, display: Any) -> bool:
    """Whether a display last drawn REDRAW_EVERY or more steps ago (or at the epoch's end) draws again. Counted
    from its last drawing, since the trainer reports only at sync points (every 3rd step, say)."""
    step, last = trainer.state.step, getattr(display, "drawn_at", 0)
    if step < last or step - last >= REDRAW_EVERY or step == trainer.steps_per_epoch:  # (a new epoch restarts)
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
        if redraw_now(trainer, self):
            running = trainer.state.running
            self.progress.update(self.task, completed=step,
                                 stats=f"loss {running.loss:.4f} acc {running.accuracy:.4f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.stop()
        self.console.print(format_epoch(metrics, trainer.config.epochs), highlight=False, soft_wrap=True)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.stop()

    def on_train_end(self, trainer: Trainer) -> None:
        self.stop()


def format_epoch(m: dict[str, Any], epochs: int) -> str:
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

    def show_step(self, trainer: Trainer) -> None:
        epoch, epochs, step, steps = trainer.state.epoch + 1, trainer.config.epochs, trainer.state.step, \
            trainer.steps_per_epoch
        running = trainer.state.running
        stats = f"loss {running.loss:.4f} acc {running.accuracy:.4f}" if running.seen else ""
        text = f"epoch {epoch}/{epochs}  {step}/{steps}  {stats}"
        self.show(f'<div>epoch {epoch}/{epochs} <progress value="{step}" max="{steps}" style="width:40%">'
                  f"</progress> {step}/{steps} &nbsp; {stats}</div>", text)

    def on_epoch_begin(self, trainer: Trainer) -> None:
        self.show_step(trainer)

    def on_batch_end(self, trainer: Trainer, loss: float, accuracy: float) -> None:
        if redraw_now(trainer, self):
            self.show_step(trainer)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.lines.append(format_epoch(metrics, trainer.config.epochs))
        self.show("", "")
        if self.curves is None:
            return
        from IPython.display import display

        picture = self.curves(trainer.history)
        if self.plot is None:
            self.plot = display(picture, display_id=True)
        else:
            self.plot.update(picture)


def progress_display(curves: Callable[[list[dict[str, Any]]], object] | None = None) -> Callback:
    """The progress display for where this runs: `NotebookProgress` in Jupyter, the terminal's bar elsewhere."""
    return NotebookProgress(curves) if in_notebook() else ProgressBar()
