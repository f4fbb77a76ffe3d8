"""`cnnlab show kernels|features|mistakes|saliency|curves|calibration|embedding|batch`, `cnnlab report`,
`cnnlab runs [compare]`.

Over 400 lines on purpose: one thin command per picture of the `show` group, each a few lines of options and one
call; split by picture, the group's shared options and loading would be repeated in eight files."""
from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cnnlab.cli._app import LOOK, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import (
    RUNS_DIR,
    ConfigFile,
    DataDir,
    Dataset,
    DefaultModel,
    LatestRun,
    Overrides,
    Run,
    RunsDir,
    output_file,
)
from cnnlab.text import to_json

if TYPE_CHECKING:
    from typer.models import OptionInfo

    from cnnlab.inspect.show import LoadedRun

T = TypeVar("T")

show_app = typer.Typer(help="Pictures of a trained run: kernels, feature maps, mistakes, saliency, curves, "
                       "calibration, a map of the learned features; and a training batch.",
                       no_args_is_help=True)
runs_app = typer.Typer(help="A table of the runs under --runs-dir; `compare` puts runs side by side.",
                       invoke_without_command=True)

ImageFile = Annotated[Path | None, typer.Argument(
    help="Any image file (prepared as the run's dataset was: 28x28 grey white on black, 32x32 colour, ...); "
    "or use --index.", show_default=False)]
Index = Annotated[int | None, typer.Option("--index", "-i", min=0,
                                          help="Use test image N of the run's dataset instead.")]


def out_option(what: str) -> OptionInfo:
    """The --out option of a `show` command, for `Annotated[Path, out_option(...)]`."""
    return typer.Option("--out", "-o", help=f"PNG file to write ({what}).")


def save_png(out: Path, draw: Callable[[Path], T]) -> T:
    """Draw into a temporary file renamed over `out` (never a half-written picture); returns draw's result."""
    from cnnlab.files import write_atomic

    output_file(out, (".png",))
    result: list[T] = []
    write_atomic(out, lambda tmp: result.append(draw(tmp)))
    print(f"saved {out}")
    return result[0]


def load(run: Path, data_dir: Path | None = None) -> LoadedRun:
    from cnnlab.inspect.show import LoadedRun

    return LoadedRun(run, data_dir)


# ------------------------------------------------------------------------------------- show
@show_app.command("kernels")
@friendly_errors
def show_kernels(run: Run, layer: Annotated[str, typer.Option(help="Conv layer: conv1, conv2, ...")] = "conv1",
                 out: Annotated[Path, out_option("a grid of kernels")] = Path("kernels.png")) -> None:
    """The kernels a conv layer learned, as a grid (one panel per input channel for colour input)."""
    output_file(out, (".png",))  # before anything is loaded
    from cnnlab.inspect import show as inspection

    loaded = load(run)
    grid = save_png(out, lambda tmp: inspection.show_kernels(loaded, tmp, layer))
    print(grid.describe())


@show_app.command("features")
@friendly_errors
def show_features(run: Run, image: ImageFile = None, index: Index = None,
                  out: Annotated[Path, out_option("the feature maps")] = Path("features.png"),
                  max_maps: Annotated[int, typer.Option(min=1, max=256, help="Maps shown per layer.")] = 16,
                  data_dir: DataDir = None) -> None:
    """The feature maps every conv layer computes for one image."""
    output_file(out, (".png",))  # before anything is loaded
    from cnnlab.inspect import show as inspection

    loaded = load(run, data_dir)
    picture = inspection.choose_input(loaded, image, index)
    panels = save_png(out, lambda tmp: inspection.show_features(loaded, tmp, picture, max_maps))
    print(inspection.describe(loaded, picture))
    print("maps shown: " + ", ".join(f"{name} {count}" for name, count in panels.items() if name != "input"))


@show_app.command("mistakes")
@friendly_errors
def show_mistakes(run: Run, out: Annotated[Path, out_option("the grid")] = Path("mistakes.png"),
                  limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many images.")] = 24,
                  data_dir: DataDir = None) -> None:
    """A grid of misclassified test images with true and predicted class and confidence, worst first."""
    output_file(out, (".png",))  # before anything is loaded
    from cnnlab.inspect import show as inspection

    loaded = load(run, data_dir)
    mistakes = save_png(out, lambda tmp: inspection.show_mistakes(loaded, tmp, limit))
    for m in mistakes[:5]:
        print(f"  {m.name}: true {loaded.classes[m.true_label]}, predicted "
              f"{loaded.classes[m.predicted_label]} ({m.confidence:.0%})")
    if len(mistakes) > 5:
        print(f"  ... {len(mistakes) - 5} more in the picture")


