"""The main job as named steps: load data, build the model, start the run, train, test, record.

`train` and `resume` are what `cnnlab train` runs (on every rank of a data-parallel job: rank 0 loads
data first, creates and writes the run; the others follow); `evaluate_run` is `cnnlab evaluate`.
`train` also takes the lesson's settings as keywords, `train(model="seed", dataset="mnist-sample",
epochs=4, dropout=0.4)`, and shows its progress (live in a notebook).

Over 400 lines on purpose: it is the job, step by step (train, resume, restart, evaluate, cross-validate); each
step is a short function calling the packages below it, and reading them in one file is reading the job."""
from __future__ import annotations

import contextlib
import dataclasses
import html
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cnnlab.config import Config, ConfigError, TrainConfig, check_dataset_name, dotted_keys, list_presets
from cnnlab.data.loading import Dataset
from cnnlab.data.pinning import FolderChanged, check_folder
from cnnlab.data.registry import is_image_folder, load_config_for
from cnnlab.data.sources import Data, Subset, check_folder_there, deal_folds, load_data, prepare_data, with_data_dir
from cnnlab.data.store import notify
from cnnlab.errors import UserError
from cnnlab.files import reason, write_atomic, write_json, write_text
from cnnlab.inspect.figures import plot_confusion
from cnnlab.inspect.notebook import Run, curves_figure
from cnnlab.models.cnn import CNN, build_model
from cnnlab.models.summary import format_summary
from cnnlab.models.whitening import fit_whitening
from cnnlab.runs import layout, records
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.predictions import rows_of, write_predictions
from cnnlab.runs.recorder import RunRecorder
from cnnlab.runs.restart import restart_decision
from cnnlab.runs.transfer import start_from
from cnnlab.runs.weights import load_model, save_weights, weights_problem
from cnnlab.text import command
from cnnlab.training.busy import busy_note
from cnnlab.training.callbacks import Callback, in_notebook, progress_display
from cnnlab.training.distributed import SINGLE, Context, first_on_main, launched_by_torchrun, on_main
from cnnlab.training.engine import TrainData, Trainer, TrainingInterrupted, prepare_process, stop_on_signals
from cnnlab.training.evaluate import Evaluation, PerImage, evaluation_of, predict_per_image
from cnnlab.training.lr_find import Finding, find_lr


@dataclass
class RunResult(Run):
    """What `train` made: the run directory, the per-epoch history and the test evaluation; as a `Run`, it
    also evaluates, summarises, predicts and draws (`result.show.mistakes()`) in a notebook."""

    run: Path
    history: list[dict]
    test: Evaluation | None  # None on data-parallel ranks other than 0
    train_seconds: float  # wall time of this invocation's training loop, validation included (compiling not)
    images_per_second: float  # training images processed per second of that time (all ranks)
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable images: path -> reason
    kept_epoch: int | None = None  # early stopping: the epoch whose weights were kept (None: the last)
    stopped: str | None = None  # early stopping: why training ended before train.epochs
    lr_finding: Finding | None = None  # train.lr auto: what the finder saw and suggested
    compile_seconds: float = 0.0  # train.compile: the steps that compiled, not counted in train_seconds
    stop_requested: bool = False  # Ctrl-C or SIGTERM came after the last step: the run finished, then should stop
    busy: str | None = None  # other work shared the cores as training ended (training.busy's note), else None

    def __repr__(self) -> str:  # the dataclass's own would print every test prediction
        accuracy = f"{self.test.accuracy:.4f}" if self.test is not None else "None"
        return (f"RunResult(run={str(self.run)!r}, epochs={len(self.history)}, test_accuracy={accuracy}, "
                f"train_seconds={self.train_seconds:.1f})")

    def _repr_html_(self) -> str:
        note = f"<p>note: {html.escape(self.busy)}</p>" if self.busy else ""
        return super()._repr_html_() + note

    @property
    def kept(self) -> dict:
        """The metrics of the epoch whose weights the run kept (the last, unless early stopping chose)."""
        if not self.history:
            return {}
        return self.history[self.kept_epoch - 1] if self.kept_epoch else self.history[-1]


