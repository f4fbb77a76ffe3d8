"""`cnnlab predict`, `export` and `serve`: use a trained run on your own pictures, elsewhere, or in a browser."""
from __future__ import annotations

import contextlib
import ipaddress
import itertools
import sys
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cnnlab.cli._app import USE, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import Run, output_file

if TYPE_CHECKING:
    import numpy as np

    from cnnlab.use.predict import Prediction


class BackendName(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


# the names are cnnlab.use.backends.BACKENDS (not imported here: that module brings torch into `--help`)
BackendOption = Annotated[BackendName, typer.Option(
    "--backend", help="What runs the model: onnx (onnxruntime, needs cnnlab\\[export]; the run's ONNX file is made "
    "once and cached in the run folder), torch, or auto: onnx when it is installed and the export checks, else "
    "torch. The choice is printed.")]


@app.command(rich_help_panel=USE)
@friendly_errors
def predict(
    run: Run,
    images: Annotated[list[Path], typer.Argument(
        help="Image files (PNG, JPEG, ... any size, colour or grey), or folders: every image file under them.",
        readable=False)],  # an unreadable file is one error line among the others' rows, not the end of the command
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=1000,
                                       help="How many classes to list per image named on the command line.")] = 3,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per image, one per line.")] = False,
    csv_: Annotated[bool, typer.Option("--csv", help="CSV: file, predicted, confidence, error, p_<class>...")]
    = False,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the rows to this .csv, .json (a list) or .jsonl file instead of printing them.")]
    = None,
    preview: Annotated[Path | None, typer.Option(
        "--preview", help="Write the images the model saw (28x28 grey, 32x32 colour, ...) side by side to this PNG.")]
    = None,
    backend: BackendOption = BackendName.auto,
) -> None:
    """Classify your own pictures, prepared the way the run's dataset was made (crop, scale, centre, invert).

    A folder is walked (sub-folders too): one line per image, unreadable files listed on stderr without stopping,
    and a summary line. Exit status 1 when a file named on the command line could not be read."""
    from cnnlab.files import write_atomic
    from cnnlab.use.folder_predict import Tally, expand, format_lines, output_format
    from cnnlab.use.predict import PREVIEW_IMAGES, FileError, Predictor, iter_predictions, save_preview

    kind = output_format(out, csv_, json_)
    if out is not None:
        output_file(out, (".csv", ".json", ".jsonl"))
    if preview is not None:
        output_file(preview, (".png",), "--preview")
    predictor = Predictor.from_run(run)
    # Said on stderr (stdout may hold the rows), once the first picture has been read: a refused input makes nothing
    predictor.use_backend_when_needed(backend.value, lambda line: print(line, file=sys.stderr))
    named = {str(path) for path in images}
    walked = any(path.is_dir() for path in images)
    files, problems = expand(images)  # problems: an empty folder, a sub-folder that cannot be listed
    tally = Tally()
    seen: list[np.ndarray] = []  # the prepared images --preview draws
    items = iter_predictions(predictor, files)

    def tallied() -> Iterator[Prediction | FileError]:
        for item in itertools.chain(problems, items):
            tally.add(item)
            if isinstance(item, FileError):
                print(f"error: {item.message}", file=sys.stderr)
            elif preview is not None and len(seen) < PREVIEW_IMAGES:  # kept only while they will be drawn
                seen.append(item.image)
            yield item

    with contextlib.closing(items):  # whatever stops the rows (an error, Ctrl-C) ends the decoding processes
        if out is not None and kind is not None:
            write_atomic(out, lambda tmp: write_lines(tmp, format_lines(tallied(), kind, predictor.classes)))
        elif kind is not None:
            for line in format_lines((i for i in tallied() if not isinstance(i, FileError)), kind,
                                     predictor.classes):
                print(line, end="")
        else:
            for item in tallied():
                if isinstance(item, FileError):
                    continue
                if walked:
                    best = item.top(1)[0]
                    print(f"{item.file}: {best[0]} ({best[1]:.1%})")
                else:
                    print_top(item.file, item.top(top_k))
    quiet = kind is not None and out is None  # stdout holds the rows: the rest goes to stderr
    if out is not None:
        print(f"saved {out}", file=sys.stderr if quiet else sys.stdout)
    if preview is not None and seen:
        save_preview(seen, preview)
        print(f"saved {preview}", file=sys.stderr if quiet else sys.stdout)
    print(tally.summary(), file=sys.stderr if quiet else sys.stdout)
    if any(error.file in named for error in tally.errors) or not tally.counts:
        raise typer.Exit(1)


def write_lines(tmp: Path, lines: Iterable[str]) -> None:
    from cnnlab.text import OUTPUT_ERRORS

    # a file name that is not UTF-8 is written as the bytes it came from, as on stdout
    with open(tmp, "w", encoding="utf-8", errors=OUTPUT_ERRORS, newline="") as handle:
        handle.writelines(lines)


def print_top(file: str, top: list[tuple[str, float]]) -> None:
    """file -> best class, then one line per class with a bar of its probability."""
    print(f"{file}: {top[0][0]}")
    width = max(len(name) for name, _ in top)
    for name, probability in top:
        print(f"  {name:<{width}}  {100 * probability:5.1f}%  {'█' * round(20 * probability)}")