@show_app.command("label-issues")
@friendly_errors
def show_label_issues(run: Run,
                      json_: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects (file, split, "
                                                          "given, suggested, score, kind), worst first.")] = False,
                      limit: Annotated[int, typer.Option(min=0, help="List at most this many of each kind "
                                                         "(0: all).")] = 25,
                      folds: Annotated[int, typer.Option(min=0, help="Check the training images too: train this "
                                                         "many runs as this one was, each on all but one fold of "
                                                         "the training split, judging the fold it never saw "
                                                         "(costs that many trainings; 0: off).")] = 0,
                      data_dir: DataDir = None) -> None:
    """Files whose given class the model confidently disputes (confident learning on the held-out validation
    and test images, and with --folds on the training images), with the class it suggests; and images that
    sit in two splits (near-duplicates)."""
    if folds == 1:
        raise fail("--folds: 2 or more (each fold's run judges the images it did not train on), or 0: off")
    from cnnlab.inspect.label_issues import find_label_issues
    from cnnlab.pipeline import cross_validated

    loaded = load(run, data_dir)
    data = loaded.data()
    found = find_label_issues(loaded, data, cross_validated(loaded.config, data, folds) if folds else None)
    issues = found.issues[:limit or None]
    duplicates = found.duplicates[:limit or None]
    if json_:
        print(to_json(found.to_list(limit or None), indent=2))
        return
    checked = " and ".join(f"{count:,} {'validation' if split == 'val' else split}" for split, count in
                           found.checked.items())
    how = (f"each judged by a model that did not train on it: the training images by {folds} runs of its folds"
           if "train" in found.checked else "held out from training; training images are not checked: the model "
           "learned their labels, right or wrong (--folds 5 checks them)")
    print(f"{len(found.issues)} possible label issue(s) among the {checked} images ({how})")
    if issues:
        width = max(len(i.file) for i in issues)
        print(f"  {'score':>6}  {'file':<{width}}  given -> suggested")
        for i in issues:
            print(f"  {i.score:6.3f}  {i.file:<{width}}  {i.given} -> {i.suggested} "
                  f"({i.given_probability:.0%} vs {i.suggested_probability:.0%})")
    if len(found.issues) > len(issues):
        print(f"  ... {len(found.issues) - len(issues)} more (--limit 0 lists all)")
    print(f"{len(found.duplicates)} image(s) that also sit in an earlier split (near-duplicates: leakage)")
    for d in duplicates:
        print(f"  {d.split}: {d.file} ({d.given}) = {d.duplicate_split}: {d.duplicate_of} ({d.duplicate_given})")
    if len(found.duplicates) > len(duplicates):
        print(f"  ... {len(found.duplicates) - len(duplicates)} more (--limit 0 lists all)")


class Method(str, Enum):
    gradcam = "gradcam"
    gradient = "gradient"


@show_app.command("saliency")
@friendly_errors
def show_saliency(run: Run, image: ImageFile = None, index: Index = None,
                  out: Annotated[Path, out_option("image, heat map, probabilities")] = Path("saliency.png"),
                  method: Annotated[Method, typer.Option(help="gradcam: which regions of the last conv layer's "
                                                         "maps; gradient: which input pixels.")] = Method.gradcam,
                  target: Annotated[str | None, typer.Option(
                      help="Explain this class (name or index) instead of the prediction.")] = None,
                  data_dir: DataDir = None) -> None:
    """Which parts of one image the prediction rests on, as a heat map over it (Grad-CAM or gradients)."""
    output_file(out, (".png",))  # before anything is loaded
    from cnnlab.inspect import show as inspection

    loaded = load(run, data_dir)
    picture = inspection.choose_input(loaded, image, index)
    target_index = inspection.class_index(loaded.classes, target) if target is not None else None
    result = save_png(out, lambda tmp: inspection.show_saliency(loaded, tmp, picture, target_index, method.value))
    print(inspection.describe(loaded, picture))
    print(f"{result.method} for class {loaded.classes[result.target]}")


@show_app.command("curves")
@friendly_errors
def show_curves(run: Run, out: Annotated[Path, out_option("loss and accuracy")] = Path("curves.png")) -> None:
    """Training and validation loss and accuracy per epoch."""
    output_file(out, (".png",))  # before anything is loaded
    from cnnlab.inspect import show as inspection

    save_png(out, lambda tmp: inspection.show_curves(run, tmp))