def new_network(config: Config, data: Data) -> CNN:
    """The freshly initialised network `config` trains on `data` (seeded), its whitening layer fitted to
    the training split (`--init-from` then copies a source run's weights over it)."""
    network = build_model(config.model, data.image_shape, data.num_classes, seed=config.train.seed)
    fit_whitening(network.whitening_layers(), data.train)
    return network


def open_data(config: Config, progress: bool = True, context: Context = SINGLE, summary: bool = False,
              hold: bool = True) -> Data:
    """The configured dataset, ready to train on; under data-parallel training rank 0 goes first
    (it may download into the shared cache) and the others follow once it succeeded. `summary`: an image
    folder's summary and warnings printed (by rank 0); `hold` False: an image folder streamed, never decoded
    into memory (for a command that reads one split once)."""
    return first_on_main(context, lambda: load_data(config, progress and context.is_main,
                                                    summary and progress and context.is_main, hold))


def open_pinned_data(run: Path, config: Config, progress: bool = True, context: Context = SINGLE,
                     same_files: bool = False, hold: bool = True) -> Data:
    """The dataset a run was made from, opened again: an image folder is compared with the one the run pinned
    in its manifest (FolderChanged, before anything is written, when its classes differ; a warning when its
    files do, or with `same_files` (resuming: the splits must be the ones it trained on) FolderChanged too).
    `hold` False: streamed (see open_data)."""
    recorded = (records.read_record(run, "manifest") or {}).get("image_folder")
    if recorded:
        check_folder_there(config, str(run))
    data = open_data(config, progress, context, hold=hold)
    now = data.about.get("image_folder")
    for warning in check_folder(recorded, now, str(run)) if now else []:
        if same_files:
            raise FolderChanged(f"{warning}; --resume would go on with other splits (a test image could reach "
                                "training): restore the folder with its files' times (cp -p, rsync -a), or "
                                "train a new run on it")
        if progress and context.is_main:
            notify(warning)
    return data


def pinned(config: Config) -> Config:
    """The config with an image folder's path made absolute: the run records where its data is, whatever the
    working folder of a later `evaluate` or `--resume`."""
    if not is_image_folder(config.data.dataset):
        return config
    where = os.path.abspath(config.data.dataset)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, dataset=where))


def start_run(config: Config, data: Data, model: CNN, root: str | Path, name: str | None,
              reuse: bool = False, started_from: dict | None = None, finding: Finding | None = None) -> Path:
    """A new run directory with its config, summary and manifest (`reuse`: an elastic restart's own);
    where its weights started (`train.init_from`) in the manifest, and the learning-rate finder's
    sweep (`train.lr: auto`) as lr_find.json and lr_find.png."""
    run = layout.new_run(config, root, name, reuse=reuse)
    records.save_config(run, config)
    write_text(layout.path(run, "summary"), format_summary(model.plan, config.model.name, explain=True) + "\n")
    extra = {**data.about, **({"init_from": started_from} if started_from else {})}
    records.write_manifest(run, data.files, config.data.allow_checksum_mismatch, extra=extra)
    if finding is not None:
        from cnnlab.inspect.lr_curve import plot_lr_finding

        write_json(layout.path(run, "lr_find"), finding.to_dict())
        write_atomic(layout.path(run, "lr_find_plot"), lambda tmp: plot_lr_finding(finding, tmp))
    return run


def choose_lr(config: Config, model: CNN, data: Data, context: Context = SINGLE,
              progress: bool = True) -> tuple[Config, Finding | None]:
    """The config with `train.lr: auto` replaced by the finder's suggestion (two significant digits)."""
    if config.train.lr != "auto":
        return config, None
    finding = find_lr(model, TrainData(data.train, data.val), config.train, context=context)
    lr = float(f"{finding.suggestion:.2g}")
    if progress and context.is_main:
        print(f"lr-find: train.lr {lr:g} ({finding.why}; {len(finding.lrs)} steps in {finding.seconds:.1f}s)")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr)), finding


