"""Serving speed: `POST /api/predict` latency and requests/s over loopback, batched against one pass per request,
and the models' batch inference throughput.

    python bench/bench_serve.py --requests 320 --repeats 5 --threads 2

1. Latency: two servers, each one uvicorn process configured as `cnnlab serve` runs it, serve the `seed` preset
   (random weights: speed does not depend on what was learned): "one at a time" (`--max-batch 1`: a forward pass
   per request, the server before dynamic batching) and "batched" (`cnnlab serve`'s defaults, or --max-batch /
   --max-wait-ms here). The clients run in a process of their own: 1, 16 and 64 of them at once (--clients), each
   uploading a 280x280 PNG drawing (as the demo page's canvas does) --requests / clients times in a row over a
   kept-alive connection, timing each request. Each repeat measures every (clients, server) pair, servers
   alternating, so that machine noise hits both alike; the table gives the median over --repeats of each
   measurement's p50, p99 and requests/s, and the batched server's mean images per forward pass.
2. `?details=true` (+ feature maps, what the demo page asks for), 1 client, batched server.
3. Throughput: `seed` and `deep` (built from their presets) run inference on batches of 256 random 28x28 images,
   channels-last, as `cnnlab evaluate` does; reported in images/s (best of --repeats).
Loopback only (127.0.0.1); nothing is downloaded. Prints Markdown tables.
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Server:
    """One server under test: its label in the table and its batching options (those of `cnnlab serve`)."""

    label: str
    max_batch: int
    max_wait_ms: float


def serve(run: Path, port: int, threads: int, max_batch: int, max_wait_ms: float) -> None:
    """The server process: the app and uvicorn configuration `cnnlab serve --max-batch ... --max-wait-ms ...` runs,
    plus GET /bench/passes (forward passes run so far)."""
    import torch
    import uvicorn

    from cnnlab.use.serve import create_app
    from cnnlab.use.serve.batching import BatchSettings
    from cnnlab.use.serve.server import server_config

    torch.set_num_threads(threads)
    application = create_app([run], batching=BatchSettings(max_batch=max_batch, max_wait_ms=max_wait_ms))
    batchers = application.state.batchers
    application.get("/bench/passes")(lambda: {"passes": sum(b.passes for b in batchers.values())})
    uvicorn.Server(server_config(application, "127.0.0.1", port)).run()


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


# ----------------------------------------------------------------------- the clients' process
def measure(url: str, clients: int, per_client: int, details: bool) -> tuple[list[float], float]:
    """In the clients' process: every request's latency (seconds) and the wall time of the whole run."""
    return asyncio.run(client_latencies(url, drawing_png(), clients, per_client, details))


async def client_latencies(url: str, body: bytes, clients: int, per_client: int,
                           details: bool) -> tuple[list[float], float]:
    """`clients` concurrent clients (one kept-alive connection each), `per_client` requests each, one after another."""
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
                response.raise_for_status()  # a 503 or 504 would be a fast wrong answer: stop the benchmark
            return times

        await asyncio.gather(*(one_client() for _ in range(clients)))  # warm-up: connections, first passes
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client() for _ in range(clients)))
        return [t for times in results for t in times], time.perf_counter() - start


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


def passes_so_far(url: str) -> int:
    import httpx

    return int(httpx.get(url + "/bench/passes", timeout=10).json()["passes"])


def latency_rows(run: Path, servers: list[Server], client_counts: list[int], requests: int, repeats: int,
                 threads: int) -> list[dict]:
    """Median p50, p99 and requests/s over `repeats` for every (clients, server); then ?details=true, 1 client."""
    context = multiprocessing.get_context("spawn")
    urls, processes = {}, []
    for server in servers:
        port = free_port()
        urls[server] = f"http://127.0.0.1:{port}"
        processes.append(context.Process(target=serve, daemon=True,
                                         args=(run, port, threads, server.max_batch, server.max_wait_ms)))
        processes[-1].start()
    try:
        for url in urls.values():
            wait_until_up(url)
        samples: dict[tuple[int, Server], list[dict]] = {}
        with ProcessPoolExecutor(1, mp_context=context) as clients_process:
            for _ in range(repeats):
                for clients in client_counts:
                    for server in servers:
                        per_client = max(1, requests // clients)
                        passes_before = passes_so_far(urls[server])
                        times, wall = clients_process.submit(measure, urls[server], clients, per_client, False).result()
                        passes = passes_so_far(urls[server]) - passes_before  # warm-up's included: 2x the requests
                        samples.setdefault((clients, server), []).append(dict(
                            p50=percentile(times, 50), p99=percentile(times, 99), rate=len(times) / wall,
                            per_pass=2 * len(times) / max(passes, 1), requests=len(times)))
            batched = servers[-1]
            details, wall = clients_process.submit(measure, urls[batched], 1, requests, True).result()
        rows = [dict(clients=clients, server=server, **{key: statistics.median(s[key] for s in runs)
                                                       for key in runs[0]})
                for (clients, server), runs in samples.items()]
        rows.append(dict(clients=1, server=batched, details=True, p50=percentile(details, 50),
                         p99=percentile(details, 99), rate=len(details) / wall, requests=len(details), per_pass=None))
        return rows
    finally:
        for process in processes:
            process.terminate()
            process.join(10)


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
    parser.add_argument("--requests", type=int, default=320, help="requests per latency measurement")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64], help="concurrent clients to measure")
    parser.add_argument("--max-batch", type=int, default=None, help="the batched server's (default: cnnlab serve's)")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="the batched server's (default: cnnlab serve's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (servers and throughput)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="images per throughput measurement")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from cnnlab.use.serve.batching import BatchSettings

    defaults = BatchSettings()
    batched = Server("batched", args.max_batch or defaults.max_batch,
                     defaults.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms)
    servers = [Server("one at a time", 1, 0.0), batched]
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run("seed", Path(tmp))
        latencies = latency_rows(run, servers, args.clients, args.requests, args.repeats, args.threads)
    speeds = {preset: throughput(preset, args.batch, args.images, args.repeats) for preset in ("seed", "deep")}
    print_tables(latencies, speeds, args, batched, load_before)


def print_tables(latencies: list[dict], speeds: dict[str, float], args: argparse.Namespace, batched: Server,
                 load_before: tuple[float, float, float]) -> None:
    import torch

    load = ", ".join(f"{x:.1f}" for x in load_before)
    print(f"cnnlab serve benchmark: torch {torch.__version__}, {args.threads} threads, Python "
          f"{platform.python_version()}, {platform.machine()}, {multiprocessing.cpu_count()} CPUs "
          f"(load average before: {load}); clients in their own process, on the same CPUs as the servers\n")
    print(f"Batched: --max-batch {batched.max_batch} --max-wait-ms {batched.max_wait_ms:g}; one at a time: "
          f"--max-batch 1. Medians of {args.repeats} repeats.\n")
    print("| POST /api/predict (seed) | clients | server | requests | p50 | p99 | requests/s | images/pass |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for row in sorted(latencies, key=lambda r: (r.get("details", False), r["clients"])):
        what = "?details=true (+ feature maps)" if row.get("details") else "plain"
        per_pass = "" if row["per_pass"] is None else f"{row['per_pass']:.1f}"
        print(f"| {what} | {row['clients']} | {row['server'].label} | {row['requests']:.0f} | "
              f"{1000 * row['p50']:.1f} ms | {1000 * row['p99']:.1f} ms | {row['rate']:.0f} | {per_pass} |")
    print("\n| measurement | images | time | throughput |")
    print("|---|---:|---:|---:|")
    print(f"| prepare one 280x280 PNG drawing (in process) | 50 | {preprocess_ms():.1f} ms | |")
    for preset, speed in speeds.items():
        print(f"| batch inference `{preset}`, batches of {args.batch} | {args.images} | | {speed:,.0f} images/s |")


if __name__ == "__main__":
    sys.exit(main())