@show_app.command("calibration")
@friendly_errors
def show_calibration(run: Run, out: Annotated[Path, out_option("the reliability diagram")] = Path("calibration.png"),
                     data_dir: DataDir = None) -> None:
    """Are the probabilities honest: each confidence bin's test accuracy against the diagonal, and the ECE."""
    output_file(out, (".png",))  # before anything is loaded
    from cnnlab.inspect import show as inspection

    loaded = load(run, data_dir)
    cal = save_png(out, lambda tmp: inspection.show_calibration(loaded, tmp))
    print(f"ECE {cal.ece:.4f} (expected calibration error over {cal.bins} confidence bins; 0 is honest), "
          f"MCE {cal.mce:.4f}; mean confidence {cal.mean_confidence:.4f} against accuracy "
          f"{cal.accuracy_overall:.4f}: {cal.verdict}")


class MapMethod(str, Enum):
    pca = "pca"
    tsne = "tsne"


@show_app.command("embedding")
@friendly_errors
def show_embedding(run: Run, out: Annotated[Path, out_option("the map")] = Path("embedding.png"),
                   method: Annotated[MapMethod, typer.Option(help="pca: the two directions of most variance "
                                                             "(NumPy); tsne: keeps neighbours together "
                                                             "(needs scikit-learn).")] = MapMethod.pca,
                   images: Annotated[int, typer.Option("--images", min=3, max=5000,
                                                       help="Map the first N test images.")] = 1000,
                   thumbnails: Annotated[int, typer.Option(min=0, max=400, help="Images drawn on the map.")] = 60,
                   data_dir: DataDir = None) -> None:
    """A map of the learned features: test images placed by the penultimate layer (PCA or t-SNE), with thumbnails."""
    output_file(out, (".png",))  # before anything is loaded
    from cnnlab.inspect import show as inspection

    loaded = load(run, data_dir)
    emb = save_png(out, lambda tmp: inspection.show_embedding(loaded, tmp, method.value, images, thumbnails))
    print(emb.describe())


@show_app.command("batch")
@friendly_errors
def show_batch(ctx: typer.Context,
               run: Annotated[Path | None, typer.Argument(
                   help="A run directory: its config.yaml; or leave it out and give the config by options.",
                   show_default=False)] = None,
               model: DefaultModel = None,
               dataset: Dataset = None, config: ConfigFile = None, set_: Overrides = None, data_dir: DataDir = None,
               allow_checksum_mismatch: Annotated[bool, typer.Option(
                   "--allow-checksum-mismatch", help="Use local dataset files whose checksums differ.")] = False,
               out: Annotated[Path, out_option("the batch")] = Path("batch.png"),
               limit: Annotated[int, typer.Option(min=1, max=512, help="Draw at most this many images.")] = 64
               ) -> None:
    """The first training batch after augmentation, as the network sees it, with labels (exactly what
    `cnnlab train` would feed its first step)."""
    from cnnlab.cli.training import sections
    from cnnlab.config import load_config
    from cnnlab.data.registry import load_config_for
    from cnnlab.runs import layout, records

    output_file(out, (".png",))  # before anything is loaded
    if run is not None:
        given = [flag for flag, name in (("--model", "model"), ("--dataset", "dataset"), ("--config", "config"),
                                         ("--set", "set_")) if (source := ctx.get_parameter_source(name))
                 is not None and source.name != "DEFAULT"]
        if given:
            raise fail(f"the run's config.yaml says how it trains; drop {', '.join(given)} (or drop the run)")
        from cnnlab.data.sources import with_data_dir

        cfg = records.load_config(layout.check_run(run, "config"))
        if allow_checksum_mismatch:
            cfg = load_config(None, None, None, base=cfg.to_dict(), **sections(None, None, True))
        cfg = with_data_dir(cfg, data_dir)  # a folder run: the folder's new place (as evaluate and show take it)
    else:
        cfg = load_config_for(model, config, set_, **sections(dataset, data_dir, allow_checksum_mismatch))[0]
    from cnnlab.inspect.batch import first_batch, plot_batch
    from cnnlab.pipeline import open_data, open_pinned_data

    # a run's folder is checked against the one it pinned: a renamed class would label the batch wrongly
    data = open_pinned_data(run, cfg, progress=False) if run is not None else open_data(cfg, progress=False)
    batch = first_batch(cfg, data)
    shown = save_png(out, lambda tmp: plot_batch(batch, data.classes, tmp, limit))
    counts = {data.classes[c]: n for c, n in enumerate(batch.labels.bincount(minlength=data.num_classes).tolist())
              if n}
    print(f"{cfg.data.dataset}: the first batch of {len(batch.labels)} training images ({shown} drawn), "
          f"{batch.read.shape[2]}x{batch.read.shape[3]}, {batch.read.shape[1]} channel(s); augmentation: "
          f"{batch.augmentation}")
    print("labels: " + ", ".join(f"{name} {n}" for name, n in counts.items()))