class Format(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class Quantize(str, Enum):
    int8 = "int8"


@app.command(rich_help_panel=USE)
@friendly_errors
def export(
    run: Run,
    format: Annotated[Format, typer.Option("--format", "-f", help="onnx (needs cnnlab\\[export]) or torchscript.")]
    = Format.onnx,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="File to write (default <run>/model.onnx or .pt; <run>/model.int8.onnx with --quantize).")]
    = None,
    quantize: Annotated[Quantize | None, typer.Option(
        "--quantize", help="int8: onnxruntime's static quantization, calibrated on the run's training images; "
        "reports size, test accuracy and batch-1 latency against float32.")] = None,
    max_drop: Annotated[float | None, typer.Option(
        "--max-drop", min=0.0, max=100.0, help="With --quantize: refuse to write a model whose test accuracy is more "
        "than this many points below float32's (default 0.5).")] = None,
) -> None:
    """Export the run's model (probabilities out), then run the file and compare it with the original."""
    from cnnlab.use.export import FORMATS, export_run

    if quantize is None and max_drop is not None:
        raise fail("--max-drop: only with --quantize int8 (it bounds the int8 model's accuracy drop)")
    if out is not None:
        output_file(out, (FORMATS[format.value],))
    if quantize is not None:
        quantized(run, format, out, max_drop)
        return
    result = export_run(run, format.value, out)
    runtime = "onnxruntime" if result.format == "onnx" else "torch.jit.load"
    print(f"saved {result.file}")
    print(f"checked with {runtime} on {result.images_checked} images: max abs difference "
          f"{result.max_abs_difference:.2e} in probability")


def quantized(run: Path, format: Format, out: Path | None, max_drop: float | None) -> None:
    """`export --quantize int8`: the int8 ONNX file and its report, or the refusal."""
    from cnnlab.use.quantize import MAX_DROP, quantize_run

    if format is not Format.onnx:
        raise fail(f"--quantize needs --format onnx, not {format.value}")
    result = quantize_run(run, out, MAX_DROP if max_drop is None else max_drop)
    print(f"saved {result.file}")
    print("\n".join(result.lines()))


@app.command(rich_help_panel=USE)
@friendly_errors
def serve(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories; the page lets you pick one.")],
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps it to this computer.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    # the defaults are BatchSettings' (not imported here: the module would bring torch into `--help`)
    max_batch: Annotated[int, typer.Option(min=1, max=4096, help=(
        "Most pictures one forward pass takes: concurrent requests for a model share a pass. 1 = a pass per "
        "request (no batching)."))] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, max=1000.0, help=(
        "Milliseconds the first waiting request may wait for others to join its pass; 0 = take only what is "
        "already waiting."))] = 2.0,
    queue_size: Annotated[int, typer.Option(min=1, max=100_000, help=(
        "Requests that may wait for a pass, per model; one more is refused with 503 and Retry-After."))] = 256,
    timeout: Annotated[float, typer.Option(min=0.001, max=3600.0, help=(
        "Seconds a request may wait for its forward pass, queue included; then it gets 504."))] = 10.0,
    allowed_host: Annotated[list[str] | None, typer.Option("--allowed-host", help=(
        "Another host name requests may use to reach the server (repeat for more). It always answers to "
        "localhost, 127.0.0.1 and ::1, and to --host unless that is 0.0.0.0 or ::; any other Host gets 421 "
        "(a web page elsewhere cannot reach it through DNS rebinding)."))] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help=(
        "Server processes sharing the port, each with its own copy of the models and a share of the cores "
        "(default: one per 2 cores, at most 8)."))] = None,
    backend: BackendOption = BackendName.auto,
) -> None:
    """A web page to draw or upload pictures and see the prediction, the model's input and its feature maps."""
    try:
        import uvicorn  # noqa: F401  (only to say what is missing before any model is loaded)

        from cnnlab.use.serve.batching import BatchSettings
        from cnnlab.use.serve.guards import served_hosts
        from cnnlab.use.serve.server import ServedApp, default_workers, listening_socket
        from cnnlab.use.serve.server import serve as run_server
    except ImportError as exc:
        raise fail(f"serve needs the web packages ({exc.name} is missing): pip install 'cnnlab[serve]'") from None
    batching = BatchSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size, timeout_s=timeout)
    served = ServedApp(tuple(runs), batching, served_hosts(host, allowed_host or []), backend.value)
    # Built here, not only in the workers: a bad run stops the command with one line, and the ONNX file each
    # run's backend needs is made (and checked) once, before the workers load it.
    application = served.build()
    for name, line in application.state.backend_lines.items():
        print(f"{name}: {line}")
    workers = workers or default_workers()
    if not is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the demo (as host "
              f"{', '.join(served.allowed_hosts)}; add names with --allowed-host)", file=sys.stderr)
    listening = listening_socket(host, port)  # a port in use is one line, before the server says it serves
    processes = f" ({workers} worker processes)" if workers > 1 else ""
    print(f"serving {', '.join(application.state.batchers)} on http://{host}:{port}/{processes}  (Ctrl+C stops)")
    in_process = application if workers == 1 else None  # with workers, each loads its own copy: drop this one
    del application
    run_server(served, host, port, workers, in_process, listening)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
