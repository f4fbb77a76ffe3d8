"""What each recipe key buys: a preset trained with one recipe switched on or off at a time, judged on
the validation split (settings are chosen there, never on the test set).

    python bench/bench_recipes.py --data-dir DIR --dataset fashion-mnist --preset best --epochs 4 --seeds 2

Every variant runs in this process through pipeline.train (the code behind `cnnlab train`) on the
same data in memory, for each seed; the table gives the median last-epoch validation accuracy and its
difference from the preset as it ships, and the median seconds per epoch (the price of a recipe:
test-time augmentation costs at validation, EMA at every step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

# name -> overrides on the preset (as --set takes them)
VARIANTS: dict[str, list[str]] = {
    "as shipped": [],
    "no test-time augmentation": ["train.tta=false", "train.tta_shift=0"],
    "no random flips": ["train.augment_flip=false"],
    "no random shifts": ["train.augment_shift=0"],
    "no label smoothing": ["train.label_smoothing=0"],
    "+ random erasing 0.5": ["train.augment_erase=0.5"],
    "+ weight averaging (EMA 0.999)": ["train.ema=0.999"],
    "+ weight decay 5e-4 (AdamW), norms and biases too": ["train.optimizer=adamw", "train.weight_decay=5e-4"],
    "+ weight decay 5e-4 (AdamW), not on norms and biases": ["train.optimizer=adamw", "train.weight_decay=5e-4",
                                                             "train.decay_norms_and_biases=false"],
    "+ batch-norm biases at 8x the learning rate": ["train.norm_bias_lr_scale=8"],
    "+ whitening first layer": ["model.conv.0.whiten=true"],
    "no whitening first layer": ["model.conv.0.whiten=false"],
    "+ lookahead": ["train.lookahead=true"],
    "+ random rotations 10 degrees": ["train.augment_rotate=10"],
    "+ random rotations 15 degrees": ["train.augment_rotate=15"],
    "+ bf16-mixed precision": ["train.precision=bf16-mixed"],
    "+ bf16-mixed, batch-norm biases at 8x": ["train.precision=bf16-mixed", "train.norm_bias_lr_scale=8"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--preset", default="best")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from cnnlab import pipeline
    from cnnlab.config import load_config
    from cnnlab.data import load_dataset

    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, args.data_dir, allow_mismatch=True, progress=False)
    rows = []
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        for seed in range(args.seeds):
            config = load_config(args.preset, overrides=[f"data.dataset={args.dataset}", f"seed={seed}",
                                                         f"train.epochs={args.epochs}", *overrides])
            with tempfile.TemporaryDirectory() as root:
                started = time.perf_counter()
                result = pipeline.train(config, root, progress=False, dataset=dataset)
                seconds = time.perf_counter() - started
            last = result.history[-1]
            rows.append(dict(variant=name, seed=seed, val_accuracy=last["val_accuracy"], seconds=seconds,
                             test_accuracy=result.test.accuracy if result.test else None,
                             epoch_seconds=statistics.median(m["seconds"] for m in result.history)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(dataset=args.dataset, preset=args.preset, epochs=args.epochs,
                                            seeds=args.seeds, rows=rows), indent=2) + "\n")
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    base = statistics.median(r["val_accuracy"] for r in by_variant.get("as shipped", rows))
    print(f"\n{args.dataset}, preset {args.preset}, {args.epochs} epochs, {args.seeds} seeds, {args.threads} threads\n")
    # the test accuracy is recorded for the ladder, never used to choose (the last epoch's, on the test set)
    print("| variant | val acc (median) | change vs as shipped | s/epoch (median) | test acc (median, min-max) |")
    print("| --- | --- | --- | --- | --- |")
    for name, group in by_variant.items():
        accuracy = statistics.median(r["val_accuracy"] for r in group)
        seconds = statistics.median(r["epoch_seconds"] for r in group)
        tests = [r["test_accuracy"] for r in group if r.get("test_accuracy") is not None]
        test = f"{statistics.median(tests):.4f} ({min(tests):.4f}-{max(tests):.4f})" if tests else ""
        print(f"| {name} | {accuracy:.4f} | {100 * (accuracy - base):+.2f} pts | {seconds:.2f} | {test} |")


if __name__ == "__main__":
    main()
