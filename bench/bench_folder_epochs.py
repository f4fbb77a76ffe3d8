"""Seconds of an image folder's second epoch: decoded once into memory (data.memory_mb, the default) against
streamed from disk every epoch (data.memory_mb=0, and the tree before the in-memory copy existed).

Each measurement is a fresh `python -m cnnlab train` of 2 epochs on the folder; the second epoch's seconds
come from the run's metrics.jsonl (the first includes the one-off decoding). Variants run in turn, A B C A B C
..., so a machine that slows down slows all of them alike.

    python bench/bench_folder_epochs.py FOLDER [--against OTHER_SRC] [--repeats 3] [--model seed] [--size 32]

--against: another checkout's src/ folder (e.g. a `git worktree` of the commit before), run with the same
python: its epoch is streamed as that tree always did.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def second_epoch(src: Path, folder: Path, extra: list[str], model: str, size: int) -> float:
    """Seconds of epoch 2 of a fresh 2-epoch training on `folder` with the cnnlab in `src`."""
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, "-m", "cnnlab", "train", "--dataset", str(folder), "--model", model,
                   "--epochs", "2", "--runs-dir", runs, "--name", "bench", "--quiet",
                   "--set", f"data.image_size={size}", *extra]
        env = {**os.environ, "PYTHONPATH": str(src)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        rows = [json.loads(line) for line in (Path(runs) / "bench" / "metrics.jsonl").read_text().splitlines()]
        return float(rows[1]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--against", type=Path, help="another tree's src/ folder, streamed as it does")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="seed")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    variants = {"in memory": (SRC, []), "streamed": (SRC, ["--set", "data.memory_mb=0"])}
    if args.against is not None:
        variants["tree before"] = (args.against, [])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (src, extra) in variants.items():
            seconds[name].append(second_epoch(src, args.folder, extra, args.model, args.size))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        ratio = medians[name] / medians["in memory"]
        print(f"{name:12} epoch 2: median {medians[name]:.2f} s  ({', '.join(f'{v:.2f}' for v in values)})  "
              f"{ratio:.1f}x the in-memory epoch")
    print(json.dumps({"folder": str(args.folder), "model": args.model, "size": args.size, "seconds": seconds}))


if __name__ == "__main__":
    main()