def check_early_stopping(config: Config, data: Data) -> None:
    if config.train.early_stopping.patience and len(data.val) == 0:
        raise ConfigError("train.early_stopping watches the validation split, which is empty here "
                          "(data.val_size is 0): give it images, or turn early stopping off (patience 0)")


def keyword_config(model: str | None, file: str | Path | None, dataset: str | None, settings: dict[str, Any]
                   ) -> Config:
    """The config of `train(model=..., dataset=..., epochs=4, dropout=0.4)`: each keyword is a `--set`
    override (a knob of the preset, or a config key: `lr` is train.lr), so an unknown one is the same
    one-line error, naming it with a "did you mean"."""
    overrides = [(key, str(value) if isinstance(value, Path) else value)  # values as given, never re-read as text
                 for key, value in settings.items()]
    config, chosen = load_config_for(model, file, overrides, data={} if dataset is None else {"dataset": dataset})
    if chosen:
        print(chosen)
    return config


def check_keyword_types(**given: tuple[object, tuple[type, ...], str]) -> None:
    """The notebook API's own keywords, each checked before use: `train(dataset=123)` was an AttributeError
    deep inside. `given`: keyword -> (value, the types it may have, what it is in words)."""
    for keyword, (value, types, what) in given.items():
        if keyword == "dataset" and not isinstance(value, (Dataset, Data, Path, type(None))):
            check_dataset_name(value, "dataset")  # a name, not empty: the rule of --dataset and data.dataset
        elif not isinstance(value, types):
            raise ConfigError(f"{keyword}={value!r}: expected {what}, found {type(value).__name__}")


def train(config: Config | str | Path | None = None, root: str | Path = layout.DEFAULT_ROOT, name: str | None = None,
          callbacks: Sequence[Callback] = (), progress: bool = True, dataset: Data | Dataset | str | Path | None = None,
          context: Context = SINGLE, reuse: bool = False, *, model: str | None = None, **settings: Any) -> RunResult:
    """Train a model from a config into a new run directory, then evaluate it on the test set.

    `config` is a Config (`load_config`); or, the notebook form, a YAML file or nothing, with the preset
    as `model`, the dataset's name (or an image folder's path) as `dataset` and any setting as a keyword
    (`epochs=4, dropout=0.4`); that form shows its progress (a live bar and curves in Jupyter), as does any
    form in Jupyter.
    Data and config problems are raised before the run directory is created, so a bad input
    leaves nothing behind. A Dataset (or Data) as `dataset` skips loading when the caller holds it already
    (benchmarks; a sweep's trials). Under data-parallel training every rank calls this; only rank 0 writes the run.
    """
    check_keyword_types(
        config=(config, (Config, str, Path, type(None)), "a Config, a YAML file's path or None"),
        root=(root, (str, Path), "a folder's path"), name=(name, (str, type(None)), "a run name or None"),
        progress=(progress, (bool,), "True or False"), reuse=(reuse, (bool,), "True or False"),
        dataset=(dataset, (Dataset, Data, str, Path, type(None)),
                 "a dataset's name, an image folder's path or a Dataset"),
        model=(model, (str, type(None)), "a model preset's name"))
    if isinstance(dataset, Path):
        dataset = str(dataset)  # an image folder's path
    if isinstance(config, str) and config in list_presets() and not Path(config).exists():
        raise ConfigError(f"train({config!r}, ...): the first argument is a Config or a YAML file; a preset is "
                          f"named as model={config!r}")
    keywords = not isinstance(config, Config)
    if not isinstance(config, Config):
        config = keyword_config(model, config, dataset if isinstance(dataset, str) else None, settings)
    elif model is not None or settings or isinstance(dataset, str):
        given = ", ".join([*(["model"] if model is not None else []), *(["dataset"] if isinstance(dataset, str)
                                                                     else []), *settings])
        raise ConfigError(f"train(config, ...): a Config already holds every setting; drop {given}, or give "
                          "settings as keywords without a Config, e.g. train(model='seed', epochs=4)")
    if isinstance(dataset, str):
        dataset = None  # a name: the config holds it
    if progress and context.is_main and (keywords or in_notebook()):
        callbacks = [*callbacks, progress_display(curves_figure)]
    if name is not None:
        layout.check_name(name)  # before the data is loaded: a bad name costs nothing
    config = pinned(config)
    prepare_process(config.train, context.device)  # threads first: the manifest records them, the data uses them
    if isinstance(dataset, Data):
        data = dataset
    else:
        data = prepare_data(dataset, config) if dataset is not None else open_data(config, progress, context,
                                                                                   summary=True)
    network = new_network(config, data)
    check_early_stopping(config, data)
    started_from = start_from(network, config.train.init_from, data.classes) if config.train.init_from else None
    config, finding = choose_lr(config, network, data, context, progress)
    # Built before the run directory: a setting the data cannot satisfy (class weights) leaves nothing behind.
    trainer = Trainer(network, TrainData(data.train, data.val), config.train, callbacks, context)
    run = Path(on_main(context, lambda: str(start_run(config, data, network, root, name, reuse, started_from,
                                                      finding))))
    if context.is_main:
        trainer.callbacks.insert(0, RunRecorder(run, data.classes, config))
    result = fit_and_test(run, trainer, data, context)
    result.lr_finding = finding
    return result


