"""The model step in float32 against bfloat16 (`train.precision`), at a few batch sizes, for one preset.

    python bench/bench_precision.py --preset top --dataset fashion-mnist

The engine's model and fused optimizer on random batches (bench/engine_step.py), 5 warm-up steps, then the
median of 3 rounds of at least 1,280 images; printed as seconds per 55,000 images (a Fashion-MNIST epoch's
training split), the model step only: no augmentation, data indexing or validation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from cnnlab.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import engine_step  # noqa: E402  (a sibling script)

EPOCH_IMAGES = 55_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="top")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", nargs="*", default=["128:float32", "128:bf16-mixed", "256:bf16-mixed",
                                                       "512:bf16-mixed"], metavar="BATCH:PRECISION")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run in args.runs:
        batch, precision = run.split(":")
        config = load_config(args.preset, overrides=[f"data.dataset={args.dataset}", f"train.precision={precision}"])
        step, _, size = engine_step(config, int(batch))
        for i in range(5):
            step(i)
        steps = max(5, 1280 // size)
        rounds = []
        for _ in range(3):
            started = time.perf_counter()
            for i in range(steps):
                step(i)
            rounds.append((time.perf_counter() - started) / (steps * size) * EPOCH_IMAGES)
        print(f"{args.preset} batch {size} {precision}: {statistics.median(rounds):.1f} s per {EPOCH_IMAGES:,} images")


if __name__ == "__main__":
    main()
