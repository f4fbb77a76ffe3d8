"""Draw the shipped offline samples from the real datasets (run once; the output is committed).

    python scripts/make_samples.py --mnist DIR --fashion DIR

mnist-sample is drawn from the official MNIST *test* files only (train and test parts disjoint);
fashion-mnist-sample from the official Fashion-MNIST train and test files. Draws are seeded and
stratified by class so every class is represented evenly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cnnlab.data.idx import read_idx, write_idx

OUT = Path(__file__).resolve().parents[1] / "src" / "cnnlab" / "data" / "samples"
TRAIN_SIZE, TEST_SIZE = 4000, 1000


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator,
               exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of `per_class` examples of every class, in a shuffled order."""
    taken = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude)
        taken.append(rng.choice(pool, per_class, replace=False))
    return rng.permutation(np.concatenate(taken))


def write_sample(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> None:
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "train-images-idx3-ubyte.gz", train[0])
    write_idx(out / "train-labels-idx1-ubyte.gz", train[1])
    write_idx(out / "t10k-images-idx3-ubyte.gz", test[0])
    write_idx(out / "t10k-labels-idx1-ubyte.gz", test[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, required=True, help="folder with the official MNIST IDX files")
    parser.add_argument("--fashion", type=Path, required=True, help="folder with the Fashion-MNIST IDX files")
    args = parser.parse_args()
    rng = np.random.default_rng(20261124)

    x = read_idx(args.mnist / "t10k-images-idx3-ubyte.gz")
    y = read_idx(args.mnist / "t10k-labels-idx1-ubyte.gz")
    test = stratified(y, TEST_SIZE // 10, rng)
    train = stratified(y, TRAIN_SIZE // 10, rng, exclude=test)
    write_sample("mnist-sample", (x[train], y[train]), (x[test], y[test]))

    xtr = read_idx(args.fashion / "train-images-idx3-ubyte.gz")
    ytr = read_idx(args.fashion / "train-labels-idx1-ubyte.gz")
    xte = read_idx(args.fashion / "t10k-images-idx3-ubyte.gz")
    yte = read_idx(args.fashion / "t10k-labels-idx1-ubyte.gz")
    train = stratified(ytr, TRAIN_SIZE // 10, rng)
    test = stratified(yte, TEST_SIZE // 10, rng)
    write_sample("fashion-mnist-sample", (xtr[train], ytr[train]), (xte[test], yte[test]))


if __name__ == "__main__":
    main()
