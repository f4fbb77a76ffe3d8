"""Forward-pass speed of the inference backends (issue 31): torch eager, onnxruntime float32 and onnxruntime int8,
per preset, at batch 1 and 256; and, given a trained run, int8's test accuracy against float32's.

    python bench/bench_inference.py --presets seed fast best top --threads 2 --repeats 5
    python bench/bench_inference.py --presets --run runs/fashion-mnist-best-...   # only the accuracy part

1. Speed: each preset is built with random weights (speed does not depend on what was learned) in a temporary
   run; its ONNX file is made as `cnnlab predict` makes it (`Predictor.use_backend("onnx")`), its int8 file by
   the same quantization `cnnlab export --quantize int8` runs (`cnnlab.use.quantize.quantize_static`),
   calibrated here on 512 images of random ink since the weights are random anyway. Inputs are random ink, float
   (N, C, H, W) as every backend receives them. Each repeat times every backend in turn (noise from other jobs
   hits all alike); a measurement is the median of its passes, the table the median over repeats, and the
   ratios are against torch eager in the same repeat. Also: the time a start takes to check a cached ONNX file.
2. Start-up (--startup RUN): the whole `cnnlab predict RUN picture.png --backend B` process, torch and onnx (its
   ONNX file made before the first timing, so every timed onnx start checks the cache) taking turns, medians.
3. Accuracy (--run): `cnnlab.use.quantize.quantize_run` on the run (its cached float32 ONNX, static int8
   calibrated on 512 of its training images), written to a temporary folder: sizes, test accuracy, batch-1
   latency.
Prints Markdown tables; --out writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import make_run  # noqa: E402  (a run with a preset's random weights)

BACKENDS = ("torch", "onnx float32", "onnx int8")
BATCHES = (1, 256)


def passes_for(batch: int) -> int:
    return 200 if batch == 1 else 10


def median_ms(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, passes: int) -> float:
    """Median milliseconds of `passes` forward passes on x, after 3 of warm-up."""
    for _ in range(3):
        forward(x)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def backends_of(preset: str, root: Path, threads: int) -> tuple[dict[str, Callable], dict[str, float], tuple]:
    """The three forward passes of a preset with random weights, the files' sizes, and the input shape."""
    from cnnlab.runs.layout import path
    from cnnlab.use.backends import OnnxBackend, cached_backend, onnx_session
    from cnnlab.use.export import random_ink
    from cnnlab.use.predict import Predictor
    from cnnlab.use.quantize import quantize_static

    run = make_run(preset, root)
    predictor = Predictor.from_run(run)
    torch_backend = predictor.backend
    predictor.use_backend("onnx")  # makes the cache, checked
    float_file = path(run, "inference_onnx")
    calibration = ink_inputs(random_ink(predictor.model.input_shape, 512, seed=2))
    int8_file = root / f"{preset}.int8.onnx"
    quantize_static(float_file, calibration, int8_file)
    int8 = onnx_session(int8_file, threads)
    name = int8.get_inputs()[0].name
    start = time.perf_counter()
    assert isinstance(cached_backend(predictor.model, run), OnnxBackend)
    check_s = time.perf_counter() - start
    forwards = {"torch": torch_backend.probabilities, "onnx float32": predictor.backend.probabilities,
                "onnx int8": lambda x: int8.run(None, {name: x})[0]}
    sizes = {"model.safetensors": path(run, "weights").stat().st_size, "onnx float32": float_file.stat().st_size,
             "onnx int8": int8_file.stat().st_size, "cached start check s": check_s}
    return forwards, sizes, predictor.model.input_shape


def ink_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    x = images.astype(np.float32) / 255
    return np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))


