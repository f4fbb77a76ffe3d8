"""How many planted wrong labels `cnnlab show label-issues` finds (issue 28, point 7).

    python bench/bench_label_issues.py --images 6000 --noise 0.05 --epochs 4 --model fast \
        --idx /usr/share/datasets/fashion-mnist

Writes the first --images Fashion-MNIST test images as PNG files in one folder per class, moves --noise of them
(seeded) into another class's folder, trains a run on the folder (`cnnlab train --dataset FOLDER`, one thread),
then runs confident learning on the run's held-out splits (validation and test: the training split is not
checked, unless --folds K trains K runs on the training split's folds to judge it too). Reports the share of the
planted files that sit in the checked splits and appear in the top 2 x (that many) of the ranked list, and the
near-duplicates found across splits. Prints Markdown for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.data.idx import read_idx

CLASSES = ("T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def write_folder(idx: Path, root: Path, count: int, noise: float, seed: int) -> set[str]:
    """The images as root/<class>/<n>.png, `noise` of them filed under another class; returns the planted paths."""
    images = read_idx(idx / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(idx / "t10k-labels-idx1-ubyte.gz")[:count]
    rng = np.random.default_rng(seed)
    planted = set(rng.choice(count, size=round(noise * count), replace=False).tolist())
    given = labels.copy()
    for i in planted:
        given[i] = (labels[i] + rng.integers(1, len(CLASSES))) % len(CLASSES)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, given)):
        Image.fromarray(image).save(root / CLASSES[label] / f"{i:05d}.png")
    return {f"{CLASSES[given[i]]}/{i:05d}.png" for i in planted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=0, help="check the training split too, by this many folds")
    parser.add_argument("--idx", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fashion"
        planted = write_folder(args.idx, folder, args.images, args.noise, args.seed)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnlab", "train", "--dataset", str(folder), "--model", args.model,
                        "--epochs", str(args.epochs), "--threads", "1", "--quiet", "--set", "data.channels=1",
                        "--set", "data.image_size=28", "--set", "data.workers=1", "--runs-dir", f"{tmp}/runs",
                        "--name", "noisy"], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        trained = time.perf_counter() - started

        from cnnlab.inspect.label_issues import find_label_issues
        from cnnlab.inspect.show import LoadedRun

        started = time.perf_counter()
        from cnnlab.data.sources import load_data
        from cnnlab.pipeline import cross_validated

        loaded = LoadedRun(Path(tmp) / "runs" / "noisy")
        data = load_data(loaded.config, progress=False)
        by_folds = cross_validated(loaded.config, data, args.folds) if args.folds else None
        found = find_label_issues(loaded, data, by_folds)
        checked = time.perf_counter() - started
        held_out = set()
        from cnnlab.data.folder import open_image_folder

        split = open_image_folder(folder, (28, 28), 1, workers=0)
        for source in (split.train, split.val, split.test) if args.folds else (split.val, split.test):
            held_out |= {source.path(i).relative_to(folder).as_posix() for i in range(len(source))}
        planted_held_out = planted & held_out
        top = [issue.file for issue in found.issues[:2 * len(planted_held_out)]]
        hits = len(planted_held_out & set(top))
        accuracy = __import__("json").loads((Path(tmp) / "runs" / "noisy" / "test.json").read_text())["accuracy"]
    checked_splits = "all splits" if args.folds else "val+test"
    print(f"| images | planted | planted in {checked_splits} | flagged | found in top 2x | share | duplicates | "
          "test acc | train s | check s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.images:,} | {len(planted)} | {len(planted_held_out)} | {len(found.issues)} | {hits} | "
          f"{hits / max(1, len(planted_held_out)):.0%} | {len(found.duplicates)} | {accuracy:.3f} | "
          f"{trained:.0f} | {checked:.1f} |")


if __name__ == "__main__":
    main()
