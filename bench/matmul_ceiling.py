"""The machine's fp32 matmul ceiling: the most GFLOP/s torch gets out of these cores.

    python bench/matmul_ceiling.py [--threads 2] [--size 2048] [--repeats 10]

Training GFLOP/s in bench/bench_presets.py are reported next to this number.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def matmul_gflops(size: int, repeats: int) -> list[float]:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool, caches
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)  # 2 FLOP per multiply-add
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = matmul_gflops(args.size, args.repeats)
    result = dict(threads=args.threads, size=args.size, median_gflops=statistics.median(rates), max_gflops=max(rates))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
