"""Time one gloo all-reduce of a model's gradients between 2 processes on this machine.

    torchrun --standalone --nproc-per-node 2 bench/gloo_allreduce.py --params 693962 121930

The figure feeds the data-parallel scaling estimate in BENCHMARKS.md: each step costs the compute
on the rank's share of the batch plus this all-reduce.
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--params", type=int, nargs="+", default=[693962])
parser.add_argument("--repeats", type=int, default=200)
args = parser.parse_args()
dist.init_process_group("gloo")
for n in args.params:
    tensor = torch.ones(n)
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(f"{n:,} float32 parameters ({n * 4 / 2**20:.1f} MiB): all-reduce median "
              f"{statistics.median(times) * 1e3:.2f} ms over {args.repeats}")
dist.destroy_process_group()
