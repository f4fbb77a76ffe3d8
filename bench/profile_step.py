"""Where a training step's time goes: torch.profiler's top operators for one preset.

    python bench/profile_step.py --preset seed [--config FILE] [--batch-size 32] [--steps 100] [--nchw]

Runs the engine's own optimizer and model (random uint8 images: the cost does not depend on the
pixels) and prints the operators by self CPU time, plus ms per step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cnnlab.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import engine_step  # noqa: E402  (a sibling script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--config", help="a YAML config file instead of a preset")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nchw", action="store_true", help="keep the default memory format (no channels-last)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(None if args.config else args.preset, args.config)
    step, _, batch = engine_step(config, args.batch_size, channels_last=not args.nchw, batches=20)

    for i in range(10):  # warm-up
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for i in range(args.steps):
            step(i)
        per_step = (time.perf_counter() - started) / args.steps * 1000
    print(f"{args.preset}, batch {batch}, {'NCHW' if args.nchw else 'channels-last'}: {per_step:.2f} ms/step "
          f"(profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
