"""`cnnlab presets`, `summary`, `train` and `evaluate`: thin commands over `cnnlab.pipeline`.

Nothing heavy is imported until a command runs: `presets` and `summary` never load torch.

Over 400 lines on purpose: `train` has the most options of any command (fine-tuning, trackers, data-parallel
launch); each is a few lines of parsing handed to `cnnlab.pipeline`."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cnnlab.cli._app import LEARN, TRAIN, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import (
    RUNS_DIR,
    ConfigFile,
    DataDir,
    Dataset,
    DefaultModel,
    LatestRun,
    Overrides,
    RunsDir,
)
from cnnlab.text import command, to_json

if TYPE_CHECKING:
    from cnnlab.config import Config
    from cnnlab.pipeline import RunResult
    from cnnlab.trackers.tensorboard import TensorBoardTracker
    from cnnlab.trackers.wandb import WandbTracker

    Tracker = WandbTracker | TensorBoardTracker  # what `train` calls finish(result) on
    from cnnlab.training.callbacks import Callback
    from cnnlab.training.distributed import Context
    from cnnlab.training.evaluate import Evaluation


def sections(dataset: str | None = None, data_dir: Path | None = None, allow_mismatch: bool = False,
             image_size: int | None = None, **train: object) -> dict[str, dict[str, Any]]:
    """Typed CLI options as config sections (options left unset do not override the files)."""
    given = dict(dataset=dataset, data_dir=str(data_dir) if data_dir else None, image_size=image_size)
    data: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # --dataset "" is refused, not dropped
    if allow_mismatch:
        data["allow_checksum_mismatch"] = True
    return dict(data=data, train={k: v for k, v in train.items() if v is not None})


@app.command(rich_help_panel=LEARN)
@friendly_errors
def presets(name: Annotated[str | None, typer.Argument(help="Print this preset's YAML (copy it to edit).")] = None
            ) -> None:
    """List the model presets, or print one as YAML to copy and edit."""
    from cnnlab.config import list_presets, preset_path

    if name is None:
        for preset in list_presets():
            first = preset_path(preset).read_text().splitlines()[0].lstrip("# ")
            print(f"{preset:14} {first}")
        return
    print(preset_path(name).read_text(), end="")


@app.command(rich_help_panel=LEARN)
@friendly_errors
def summary(model: DefaultModel = None, config: ConfigFile = None, set_: Overrides = None, dataset: Dataset = None,
            explain: Annotated[bool, typer.Option("--explain", help="Show how each layer's parameters add up.")] = False
            ) -> None:
    """The model layer by layer, like Keras' model.summary(): output shapes and parameters."""
    from cnnlab.data.registry import dataset_shape, load_config_for
    from cnnlab.models.summary import summarize

    cfg, chosen = load_config_for(model, config, set_, **sections(dataset))
    if chosen:
        print(chosen)
    image_shape, num_classes = dataset_shape(cfg.data)
    print(summarize(cfg, image_shape, num_classes, explain))


