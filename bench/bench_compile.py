"""Does torch.compile pay for cnnlab's training step on this machine? Eager against compiled, side by side.

    python bench/bench_compile.py --presets seed fast --rounds 3

Each measurement is its own process running the engine's model and fused optimizer on random uint8
batches (the cost does not depend on the pixels): 20 warm-up steps, then ms per step over --steps.
Rounds alternate eager and compiled processes so both see the same machine. The compiled step is
`torch.compile(model)` (inductor; forward and backward compiled, the fused optimizer as is), with its
cache in a fresh folder: the first compiled process pays the whole compile ("cold"), later ones load
the cached kernels ("warm"). Prints a Markdown table; --out writes every measurement as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(preset: str, batch: int | None, compiled: bool, steps: int, threads: int) -> dict:
    import torch

    from cnnlab.config import load_config

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_step import engine_step  # a sibling script

    torch.set_num_threads(threads)
    step, _, batch = engine_step(load_config(preset), batch, compiled=compiled, batches=20)

    started = time.perf_counter()
    step(0)
    first = time.perf_counter() - started  # includes the compile (or loading it from the cache)
    for i in range(1, 21):
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return dict(preset=preset, batch=batch, compiled=compiled, first_step_s=first,
                ms_per_step=(time.perf_counter() - started) / steps * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["seed", "fast"])
    parser.add_argument("--batch-size", type=int, help="default: each preset's own")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, mode = args.worker
        print(json.dumps(worker(preset, args.batch_size, mode == "compiled", args.steps, args.threads)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for preset in args.presets:
            for round_ in range(args.rounds):
                for mode in ("eager", "compiled"):
                    cmd = [sys.executable, __file__, "--worker", preset, mode, "--steps", str(args.steps),
                           "--threads", str(args.threads)]
                    cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                    rows.append(dict(json.loads(out.strip().splitlines()[-1]), round=round_))
                    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| preset | batch | eager ms/step | compiled ms/step | compiled / eager | first compile s (cold) | "
          "first step s (warm cache) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        eager = [r for r in rows if r["preset"] == preset and not r["compiled"]]
        compiled = [r for r in rows if r["preset"] == preset and r["compiled"]]
        e, c = statistics.median(r["ms_per_step"] for r in eager), statistics.median(r["ms_per_step"] for r in compiled)
        warm = statistics.median(r["first_step_s"] for r in compiled[1:]) if len(compiled) > 1 else float("nan")
        cold = compiled[0]["first_step_s"]
        print(f"| {preset} | {eager[0]['batch']} | {e:.2f} | {c:.2f} | {c / e:.2f}x | {cold:.1f} | {warm:.1f} |")


if __name__ == "__main__":
    main()
