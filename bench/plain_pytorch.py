"""The reference: the lesson's model trained the way a plain PyTorch tutorial trains it.

    python bench/plain_pytorch.py --data-dir DIR --dataset mnist [--epochs 4] [--seed 0]

No cnnlab code in the loop: float tensors in a TensorDataset, a DataLoader (shuffle, batch 32,
default collate), Adam 1e-3, cross-entropy, the lesson's Conv2D(32, 3x3) -> MaxPool -> Dense(128)
-> Dense(10). cnnlab is used only to read the IDX files. Prints one JSON line per epoch and a final
one with the test accuracy.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnlab.data import load_dataset


def lesson_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(13 * 13 * 32, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset, args.data_dir, allow_mismatch=True, progress=False)
    x_train = torch.from_numpy(data.train_images).float().div(255).unsqueeze(1)[5000:]  # hold out 5,000 as cnnlab does
    y_train = torch.from_numpy(data.train_labels)[5000:]
    x_test = torch.from_numpy(data.test_images).float().div(255).unsqueeze(1)
    y_test = torch.from_numpy(data.test_labels)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
    model = lesson_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        print(json.dumps(dict(epoch=epoch, seconds=time.perf_counter() - epoch_start)), flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(json.dumps(dict(test_accuracy=accuracy, seconds=time.perf_counter() - started, epochs=args.epochs)))


if __name__ == "__main__":
    main()
