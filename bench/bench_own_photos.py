"""The default command on a folder of one's own photos, against a plain PyTorch notebook on the same files.

    python bench/bench_own_photos.py FOLDER [--seeds 0] [--reference-epochs 10] [-- extra cnnlab train args]

For each seed: `cnnlab train --dataset FOLDER --seed S` exactly as a user types it (whatever model cnnlab
chooses), timed as a whole process, its test accuracy read from test.json; then the reference, a plain
PyTorch loop a practitioner writes in a notebook: Pillow opens each file, converts it to RGB and resizes it to
32x32 (squashed), the lesson's CNN widened to three channels (Conv2D(32, 3x3) -> MaxPool -> Dense(128) ->
Dense(classes)), Adam 1e-3, batch 32, on the same training and test files (cnnlab's split, read from the
folder by path hashes; nothing of cnnlab runs in its loop). Both run in this one process's turn, one after
the other, so the machine's speed is the same for both. Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cnnlab(folder: Path, seed: int, extra: list[str]) -> dict:
    """The user's command, timed from outside; its test accuracy and the model it chose."""
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, "-m", "cnnlab", "train", "--dataset", str(folder), "--seed", str(seed),
                   "--runs-dir", runs, "--name", "bench", "--quiet", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        test = json.loads((Path(runs) / "bench" / "test.json").read_text())
        config = (Path(runs) / "bench" / "config.yaml").read_text()
        model = next(line.split(":", 1)[1].strip() for line in config.splitlines() if line.strip().startswith("name:"))
        return {"what": "cnnlab train (default)", "seed": seed, "model": model, "wall_seconds": round(wall, 1),
                "test_accuracy": test["accuracy"], "test_images": test["num_images"]}


def split_files(folder: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], list[str]]:
    """(train files, test files, classes) as cnnlab splits the folder (validation files are left out)."""
    sys.path.insert(0, str(SRC))
    from cnnlab.data.folder import open_image_folder

    opened = open_image_folder(folder, workers=0)
    pick = lambda source: [(source.path(i), int(source.labels[i])) for i in range(len(source))]  # noqa: E731
    return pick(opened.train), pick(opened.test), list(opened.classes)


def load_plain(files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a notebook does: open, RGB, resize to 32x32, scale to [0, 1]; unreadable files dropped."""
    images, labels = [], []
    for path, label in files:
        try:
            with Image.open(path) as picture:
                images.append(np.asarray(picture.convert("RGB").resize((32, 32)), dtype=np.float32) / 255)
        except OSError:
            continue
        labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def run_reference(folder: Path, seed: int, epochs: int) -> dict:
    started = time.perf_counter()
    train_files, test_files, classes = split_files(folder)
    (x, y), (tx, ty) = load_plain(train_files), load_plain(test_files)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(15 * 15 * 32, 128), nn.ReLU(), nn.Linear(128, len(classes)))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(tx).argmax(1) == ty).float().mean())
    return {"what": f"plain PyTorch notebook ({epochs} epochs)", "seed": seed,
            "wall_seconds": round(time.perf_counter() - started, 1), "test_accuracy": accuracy,
            "test_images": len(ty)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reference-epochs", type=int, default=10)
    parser.add_argument("extra", nargs="*", help="after --: more `cnnlab train` arguments")
    args = parser.parse_args()
    for seed in args.seeds:
        print(json.dumps(run_cnnlab(args.folder, seed, args.extra)), flush=True)
        print(json.dumps(run_reference(args.folder, seed, args.reference_epochs)), flush=True)


if __name__ == "__main__":
    main()
