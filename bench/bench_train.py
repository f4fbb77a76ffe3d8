"""Train presets on full datasets and report test accuracy, seconds per epoch and peak memory.

    python bench/bench_train.py --data-dir DIR --runs mnist:seed fashion-mnist:seed mnist:deep ...

Each run is a fresh subprocess (so peak RSS is that run's own) running `cnnlab train`. Prints a
Markdown table and writes the rows as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(dataset: str, model: str, args: argparse.Namespace, root: Path) -> dict:
    name = f"{dataset}-{model}"
    cmd = [sys.executable, "-m", "cnnlab", "train", "--dataset", dataset, "--model", model, "--runs-dir", str(root),
           "--name", name, "--quiet", "--seed", str(args.seed)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.allow_checksum_mismatch:
        cmd += ["--allow-checksum-mismatch"]
    for item in args.set or []:
        cmd += ["--set", item]
    started = time.perf_counter()
    process = subprocess.Popen(cmd)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    metrics = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    test = json.loads((root / name / "test.json").read_text())
    epoch_seconds = sorted(m["seconds"] for m in metrics)
    return dict(dataset=dataset, model=model, epochs=len(metrics), test_accuracy=test["accuracy"],
                val_accuracy=metrics[-1]["val_accuracy"], median_epoch_seconds=epoch_seconds[len(epoch_seconds) // 2],
                total_epoch_seconds=sum(epoch_seconds), process_wall_seconds=wall,
                peak_rss_mib=usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="dataset:preset pairs")
    parser.add_argument("--data-dir", help="folder holding <dataset>/<IDX files>")
    parser.add_argument("--allow-checksum-mismatch", action="store_true")
    parser.add_argument("--set", action="append", help="config override passed to every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/train_results.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.runs:
            dataset, model = pair.split(":")
            rows.append(run_one(dataset, model, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(dict(machine=platform.platform(), rows=rows), indent=2) + "\n")
    print("\n| dataset | model | epochs | test acc | s/epoch (median) | process wall s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {r['model']} | {r['epochs']} | {r['test_accuracy']:.4f} | "
              f"{r['median_epoch_seconds']:.1f} | {r['process_wall_seconds']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
