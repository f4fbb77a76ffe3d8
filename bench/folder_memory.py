"""Peak memory of training on an image folder streamed from disk, against the folder's decoded size.

Writes N synthetic JPEG images (one sub-folder per class) and trains one epoch of the `perceptron`
preset on them in a fresh process, then reports that process's peak RSS and its DataLoader
workers', streaming (data.memory_mb=0: a folder that fits the budget is otherwise decoded into memory).
Streaming means the peak stays flat as N grows; an in-memory copy would add N x H x W x C
bytes. tests/test_folder_training.py runs this at two sizes and compares.

    python bench/folder_memory.py --images 16000 --size 96 [--workers 2] [--folder DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys
from cnnlab import pipeline
from cnnlab.config import load_config
folder, size, workers, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = load_config("perceptron", None, [f"data.image_size={size}", f"data.workers={workers}",
                     "data.memory_mb=0", "train.epochs=1", "train.batch_size=64"], data=dict(dataset=folder))
result = pipeline.train(config, runs, name="memory", progress=False)
print(json.dumps(dict(main_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      worker_peak_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      trained=len(result.history), test_images=int(result.test.confusion.sum()),
                      images_per_second=result.images_per_second)))
"""


def write_folder(root: Path, images: int, size: int, classes: int = 4, seed: int = 0) -> None:
    """`images` JPEGs of size x size pixels: smooth colour gradients (small on disk, full size decoded)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        pixels = (ramp[:, None, None] * colour + ramp[None, :, None] * (255 - colour)) / 2
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{i % classes}" / f"{i}.jpg", quality=80)


def measure(folder: Path, size: int, workers: int, runs: Path) -> dict:
    """Train once in a fresh process; its peak RSS and its workers' (MiB)."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(size), str(workers), str(runs)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--size", type=int, default=96, help="pixels per side, on disk and as trained")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", type=Path, help="reuse (or create) the images here instead of a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "images"
        if not folder.exists():
            write_folder(folder, args.images, args.size)
        report = measure(folder, args.size, args.workers, Path(tmp) / "runs")
    decoded = args.images * args.size * args.size * 3 / 2**20
    print(json.dumps(dict(images=args.images, size=args.size, workers=args.workers,
                          decoded_dataset_mib=round(decoded, 1), **report), indent=2))


if __name__ == "__main__":
    main()