# ------------------------------------------------------------------------------------ report
@app.command(rich_help_panel=LOOK)
@friendly_errors
def report(run: LatestRun = None,
           out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default <run>/report.html).")]
           = None,
           data_dir: DataDir = None, runs_dir: RunsDir = RUNS_DIR) -> None:
    """One self-contained HTML page about a run: summary, config, curves, test results, mistakes, kernels, maps."""
    from cnnlab.inspect.report import write_report
    from cnnlab.runs.layout import latest_run

    if out is not None:
        output_file(out, (".html", ".htm"))
    page = write_report(run or latest_run(runs_dir), out, data_dir)
    print(f"wrote {page} (self-contained: open it in any browser, no network needed)")


# -------------------------------------------------------------------------------------- runs
class SortKey(str, Enum):
    run = "run"
    dataset = "dataset"
    model = "model"
    params = "params"
    epochs = "epochs"
    val_accuracy = "val_accuracy"
    test_accuracy = "test_accuracy"
    seconds = "seconds"
    started = "started"


@runs_app.callback()
@friendly_errors
def list_runs(ctx: typer.Context, runs_dir: RunsDir = RUNS_DIR,
              sort: Annotated[SortKey | None, typer.Option(
                  help="Sort by a column: names A-Z, numbers biggest first (default: oldest run first).")] = None,
              reverse: Annotated[bool, typer.Option("--reverse", help="Reverse the order.")] = False,
              json_: Annotated[bool, typer.Option("--json", help="Print a JSON list of rows.")] = False) -> None:
    """A table of runs: dataset, model, parameters, epochs, validation and test accuracy, training time."""
    if ctx.invoked_subcommand is not None:
        return
    from cnnlab.inspect.run_table import run_rows

    rows = run_rows(runs_dir, sort.value if sort else None, reverse)
    if json_:
        print(to_json(rows, indent=2))
        return
    if not rows:
        print(f"no runs under {runs_dir}/: train one with `cnnlab train`")
        return
    print_rows(rows)


def print_rows(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cnnlab.inspect.run_table import format_cell

    broken = any(row.get("error") for row in rows)
    table = Table("run", "dataset", "model", "params", "epochs", "val acc", "test acc", "train s", "started",
                  *(["problem"] if broken else []))
    for row in rows:
        cells = [row["run"], format_cell(row["dataset"]), format_cell(row["model"]), format_cell(row["params"]),
                 f"{row['epochs']}/{format_cell(row['epochs_planned'])}",
                 format_cell(row["val_accuracy"], "val_accuracy"), format_cell(row["test_accuracy"], "test_accuracy"),
                 format_cell(row["seconds"], "seconds"), format_cell(row["started"])]
        cells += [row.get("error") or ""] if broken else []
        table.add_row(*(escape(cell) for cell in cells))  # names and messages are text, not rich markup
    Console(width=200).print(table)


@runs_app.command("compare")
@friendly_errors
def compare(run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
            out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG with the runs' curves overlaid.")]
            = None) -> None:
    """The config keys in which runs differ, their results side by side, and (with --out) curves overlaid."""
    if out is not None:
        output_file(out, (".png",))
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cnnlab.inspect.run_table import config_differences, format_cell, run_row
    from cnnlab.runs.records import read_metrics

    if len(run_dirs) < 2:
        raise fail("compare needs at least two run directories")
    names = [p.resolve().name for p in run_dirs]
    differences = config_differences(run_dirs)
    table = Table("config key", *names, title="config keys that differ" if differences else None)
    for key, values in differences.items():
        table.add_row(escape(key), *(escape(format_cell(v)) for v in values))
    rows = [run_row(p) for p in run_dirs]
    table.add_section()  # below: results, not config
    for column in ("params", "epochs", "val_accuracy", "test_accuracy", "seconds"):
        table.add_row(f"[bold]{column}[/bold]", *(escape(format_cell(r[column], column)) for r in rows))
    console = Console(width=200)
    if not differences:
        console.print("the configs are identical")
    console.print(table)
    if out is not None:
        from cnnlab.inspect.figures import plot_curves

        histories = {name: read_metrics(p) for name, p in zip(names, run_dirs)}
        save_png(out, lambda tmp: plot_curves(histories, tmp, title="training curves: " + " vs ".join(names)))


app.add_typer(show_app, name="show", rich_help_panel=LOOK)
app.add_typer(runs_app, name="runs", rich_help_panel=LOOK)
