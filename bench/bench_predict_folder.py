"""`cnnlab predict RUN DIR` on a folder of 5,000 pictures against the plain loop a user would write: Pillow open
-> the run's preparation -> a forward pass, one file at a time.

    python bench/bench_predict_folder.py --files 5000 --repeats 3

The folder (in a temporary folder, or --folder to keep it): the shipped MNIST and Fashion-MNIST samples'
test and training pictures, each enlarged to 28..196 px (and half of them inverted: dark ink on light paper, as
people draw), saved as PNG, JPEG or BMP in turn, in 10 sub-folders; --bad adds unreadable files (text named
.png), which every way lists and goes past. The run: `seed` (digits recipe) with random weights; speed does not
depend on what was learned. Measured in this process, each repeat running every way in turn:
  plain loop            Image.open -> Predictor.prepare -> Predictor.probabilities(image[None]), file by file,
                        with one torch thread (--plain-threads; see plain_loop)
  batched, 1 process    iter_predictions(workers=0): the files prepared here, 256 per forward pass
  batched, N processes  iter_predictions(): prepared in min(4, CPUs) decoding processes, what `cnnlab predict` runs
and, twice, `cnnlab predict RUN DIR --out rows.csv` as a command (start-up and model loading included; the first
use of a run also makes its cached ONNX file when onnxruntime is installed).
Prints a Markdown table (median seconds and files/s over --repeats, the speed-up against the plain loop, and the
CPU seconds each way used, decoding processes included) and `uptime` before and after. On a shared machine the
kernel gives each session its share of the cores (autogroup scheduling): more processes do not get more of them,
so there the CPU columns say what the wall-clock ones cannot.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench_serve import uptime  # the same reading beside every number

HERE = Path(__file__).resolve().parent.parent
FORMATS = ("png", "jpg", "bmp")


def make_folder(root: Path, files: int, bad: int) -> list[Path]:
    """`files` pictures from the shipped samples at mixed sizes and formats, plus `bad` unreadable ones."""
    from PIL import Image

    from cnnlab.data import load_dataset

    samples = [load_dataset(name, progress=False) for name in ("mnist-sample", "fashion-mnist-sample")]
    pictures = np.concatenate([np.concatenate([d.test_images, d.train_images]) for d in samples])
    rng = np.random.default_rng(0)
    made = []
    for i in range(files):
        pixels = pictures[i % len(pictures)]
        side = int(rng.integers(28, 197))
        picture = Image.fromarray(255 - pixels if i % 2 else pixels).resize((side, side), Image.Resampling.BICUBIC)
        path = root / f"part{i % 10}" / f"{i:05d}.{FORMATS[i % len(FORMATS)]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        made.append(path)
    for i in range(bad):
        path = root / f"part{i % 10}" / f"bad{i:03d}.png"
        path.write_text("not a picture")
        made.append(path)
    return made


def make_run(root: Path) -> Path:
    """A `seed` run (MNIST's digits recipe) with freshly initialised weights."""
    sys.path.insert(0, str(HERE / "bench"))
    from bench_serve import make_run as serve_make_run

    return serve_make_run("seed", root)


def plain_loop(predictor, files: list[Path], threads: int) -> int:
    """What a user writes first: one file at a time, opened, prepared, predicted. Returns the files predicted.

    With torch's `threads` for the loop: one thread makes the reference stronger on a loaded machine, where a
    2-thread pool spins for each single-image pass (100 ms a file measured at load 17 on 2 cores, 3 ms with one).
    """
    import torch
    from PIL import Image

    from cnnlab.use.predict import PER_FILE_ERRORS

    done, before = 0, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for file in files:
            try:
                with Image.open(file) as picture:
                    image = predictor.prepare(picture, str(file))
            except (*PER_FILE_ERRORS, OSError):
                continue
            predictor.probabilities(image[None])
            done += 1
    finally:
        torch.set_num_threads(before)
    return done


def predicted(predictor, files: list[Path], workers: int | None) -> int:
    from cnnlab.use.predict import FileError, iter_predictions

    return sum(not isinstance(item, FileError) for item in iter_predictions(predictor, files, workers=workers))


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its ended (waited-for) children: the decoding processes."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed(how: Callable[[], int]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (decoding processes included) and the files predicted."""
    start, cpu = time.perf_counter(), cpu_seconds()
    count = how()
    return time.perf_counter() - start, cpu_seconds() - cpu, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--bad", type=int, default=20, help="unreadable files added to the folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-threads", type=int, default=1, help="torch threads for the plain loop (the "
                                                                         "reference); the other ways keep torch's own")
    parser.add_argument("--folder", type=Path, default=None, help="make the folder here and keep it (default: a "
                                                                   "temporary folder)")
    args = parser.parse_args()

    import torch

    from cnnlab.use.folder_predict import walk_images
    from cnnlab.use.predict import Predictor, default_workers

    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "pictures"
        make_folder(folder, args.files, args.bad)
        run = make_run(Path(tmp) / "runs")
        files = walk_images(folder)
        predictor = Predictor.from_run(run)
        ways: dict[str, Callable[[], int]] = {
            f"plain loop (open, prepare, forward; file by file), torch {args.plain_threads} thread(s)":
                lambda: plain_loop(predictor, files, args.plain_threads),
            "iter_predictions, 1 process, 256 per pass": lambda: predicted(predictor, files, 0),
            f"iter_predictions, {default_workers()} decoding processes (cnnlab predict)":
                lambda: predicted(predictor, files, None),
        }
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        cpu: dict[str, list[float]] = {name: [] for name in ways}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, how in ways.items():
                elapsed, used, counts[name] = timed(how)
                seconds[name].append(elapsed)
                cpu[name].append(used)
        command = [sys.executable, "-m", "cnnlab", "predict", str(run), str(folder), "--out", f"{tmp}/rows.csv"]
        command_seconds = []  # the first makes the run's ONNX file (--backend auto), the second uses it
        for _ in range(2):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(HERE / "src")})
            command_seconds.append(time.perf_counter() - start)
    after = uptime()

    print(f"cnnlab predict on a folder: torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
          f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; {args.files} pictures + "
          f"{args.bad} unreadable files; medians of {args.repeats} repeats\n")
    print(f"`uptime` before: `{before}`; after: `{after}`\n")
    reference = statistics.median(seconds[next(iter(ways))])
    reference_cpu = statistics.median(cpu[next(iter(ways))])
    print("| way | files predicted | seconds | files/s | vs plain loop | CPU seconds | CPU: plain loop / this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ways:
        median, used = statistics.median(seconds[name]), statistics.median(cpu[name])
        print(f"| {name} | {counts[name]} | {median:.2f} | {counts[name] / median:,.0f} | {reference / median:.2f}x | "
              f"{used:.2f} | {reference_cpu / used:.2f}x |")
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    for seconds_taken, when in zip(command_seconds, ("first use of the run", "again")):
        print(f"| `cnnlab predict RUN DIR --out rows.csv` (a command: start-up and model loading included), {when} | "
              f"| {seconds_taken:.2f} | | {reference / seconds_taken:.2f}x | | |")
    print(f"\nthe command said: {summary} (exit {done.returncode}); its stderr: {done.stderr.strip()[-200:]!r}")


if __name__ == "__main__":
    sys.exit(main())
