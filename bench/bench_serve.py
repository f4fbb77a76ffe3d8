"""Serving speed: `POST /api/predict` latency over loopback, and the models' batch inference throughput.

    python bench/bench_serve.py --requests 200 --threads 2

1. Latency: the web app (uvicorn, one worker process) serves the `seed` preset (random weights: speed does not
   depend on what was learned); clients upload a 280x280 PNG drawing, as the demo page's canvas does, and time
   each request. 1 client sends --requests requests one after another; 16 clients send --requests / 16 each, all
   at once. Reported: p50 / p99 per request, and requests/s.
2. Throughput: `seed` and `deep` (built from their presets) run inference on batches of 256 random 28x28 images,
   channels-last, as `cnnlab evaluate` does; reported in images/s (best of --repeats).
Loopback only (127.0.0.1); nothing is downloaded. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_run(preset: str, root: Path) -> Path:
    """A run directory with a freshly initialised model of `preset` (config.yaml + model.safetensors)."""
    from cnnlab.config import load_config
    from cnnlab.data import get_dataset
    from cnnlab.models.cnn import build_model
    from cnnlab.runs import layout, records
    from cnnlab.runs.weights import save_weights

    config = load_config(preset)
    spec = get_dataset(config.data.dataset)
    run = layout.new_run(config, root, name=preset)
    records.save_config(run, config)
    save_weights(run, build_model(config.model, spec.image_shape, spec.num_classes, seed=0), spec.classes)
    return run


def serve(run: Path, port: int, threads: int) -> None:
    """The server process: the app as `cnnlab serve` runs it."""
    import torch
    import uvicorn

    from cnnlab.use.serve import create_app

    torch.set_num_threads(threads)
    uvicorn.run(create_app([run]), host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drawing_png() -> bytes:
    """A 280x280 canvas-like PNG: a black '7' on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(image).line([(80, 60), (200, 60), (120, 230)], fill="black", width=20)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def client_latencies(url: str, body: bytes, clients: int, per_client: int,
                           details: bool) -> tuple[list[float], float]:
    """Latency of every request (seconds) with `clients` concurrent clients, and the wall time of the whole run."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    params = {"details": "true"} if details else {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one_client() -> list[float]:
            times = []
            for _ in range(per_client):
                start = time.perf_counter()
                response = await client.post("/api/predict", files={"file": ("drawing.png", body, "image/png")},
                                             params=params)
                times.append(time.perf_counter() - start)
                response.raise_for_status()
            return times

        await one_client_warmup(client, body)
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client() for _ in range(clients)))
        return [t for times in results for t in times], time.perf_counter() - start


async def one_client_warmup(client, body: bytes, count: int = 10) -> None:
    for _ in range(count):
        (await client.post("/api/predict", files={"file": ("drawing.png", body, "image/png")})).raise_for_status()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def wait_until_up(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/api/model", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def latency_rows(run: Path, requests: int, threads: int) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(run, port, threads), daemon=True)
    server.start()
    try:
        wait_until_up(url)
        body = drawing_png()
        rows = []
        for clients, details in ((1, False), (16, False), (1, True)):
            per_client = max(1, requests // clients)
            times, wall = asyncio.run(client_latencies(url, body, clients, per_client, details))
            rows.append(dict(clients=clients, details=details, requests=len(times), p50=percentile(times, 50),
                             p99=percentile(times, 99), rate=len(times) / wall))
        return rows
    finally:
        server.terminate()
        server.join(10)


def throughput(preset: str, batch: int, total: int, repeats: int) -> float:
    """Best images/s of `evaluate.infer` over `total` random images in batches of `batch`."""
    import torch

    from cnnlab.config import load_config
    from cnnlab.models.cnn import build_model
    from cnnlab.training.evaluate import infer

    model = build_model(load_config(preset).model, seed=0).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (total, 28, 28), dtype=np.uint8))
    infer(model, images[:batch], batch, channels_last=True)  # warm-up: first calls allocate
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        infer(model, images, batch, channels_last=True)
        best = max(best, total / (time.perf_counter() - start))
    return best


def preprocess_ms(repeats: int = 50) -> float:
    """Median milliseconds to read and prepare one 280x280 PNG drawing (digits recipe)."""
    from cnnlab.use.recipes import prepare

    body = drawing_png()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        prepare(body, "digits")
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per latency measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (server and throughput)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="images per throughput measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run("seed", Path(tmp))
        latencies = latency_rows(run, args.requests, args.threads)
    speeds = {preset: throughput(preset, args.batch, args.images, args.repeats) for preset in ("seed", "deep")}

    load = ", ".join(f"{x:.1f}" for x in load_before)
    print(f"cnnlab serve benchmark: torch {torch.__version__}, {args.threads} threads, Python "
          f"{platform.python_version()}, {platform.machine()}, {multiprocessing.cpu_count()} CPUs "
          f"(load average before: {load}); client and server share the CPUs\n")
    print("| measurement | requests | p50 | p99 | throughput |")
    print("|---|---:|---:|---:|---:|")
    for row in latencies:
        what = f"POST /api/predict (seed), {row['clients']} client{'s' if row['clients'] > 1 else ''}"
        what += ", ?details=true (+ feature maps)" if row["details"] else ""
        print(f"| {what} | {row['requests']} | {1000 * row['p50']:.1f} ms | {1000 * row['p99']:.1f} ms | "
              f"{row['rate']:.0f} req/s |")
    print(f"| prepare one 280x280 PNG drawing (in process) | 50 | {preprocess_ms():.1f} ms | | |")
    for preset, speed in speeds.items():
        print(f"| batch inference `{preset}`, batches of {args.batch} | {args.images} images | | | "
              f"{speed:,.0f} images/s |")


if __name__ == "__main__":
    sys.exit(main())
