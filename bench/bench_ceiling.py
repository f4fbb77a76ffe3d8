"""How close the training step comes to the machine's matmul ceiling, both measured in the same process.

    python bench/bench_ceiling.py --runs seed:mnist fast:mnist fast:fashion-mnist best:fashion-mnist --rounds 3

For each PRESET:DATASET (the preset with that dataset's `datasets:` block), the engine's own model and fused
optimizer, channels-last, at the preset's batch size, on random uint8 batches of the dataset's shape (the
cost does not depend on the pixels): 20 warm-up steps, then ms per step over --steps. GFLOP/s counts
2 FLOP per multiply-add, and the multiply-adds a step really does (`training_macs`): the forward pass,
each trained layer's weight gradient, and the input gradient of every layer that a trained layer feeds
(not the first layer's, whose input is the image; nothing at all for a frozen whitening layer).
bench_presets.py's rougher 3 forward passes' worth overstates it by up to a third. The ceiling is
bench/matmul_ceiling.py's 2048² fp32 matmul, measured before and after every round; the step's share of
it is its GFLOP/s over the round's ceiling (the mean of the two).
Rounds take the presets in turn; medians over rounds. Prints a Markdown table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import engine_step  # noqa: E402  (sibling scripts)
from matmul_ceiling import matmul_gflops  # noqa: E402


def training_macs(plan: object) -> int:
    """Multiply-adds of one training image: forward, weight gradients, and the input gradients backprop needs."""
    total, trained_below = 0, False
    for layer in plan.layers():  # type: ignore[attr-defined]
        weights_trained = layer.params > 0 and layer.frozen == 0  # a whitening layer trains its bias alone
        total += layer.macs * (1 + weights_trained + trained_below)  # forward, weight gradient, input gradient
        trained_below = trained_below or layer.params > layer.frozen  # batch norm too: its input gradient is needed
    return total


def step_timer(preset: str, dataset: str, steps: int) -> tuple[dict, object]:
    """The preset's training step on `dataset`'s image shape, and what describes it."""
    from cnnlab.config import load_config
    from cnnlab.models.plan import plan

    config = load_config(preset, overrides=[f"data.dataset={dataset}"])
    step, model, batch = engine_step(config)

    def timed() -> float:
        for i in range(20):
            step(i)
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        return (time.perf_counter() - started) / steps

    layers = plan(config.model, model.plan.input_shape, model.plan.num_classes)
    return dict(preset=preset, dataset=dataset, batch=batch, macs_per_image=layers.macs,
                training_macs_per_image=training_macs(layers)), timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["seed:mnist", "fast:mnist", "fast:fashion-mnist",
                                                      "best:fashion-mnist"], metavar="PRESET:DATASET")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timers = [step_timer(*run.split(":", 1), args.steps) for run in args.runs]
    rows: list[dict] = [dict(about, seconds=[], ceilings=[]) for about, _ in timers]
    for _ in range(args.rounds):
        for row, (_, timed) in zip(rows, timers):
            before = statistics.median(matmul_gflops(2048, 5))
            seconds = timed()  # type: ignore[operator]
            after = statistics.median(matmul_gflops(2048, 5))
            row["seconds"].append(seconds)
            row["ceilings"].append((before + after) / 2)
    print(f"{args.threads} threads, {args.rounds} rounds of {args.steps} steps; uptime load before: "
          f"{Path('/proc/loadavg').read_text().split()[0]}\n")
    print("| preset | dataset | batch | multiply-adds per image: forward, training | ms/step | step GFLOP/s "
          "| matmul ceiling GFLOP/s | share of the ceiling |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        gflops = [2 * row["training_macs_per_image"] * row["batch"] / s / 1e9 for s in row["seconds"]]
        shares = [g / c for g, c in zip(gflops, row["ceilings"])]
        row.update(ms_per_step=statistics.median(row["seconds"]) * 1000, gflops=statistics.median(gflops),
                   ceiling=statistics.median(row["ceilings"]), share=statistics.median(shares))
        print(f"| {row['preset']} | {row['dataset']} | {row['batch']} | {row['macs_per_image'] / 1e6:.2f}M, "
              f"{row['training_macs_per_image'] / 1e6:.2f}M | "
              f"{row['ms_per_step']:.2f} | {row['gflops']:.0f} | {row['ceiling']:.0f} | {row['share']:.0%} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