@app.command(rich_help_panel=TRAIN)
@friendly_errors
def train(
    ctx: typer.Context,
    model: DefaultModel = None,
    dataset: Dataset = None,
    config: ConfigFile = None,
    set_: Overrides = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training set.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per optimisation step.")] = None,
    lr: Annotated[str | None, typer.Option(help="Learning rate, or auto: the learning-rate finder's suggestion "
                                           "(see `cnnlab lr-find`).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (split, weights, order, dropout).")] = None,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Image folders: pixels per side each picture becomes (data.image_size; how it gets "
        "there: data.resize crop, pad or squish).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Start from this run's weights and model (fine-tuning): the features are kept, the "
        "head gets this dataset's classes. See train.freeze_epochs and train.features_lr_scale.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(
        "--keep-checkpoints", help="Keep both checkpoints of a finished run (by default only the last one, which "
        "--resume reads, stays; train.keep_checkpoints).")] = False,
    data_dir: DataDir = None,
    allow_checksum_mismatch: Annotated[bool, typer.Option(
        "--allow-checksum-mismatch", help="Use local dataset files whose checksums differ (recorded in the run)."
    )] = False,
    runs_dir: RunsDir = RUNS_DIR,
    name: Annotated[str | None, typer.Option(help="Run directory name (default <dataset>-<model>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this interrupted run instead of starting one.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log to Weights & Biases (pip install "
                                        "'cnnlab\\[wandb]'; offline under ./wandb when not logged in).")] = False,
    wandb_project: Annotated[str, typer.Option(help="W&B project for --wandb.")] = "cnnlab",
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log TensorBoard events, under "
                                              "RUN/tensorboard/ (pip install 'cnnlab\\[tensorboard]'; "
                                              "view with: tensorboard --logdir runs).")] = False,
    tensorboard_dir: Annotated[Path | None, typer.Option(help="TensorBoard events in DIR/<run name>/ instead "
                                                         "(implies --tensorboard).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto (a GPU when there is one; "
                                                  "the default).")] = None,
    nproc: Annotated[int, typer.Option(
        min=1, max=256, help="Train data-parallel in this many processes on this machine "
                                       "(torchrun; gloo on CPU, nccl on GPUs).")] = 1,
    max_restarts: Annotated[int, typer.Option(
        min=0, max=100, help="With --nproc: restart the job this many times if a process "
                                              "dies; it resumes from the last checkpoint.")] = 0,
) -> None:
    """Train a model, evaluate it on the test set, and record everything in a run directory.

    Data-parallel: `--nproc N` on one machine, or `torchrun ... -m cnnlab train ...` across machines.
    """
    from cnnlab import pipeline
    from cnnlab.data.registry import load_config_for
    from cnnlab.runs import layout, records
    from cnnlab.training import distributed
    from cnnlab.training.engine import TrainingInterrupted

    tensorboard = tensorboard or tensorboard_dir is not None
    if tensorboard:
        require_tensorboard()  # before any run directory, or any process, is started
    if nproc > 1 and not distributed.launched_by_torchrun():
        if resume is None and name is None:
            name = layout.default_name(load_config_for(model, config, set_, **sections(dataset))[0])
        launch_processes(ctx, nproc, max_restarts, name, resume, runs_dir)
        return
    trackers: list[Tracker] = []
    try:
        if resume is not None:
            given = [flag for flag, value in (("--config", config), ("--set", set_), ("--epochs", epochs),
                                              ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed),
                                              ("--dataset", dataset), ("--data-dir", data_dir), ("--name", name),
                                              ("--device", device), ("--init-from", init_from),
                                              ("--keep-checkpoints", keep_checkpoints),
                                              ("--image-size", image_size))
                     if value]
            if given:
                raise fail(f"--resume continues a run with its saved config.yaml; drop {', '.join(given)}")
            cfg = records.load_config(resume)
            context = distributed.init(cfg.train.device)
            say(context, f"resuming {resume}")
            callbacks, trackers = training_callbacks(context, quiet, cfg, wandb_project if wandb else None,
                                                     tensorboard, tensorboard_dir)
            result = pipeline.resume(resume, callbacks, context=context)
        else:
            cfg = training_config(ctx, model, config, set_, init_from, sections(
                dataset, data_dir, allow_checksum_mismatch, image_size, epochs=epochs, batch_size=batch_size, lr=lr,
                seed=seed, threads=threads, device=device, keep_checkpoints=keep_checkpoints or None))
            if not distributed.launched_by_torchrun():  # a restarted job reuses its run: pipeline checks
                layout.check_new_run(runs_dir, name)  # before the data: a folder may take minutes to read
            context = distributed.init(cfg.train.device)
            if init_from is not None:
                say(context, fine_tuning_line(init_from, cfg))
            callbacks, trackers = training_callbacks(context, quiet, cfg, wandb_project if wandb else None,
                                                     tensorboard, tensorboard_dir)
            result = pipeline.train_or_restart(cfg, runs_dir, name, callbacks, context)
    except TrainingInterrupted as exc:
        if distributed.launched_by_torchrun() and os.environ.get("RANK") != "0":
            raise typer.Exit(130) from None  # rank 0 says it once
        ranks = ["--nproc", os.environ["WORLD_SIZE"]] if distributed.launched_by_torchrun() else []
        again = command("train", "--resume", str(exc.run), *ranks)
        raise fail(f"{exc}; the checkpoint is saved. Continue with: {again}", code=130) from None
    if not context.is_main:
        return
    for tracker in trackers:
        tracker.finish(result)
    print_result(result)
    if result.stop_requested:  # the run is whole; the caller (a shell loop, a scheduler) still learns of the stop
        raise fail("stopped as asked, after the run was complete (its test and files are written)", code=130)


