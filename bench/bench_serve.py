"""Serving speed: `POST /api/predict` latency and requests/s over loopback, `cnnlab serve` of this tree against
`cnnlab serve` of another tree (the tree before a change) measured in the same run.

    python bench/bench_serve.py --before ../cnnlab-before --requests 320 --repeats 3 --clients 1 16 64

1. Latency: each tree's `cnnlab serve` (its own CLI, its defaults, as a user starts it; --serve-args adds options
   to this tree's) serves the `seed` preset (random weights: speed does not depend on what was learned). The
   clients run in a process of their own: 1, 16 and 64 of them at once (--clients), each on its own kept-alive
   connection, sending a 280x280 PNG drawing (as the demo page's canvas does) --requests / clients times in a row
   and timing each request, after a warm-up round on the same connections. Every tree gets the same multipart
   form (field `file`, as the page and `curl -F` send it); this tree is also measured with the PNG as the raw
   body (Content-Type: image/png), which trees before issue 31 do not accept. Each repeat measures every
   (clients, server) pair, servers alternating, so that machine noise hits all alike; the table gives the median
   over --repeats of each measurement's p50, p99 and requests/s, and the requests that failed (HTTP errors,
   connections closed or reset) summed over the repeats, and the server process's CPU time per request (all its
   threads, from /proc), which a loaded machine stretches far less than wall times.
2. The client (--client): `raw` (default) writes prepared HTTP/1.1 requests on asyncio streams, so that its own
   cost (~0.1 ms a request) does not hide the servers'; `httpx` is the client of issue 17's table (httpx's pool,
   ~1-2 ms of CPU a request), kept to compare with it.
3. The recipe: milliseconds to read and prepare the drawing, with each tree's recipes, in a process of its own.
Loopback only (127.0.0.1); nothing is downloaded. Prints Markdown tables and `uptime` before and after.
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
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

HERE = Path(__file__).resolve().parent.parent  # this tree
BOUNDARY = b"cnnlab-bench-7a1c"


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


def drawing_png() -> bytes:
    """A 280x280 canvas-like PNG: a black '7' on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(image).line([(80, 60), (200, 60), (120, 230)], fill="black", width=20)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- servers
@dataclass(frozen=True)
class Server:
    """One `cnnlab serve` under test: the tree it runs from and the options it gets."""

    label: str
    tree: Path
    options: tuple[str, ...] = ()
    raw_body: bool = True  # whether it takes the picture as the body (this tree) or only a form


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(server: Server, run: Path) -> Iterator[tuple[str, int]]:
    """`python -m cnnlab serve RUN` of the server's tree, in a process of its own; yields its URL and process id."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(server.tree / "src")}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(run), "--port", str(port),
                                    *server.options], cwd=server.tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_up(url, process, log)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until_up(url: str, process: subprocess.Popen, log: IO[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server stopped (exit {process.returncode}): {log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/api/model", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url}: the server did not start within {timeout:g} s")


# ----------------------------------------------------------------------------------------- clients
def request_bytes(port: int, picture: bytes, raw_body: bool) -> bytes:
    """One whole HTTP/1.1 request for POST /api/predict: the picture as the body, or as the form field `file`."""
    if raw_body:
        kind, body = b"image/png", picture
    else:
        kind = b"multipart/form-data; boundary=" + BOUNDARY
        body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="drawing.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + picture + b"\r\n--" + BOUNDARY + b"--\r\n")
    head = (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {kind.decode()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


@dataclass
class Measured:
    """One measurement: every answered request's latency (seconds), the wall time, and what failed."""

    times: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)
    server_cpu: float = float("nan")  # the server process's CPU seconds per request (all its threads)


def measure(url: str, clients: int, per_client: int, raw_body: bool, client: str) -> Measured:
    """In the clients' process: a warm-up round, then the measured one, on `clients` kept-alive connections."""
    picture = drawing_png()
    if client == "httpx":
        return asyncio.run(httpx_clients(url, picture, clients, per_client, raw_body))
    port = int(url.rsplit(":", 1)[1])
    return asyncio.run(raw_clients(port, request_bytes(port, picture, raw_body), clients, per_client))


async def raw_clients(port: int, request: bytes, clients: int, per_client: int) -> Measured:
    await raw_round(port, request, clients, per_client, Measured())  # warm-up: the server's first passes
    measured = Measured()
    start = time.perf_counter()
    await raw_round(port, request, clients, per_client, measured)
    measured.wall = time.perf_counter() - start
    return measured