def train_or_restart(config: Config, root: str | Path, name: str | None, callbacks: Sequence[Callback],
                     context: Context) -> RunResult:
    """`train`; or, in a data-parallel job that torchrun restarted after a failure, the run it had started.

    A restarted job finds its run by name (`--nproc` always passes one; under a bare torchrun the
    name comes from the rendezvous id), resumes from its checkpoint, or starts over in it when the
    failure came before the first checkpoint (`runs.restart`). Rank 0 decides, from the run directory,
    and tells the others: their restart counts need not agree (a node that rejoins resets the others
    uncounted).
    """
    if launched_by_torchrun() and name is None:
        job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        name = f"{layout.default_name(config).rsplit('-', 2)[0]}-job-{job}" if job != "none" else None
    if name is None or not launched_by_torchrun():
        return train(config, root, name, callbacks, context=context)
    run = Path(root) / name
    decision = on_main(context, lambda: restart_decision(config, run, context.restarts))
    if decision != "new" and context.is_main:
        print(f"restart {context.restarts}: " + (f"resuming {run} from its checkpoint" if decision == "resume"
                                                 else f"starting {run} over"))
    if decision == "resume":
        return resume(run, callbacks, context=context)
    return train(config, root, name, callbacks, context=context, reuse=decision == "again")


def resume(run: str | Path, callbacks: Sequence[Callback] = (), progress: bool = True,
           context: Context = SINGLE) -> RunResult:
    """Continue an interrupted run from its newest readable checkpoint, to the same end result.

    A config.yaml edited since the checkpoint was written is refused (the run continues as it was
    trained, or not at all); a finished run whose model.safetensors is missing, unreadable or not
    the checkpoint's weights gets it back from the checkpoint, and says so.
    """
    run = layout.check_run(run, "config")
    config = records.load_config(run)
    data = open_pinned_data(run, config, progress, context, same_files=True)
    model = build_model(config.model, data.image_shape, data.num_classes)
    recorders = [RunRecorder(run, data.classes, config)] if context.is_main else []
    trainer = Trainer(model, TrainData(data.train, data.val), config.train, [*recorders, *callbacks], context)
    # A checkpoint the model rejects (tensors that do not fit) counts as unreadable: the previous one is tried.
    # An edited config.yaml is refused first, naming the key, even where the edit (a recipe switched on)
    # is also why the model would reject the checkpoint.
    def restore(state: dict[str, Any]) -> None:
        try:
            refuse_edited_config(run, config, state.get("config"))
        except layout.RunError as exc:
            raise EditedConfig(str(exc)) from None
        trainer.load_state_dict(state)

    try:
        checkpoint, warnings = load_checkpoint(run, restore=restore)
    except EditedConfig as exc:
        raise layout.RunError(str(exc)) from None
    for warning in warnings if context.is_main else ():
        print(f"warning: {warning}")
    if context.is_main:
        records.rewrite_metrics(run, trainer.history)
        if trainer.finished:
            # the network build_model made (or its averaged copy), as the checkpoint left it
            restore_weights(run, cast(CNN, trainer.evaluated), data.classes)
    return fit_and_test(run, trainer, data, context)


