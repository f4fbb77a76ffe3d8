"""What an image folder holds, said before anything trains on it (Keras' "Found N files belonging to K
classes", fastai's `DataBlock.summary`): classes, files per class per split, the picture sizes seen, the
files skipped and why, and warnings for what will make a run misleading.

`summarize` reads only what opening the folder already found, the pixels held in memory (which say which
files were unreadable) and the headers of up to SIZE_SAMPLE pictures; no torch.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cnnlab.text import command

if TYPE_CHECKING:
    from cnnlab.config import TrainConfig
    from cnnlab.data.folder import ImageFolder

SIZE_SAMPLE = 300  # picture headers read to say which sizes the folder holds (spread over the whole folder)
FEW_TEST_IMAGES = 20  # a class judged on fewer test images than this gets a noisy accuracy (1 image = 5 points)
IMBALANCE_RATIO = 5.0  # the largest class this many times the smallest: accuracy hides the small ones
SPLITS = ("train", "val", "test")


@dataclass
class FolderSummary:
    """Counts, sizes and skipped files of an image folder, and the warnings they call for."""

    root: str
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]  # split -> class -> files found
    readable: dict[str, dict[str, int]] | None  # split -> class -> files decoded (None: streamed, not known yet)
    skipped: dict[str, int]  # reason -> files
    sizes: dict[str, int]  # "WxH" -> pictures among the sampled headers
    sampled: int  # headers read for `sizes`
    image_shape: tuple[int, int, int]  # (H, W, C) the pictures become
    resize: str
    in_memory: bool
    ignored: int  # files without an image's name
    warnings: list[str] = field(default_factory=list)
    layout: str = "classes"  # "classes": splits drawn from root/<class>/; "splits": root/train/, root/test/ given

    @property
    def total(self) -> int:
        return sum(sum(per_class.values()) for per_class in self.counts.values())

    def to_dict(self) -> dict:
        """The JSON of `cnnlab datasets info FOLDER --json`."""
        return {"root": self.root, "classes": list(self.classes), "files": self.total, "counts": self.counts,
                "readable": self.readable, "skipped": self.skipped, "sizes_seen": self.sizes,
                "sizes_sampled": self.sampled, "image_shape": list(self.image_shape), "resize": self.resize,
                "in_memory": self.in_memory, "ignored": self.ignored, "warnings": self.warnings}

    def lines(self) -> list[str]:
        """The summary as a user reads it: a headline, a table of classes by split, sizes, skipped files."""
        h, w, c = self.image_shape
        where = "decoded into memory" if self.in_memory else "streamed from disk each epoch"
        out = [f"found {self.total:,} files belonging to {len(self.classes)} classes in {self.root} "
               f"({where}; each becomes {h}x{w}x{c} by {self.resize})"]
        width = max(len("class"), *(len(name) for name in self.classes))
        out.append(f"  {'class':<{width}}  {'train':>7}  {'val':>7}  {'test':>7}")
        for name in self.classes:
            cells = "  ".join(f"{self.count_text(split, name):>7}" for split in SPLITS)
            out.append(f"  {name:<{width}}  {cells}")
        if self.sizes:
            out.append(f"  sizes seen ({self.sampled} pictures sampled): {size_text(self.sizes)}")
        if self.skipped:
            reasons = "; ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            out.append(f"  skipped {sum(self.skipped.values())} unreadable files: {reasons}")
        if self.ignored:
            out.append(f"  ignored {self.ignored} files without an image's name")
        return out

    def count_text(self, split: str, name: str) -> str:
        found = self.counts[split][name]
        if self.readable is None or self.readable[split][name] == found:
            return str(found)
        return f"{self.readable[split][name]}/{found}"  # readable of found


def size_text(sizes: dict[str, int]) -> str:
    """'28x28 (all)', or the range of widths and heights, the median, and the most common sizes that repeat."""
    if len(sizes) == 1:
        return f"{next(iter(sizes))} (all)"
    pairs = [tuple(map(int, size.split("x"))) for size, n in sizes.items() for _ in range(n)]
    widths, heights = sorted(w for w, _ in pairs), sorted(h for _, h in pairs)
    middle = len(pairs) // 2
    text = (f"{widths[0]} to {widths[-1]} wide, {heights[0]} to {heights[-1]} high, median "
            f"{widths[middle]}x{heights[middle]}")
    repeated = [(size, n) for size, n in Counter(sizes).most_common(3) if n > 1]
    return text + (("; most common " + ", ".join(f"{size} ({n})" for size, n in repeated)) if repeated else "")


def summarize(folder: ImageFolder, train: TrainConfig | None = None) -> FolderSummary:
    """The summary of an opened folder (held in memory or not); with `train`, warnings about what the run's
    settings make of it (steps an epoch against the warm-up and early stopping's patience)."""
    counts, readable = {}, {}
    for split, source in folder.splits.items():
        labels = source.labels.numpy()
        counts[split] = {name: int((labels == k).sum()) for k, name in enumerate(folder.classes)}
        if source.readable is not None:
            ok = labels[source.readable.numpy()]
            readable[split] = {name: int((ok == k).sum()) for k, name in enumerate(folder.classes)}
    skipped = Counter(short(reason) for source in folder.splits.values() for reason in source.skipped.values())
    sizes, sampled = sample_sizes(folder)
    summary = FolderSummary(str(folder.root), folder.classes, counts, readable if folder.in_memory else None,
                            dict(skipped), sizes, sampled, folder.image_shape, folder.train.resize, folder.in_memory,
                            folder.ignored)
    summary.layout = folder.layout
    summary.warnings = data_warnings(summary) + (schedule_warnings(summary, train) if train is not None else [])
    return summary


def short(reason: str) -> str:
    """A skip reason without the file's own details, so that reasons count: 'not a readable image (...)' ->
    'not a readable image'."""
    return reason.split(" (")[0].split(": ")[0][:80]


def sample_sizes(folder: ImageFolder) -> tuple[dict[str, int], int]:
    """'WxH' -> count over the headers of up to SIZE_SAMPLE pictures spread evenly over the folder."""
    from PIL import Image

    paths = [source.path(i) for source in folder.splits.values() for i in range(len(source))]
    step = max(1, math.ceil(len(paths) / SIZE_SAMPLE))
    sizes: Counter[str] = Counter()
    sampled = 0
    for path in paths[::step]:
        try:
            with warnings.catch_warnings():  # a huge header: counted as too large where it is decoded, not
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's warning on stderr
                with Image.open(path) as image:  # the header only: nothing is decoded
                    sizes[f"{image.width}x{image.height}"] += 1
            sampled += 1
        except Exception:  # noqa: BLE001 -- an unreadable file is counted where it is decoded, not here
            continue
    return dict(sizes), sampled


def usable(summary: FolderSummary, split: str) -> dict[str, int]:
    """Files per class of a split that will be used: decoded ones when known, else every one found."""
    return (summary.readable or summary.counts)[split]


def data_warnings(summary: FolderSummary) -> list[str]:
    """Classes nothing can be learnt or judged from, a test split too small to trust, heavy imbalance."""
    out = []
    test = usable(summary, "test")
    unjudged = [name for name, n in test.items() if n == 0]
    if unjudged:
        many = len(unjudged) > 1
        found = any(summary.counts["test"][name] for name in unjudged)  # files there, none of them readable
        out.append(f"class{'es' if many else ''} {', '.join(unjudged)} ha{'ve' if many else 's'} no "
                   f"{'readable ' if found else ''}test image: the test accuracy says nothing about "
                   f"{'them' if many else 'it'}; add images")
    train = usable(summary, "train")
    unlearnt = [name for name, n in train.items() if n == 0]
    if unlearnt and summary.readable is not None:  # training refuses this folder (readable_problem)
        out.append(f"class{'es' if len(unlearnt) > 1 else ''} {', '.join(unlearnt)}: no readable training image; "
                   "training refuses the folder until there is one")
    few = [f"{name} ({n})" for name, n in test.items() if 0 < n < FEW_TEST_IMAGES]
    if few:
        out.append(f"{len(few)} class{'es have' if len(few) > 1 else ' has'} fewer than {FEW_TEST_IMAGES} test images "
                   f"({', '.join(few[:5])}{', ...' if len(few) > 5 else ''}): one image moves its accuracy by "
                   f"{100 / max(1, min(n for n in test.values() if n)):.0f} points; add images"
                   + (", or put a test/ folder beside train/" if summary.layout == "classes" else " to test/"))
    smallest, largest = min(train.values()), max(train.values())
    if smallest and largest / smallest >= IMBALANCE_RATIO:
        small = min(train, key=lambda name: train[name])
        big = max(train, key=lambda name: train[name])
        out.append(f"classes are imbalanced: {big} has {largest} training images, {small} {smallest} "
                   f"({largest / smallest:.0f}x); consider --set train.class_weights=balanced or "
                   "train.sampling=balanced, and read the per-class accuracy, not only the overall one")
    return out


def schedule_warnings(summary: FolderSummary, train: TrainConfig) -> list[str]:
    """Too few steps an epoch for what the schedule and early stopping expect of an epoch."""
    images = sum(usable(summary, "train").values())
    steps = max(1, math.ceil(images / train.batch_size))
    out = []
    smaller = max(8, 2 ** int(math.log2(max(1, images // 20))))
    if steps < 10:
        out.append(f"{images} training images in batches of {train.batch_size} make {steps} step"
                   f"{'s' if steps > 1 else ''} an epoch: "
                   + (f"a lower --set train.batch_size (e.g. {smaller}) gives the optimiser more steps"
                      if smaller < train.batch_size else "few for training from scratch; more images help most"))
    patience = train.early_stopping.patience
    warm_epochs = math.ceil(0.25 * train.epochs) if train.schedule == "onecycle" else 0
    if patience and warm_epochs and patience <= warm_epochs:
        out.append(f"early stopping's patience ({patience} epochs) is within the one-cycle warm-up ({warm_epochs} of "
                   f"{train.epochs} epochs): it can stop before the learning rate peaks; raise "
                   f"train.early_stopping.patience above {warm_epochs}")
    return out


def readable_problem(folder: ImageFolder) -> str | None:
    """A one-line reason when a class has no readable training image (nothing to learn it from), else None.

    Known only for a folder held in memory; a streamed one finds out as it trains."""
    train = folder.train
    if train.readable is None:
        return None
    labels = train.labels[train.readable].numpy()
    empty = [name for k, name in enumerate(folder.classes) if not (labels == k).any()]
    if not empty:
        return None
    reasons = Counter(short(reason) for reason in train.skipped.values())
    common = f" (most common reason: {reasons.most_common(1)[0][0]})" if reasons else ""
    which = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
    if len(empty) == len(folder.classes):
        return f"{folder.root}: no training image could be read{common}; see {command('datasets', 'info', folder.root)}"
    return (f"{folder.root}: class{'es' if len(empty) > 1 else ''} {which} ha{'ve' if len(empty) > 1 else 's'} no "
            f"readable training image{common}; fix or remove the files, or remove the class folder")