def distributed_worker() -> bool:
    """A data-parallel process other than rank 0 (which says things once for the job)."""
    return os.environ.get("RANK", "0") != "0"


def training_config(ctx: typer.Context, model: str | None, file: Path | None, overrides: list[str] | None,
                    init_from: Path | None, given: dict[str, dict[str, Any]]) -> Config:
    """The run's config: the preset, file and overrides; with --init-from, the source run's config.yaml
    in the preset's place (its model, its input size for an image folder, its training settings)."""
    from cnnlab.config import load_config
    from cnnlab.data.registry import load_config_for
    from cnnlab.runs import layout, records

    if init_from is None:
        config, chosen = load_config_for(model, file, overrides, **given)
        if chosen and not distributed_worker():
            print(chosen)
        return config
    source_of_model = ctx.get_parameter_source("model")
    if source_of_model is not None and source_of_model.name != "DEFAULT":  # (Typer ships its own click)
        raise fail("--init-from takes the model from the run it starts from; drop --model")
    source = records.load_config(layout.check_run(init_from, "config", "weights"))
    from cnnlab.runs.weights import read_input_shape

    height, _, channels = read_input_shape(init_from)
    base = source.to_dict()
    base["data"].update(image_size=height, channels=channels)  # an image folder is read as the source saw images
    base["train"]["init_from"] = str(init_from.resolve())  # the config reruns the fine-tuning from anywhere
    return load_config(None, file, overrides, base=base, **given)


def fine_tuning_line(source: Path, cfg: Config) -> str:
    """What --init-from converts (channels, image size, polarity), in one line, before training starts."""
    from cnnlab.data.registry import is_image_folder
    from cnnlab.runs import records
    from cnnlab.runs.transfer import conversion_line, look_at_folder
    from cnnlab.runs.weights import read_input_shape

    look = look_at_folder(Path(cfg.data.dataset)) if is_image_folder(cfg.data.dataset) else None
    return conversion_line(source, records.load_config(source), read_input_shape(source), cfg, look)


def say(context: Context, text: str) -> None:
    if context.is_main:
        print(text)


def training_callbacks(context: Context, quiet: bool, cfg: Config, wandb_project: str | None, tensorboard: bool,
                       tensorboard_dir: Path | None = None) -> tuple[list[Callback], list[Tracker]]:
    """Progress bar and trackers (W&B with a project, TensorBoard): on rank 0 only, so a job prints and
    logs once."""
    from cnnlab.training.callbacks import ProgressBar

    if not context.is_main:
        return [], []
    trackers: list[Tracker] = []
    if wandb_project is not None:
        trackers.append(wandb_tracker(cfg, wandb_project))
    if tensorboard:
        from cnnlab.trackers.tensorboard import TensorBoardTracker

        trackers.append(TensorBoardTracker(cfg, tensorboard_dir))
    callbacks: list[Callback] = [] if quiet else [ProgressBar()]
    return [*callbacks, *trackers], trackers


def launch_processes(ctx: typer.Context, nproc: int, max_restarts: int, name: str | None, resume: Path | None,
                     runs_dir: Path) -> None:
    """`--nproc N`: run this same command as N torchrun ranks, under a run name fixed now, so that
    an elastic restart finds and resumes the run its first attempt started."""
    from cnnlab.training import distributed

    drop = {"nproc", "max_restarts"}
    if resume is None:
        if name is None:  # `train` fixes the name before launching, so that a restart finds the run
            raise ValueError("a new data-parallel run needs its name before the processes start")
        run = Path(runs_dir) / name
        if run.exists():
            raise fail(f"{run}: a run of that name exists; pick another --name or --resume it")
        argv = ["train", *command_line(ctx, drop=drop | {"name"}), "--name", name]
    else:
        run = resume
        argv = ["train", *command_line(ctx, drop=drop)]
    print(f"launching {nproc} processes with torchrun"
          + (f" (up to {max_restarts} restarts)" if max_restarts else "") + f": run {run}")
    code = distributed.launch(nproc, argv, max_restarts)
    if code == 130:
        raise typer.Exit(130)  # the ranks stopped on the signal; rank 0 said how to continue
    if code:
        raise fail(f"the data-parallel job failed (see the messages above); "
                   f"its last checkpoint is in {Path(runs_dir) / name if name else resume}", code=code)


