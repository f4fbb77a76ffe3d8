"""Test accuracy against training time for every preset of a ladder and the reference: one PNG per dataset.

    python bench/plot_ladder.py bench/ladder_fashion.json [LATER.json ...] --out bench/ladder_fashion.png

With several files (one dataset), a later file's presets replace the earlier ones of the same name:
a rung re-measured after a change, beside the rungs that did not change; every file's reference is
drawn, named by its file, since it shows how fast the machine was for that file's rows.

Reads what bench_presets.py --out wrote: each seed a small dot, each preset's median a large one
(labelled), the plain-PyTorch reference a square; issue 16's targets as open triangles ("this much in
at most this long" sits up and to the left of its triangle).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REFERENCE = "plain PyTorch (reference)"
# issue 16: (seconds, accuracy) -- reach at least the accuracy in at most the time
TARGETS = {"fashion-mnist": [(6, 0.91), (180, 0.935), (600, 0.94), (1800, 0.95)],
           "mnist": [(2.5, 0.99), (180, 0.996), (1800, 0.997)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="JSON written by bench_presets.py --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    files = [json.loads(path.read_text()) for path in args.results]
    datasets = {part["dataset"] for part in files}
    if len(datasets) != 1:
        raise SystemExit(f"one dataset per picture; these files hold {sorted(datasets)}")
    rows_of: dict[str, list] = {}
    later: set[str] = set()  # rows from a file after the first: labelled on the other side of their dot
    for i, (path, part) in enumerate(zip(args.results, files)):
        for name, rows in part["rows"].items():
            # each command's reference is kept: it says how fast the machine was for that command's rows
            key = f"reference ({path.stem})" if name == REFERENCE and i else name
            if i:
                later.add(key)
            rows_of[key] = rows
    data = dict(dataset=datasets.pop(), rows=rows_of)
    dataset = data["dataset"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    later_references = [name for name in data["rows"] if name.startswith("reference (")]
    for name, rows in data["rows"].items():
        seconds = [r["seconds"] for r in rows]
        accuracy = [100 * r["test_accuracy"] for r in rows]
        reference = name == REFERENCE or name.startswith("reference (")
        marker, colour = ("s", "tab:gray") if reference else ("o", "tab:blue")
        ax.scatter(seconds, accuracy, s=12, color=colour, alpha=0.5)
        x, y = statistics.median(seconds), statistics.median(accuracy)
        ax.scatter([x], [y], s=60, marker=marker, color=colour, zorder=3)
        epochs = rows[0]["epochs"]
        # the reference's label above its square, the presets' below their dots: they sit close in time;
        # a later file's rows the other way round, so two commands' labels do not overlap
        above = reference != (name in later)
        # later files' references sit close together (the same machine): each one's label a line lower
        below = -11 - 10 * later_references.index(name) if name in later_references else -11
        ax.annotate(f"{name} ({epochs} ep, {len(rows)} seed{'s' if len(rows) > 1 else ''}): {y:.2f}%",
                    (x, y), textcoords="offset points", xytext=(7, 5 if above else below), fontsize=8)
    for seconds, accuracy in TARGETS.get(dataset, []):
        ax.scatter([seconds], [100 * accuracy], s=50, marker="^", facecolors="none", edgecolors="tab:red", zorder=2)
    ax.scatter([], [], s=50, marker="^", facecolors="none", edgecolors="tab:red", label="target (issue 16)")
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.1 * len(later_references), high)  # room for the stacked reference labels
    ax.set_xscale("log")
    every_second = [r["seconds"] for rows in data["rows"].values() for r in rows]
    ax.set_xlim(min(every_second + [t for t, _ in TARGETS.get(dataset, [])]) / 1.5, max(every_second) * 6)
    ax.set_xlabel("time of pipeline.train, seconds (log scale; 2 CPU cores)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"{dataset}: test accuracy against training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
