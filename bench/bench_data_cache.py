"""Where the seconds of `cnnlab train` go besides training, with a cold and a warm decoded-data cache (issue 17).

    python bench/bench_data_cache.py [all|stages|whole] --runs 3 --dataset mnist --model fast \
        --data-dir /tmp/DATA --allow-checksum-mismatch

`stages` runs one fresh Python process that times each step of reading the dataset by hand (each file's
read, gunzip, SHA-256 and parse) and `load_dataset` with the decoded-data cache off, cold and warm.
`whole` runs the whole `cnnlab train` command, cold (an empty cache folder, $XDG_CACHE_HOME) and warm (the
folder the cold run filled) taking turns, --runs times each. Each run is the real command in a process of its
own (what the `cnnlab` script runs: `cnnlab.cli.app()`, then its way out, `exit_now`) with timers wrapped around
its steps: interpreter start-up, imports, loading the dataset, tensors and split, model, Trainer (optimizer and
schedule), run directory, the first training step, the training loop, the test evaluation, confusion.png;
"rest" is the wall time no timer covers (argument parsing, config, writing the run, interpreter exit). Its wall
time is compared with the training time the run reports (the sum of the epochs' `seconds` in metrics.jsonl,
what "trained in" rounds). `--against SRC` also times another source tree's cnnlab, pair for pair (before and
after a change, on the same machine). `all` (the default) runs both. Prints Markdown for BENCHMARKS.md; medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The body of the `stages` process: each data step timed once, in the order `load_dataset` takes them.
STAGES = r'''
import json, os, sys, time
marks, t = {}, time.perf_counter()
def mark(name):
    global t
    now = time.perf_counter(); marks[name] = marks.get(name, 0.0) + now - t; t = now
import hashlib
from cnnlab.data import loading
from cnnlab.data.idx import decompress, parse_idx, read_raw
from cnnlab.data.store import candidates
from cnnlab.data.registry import get_dataset
dataset, data_dir, allow = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1"
mark("-")
spec = get_dataset(dataset)
location = candidates(spec, data_dir)[0]
for file in spec.all_files():
    raw = read_raw(location.path(file)); mark("by hand: read the 4 .gz files")
    payload = decompress(raw, file.name); mark("by hand: gunzip")
    hashlib.sha256(payload).hexdigest(); mark("by hand: SHA-256 of the payloads")
    parse_idx(payload, file.name); mark("by hand: parse IDX (a native-order copy)")
os.environ["CNNLAB_DATA_CACHE"] = "off"
loading.load_dataset(dataset, data_dir, allow_mismatch=allow, progress=False)
mark("load_dataset, cache off")
del os.environ["CNNLAB_DATA_CACHE"]
loading.load_dataset(dataset, data_dir, allow_mismatch=allow, progress=False)
mark("load_dataset, cache cold (fills it)")
loading.load_dataset(dataset, data_dir, allow_mismatch=allow, progress=False)
mark("load_dataset, cache warm")
marks.pop("-")
print(json.dumps(marks))
'''

# The body of each `whole` run: `cnnlab train ...` (sys.argv after the first two) with timers around its steps.
RUNNER = r'''
import time
started_at = time.time()  # wall clock: the parent's launch time is on the same clock
import json, sys
out, launched_at = sys.argv[1], float(sys.argv[2])
spans = {"interpreter start-up": started_at - launched_at}
def clock(label, t):
    spans[label] = spans.get(label, 0.0) + time.perf_counter() - t
def timed(owner, name, label, first_only=False):
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            if not (first_only and label in spans):
                clock(label, t)
    setattr(owner, name, wrapper)
t = time.perf_counter(); import torch; clock("import torch", t)
t = time.perf_counter()
import cnnlab.cli, cnnlab.cli.training, cnnlab.pipeline, cnnlab.data.sources, cnnlab.training.engine
clock("import cnnlab (cli, pipeline)", t)
from cnnlab import pipeline
from cnnlab.data import sources
from cnnlab.training.engine import Trainer
timed(sources, "load_dataset", "load dataset (read, gunzip or cache, SHA-256, parse)")
timed(sources, "prepare_data", "to tensors and split")
timed(pipeline, "build_model", "build model")
timed(Trainer, "__init__", "Trainer (model to device, optimizer, schedule)")
timed(pipeline, "start_run", "run directory (config, summary, manifest)")
timed(Trainer, "fit", "training loop (validation included)")
timed(Trainer, "train_step", "of which: the first step", first_only=True)
timed(pipeline, "evaluate_source", "test evaluation")
timed(pipeline, "plot_confusion", "confusion.png (imports matplotlib)")
timed(pipeline, "train", "pipeline.train")
sys.argv = ["cnnlab", *sys.argv[3:]]
t = time.perf_counter()
code = 0
try:
    cnnlab.cli.app()  # what cnnlab.cli.main() runs, then it leaves as below
except SystemExit as exc:
    code = exc.code
    if code not in (0, None):
        raise
clock("cnnlab.cli.main", t)
with open(out, "w") as handle:
    json.dump({"spans": spans, "ended_at": time.time()}, handle)
if hasattr(cnnlab.cli, "exit_now"):  # the script's own way out (a cnnlab from before it: the interpreter's)
    cnnlab.cli.exit_now(code)
'''
FIRST_STEP = "of which: the first step"
TOTAL, TRAINED = "whole command", "training the run reports"
# Steps inside pipeline.train: what they leave of it is its own work (checkpoints, metrics, test.json, weights).
INSIDE_TRAIN = ("load dataset (read, gunzip or cache, SHA-256, parse)", "to tensors and split", "build model",
                "Trainer (model to device, optimizer, schedule)", "run directory (config, summary, manifest)",
                "training loop (validation included)", "test evaluation", "confusion.png (imports matplotlib)")


def stages(args: argparse.Namespace) -> None:
    """One fresh process timing each data step; the decoded cache in a temporary folder (cold, then warm)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache)
        env.pop("CNNLAB_DATA_CACHE", None)
        done = subprocess.run([sys.executable, "-c", STAGES, args.dataset, args.data_dir or "",
                               "1" if args.allow_checksum_mismatch else "0"],
                              env=env, check=True, capture_output=True, text=True)
    marks = json.loads(done.stdout.splitlines()[-1])
    print(f"| data step ({args.dataset}, one process) | seconds |")
    print("| --- | --- |")
    for name, seconds in marks.items():
        print(f"| {name} | {seconds:.3f} |")
    print()