def speed(presets: list[str], threads: int, repeats: int) -> dict:
    from cnnlab.use.export import random_ink

    results: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        for preset in presets:
            forwards, sizes, shape = backends_of(preset, Path(folder), threads)
            inputs = {batch: ink_inputs(random_ink(shape, batch, seed=3)) for batch in BATCHES}
            times: dict[str, dict[int, list[float]]] = {b: {n: [] for n in BATCHES} for b in BACKENDS}
            ratios: dict[str, dict[int, list[float]]] = {b: {n: [] for n in BATCHES} for b in BACKENDS}
            for _ in range(repeats):
                for batch in BATCHES:
                    this = {b: median_ms(forwards[b], inputs[batch], passes_for(batch)) for b in BACKENDS}
                    for backend in BACKENDS:
                        times[backend][batch].append(this[backend])
                        ratios[backend][batch].append(this["torch"] / this[backend])
            results[preset] = dict(sizes=sizes, input_shape=list(shape), ms={
                b: {n: statistics.median(times[b][n]) for n in BATCHES} for b in BACKENDS}, speedup={
                b: {n: statistics.median(ratios[b][n]) for n in BATCHES} for b in BACKENDS})
            print(f"measured {preset}", file=sys.stderr)
    return results


def speed_table(results: dict) -> str:
    rows = ["| preset | backend | file MB | batch 1 ms | vs torch | batch 256 ms | images/s | vs torch |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for preset, found in results.items():
        sizes = found["sizes"]
        for backend in BACKENDS:
            size = sizes["model.safetensors" if backend == "torch" else backend] / 1e6
            one, many = found["ms"][backend][1], found["ms"][backend][256]
            rows.append(f"| {preset} | {backend} | {size:.2f} | {one:.3f} | {found['speedup'][backend][1]:.2f}x | "
                        f"{many:.1f} | {256 / many * 1000:,.0f} | {found['speedup'][backend][256]:.2f}x |")
    checks = ", ".join(f"{p} {r['sizes']['cached start check s'] * 1000:.0f} ms" for p, r in results.items())
    return "\n".join(rows) + f"\n\nChecking a cached ONNX file at start (digests + answers on 8 inputs): {checks}"


def startup(run: Path, repeats: int) -> dict[str, float]:
    """Median seconds of whole `cnnlab predict` processes per backend, the backends taking turns."""
    import subprocess

    from PIL import Image

    from cnnlab.use.export import random_ink
    from cnnlab.use.predict import Predictor

    predictor = Predictor.from_run(run)
    predictor.use_backend("onnx")  # the cache is made here, not in a timed start
    with tempfile.TemporaryDirectory() as folder:
        picture = Path(folder) / "picture.png"
        Image.fromarray(random_ink(predictor.model.input_shape, 1)[0]).save(picture)
        times: dict[str, list[float]] = {"torch": [], "onnx": []}
        for _ in range(repeats):
            for backend in times:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "cnnlab", "predict", str(run), str(picture), "--backend",
                                backend], check=True, capture_output=True)
                times[backend].append(time.perf_counter() - start)
    found = {backend: statistics.median(t) for backend, t in times.items()}
    print(f"\n`cnnlab predict RUN picture.png` start to end, median of {repeats}: "
          + ", ".join(f"{b} {s:.2f} s" for b, s in found.items()))
    return found


def accuracy(run: Path) -> dict:
    from cnnlab.use.quantize import quantize_run

    with tempfile.TemporaryDirectory() as folder:
        result = quantize_run(run, Path(folder) / "model.int8.onnx", max_drop=100.0)
    print("\n".join(result.lines()))
    return {key: value for key, value in result.to_dict().items() if key != "file"}  # a temporary file's name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["seed", "fast", "deep", "best", "top"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", type=Path, help="a trained run: int8 test accuracy against float32")
    parser.add_argument("--startup", type=Path, metavar="RUN", help="time whole `cnnlab predict` runs on this run")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads, Python "
          f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, load average before: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    report: dict = dict(threads=args.threads, repeats=args.repeats)
    if args.presets:
        report["speed"] = speed(args.presets, args.threads, args.repeats)
        print(speed_table(report["speed"]))
    if args.startup is not None:
        report["startup_s"] = startup(args.startup, args.repeats)
    if args.run is not None:
        report["accuracy"] = dict(run=args.run.name, **accuracy(args.run))
    print(f"\nload average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