async def raw_round(port: int, request: bytes, clients: int, per_client: int, measured: Measured) -> None:
    """One round on fresh connections: a connection kept from the warm-up would sit idle while the warm-up's
    slowest client finished, and the server closes one idle for its keep-alive timeout (5 s), which a loaded
    machine reaches at 64 clients (see BENCHMARKS.md, "Serving")."""
    async def client() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            measured.errors.append(f"connect: {type(exc).__name__}: {exc}"[:120])
            return
        try:
            await one_client(reader, writer, request, per_client, measured)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))


async def one_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, count: int,
                     measured: Measured) -> None:
    """`count` requests one after another on one connection; a failed connection ends this client."""
    for _ in range(count):
        start = time.perf_counter()
        try:
            writer.write(request)
            status, body = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            measured.errors.append(f"{type(exc).__name__}: {exc}"[:120])
            return
        measured.times.append(time.perf_counter() - start)
        if status != 200:
            measured.errors.append(f"HTTP {status}: {body[:100]!r}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and body of one HTTP/1.1 response with a Content-Length (as uvicorn sends JSON)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def httpx_clients(url: str, picture: bytes, clients: int, per_client: int, raw_body: bool) -> Measured:
    """Issue 17's client: one httpx.AsyncClient whose pool holds a connection per client."""
    import httpx

    async def one(client: httpx.AsyncClient, measured: Measured) -> None:
        for _ in range(per_client):
            start = time.perf_counter()
            try:
                if raw_body:
                    response = await client.post("/api/predict", content=picture, headers={"Content-Type": "image/png"})
                else:
                    response = await client.post("/api/predict", files={"file": ("drawing.png", picture, "image/png")})
            except httpx.HTTPError as exc:
                measured.errors.append(f"{type(exc).__name__}: {exc!r}"[:120])
                return
            measured.times.append(time.perf_counter() - start)
            if response.status_code != 200:
                measured.errors.append(f"HTTP {response.status_code}: {response.text[:100]}")

    async def round_(measured: Measured) -> None:  # a client (and pool) per round: see raw_round
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            await asyncio.gather(*(one(client, measured) for _ in range(clients)))

    await round_(Measured())
    measured = Measured()
    start = time.perf_counter()
    await round_(measured)
    measured.wall = time.perf_counter() - start
    return measured


# ----------------------------------------------------------------------------------------- the run
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all its threads (Linux /proc; NaN elsewhere).

    A loaded machine stretches wall times by how many processes share the cores; the CPU a request costs the
    server is stretched far less, so it says what the server would do on a quiet machine (cores / CPU a request).
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def latency_rows(run: Path, servers: list[Server], client_counts: list[int], requests: int, repeats: int,
                 client: str) -> list[dict]:
    """Median p50, p99 and requests/s over `repeats` for every (clients, server, body); failures summed."""
    context = multiprocessing.get_context("spawn")
    cases = [(server, raw) for server in servers for raw in ((False, True) if server.raw_body else (False,))]
    samples: dict[tuple[int, Server, bool], list[Measured]] = {}
    with ProcessPoolExecutor(1, mp_context=context) as clients_process, multiple_running(servers, run) as urls:
        for _ in range(repeats):
            for clients in client_counts:
                for server, raw in cases:
                    per_client = max(1, requests // clients)
                    url, pid = urls[server]
                    cpu_before = cpu_seconds(pid)
                    measured = clients_process.submit(measure, url, clients, per_client, raw,
                                                      client).result()
                    # the server's CPU time per request, warm-up round included (as many requests as measured)
                    measured.server_cpu = (cpu_seconds(pid) - cpu_before) / max(2 * len(measured.times), 1)
                    samples.setdefault((clients, server, raw), []).append(measured)
    rows = []
    for (clients, server, raw), runs in samples.items():
        rows.append(dict(clients=clients, server=server, raw=raw,
                         requests=statistics.median(len(m.times) for m in runs),
                         p50=statistics.median(percentile(m.times, 50) for m in runs),
                         p99=statistics.median(percentile(m.times, 99) for m in runs),
                         rate=statistics.median(len(m.times) / m.wall if m.wall else 0.0 for m in runs),
                         cpu=statistics.median(m.server_cpu for m in runs),
                         errors=[e for m in runs for e in m.errors]))
    return rows


@contextmanager
def multiple_running(servers: list[Server], run: Path) -> Iterator[dict[Server, tuple[str, int]]]:
    """Every server started (one after another, so their start-up does not overlap), all stopped at the end."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield {server: stack.enter_context(running(server, run)) for server in servers}


PREPARE_TIMING = """
import io, statistics, sys, time
from PIL import Image, ImageDraw
from cnnlab.use.recipes import prepare
image = Image.new("RGB", (280, 280), "white")
ImageDraw.Draw(image).line([(80, 60), (200, 60), (120, 230)], fill="black", width=20)
buffer = io.BytesIO()
image.save(buffer, format="PNG")
body = buffer.getvalue()
for _ in range(20):
    prepare(body, "digits")
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    prepare(body, "digits")
    times.append(time.perf_counter() - start)
print(1000 * statistics.median(times), 1000 * min(times))
"""


def preprocess_ms(tree: Path, repeats: int = 300) -> tuple[float, float]:
    """Median and fastest milliseconds to read and prepare the 280x280 PNG drawing (digits recipe) with `tree`'s
    recipes, in a process of its own (the drawing as drawing_png makes it)."""
    done = subprocess.run([sys.executable, "-c", PREPARE_TIMING, str(repeats)], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(tree / "src")})
    median, fastest = done.stdout.split()
    return float(median), float(fastest)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=None,
                        help="another tree (a git worktree) whose `cnnlab serve` to measure in the same run")
    parser.add_argument("--serve-args", default="", help="options for this tree's `cnnlab serve` (e.g. '--workers 2')")
    parser.add_argument("--requests", type=int, default=320, help="requests per latency measurement")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64], help="concurrent clients to measure")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="the clients' HTTP library")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    servers = ([Server("before", args.before.resolve(), raw_body=False)] if args.before else [])
    servers.append(Server("this tree", HERE, tuple(args.serve_args.split())))
    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run("seed", Path(tmp))
        rows = latency_rows(run, servers, args.clients, args.requests, args.repeats, args.client)
    print_tables(rows, args, before, uptime())


def print_tables(rows: list[dict], args: argparse.Namespace, before: str, after: str) -> None:
    import torch

    print(f"cnnlab serve benchmark: torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {multiprocessing.cpu_count()} CPUs; {args.client} clients in their own process, "
          f"on the same CPUs as the servers. Medians of {args.repeats} repeats.\n")
    print(f"`uptime` before: `{before}`; after: `{after}`\n")
    for server in dict.fromkeys(row["server"] for row in rows):
        options = " ".join(server.options)
        print(f"- {server.label}: `cnnlab serve RUN{' ' + options if options else ''}` from {server.tree}")
    print("\n| POST /api/predict (seed) | clients | server | requests | p50 | p99 | requests/s | server CPU a request "
          "| failed |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in sorted(rows, key=lambda r: (r["clients"], r["raw"], r["server"].label != "before")):
        body = "PNG as the body" if row["raw"] else "multipart form"
        print(f"| {body} | {row['clients']} | {row['server'].label} | {row['requests']:.0f} | "
              f"{1000 * row['p50']:.1f} ms | {1000 * row['p99']:.1f} ms | {row['rate']:.0f} | "
              f"{1000 * row['cpu']:.2f} ms | {len(row['errors'])} |")
    rates = {(r["clients"], r["server"].label, r["raw"]): r["rate"] for r in rows}
    cpus = {(r["clients"], r["server"].label, r["raw"]): r["cpu"] for r in rows}
    if args.before is not None:
        print("\n| clients | requests/s: this tree / before (form) | (PNG as the body) / before (form) "
              "| server CPU a request: before (form) / this tree (form) | before (form) / this tree (PNG body) |")
        print("|---:|---:|---:|---:|---:|")
        for clients in args.clients:
            base, cpu = rates.get((clients, "before", False)) or float("nan"), cpus[(clients, "before", False)]
            mine = (clients, "this tree")
            print(f"| {clients} | {rates[(*mine, False)] / base:.2f}x | {rates[(*mine, True)] / base:.2f}x | "
                  f"{cpu / cpus[(*mine, False)]:.2f}x | {cpu / cpus[(*mine, True)]:.2f}x |")
    failures = [e for row in rows for e in row["errors"]]
    if failures:
        print(f"\n{len(failures)} failed requests, e.g.: " + "; ".join(dict.fromkeys(failures[:20])))
    print("\n| read and prepare one 280x280 PNG drawing (digits recipe), 300 times | median | fastest |")
    print("|---|---:|---:|")
    for server in dict.fromkeys(row["server"] for row in rows):
        median, fastest = preprocess_ms(server.tree)
        print(f"| {server.label} | {median:.2f} ms | {fastest:.2f} ms |")


if __name__ == "__main__":
    sys.exit(main())
