"""Start-up time of the light commands beside Python itself and `import torch`, whole processes.

    python bench/bench_startup.py [--runs 10]

Each command runs once to warm the file cache, then `--runs` times, the commands taking turns
(A B C ... A B C ...) so that a machine that speeds up or slows down affects them alike; prints the
median, minimum and maximum wall time of each and a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CNNLAB = str(Path(sys.executable).parent / "cnnlab")
PHOTO = str(ROOT / "docs" / "img" / "photo.png")


def commands(out: Path) -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "cnnlab --help": [CNNLAB, "--help"],
        "cnnlab presets": [CNNLAB, "presets"],
        "cnnlab summary": [CNNLAB, "summary"],
        "cnnlab convolve photo.png --kernel blur": [CNNLAB, "convolve", PHOTO, "--kernel", "blur", "--out",
                                                    str(out / "blur.png")],
    }


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        todo = commands(Path(folder))
        for command in todo.values():
            wall_seconds(command)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in todo}
        for _ in range(args.runs):
            for name, command in todo.items():
                times[name].append(wall_seconds(command))
    print(f"| command | median s | min s | max s |  (runs: {args.runs})")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
