"""Time-to-accuracy of presets: N seeds each, with the lesson's training as the reference, side by side.

    python bench/bench_presets.py --data-dir DIR --dataset mnist --presets fast seed --seeds 5

Each preset runs in its own process (so its peak RSS is its own) through the same code as
`cnnlab train` (pipeline.train: train, validate every epoch, test, write the run), timed from
after the dataset is in memory to the end of the test evaluation. The reference is
bench/plain_pytorch.py: the lesson's model in a plain PyTorch loop with a DataLoader. Prints a
Markdown table and writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    """Run one preset for each seed in this process; print one JSON line per seed."""
    import torch

    from cnnlab import pipeline
    from cnnlab.config import load_config
    from cnnlab.data import load_dataset
    from cnnlab.models.plan import count_macs, plan

    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, args.data_dir, allow_mismatch=True, progress=False)
    for seed in range(args.seeds):
        overrides = [f"data.dataset={args.dataset}", f"seed={seed}", *(args.set or [])]
        file = args.preset if args.preset.endswith(".yaml") else None  # a config file in place of a preset
        config = load_config(None if file else args.preset, file, overrides=overrides)
        with tempfile.TemporaryDirectory() as root:
            started = time.perf_counter()
            result = pipeline.train(config, root, progress=False, dataset=dataset)
            seconds = time.perf_counter() - started
        spec = dataset.spec
        macs = count_macs(plan(config.model, spec.image_shape, spec.num_classes))  # per image, forward pass
        val = spec.val_size if config.data.val_size is None else config.data.val_size
        trained = len(dataset.train_labels) - val
        # 2 FLOP per multiply-add; training (forward + backward) ~ 3 forwards; each validation pass and the test
        # once (test-time augmentation's extra views not counted)
        validations = sum(1 for m in result.history if not math.isnan(m["val_accuracy"]))  # NaN: not validated
        flops = 2 * macs * (config.train.epochs * 3 * trained + validations * val + len(dataset.test_labels))
        print(json.dumps(dict(preset=args.preset, seed=seed, seconds=seconds, test_accuracy=result.test.accuracy,
                              epochs=config.train.epochs, gflops=flops / seconds / 1e9,
                              epoch_seconds=[m["seconds"] for m in result.history])), flush=True)


def run_process(cmd: list[str]) -> tuple[list[dict], float]:
    """Run a command; return the JSON lines it printed and its own peak RSS in MiB."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines = process.stdout.read().splitlines()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return [json.loads(line) for line in lines if line.startswith("{")], usage.ru_maxrss / 1024


def summarize(name: str, rows: list[dict], rss: float) -> dict:
    times = [r["seconds"] for r in rows]
    accs = [r["test_accuracy"] for r in rows]
    epochs = [s for r in rows for s in r.get("epoch_seconds", [])]
    return dict(name=name, runs=len(rows), seconds_median=statistics.median(times), seconds_min=min(times),
                seconds_max=max(times), accuracy_median=statistics.median(accs), accuracy_min=min(accs),
                accuracy_max=max(accs), epochs=rows[0]["epochs"],
                epoch_seconds_median=statistics.median(epochs) if epochs else None,
                gflops_median=statistics.median(r["gflops"] for r in rows) if "gflops" in rows[0] else None,
                peak_rss_mib=rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--presets", nargs="+", default=["fast", "seed"], help="preset names or YAML config files")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seeds-of", nargs="*", default=[], metavar="PRESET=N",
                        help="another number of seeds for some presets, e.g. fast=5")
    parser.add_argument("--reference-seeds", type=int, default=1, help="runs of the plain-PyTorch reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", help="config override for every preset run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--dataset", args.dataset, "--threads", str(args.threads)]
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    seeds_of = {preset: int(n) for preset, n in (item.split("=", 1) for item in args.seeds_of)}
    results: list[dict] = []
    rows_of: dict[str, list[dict]] = {}

    def save() -> None:  # after every preset, so a long run's finished presets are kept
        if args.out:
            args.out.write_text(json.dumps(dict(dataset=args.dataset, seeds=args.seeds, seeds_of=seeds_of,
                                                results=results, rows=rows_of), indent=2) + "\n")

    for preset in args.presets:
        seeds = seeds_of.get(preset, args.seeds)
        cmd = [sys.executable, __file__, "--worker", "--preset", preset, "--seeds", str(seeds), *common]
        for item in args.set or []:
            cmd += ["--set", item]
        rows, rss = run_process(cmd)
        name = Path(preset).stem if preset.endswith(".yaml") else preset
        rows_of[name] = rows
        results.append(summarize(name, rows, rss))
        print(json.dumps(results[-1]), flush=True)
        save()
    reference = []
    rss = 0.0
    for seed in range(args.reference_seeds):
        rows, rss_one = run_process([sys.executable, str(HERE / "plain_pytorch.py"), "--seed", str(seed), *common])
        final = rows[-1]
        reference.append(dict(seconds=final["seconds"], test_accuracy=final["test_accuracy"], epochs=final["epochs"],
                              epoch_seconds=[r["seconds"] for r in rows[:-1]]))
        rss = max(rss, rss_one)
    if reference:
        rows_of["plain PyTorch (reference)"] = reference
        results.append(summarize("plain PyTorch (reference)", reference, rss))
        print(json.dumps(results[-1]), flush=True)
        save()
    ref_epoch = results[-1]["epoch_seconds_median"] if reference else None
    print(f"\n{args.dataset}, {args.threads} threads\n")
    print("| preset | seeds | epochs | time s (median, min-max) | test acc (median, min-max) | s/epoch | "
          "epoch speed-up vs reference | GFLOP/s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        speedup = f"{ref_epoch / r['epoch_seconds_median']:.2f}x" if ref_epoch and r["epoch_seconds_median"] else ""
        gflops = f"{r['gflops_median']:.1f}" if r["gflops_median"] else ""
        seconds = f"{r['seconds_median']:.1f} ({r['seconds_min']:.1f}-{r['seconds_max']:.1f})"
        print(f"| {r['name']} | {r['runs']} | {r['epochs']} | {seconds} | "
              f"{r['accuracy_median']:.4f} ({r['accuracy_min']:.4f}-{r['accuracy_max']:.4f}) | "
              f"{r['epoch_seconds_median']:.2f} | {speedup} | {gflops} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
