"""Where a served drawing's time goes: decoding the PNG against the digits recipe that prepares it.

    python bench/bench_drawing.py [--rounds 20] [--calls 50]

The drawing is the serving benchmark's (`bench_serve.drawing_png`: a 280x280 RGB PNG of a black '7' on white).
Three ways are timed in turn, `--calls` calls each per round, so that a noisy minute touches all of them:
  read      cnnlab.images.open_image on the bytes (Pillow's decoding, the EXIF-upright copy)
  prepare   cnnlab.use.recipes.prepare on the decoded picture (the recipe alone: grey, ink map, crop, fit, centre)
  both      prepare on the bytes, as `cnnlab serve` and `cnnlab predict` do
Printed: the median and fastest milliseconds per call over the rounds, and `uptime`.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_serve import drawing_png  # noqa: E402
from cnnlab.images import open_image  # noqa: E402
from cnnlab.use.recipes import prepare  # noqa: E402


def per_call_ms(work: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        work()
    return 1000 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    body = drawing_png()
    decoded = open_image(body)
    ways: dict[str, Callable[[], object]] = {
        "read (decode the PNG)": lambda: open_image(body),
        "prepare (the digits recipe on the decoded picture)": lambda: prepare(decoded, "digits"),
        "both (prepare on the bytes, as serve does)": lambda: prepare(body, "digits"),
    }
    for work in ways.values():  # warm-up: imports, first allocations
        per_call_ms(work, args.calls)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, work in ways.items():
            times[name].append(per_call_ms(work, args.calls))
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"280x280 RGB PNG drawing ({len(body)} bytes), {args.rounds} rounds of {args.calls} calls; "
          f"`uptime`: {uptime}\n")
    print("| way | median ms a call | fastest round |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} |")


if __name__ == "__main__":
    main()