class EditedConfig(Exception):
    """Carries refuse_edited_config's error out of load_checkpoint, which would count it as unreadable."""


def refuse_edited_config(run: Path, config: Config, saved: dict | None) -> None:
    """A RunError when config.yaml no longer says what the checkpoint was trained with."""
    if saved is None or saved == config.to_dict():
        return  # a checkpoint from before configs were recorded in it: nothing to compare with
    now, then = dotted_keys(config.to_dict()), dotted_keys(saved)
    # A key added to cnnlab since the checkpoint was written, at its default, changes nothing it trained with.
    defaults = dotted_keys(Config().to_dict())
    changed = [f"{key}: {then.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(now) | set(then))
               if now.get(key) != then.get(key) and not (key not in then and key in defaults
                                                         and now[key] == defaults[key])]
    if not changed:
        return
    raise layout.RunError(f"{layout.path(run, 'config')} was edited after the checkpoint was written "
                          f"({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}); --resume continues "
                          f"the run as it was trained. Undo the edit, or train a new run from it: "
                          f"{command('train', '--config', layout.path(run, 'config'))}")


def restore_weights(run: Path, model: CNN, classes: tuple[str, ...]) -> None:
    """A finished run's model.safetensors as its last checkpoint has it (rewritten when it is not)."""
    problem = weights_problem(run, model)
    if problem is not None:
        save_weights(run, model, classes)
        print(f"warning: {layout.path(run, 'weights')} was {problem}: rewritten from the checkpoint")


def fit_and_test(run: Path, trainer: Trainer, data: Data, context: Context = SINGLE) -> RunResult:
    # From the first step to the last file, a first Ctrl-C or SIGTERM asks for a stop rather than killing the
    # process: training stops at the next sync point (TrainingInterrupted, resumable); after the last step, the
    # few seconds that keep the best weights, test the run and write its files finish, and the result says a stop
    # was asked (cut short, they would leave a trained run without its test). A second Ctrl-C stops at once.
    for callback in trainer.callbacks:
        callback.on_run_start(run)  # the trainer knows no paths: its callbacks learn the run's here
    prepare_process(trainer.config, context.device)
    with layout.locked(run) if context.is_main else contextlib.nullcontext(), stop_on_signals(trainer):
        steps_before = trainer.state.epoch * trainer.steps_per_epoch + trainer.state.step
        started = time.perf_counter()
        try:
            history = trainer.fit()
        except TrainingInterrupted as exc:
            exc.run = run
            raise
        seconds = time.perf_counter() - started - trainer.forward.total_seconds
        busy = busy_note(torch.get_num_threads())  # the load of training's last minute, before testing adds its own
        trained = (trainer.state.epoch * trainer.steps_per_epoch - steps_before) * trainer.config.batch_size
        skipped = merge_skipped(context, data)
        test = None
        if context.is_main:
            test = test_run(run, trainer.evaluated, data, trainer.config)
            skipped.update(data.test.skipped)
            if skipped:
                write_json(layout.path(run, "skipped"), skipped)
        context.barrier()  # the other ranks return once rank 0's files are complete
    images = min(trained, len(trainer.data.train) * trainer.config.epochs)
    return RunResult(run, history, test, seconds, images / seconds if seconds > 0 else 0.0, skipped,
                     trainer.kept_epoch, trainer.early_stopping.stopped, compile_seconds=trainer.forward.total_seconds,
                     stop_requested=trainer.stop_requested, busy=busy)


