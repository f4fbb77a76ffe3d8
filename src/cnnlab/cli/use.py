"""`cnnlab predict`, `export` and `serve`: use a trained run on your own pictures, elsewhere, or in a browser."""
from __future__ import annotations

import ipaddress
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cnnlab.cli._app import USE, app
from cnnlab.cli._errors import fail, friendly_errors
from cnnlab.cli._options import Run, output_file
from cnnlab.text import to_json


@app.command(rich_help_panel=USE)
@friendly_errors
def predict(
    run: Run,
    images: Annotated[list[Path], typer.Argument(help="Image files: PNG, JPEG, ... any size, colour or grey.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=1000,
                                       help="How many classes to list per image.")] = 3,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per image, one per line.")] = False,
    preview: Annotated[Path | None, typer.Option(
        "--preview", help="Write the images the model saw (28x28 grey, 32x32 colour, ...) side by side to this PNG.")]
    = None,
) -> None:
    """Classify your own pictures, prepared the way the run's dataset was made (crop, scale, centre, invert)."""
    from cnnlab.use.predict import Predictor, predict_files, save_preview

    if preview is not None:
        output_file(preview, (".png",), "--preview")
    predictor = Predictor.from_run(run)
    results = predict_files(predictor, images)
    for prediction in results.predictions:
        if json_:
            print(to_json(prediction.to_dict()))
        else:
            print_top(prediction.file, prediction.top(top_k))
    for error in results.errors:
        print(f"error: {error.message}", file=sys.stderr)
    if preview is not None and results.predictions:
        save_preview([p.image for p in results.predictions], preview)
        print(f"saved {preview}", file=sys.stderr if json_ else sys.stdout)
    if not results.ok:
        raise typer.Exit(1)


def print_top(file: str, top: list[tuple[str, float]]) -> None:
    """file -> best class, then one line per class with a bar of its probability."""
    print(f"{file}: {top[0][0]}")
    width = max(len(name) for name, _ in top)
    for name, probability in top:
        print(f"  {name:<{width}}  {100 * probability:5.1f}%  {'█' * round(20 * probability)}")


class Format(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


@app.command(rich_help_panel=USE)
@friendly_errors
def export(
    run: Run,
    format: Annotated[Format, typer.Option("--format", "-f", help="onnx (needs cnnlab\\[export]) or torchscript.")]
    = Format.onnx,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="File to write (default <run>/model.onnx or .pt).")]
    = None,
) -> None:
    """Export the run's model (probabilities out), then run the file and compare it with the original."""
    from cnnlab.use.export import export_run

    result = export_run(run, format.value, out)
    runtime = "onnxruntime" if result.format == "onnx" else "torch.jit.load"
    print(f"saved {result.file}")
    print(f"checked with {runtime} on {result.images_checked} images: max abs difference "
          f"{result.max_abs_difference:.2e} in probability")


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
) -> None:
    """A web page to draw or upload pictures and see the prediction, the model's input and its feature maps."""
    try:
        import uvicorn

        from cnnlab.use.serve import create_app
        from cnnlab.use.serve.app import server_config
        from cnnlab.use.serve.batching import BatchSettings
    except ImportError as exc:
        raise fail(f"serve needs the web packages ({exc.name} is missing): pip install 'cnnlab[serve]'") from None
    batching = BatchSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size, timeout_s=timeout)
    application = create_app(runs, batching=batching)
    if not is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the demo", file=sys.stderr)
    print(f"serving {', '.join(str(r) for r in runs)} on http://{host}:{port}/  (Ctrl+C stops)")
    uvicorn.Server(server_config(application, host, port)).run()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
