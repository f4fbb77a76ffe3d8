"""`cnnlab presets`, `summary`, `train` and `evaluate`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cnnlab import pipeline, runs
from cnnlab.cli._app import app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.config import list_presets, load_config, preset_path
from cnnlab.data import get_dataset
from cnnlab.evaluate import Evaluation
from cnnlab.trainer import ProgressBar, TrainingInterrupted

Model = Annotated[str, typer.Option("--model", "-m", help="Model preset (see `cnnlab presets`).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config applied over the preset.")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a key: a knob (dropout=0.4) or a path (train.lr=3e-4, model.conv.0.filters=64). "
    "Repeatable.")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name (`cnnlab datasets list`); "
                                               "default mnist-sample, shipped with cnnlab.")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder holding <dataset>/<IDX files>.")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder that holds run directories.")]


def sections(dataset: str | None = None, data_dir: Path | None = None, allow_mismatch: bool = False,
             **train: object) -> dict:
    """Typed CLI options as config sections (options left unset do not override the files)."""
    data = {k: v for k, v in dict(dataset=dataset, data_dir=str(data_dir) if data_dir else None).items() if v}
    if allow_mismatch:
        data["allow_checksum_mismatch"] = True
    return dict(data=data, train={k: v for k, v in train.items() if v is not None})


@app.command()
def presets(name: Annotated[Optional[str], typer.Argument(help="Print this preset's YAML (copy it to edit).")] = None) -> None:
    """List the model presets, or print one as YAML to copy and edit."""
    if name is None:
        for preset in list_presets():
            first = preset_path(preset).read_text().splitlines()[0].lstrip("# ")
            print(f"{preset:14} {first}")
        return
    try:
        print(preset_path(name).read_text(), end="")
    except ValueError as exc:
        raise fail(str(exc)) from None


@app.command()
@friendly_errors
def summary(model: Model = "seed", config: ConfigFile = None, set_: Overrides = None, dataset: Dataset = None,
            explain: Annotated[bool, typer.Option("--explain", help="Show how each layer's parameters add up.")] = False
            ) -> None:
    """The model layer by layer, like Keras' model.summary(): output shapes and parameters."""
    cfg = load_config(model, config, set_, **sections(dataset))
    spec = get_dataset(cfg.data.dataset)
    print(pipeline.summarize(cfg, spec.image_shape, spec.num_classes, explain))


@app.command()
@friendly_errors
def train(
    model: Model = "seed",
    dataset: Dataset = None,
    config: ConfigFile = None,
    set_: Overrides = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training set.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per optimisation step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (split, weights, order, dropout).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.")] = None,
    data_dir: DataDir = None,
    allow_checksum_mismatch: Annotated[bool, typer.Option(
        "--allow-checksum-mismatch", help="Use local dataset files whose checksums differ (recorded in the run).")] = False,
    runs_dir: RunsDir = runs.DEFAULT_ROOT,
    name: Annotated[Optional[str], typer.Option(help="Run directory name (default <dataset>-<model>-<time>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this interrupted run instead of starting one.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log to Weights & Biases (pip install "
                                        "'cnnlab[wandb]'; offline under ./wandb when not logged in).")] = False,
    wandb_project: Annotated[str, typer.Option(help="W&B project for --wandb.")] = "cnnlab",
) -> None:
    """Train a model, evaluate it on the test set, and record everything in a run directory."""
    callbacks = [] if quiet else [ProgressBar()]
    tracker = None
    try:
        if resume is not None:
            given = [flag for flag, value in (("--config", config), ("--set", set_), ("--epochs", epochs),
                                              ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed),
                                              ("--dataset", dataset), ("--data-dir", data_dir), ("--name", name))
                     if value]
            if given:
                raise fail(f"--resume continues a run with its saved config.yaml; drop {', '.join(given)}")
            print(f"resuming {resume}")
            if wandb:
                tracker = wandb_tracker(runs.load_config(resume), wandb_project)
            result = pipeline.resume(resume, callbacks + ([tracker] if tracker else []))
        else:
            cfg = load_config(model, config, set_, **sections(
                dataset, data_dir, allow_checksum_mismatch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                threads=threads))
            if wandb:
                tracker = wandb_tracker(cfg, wandb_project)
            result = pipeline.train(cfg, runs_dir, name, callbacks + ([tracker] if tracker else []))
    except TrainingInterrupted as exc:
        raise fail(f"{exc}; the checkpoint is saved. Continue with: cnnlab train --resume {exc.run}", code=130) from None
    if tracker is not None:
        tracker.finish(result)
    print_result(result)


def wandb_tracker(cfg, project: str):
    """The W&B callback for --wandb; imports wandb only now, and says how to install it if missing."""
    from cnnlab import tracking

    if not tracking.wandb_available():
        raise fail("--wandb needs the wandb package: pip install 'cnnlab[wandb]'")
    if tracking.wandb_mode() == "offline":
        print("W&B: logging offline (no login found or WANDB_MODE=offline); upload later with `wandb sync`")
    return tracking.WandbTracker(cfg, project)


def print_result(result: pipeline.RunResult) -> None:
    test = result.test
    print(f"test accuracy {test.accuracy:.4f}  loss {test.loss:.4f}  ({int(test.confusion.sum())} images)")
    if result.images_per_second:
        print(f"trained in {result.train_seconds:.1f}s  ({result.images_per_second:,.0f} images/s)")
    else:
        print("training had already finished; the test set was evaluated again")
    print(f"results in {result.run}/: test.json, confusion.png, metrics.jsonl, model.safetensors")
    print(f"see the details with: cnnlab evaluate {result.run}")


@app.command()
@friendly_errors
def evaluate(
    run: Annotated[Optional[Path], typer.Argument(help="Run directory; default the latest under --runs-dir.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    data_dir: DataDir = None,
    runs_dir: RunsDir = runs.DEFAULT_ROOT,
) -> None:
    """Test accuracy and loss, per-class precision/recall/F1, confusion matrix, most confused pairs."""
    run = run or runs.latest_run(runs_dir)
    result = pipeline.evaluate_run(run, data_dir, progress=not json_)
    if json_:
        print(json.dumps(dict(run=str(run), **result.to_dict())))
        return
    print(format_evaluation(result))
    print(f"\nconfusion matrix picture: {runs.path(run, 'confusion')}")


def format_evaluation(result: Evaluation) -> str:
    """Accuracy, the per-class table, the confusion matrix and the most confused pairs, as text."""
    names = result.classes
    width = max(len(n) for n in [*names, "class"])
    lines = [f"test accuracy {result.accuracy:.4f}   loss {result.loss:.4f}   "
             f"({int(result.confusion.sum())} images)", "",
             f"{'class':{width}}  precision  recall     f1  support"]
    for row in result.per_class:
        lines.append(f"{row['class_name']:{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                     f"{row['f1']:5.3f}  {row['support']:7d}")
    short = [n[:5] for n in names]
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * (width + 1) + " ".join(f"{s:>5}" for s in short)]
    for name, row in zip(names, result.confusion):
        lines.append(f"{name:{width}} " + " ".join(f"{c:5d}" for c in row))
    pairs = result.most_confused()
    if pairs:
        lines += ["", "most confused (true -> predicted: count)"]
        lines += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in pairs]
    return "\n".join(lines)