def command_line(ctx: typer.Context, drop: set[str]) -> list[str]:
    """The options this command was given, as command-line arguments again (for the launched ranks)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None or value == param.default or not param.opts:
            continue
        flag = param.opts[0]
        if getattr(param, "is_flag", False):  # (Typer ships its own click: no isinstance check here)
            args.append(flag if value else param.secondary_opts[0])
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def wandb_tracker(cfg: Config, project: str) -> WandbTracker:
    """The W&B callback for --wandb; imports wandb only now, and says how to install it if missing."""
    from cnnlab.trackers import wandb as tracking

    if not tracking.wandb_available():
        raise fail("--wandb needs the wandb package: pip install 'cnnlab[wandb]'")
    if tracking.wandb_mode() == "offline":
        print("W&B: logging offline (no login found or WANDB_MODE=offline); upload later with `wandb sync`")
    return tracking.WandbTracker(cfg, project)


def require_tensorboard() -> None:
    """Say how to install the tensorboard package, if --tensorboard lacks it (without importing it)."""
    from cnnlab.trackers.tensorboard import tensorboard_available

    if not tensorboard_available():
        raise fail("--tensorboard needs the tensorboard package: pip install 'cnnlab[tensorboard]'")


def print_result(result: RunResult) -> None:
    from cnnlab.runs import layout

    test = result.test
    if test is None:  # only rank 0 evaluates, and only rank 0 prints
        raise ValueError(f"{result.run}: the result holds no test evaluation (a data-parallel rank other than 0?)")
    if result.skipped:
        print(f"warning: {len(result.skipped)} unreadable image(s) were skipped; "
              f"see {layout.path(result.run, 'skipped')}")
    if result.stopped:
        print(f"early stopping: {result.stopped}; kept epoch {result.kept_epoch}")
    elif result.kept_epoch is not None:
        print(f"early stopping: trained every epoch; kept epoch {result.kept_epoch}, the best on validation")
    print(f"test accuracy {test.accuracy:.4f}  loss {test.loss:.4f}  ({int(test.confusion.sum())} images)")
    if result.images_per_second:
        compiling = f", plus {result.compile_seconds:.1f}s compiling" if result.compile_seconds else ""
        print(f"trained in {result.train_seconds:.1f}s  ({result.images_per_second:,.0f} images/s{compiling})")
        if result.busy:
            print(f"note: {result.busy}")
    else:
        print("training had already finished; the test set was evaluated again")
    print(f"results in {result.run}/: test.json, predictions.csv, confusion.png, metrics.jsonl, model.safetensors")
    print(f"see the details with: {command('evaluate', result.run)}")


@app.command(rich_help_panel=TRAIN)
@friendly_errors
def evaluate(
    run: LatestRun = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    data_dir: DataDir = None,
    runs_dir: RunsDir = RUNS_DIR,
) -> None:
    """Test accuracy and loss, per-class precision/recall/F1, confusion matrix, calibration (ECE), most confused
    pairs."""
    from cnnlab import pipeline
    from cnnlab.runs import layout

    run = run or layout.latest_run(runs_dir)
    try:
        result, unsaved = pipeline.evaluate_run(run, data_dir, progress=not json_), None
    except pipeline.ResultNotSaved as exc:  # a read-only run: the evaluation is shown all the same
        result, unsaved = exc.evaluation, exc
    if json_:
        print(to_json(dict(run=str(run), **result.to_dict())))
    else:
        print(format_evaluation(result))
        if unsaved is None:
            print(f"\nconfusion matrix picture: {layout.path(run, 'confusion')}")
    if unsaved is not None:
        raise fail(str(unsaved))


def format_evaluation(result: Evaluation) -> str:
    """Accuracy, the per-class table, the confusion matrix and the most confused pairs, as text."""
    from cnnlab.training.confusion import format_matrix, shown_matrix

    names = result.classes
    width = max(len(n) for n in [*names, "class"])
    lines = [f"test accuracy {result.accuracy:.4f}   loss {result.loss:.4f}   "
             f"({int(result.confusion.sum())} images)", "",
             f"{'class':{width}}  precision  recall     f1  support"]
    untested = [row["class_name"] for row in result.per_class if row["support"] == 0]
    few = [name for name in few_examples(result.per_class) if name not in untested]
    for row in result.per_class:
        flag = ("  <- no test image" if row["class_name"] in untested
                else "  <- few examples" if row["class_name"] in few else "")
        lines.append(f"{row['class_name']:{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                     f"{row['f1']:5.3f}  {row['support']:7d}{flag}")
    if untested:
        lines.append(f"no test image: {', '.join(untested)}; its precision and recall say nothing: add images")
    if few:
        lines.append(f"few examples: {', '.join(few)} (under a third of the median class); "
                     "see train.class_weights: balanced, or train.sampling: balanced")
    lines += ["", *format_matrix(shown_matrix(result.confusion, names))]
    if result.calibration is not None:
        c = result.calibration
        lines += ["", f"calibration: ECE {c.ece:.4f} over {c.bins} confidence bins (0 is honest), "
                      f"mean confidence {c.mean_confidence:.4f} against accuracy {c.accuracy_overall:.4f}: "
                      f"{c.verdict}"]
    pairs = result.most_confused()
    if pairs:
        lines += ["", "most confused (true -> predicted: count)"]
        lines += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in pairs]
    return "\n".join(lines)


@app.command("lr-find", rich_help_panel=TRAIN)
@friendly_errors
def lr_find(
    model: DefaultModel = None,
    dataset: Dataset = None,
    config: ConfigFile = None,
    set_: Overrides = None,
    data_dir: DataDir = None,
    allow_checksum_mismatch: Annotated[bool, typer.Option(
        "--allow-checksum-mismatch", help="Use local dataset files whose checksums differ.")] = False,
    steps: Annotated[int, typer.Option(min=8, max=10_000, help="Optimisation steps in the sweep.")] = 80,
    start: Annotated[float, typer.Option(min=1e-12, help="The first learning rate.")] = 1e-6,
    end: Annotated[float, typer.Option(min=1e-12, help="The last learning rate.")] = 10.0,
    rule: Annotated[str, typer.Option(help="steepest: where the loss falls fastest; peak: the rate at the lowest "
                                           "loss (one-cycle's peak); minimum: a tenth of it; auto: peak for a "
                                           "one-cycle schedule, else steepest.")] = "auto",
    plot: Annotated[Path | None, typer.Option(help="Draw loss against rate, the suggestion marked, to this PNG.")
                    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the sweep as one JSON object.")] = False,
) -> None:
    """Suggest a learning rate: a short sweep of the run's own training at growing rates (Smith's range test).

    The model trained is a copy: nothing is saved and no run is made. `--lr auto` in `cnnlab train`
    (or `train.lr: auto`) runs the same sweep and trains at its suggestion.
    """
    from cnnlab.cli._options import output_file
    from cnnlab.data.registry import load_config_for
    from cnnlab.files import write_atomic
    from cnnlab.pipeline import new_network, open_data
    from cnnlab.training.engine import TrainData
    from cnnlab.training.lr_find import find_lr

    if plot is not None:
        output_file(plot, (".png",), "--plot")
    cfg = load_config_for(model, config, set_, **sections(dataset, data_dir, allow_checksum_mismatch))[0]
    data = open_data(cfg, progress=not json_)
    network = new_network(cfg, data)  # as `cnnlab train` builds it: the same suggestion as --lr auto
    finding = find_lr(network, TrainData(data.train, data.val), cfg.train, steps, start, end, rule)
    if plot is not None:
        from cnnlab.inspect.lr_curve import plot_lr_finding

        write_atomic(plot, lambda tmp: plot_lr_finding(finding, tmp))
    if json_:
        print(to_json(finding.to_dict()))
        return
    print(f"suggested learning rate {finding.suggestion:.2g}  ({finding.rule}: {finding.why})")
    print(f"{len(finding.lrs)} steps from {start:g} in {finding.seconds:.1f}s; the sweep ended: {finding.ended}")
    print(f"train at it: {command('train', '--model', cfg.model.name)} ... --lr {finding.suggestion:.2g}   "
          "(or --lr auto)")
    if plot is not None:
        print(f"plot written to {plot}")


FEW = 1 / 3  # a class with fewer than this fraction of the median class's images is flagged


def few_examples(per_class: Sequence[dict[str, Any]]) -> list[str]:
    """The classes with far fewer test images than the others (the test split mirrors the training one)."""
    counts = sorted(row["support"] for row in per_class)
    median = counts[len(counts) // 2] if counts else 0
    return [row["class_name"] for row in per_class if row["support"] < FEW * median]
