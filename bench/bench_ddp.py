"""Training throughput with 1 and 2 data-parallel processes on this machine, as a user runs it.

    python bench/bench_ddp.py --data-dir DIR --dataset mnist --presets seed fast --nproc 1 2 --repeats 3

Each measurement is one `cnnlab train ... --nproc N` command in a fresh process; the images/s it
prints (training images per second of the training loop, validation included, all ranks together)
is collected. Runs alternate between process counts so that machine noise hits both alike; the
table gives medians and each count's ratio to 1 process, measured in the same invocation.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RATE = re.compile(r"trained in ([\d.]+)s\s+\(([\d,]+) images/s\)")
ACCURACY = re.compile(r"test accuracy ([\d.]+)")


def run_once(preset: str, nproc: int, args: argparse.Namespace, root: Path, index: int) -> dict:
    command = [sys.executable, "-m", "cnnlab", "train", "--model", preset, "--dataset", args.dataset,
               "--data-dir", str(args.data_dir), "--allow-checksum-mismatch", "--epochs", str(args.epochs),
               "--quiet", "--runs-dir", str(root), "--name", f"{preset}-{nproc}-{index}"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rate, accuracy = RATE.search(done.stdout), ACCURACY.search(done.stdout)
    return dict(seconds=float(rate.group(1)), images_per_second=float(rate.group(2).replace(",", "")),
                test_accuracy=float(accuracy.group(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--presets", nargs="+", default=["seed", "fast"])
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ddp_results.json"))
    args = parser.parse_args()
    results: dict[str, dict[int, list[dict]]] = {p: {n: [] for n in args.nproc} for p in args.presets}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.repeats):
            for preset in args.presets:
                for nproc in args.nproc:
                    results[preset][nproc].append(run_once(preset, nproc, args, Path(tmp), index))
    print("| preset | processes | images/s (median) | min-max | vs 1 process | test accuracy (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset, by_count in results.items():
        base = statistics.median(r["images_per_second"] for r in by_count[min(args.nproc)])
        for nproc, rows in by_count.items():
            rates = [r["images_per_second"] for r in rows]
            accuracy = statistics.median(r["test_accuracy"] for r in rows)
            print(f"| {preset} | {nproc} | {statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
                  f"{statistics.median(rates) / base:.2f}x | {accuracy:.4f} |")
    recorded = {k: str(v) for k, v in vars(args).items() if k != "out"}  # where it was written says nothing
    args.out.write_text(json.dumps(dict(args=recorded, results=results), indent=2))


if __name__ == "__main__":
    main()
