"""Benchmark cnnlab.playground.conv (NumPy) against torch.nn.functional on the same machine, in the same run.

Usage: python bench/bench_conv.py [--size 1024] [--repeats 7] [--threads 2]
Prints a Markdown table of median times and the NumPy / torch ratio (target: conv within 3x).
Run it on a quiet machine: NumPy's BLAS threads slow down far more than torch's when other
processes share the cores, so the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.playground.conv import avg_pool2d, conv2d, max_pool2d


def median_seconds(function, repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(size: int, rng: np.random.Generator):
    """(name, numpy call, torch call, check) for each benchmark; float32 everywhere, like torch."""
    image = rng.random((size, size, 3), dtype=np.float32)                       # (H, W, C)
    nchw = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()           # (1, C, H, W)
    to_hwc = lambda t: t[0].permute(1, 2, 0).numpy()  # noqa: E731
    for k in (3, 7):
        bank = rng.standard_normal((k, k, 3, 16)).astype(np.float32)            # (kh, kw, C, F)
        weights = torch.from_numpy(bank).permute(3, 2, 0, 1).contiguous()       # (F, C, kh, kw)
        yield (f"conv2d {k}x{k}x3x16, valid", lambda b=bank: conv2d(image, b),
               lambda w=weights: to_hwc(F.conv2d(nchw, w)))
        yield (f"conv2d {k}x{k}x3x16, same", lambda b=bank: conv2d(image, b, padding="same"),
               lambda w=weights, k=k: to_hwc(F.conv2d(nchw, w, padding=k // 2)))
    yield ("max_pool2d 2x2", lambda: max_pool2d(image, 2), lambda: to_hwc(F.max_pool2d(nchw, 2)))
    yield ("avg_pool2d 2x2", lambda: avg_pool2d(image, 2), lambda: to_hwc(F.avg_pool2d(nchw, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (image is size x size x 3)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    print(f"cnnlab.playground.conv vs torch {torch.__version__} (CPU, {torch.get_num_threads()} threads), "
          f"numpy {np.__version__}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"image {args.size}x{args.size}x3 float32, median of {args.repeats} runs, "
          f"load average before: {os.getloadavg()[0]:.2f} (above ~0.3 other work is sharing the cores)\n")
    print("| case | numpy (ms) | torch (ms) | numpy / torch | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for name, ours, reference in cases(args.size, rng):
        difference = float(np.abs(ours() - reference()).max())
        ours_s, reference_s = median_seconds(ours, args.repeats), median_seconds(reference, args.repeats)
        print(f"| {name} | {ours_s * 1e3:.1f} | {reference_s * 1e3:.1f} | {ours_s / reference_s:.2f}x "
              f"| {difference:.1e} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
