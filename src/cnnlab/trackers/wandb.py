"""Weights & Biases logging for `cnnlab train --wandb`: an optional extra (`pip install 'cnnlab[wandb]'`).

wandb is imported only when a tracker starts, so cnnlab without --wandb never loads it. With no
W&B login (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc) and no WANDB_MODE set, the run is
logged offline under ./wandb (or $WANDB_DIR), to upload later with `wandb sync`.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cnnlab.config import Config
from cnnlab.data.pixels import to_pixels
from cnnlab.training.callbacks import Callback, EpochMetrics, Progress

if TYPE_CHECKING:
    import numpy as np
    import torch
    from wandb import Run

    from cnnlab.models.plan import Plan
    from cnnlab.training.evaluate import Evaluation

DEFAULT_PROJECT = "cnnlab"
SAMPLE_PREDICTIONS = 32  # test images logged with their predicted class


def wandb_available() -> bool:
    """Whether the wandb package is installed (without importing it)."""
    return importlib.util.find_spec("wandb") is not None


def logged_in() -> bool:
    """Whether W&B credentials are set up: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode() -> str:
    """WANDB_MODE if set; else online when logged in, offline otherwise (never an interactive login prompt)."""
    return os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")


class FinishedRun(Protocol):
    """What `WandbTracker.finish` reads of a `cnnlab.pipeline.RunResult` (the pipeline is a layer above)."""

    run: Path
    test: Evaluation | None
    train_seconds: float
    images_per_second: float


class WandbTracker(Callback):
    """Logs a training run to W&B: config, per-epoch metrics; `finish` adds the test summary, sample
    predictions with class names, and the confusion matrix."""

    def __init__(self, config: Config, project: str = DEFAULT_PROJECT, samples: int = SAMPLE_PREDICTIONS):
        self.config, self.project, self.samples = config, project, samples
        self.run: Run | None = None  # the wandb Run, from on_train_begin until finish

    def on_train_begin(self, progress: Progress) -> None:
        import wandb

        from cnnlab.models.cnn import CNN

        model = progress.model
        if not isinstance(model, CNN):
            raise TypeError(f"WandbTracker logs a cnnlab CNN's layers; the trainer holds a {type(model).__name__}")
        run = wandb.init(project=self.project, config=self.config.to_dict(), job_type="train",
                         # WANDB_MODE as set: wandb also takes its legacy "dryrun" and "run", which init's Literal omits
                         mode=wandb_mode(),  # type: ignore[arg-type]
                         tags=[self.config.data.dataset, self.config.model.name])
        self.run = run
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")  # plot everything against epochs, not log calls
        run.summary["params"] = model.plan.params
        self.log_layers(model.plan)

    def active_run(self) -> Run:
        """The W&B run on_train_begin started."""
        if self.run is None:
            raise RuntimeError("no W&B run is active: on_train_begin starts one, finish and on_interrupt end it")
        return self.run

    def log_layers(self, plan: Plan) -> None:
        import wandb

        rows = [[layer.name, layer.title, str(layer.output_shape), layer.params] for layer in plan.layers()]
        self.active_run().log({"layers": wandb.Table(columns=["layer", "type", "output shape", "params"], data=rows)})

    def on_epoch_end(self, progress: Progress, metrics: EpochMetrics) -> None:
        # NaN: an epoch not validated (train.val_every) or no validation split; W&B would chart it as a point
        self.active_run().log({key: value for key, value in metrics.items()
                               if not (isinstance(value, float) and math.isnan(value))})

    def on_interrupt(self, progress: Progress) -> None:
        if self.run is not None:
            self.run.summary["interrupted_after_epoch"] = progress.epoch
            self.run.finish(exit_code=130)  # shown as failed; a resumed run logs as a new W&B run
            self.run = None

    def finish(self, result: FinishedRun) -> None:
        """Log the test results of a finished run and close the W&B run."""
        if self.run is None:
            return
        import wandb

        test = result.test
        if test is None:  # only rank 0 evaluates, and only rank 0 has a tracker
            raise ValueError(f"{result.run}: the result holds no test evaluation to log")
        self.run.name = result.run.name
        self.run.summary.update(dict(test_accuracy=test.accuracy, test_loss=test.loss, run_dir=str(result.run),
                                     train_seconds=result.train_seconds, images_per_second=result.images_per_second))
        images, label_tensor = self.test_set()
        labels = label_tensor.numpy()
        self.run.log(dict(
            test_predictions=self.sample_images(images, labels, test),
            confusion_matrix=wandb.plot.confusion_matrix(y_true=labels.tolist(), preds=test.predictions.tolist(),
                                                         class_names=list(test.classes)),
            per_class=wandb.Table(columns=["class", "precision", "recall", "f1", "support"],
                                  data=[[r["class_name"], r["precision"], r["recall"], r["f1"], r["support"]]
                                        for r in test.per_class])))
        self.run.finish()
        self.run = None

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        from cnnlab.data.sources import open_test_set

        return open_test_set(self.config)

    def sample_images(self, images: torch.Tensor, labels: np.ndarray, test: Evaluation) -> list[Any]:
        """The first test images as wandb Images captioned with true and predicted class names."""
        import wandb

        captions = []
        for i in range(min(self.samples, len(labels))):
            predicted = int(test.predictions[i])
            mark = "✓" if predicted == labels[i] else "✗"
            caption = (f"{mark} true {test.classes[labels[i]]}, predicted {test.classes[predicted]} "
                       f"({test.probabilities[i, predicted]:.0%})")
            captions.append(wandb.Image(to_pixels(images[i]), caption=caption))
        return captions
