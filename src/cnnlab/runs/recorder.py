"""Recording a run while it trains: a trainer callback that writes metrics, weights and checkpoints."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from cnnlab.config import Config
from cnnlab.files import reason, write_json
from cnnlab.runs.checkpoints import prune_finished, save_checkpoint
from cnnlab.runs.layout import FILES, RunError, path, remove_stale_files
from cnnlab.runs.records import rewrite_metrics
from cnnlab.runs.weights import save_weights
from cnnlab.text import command
from cnnlab.training.callbacks import Callback, EpochMetrics, Progress


class RunRecorder(Callback):
    """Records a run as it trains: metrics, weights and a checkpoint after every epoch and on interrupt.

    A file that cannot be written (disk full, read-only) stops training with a RunError naming the
    run and the reason; the files written before it, the previous checkpoint included, stay intact.
    """

    def __init__(self, run: Path, classes: tuple[str, ...], config: Config):
        self.run, self.classes = run, classes
        self.config = config.to_dict()  # stored in every checkpoint: resume refuses a config edited since
        self.keep_checkpoints = config.train.keep_checkpoints

    def on_train_begin(self, progress: Progress) -> None:
        remove_stale_files(self.run)  # left by a killed trainer; the run's lock is held now

    def on_epoch_end(self, progress: Progress, metrics: EpochMetrics) -> None:
        where = f"epoch {progress.epoch}"
        # weights before the checkpoint: a checkpoint of the last epoch means its weights are saved too
        # (resuming a finished run does not write them again)
        self.save("weights", where, save_weights, self.run, progress.model, self.classes)
        self.save("checkpoint", where, save_checkpoint, self.run, self.checkpoint(progress))
        # the whole file, atomically (never a half-written line); resume rewrites it from the checkpoint
        self.save("metrics", where, rewrite_metrics, self.run, progress.history)

    def on_train_end(self, progress: Progress) -> None:
        """The finished run's files: with early stopping, the kept epoch's weights (the trainer restored them)
        and why it stopped; then the previous checkpoint goes (unless train.keep_checkpoints)."""
        self.save_early_stopping(progress)
        if not self.keep_checkpoints:
            # after the weights: a run killed here still resumes, from its last checkpoint
            prune_finished(self.run)

    def save_early_stopping(self, progress: Progress) -> None:
        if progress.early_stopping is None:
            return
        self.save("weights", "training", save_weights, self.run, progress.model, self.classes)
        self.save("early_stopping", "training", write_json, path(self.run, "early_stopping"), progress.early_stopping)

    def on_interrupt(self, progress: Progress) -> None:
        self.save("checkpoint", f"epoch {progress.epoch + 1}, step {progress.step}", save_checkpoint,
                  self.run, self.checkpoint(progress))

    def checkpoint(self, progress: Progress) -> dict[str, Any]:
        return {**progress.checkpoint(), "config": self.config}

    def save(self, key: str, where: str, save: Callable[..., object], *args: Any) -> None:
        """Call save(*args); a write that fails (disk full, read-only) becomes a RunError saying so."""
        try:
            save(*args)
        except (OSError, SafetensorError) as exc:
            why = reason(exc) if isinstance(exc, OSError) else str(exc)
            if path(self.run, "checkpoint").exists() or path(self.run, "previous_checkpoint").exists():
                then = f"the files saved before are intact. Free space or make the folder writable, then continue " \
                       f"with: {command('train', '--resume', self.run)}"
            else:
                then = f"no checkpoint was written yet, so there is nothing to resume: free space or make the " \
                       f"folder writable, then train again ({self.run} can be deleted)"
            raise RunError(f"{self.run}: could not save {FILES[key]} after {where}: {why}. Training stopped; "
                           f"{then}") from None
