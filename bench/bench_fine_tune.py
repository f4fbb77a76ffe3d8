"""Does starting from a trained run pay on a small folder of one's own images? `--init-from` against
training from scratch with the same budget.

    python bench/bench_fine_tune.py --data-dir DIR --out bench/fine_tune_mnist.json

The folder: 500 MNIST test images redrawn in another style (strokes thickened by a 3x3 maximum, then
blurred; with --invert also dark ink on white paper), 50 per class, as PNG files under train/<class>/, with 200 more as
val/ and 2000 more as test/ (other test images: none was seen by the source run, which trains on
MNIST's training set). The source run is the `fast` preset on full MNIST. For each budget (epochs
on the folder) and seed, the same config trains on the folder once from scratch and once
`--init-from` the source (its features copied, a new classifier), all through pipeline.train as
`cnnlab train` runs it; the table is the median test accuracy per budget, and the gain.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

TRAIN, VAL, TEST = 500, 200, 2000


def restyled(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """A digit as another pen draws it: thicker strokes (3x3 max), softened edges; with `invert`, dark ink
    on white paper."""
    from PIL import Image, ImageFilter

    pixels = np.asarray(Image.fromarray(image).filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(0.8)))
    return 255 - pixels if invert else pixels


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, invert: bool = False) -> Path:
    from PIL import Image

    per_class = TRAIN // 10
    order = np.argsort(labels, kind="stable")
    chosen = np.concatenate([order[labels[order] == c][:per_class] for c in range(10)])  # 50 of each digit
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    splits = {"train": chosen, "val": rest[:VAL], "test": rest[VAL:VAL + TEST]}
    for split, index in splits.items():
        for i in index:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(restyled(images[i], invert)).save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 5, 10, 20],
                        help="budgets: epochs on the folder, the same both ways")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                        help="overrides for the fine-tuning runs only (e.g. train.features_lr_scale=0.1); "
                             "the runs from scratch train as the preset ships")
    parser.add_argument("--invert", action="store_true", help="also swap ink and paper in the folder's images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from cnnlab import pipeline
    from cnnlab.config import load_config
    from cnnlab.data import load_dataset

    torch.set_num_threads(args.threads)
    mnist = load_dataset("mnist", args.data_dir, allow_mismatch=True, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_folder(root / "digits", mnist.test_images, mnist.test_labels, args.invert)
        source = pipeline.train(load_config("fast", overrides=["data.dataset=mnist"]), root / "runs", name="source",
                                progress=False, dataset=mnist)
        print(f"source: fast on MNIST, test {source.test.accuracy:.4f}", flush=True)
        rows, budgets = [], []
        for epochs in args.epochs:
            base = [f"data.dataset={folder}", "data.image_size=28", "data.channels=1", "data.workers=0",
                    f"train.epochs={epochs}"]
            for seed in range(args.seeds):
                for way in ("scratch", "init-from"):
                    extra = [f"train.init_from={source.run}", *args.overrides] if way == "init-from" else []
                    config = load_config("fast", overrides=[*base, f"train.seed={seed}", *extra])
                    result = pipeline.train(config, root / "runs", name=f"{way}-{epochs}-{seed}", progress=False)
                    rows.append(dict(epochs=epochs, way=way, seed=seed, test_accuracy=result.test.accuracy,
                                     val_accuracy=result.history[-1]["val_accuracy"],
                                     train_seconds=result.train_seconds))
                    print(f"  {epochs:3} epochs {way:9} seed {seed}: test {result.test.accuracy:.4f} "
                          f"({result.train_seconds:.1f}s)", flush=True)
            median = {way: statistics.median(r["test_accuracy"] for r in rows if r["way"] == way
                                             and r["epochs"] == epochs) for way in ("scratch", "init-from")}
            gain = 100 * (median["init-from"] - median["scratch"])
            budgets.append(dict(epochs=epochs, median=median, gain_points=gain))
            print(f"{epochs} epochs: median test accuracy scratch {median['scratch']:.4f}, --init-from "
                  f"{median['init-from']:.4f} ({gain:+.1f} points)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(source_test=source.test.accuracy, overrides=args.overrides,
                                            invert=args.invert, budgets=budgets, rows=rows, train_images=TRAIN,
                                            val_images=VAL, test_images=TEST), indent=1) + "\n")


if __name__ == "__main__":
    main()
