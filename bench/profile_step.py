"""Where a training step's time goes: torch.profiler's top operators for one preset.

    python bench/profile_step.py --preset seed [--config FILE] [--batch-size 32] [--steps 100] [--nchw]

Runs the engine's own optimizer and model (random uint8 images: the cost does not depend on the
pixels) and prints the operators by self CPU time, plus ms per step.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cnnlab.config import load_config
from cnnlab.models.cnn import build_model
from cnnlab.training.evaluate import to_inputs
from cnnlab.training.optim import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--config", help="a YAML config file instead of a preset")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nchw", action="store_true", help="keep the default memory format (no channels-last)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(None if args.config else args.preset, args.config)
    batch = args.batch_size or config.train.batch_size
    model = build_model(config.model, seed=0)
    channels_last = not args.nchw
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config.train)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)
    images = torch.randint(0, 256, (batch * 20, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch * 20,))

    def step(i: int) -> None:
        part = slice((i % 20) * batch, (i % 20 + 1) * batch)
        loss = loss_fn(model(to_inputs(images[part], channels_last)), labels[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(10):  # warm-up
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for i in range(args.steps):
            step(i)
        per_step = (time.perf_counter() - started) / args.steps * 1000
    print(f"{args.preset}, batch {batch}, {'NCHW' if args.nchw else 'channels-last'}: {per_step:.2f} ms/step "
          f"(profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