def train_command(args: argparse.Namespace, runs: Path) -> list[str]:
    command = ["train", "--dataset", args.dataset, "--model", args.model, "--runs-dir", str(runs), "-q"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.allow_checksum_mismatch:
        command.append("--allow-checksum-mismatch")
    return command


def one_run(args: argparse.Namespace, cache: Path, runs: Path, src: str | None = None) -> dict[str, float]:
    """Seconds of each step of one whole `cnnlab train` process, its wall time and the training it reports;
    `src`: a source tree (the folder holding cnnlab/) imported in place of the installed one."""
    timings = runs.parent / "timings.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("CNNLAB_DATA_CACHE", None)
    launched = time.time()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, str(timings), repr(launched), *train_command(args, runs)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cnnlab {' '.join(train_command(args, runs))} failed: {done.stderr.strip()[-2000:]}")
    timed = json.loads(timings.read_text())
    spans = timed["spans"]
    in_train, in_main = spans.pop("pipeline.train"), spans.pop("cnnlab.cli.main")
    spans["pipeline.train, the rest (writing the run's files)"] = in_train - sum(spans[n] for n in INSIDE_TRAIN)
    spans["cnnlab.cli.main around it (options, config, printing)"] = in_main - in_train
    spans["interpreter exit"] = wall - (timed["ended_at"] - launched)
    run = max(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    trained = sum(json.loads(line)["seconds"] for line in lines if line.strip())
    shutil.rmtree(run)
    return {TOTAL: wall, TRAINED: trained, **spans}


def whole(args: argparse.Namespace) -> None:
    """Cold and warm runs taking turns; a cold run gets an empty cache folder, a warm one the one it filled.
    With --against, the same pair from another source tree follows each pair from this one."""
    trees = {"this tree": None, **({f"{args.against}": args.against} if args.against else {})}
    rows: dict[tuple[str, str], list[dict[str, float]]] = {(t, k): [] for t in trees for k in ("cold", "warm")}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        runs = base / "runs"
        runs.mkdir()
        for i in range(args.runs):
            for n, (tree, src) in enumerate(trees.items()):
                cache = base / f"cache-{i}-{n}"
                for kind in ("cold", "warm"):
                    rows[(tree, kind)].append(one_run(args, cache, runs, src))
                print(f"pair {i + 1}/{args.runs}, {tree}: cold {rows[(tree, 'cold')][-1][TOTAL]:.2f}s, "
                      f"warm {rows[(tree, 'warm')][-1][TOTAL]:.2f}s", file=sys.stderr)
    median = {key: {name: statistics.median(run[name] for run in values) for name in values[0]}
              for key, values in rows.items()}
    print(f"`cnnlab {' '.join(train_command(args, Path('RUNS')))}`, {args.runs} cold/warm pairs"
          f"{' per source tree' if args.against else ''}, load average before: {load:.2f}")
    print()
    print("| source | run | whole command s (median, min-max) | training s (median) | whole - training s "
          "| whole / training |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (tree, kind), values in rows.items():
        walls = [run[TOTAL] for run in values]
        ratios = statistics.median(run[TOTAL] / run[TRAINED] for run in values)
        overhead = statistics.median(run[TOTAL] - run[TRAINED] for run in values)
        print(f"| {tree} | {kind} cache ({'first' if kind == 'cold' else 'second'} run) | "
              f"{statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
              f"{median[(tree, kind)][TRAINED]:.2f} | {overhead:.2f} | {ratios:.2f}x |")
    print()
    print("| step of the whole command (median s) | " + " | ".join(f"{t}, {k}" for t, k in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    names = dict.fromkeys(name for values in median.values() for name in values)
    for name in names:
        cells = [f"{median[key][name]:.3f}" if name in median[key] else "-" for key in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=("all", "stages", "whole"))
    parser.add_argument("--runs", type=int, default=3, help="whole: cold/warm pairs")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="fast")
    parser.add_argument("--data-dir", default=None, help="the folder holding <dataset>/")
    parser.add_argument("--allow-checksum-mismatch", action="store_true")
    parser.add_argument("--against", metavar="SRC", help="whole: also time another source tree's cnnlab (the "
                        "folder holding cnnlab/, e.g. an older commit's src from `git archive`), in turns")
    args = parser.parse_args()
    if args.mode in ("all", "stages"):
        stages(args)
    if args.mode in ("all", "whole"):
        whole(args)


if __name__ == "__main__":
    main()
