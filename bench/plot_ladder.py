"""Test accuracy against training time for every preset of a ladder and the reference: one PNG per dataset.

    python bench/plot_ladder.py bench/ladder_fashion.json --out bench/ladder_fashion.png

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
    parser.add_argument("results", type=Path, help="JSON written by bench_presets.py --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    dataset = data["dataset"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name, rows in data["rows"].items():
        seconds = [r["seconds"] for r in rows]
        accuracy = [100 * r["test_accuracy"] for r in rows]
        marker, colour = ("s", "tab:gray") if name == REFERENCE else ("o", "tab:blue")
        ax.scatter(seconds, accuracy, s=12, color=colour, alpha=0.5)
        x, y = statistics.median(seconds), statistics.median(accuracy)
        ax.scatter([x], [y], s=60, marker=marker, color=colour, zorder=3)
        epochs = rows[0]["epochs"]
        # the reference's label above its square, the presets' below their dots: they sit close in time
        below = -11 if name != REFERENCE else 5
        ax.annotate(f"{name} ({epochs} ep, {len(rows)} seed{'s' if len(rows) > 1 else ''}): {y:.2f}%",
                    (x, y), textcoords="offset points", xytext=(7, below), fontsize=8)
    for seconds, accuracy in TARGETS.get(dataset, []):
        ax.scatter([seconds], [100 * accuracy], s=50, marker="^", facecolors="none", edgecolors="tab:red", zorder=2)
    ax.scatter([], [], s=50, marker="^", facecolors="none", edgecolors="tab:red", label="target (issue 16)")
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
