"""Does the learning-rate finder's suggestion train as well as a grid search around it, and what does it cost?

    python bench/bench_lr_find.py --data-dir DIR --dataset mnist --presets seed fast --out bench/lr_find_mnist.json

For each preset: the finder's sweep (`cnnlab lr-find`, the preset's own batch, optimizer and schedule),
then the preset trained at the suggestion and at a 5-point log grid around it (the suggestion times
10^-1, 10^-0.5, 1, 10^0.5, 10), each for the preset's epochs, all in this process through pipeline.train
on the same data in memory. Reports the last epoch's test accuracy (and validation), the gap between the
suggestion and the best grid point, and the finder's time against one training epoch of the same run
(a second call: the first in a process also pays torch's one-time kernel set-up, which the training
after it then does not).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)  # decades around the suggestion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--presets", nargs="+", default=["seed", "fast"])
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per grid point (the finder uses seed 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from cnnlab import pipeline
    from cnnlab.config import load_config
    from cnnlab.data import load_dataset
    from cnnlab.data.sources import prepare_data
    from cnnlab.models.cnn import build_model
    from cnnlab.training.engine import TrainData
    from cnnlab.training.lr_find import find_lr

    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, args.data_dir, allow_mismatch=True, progress=False)
    results = []
    for preset in args.presets:
        config = load_config(preset, overrides=[f"data.dataset={args.dataset}"])
        data = prepare_data(dataset, config)
        model = build_model(config.model, data.image_shape, data.num_classes, seed=config.train.seed)
        started = time.perf_counter()
        finding = find_lr(model, TrainData(data.train, data.val), config.train)
        cold_seconds = time.perf_counter() - started  # with torch's one-time kernel set-up, if first in the process
        started = time.perf_counter()
        again = find_lr(model, TrainData(data.train, data.val), config.train)
        finder_seconds = time.perf_counter() - started  # what `lr: auto` adds to a run: the set-up is paid either way
        assert again.suggestion == finding.suggestion, "the finder gave two suggestions"
        suggestion = float(f"{finding.suggestion:.2g}")
        print(f"{preset}: suggestion {suggestion:g} in {finder_seconds:.1f}s ({finding.why})", flush=True)
        rows = []
        for decades in GRID:
            lr = float(f"{suggestion * 10 ** decades:.2g}")
            for seed in range(args.seeds):
                trial = load_config(preset, overrides=[f"data.dataset={args.dataset}", f"train.lr={lr}",
                                                       f"train.seed={seed}"])
                with tempfile.TemporaryDirectory() as root:
                    result = pipeline.train(trial, root, name="r", progress=False, dataset=dataset)
                row = dict(lr=lr, decades=decades, seed=seed, test_accuracy=result.test.accuracy,
                           val_accuracy=result.history[-1]["val_accuracy"],
                           epoch_seconds=result.history[0]["seconds"], train_seconds=result.train_seconds)
                rows.append(row)
                print(f"  lr {lr:<8g} seed {seed}: test {row['test_accuracy']:.4f} val {row['val_accuracy']:.4f} "
                      f"({row['train_seconds']:.1f}s)", flush=True)
        by_lr = {lr: statistics.median(r["test_accuracy"] for r in rows if r["lr"] == lr)
                 for lr in dict.fromkeys(r["lr"] for r in rows)}
        at_suggestion, best_lr = by_lr[suggestion], max(by_lr, key=by_lr.__getitem__)
        epoch = statistics.median(r["epoch_seconds"] for r in rows)
        summary = dict(preset=preset, suggestion=suggestion, rule=finding.rule, why=finding.why,
                       finder_steps=len(finding.lrs), finder_seconds=finder_seconds,
                       finder_cold_seconds=cold_seconds, epoch_seconds=epoch,
                       finder_per_epoch=finder_seconds / epoch, test_at_suggestion=at_suggestion,
                       best_grid_lr=best_lr, best_grid_test=by_lr[best_lr],
                       gap_points=100 * (by_lr[best_lr] - at_suggestion), shipped_lr=config.train.lr, rows=rows)
        results.append(summary)
        print(f"{preset}: suggestion {suggestion:g} -> {at_suggestion:.4f}; best of grid {best_lr:g} -> "
              f"{by_lr[best_lr]:.4f} (gap {summary['gap_points']:.2f} points); finder {finder_seconds:.1f}s = "
              f"{summary['finder_per_epoch']:.1%} of an epoch ({epoch:.1f}s); first call {cold_seconds:.1f}s",
              flush=True)
        if args.out:
            args.out.write_text(json.dumps(dict(dataset=args.dataset, threads=args.threads, results=results),
                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