def merge_skipped(context: Context, data: Data) -> dict[str, str]:
    """Unreadable images met by any rank while training and validating: path -> reason."""
    mine = {**data.train.skipped, **data.val.skipped}
    merged: dict[str, str] = {}
    for part in context.gather_json(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def cross_validated(config: Config, data: Data, folds: int) -> dict[int, np.ndarray]:
    """Out-of-sample class probabilities (classes,) of each readable training image, keyed by its position in
    the training split: `folds` runs trained by `config` in a temporary folder (deleted after), each on all the
    folds but one, each judging the fold it never saw, as its test pass would (`show label-issues --folds`)."""
    images = len(data.train)
    if not 2 <= folds <= images:  # an empty fold would have nothing to judge
        raise ConfigError(f"--folds {folds}: expected 2 to {images:,} (the training images), or 0 for no folds")
    dealt = deal_folds(data.train.labels, folds, config.train.seed)
    found: dict[int, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="cnnlab-folds-") as scratch:
        for number, held in enumerate(dealt):
            others = torch.sort(torch.cat([f for k, f in enumerate(dealt) if k != number])).values
            unseen = Subset(data.train, held)
            print(f"fold {number + 1}/{folds}: training on {len(others):,} images, to judge {len(held):,}",
                  file=sys.stderr, flush=True)
            fold = dataclasses.replace(data, train=Subset(data.train, others), test=unseen)
            result = train(config, dataset=fold, root=scratch, name=f"fold-{number + 1}", progress=False)
            model, _, trained = load_model(result.run)
            t = trained.train
            judged = predict_per_image(model, unseen, t.eval_batch_size, t.channels_last, t.tta, t.tta_shift)
            probabilities = torch.softmax(judged.logits, 1).numpy()
            found.update(zip(held[judged.positions].tolist(), probabilities))
    return found


def test_run(run: Path, model: nn.Module, data: Data, config: TrainConfig) -> Evaluation:
    """Evaluate on the test set and record test.json, confusion.png and predictions.csv (every image's
    file, true and predicted class) in the run."""
    result, per_image = evaluate_with_files(model, data, config)
    record_test(run, result, data, per_image)
    return result


def evaluate_with_files(model: nn.Module, data: Data, config: TrainConfig) -> tuple[Evaluation, PerImage]:
    """The test split evaluated, each prediction tied to its image's position (and so its file)."""
    per_image = predict_per_image(model, data.test, config.eval_batch_size, config.channels_last, config.tta,
                                  config.tta_shift)
    return evaluation_of(per_image.logits, torch.from_numpy(per_image.labels), data.classes), per_image


def record_test(run: Path, result: Evaluation, data: Data, per_image: PerImage) -> None:
    """confusion.png, predictions.csv and test.json in the run, each whole or not at all, the record last: a
    picture that cannot be written leaves the run's test.json as it was."""
    write_atomic(layout.path(run, "confusion"),
                 lambda tmp: plot_confusion(result.confusion, tuple(data.classes), tmp,
                                            title=f"{run.name}: test accuracy {result.accuracy:.2%}"))
    write_predictions(run, rows_of(per_image, data.test, data.classes))
    write_json(layout.path(run, "test"), result.to_dict())


class ResultNotSaved(layout.RunError):
    """The evaluation is done (`.evaluation`), but the run would not take its test.json or confusion.png
    (a read-only or full disk): the result is still the caller's to show."""

    def __init__(self, message: str, evaluation: Evaluation):
        super().__init__(message)
        self.evaluation = evaluation


def evaluate_run(run: str | Path, data_dir: str | Path | None = None, progress: bool = True) -> Evaluation:
    """Reload a run's model from its files and evaluate it on its dataset's test set, recorded in the run.

    A run that cannot be written (read-only, a full disk) raises ResultNotSaved, which holds the evaluation.
    """
    model, classes, config = load_model(run)
    config = with_data_dir(config, data_dir)
    data = open_pinned_data(Path(run), config, progress, hold=False)  # the test split, read once
    result, per_image = evaluate_with_files(model, data, config.train)
    try:
        record_test(Path(run), result, data, per_image)
    except OSError as exc:
        raise ResultNotSaved(f"{run}: the evaluation was not saved ({exc.filename or run}: {reason(exc)}); "
                             "test.json is as it was", result) from None
    except UserError as exc:  # a file the run holds that cnnlab will not replace (a folder, a link, a FIFO)
        raise ResultNotSaved(f"{run}: the evaluation was not saved ({exc}); test.json is as it was", result) from None
    return result
