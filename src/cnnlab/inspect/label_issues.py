"""`cnnlab show label-issues`: the files whose given class the model most confidently disputes, and images
that sit in two splits (a test image the model also trained on).

Label issues by confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 2021), in NumPy: each class's threshold is the mean probability the model gives that class
on the images labelled with it (its self-confidence); an image is flagged when its probability for another class
reaches that class's threshold, or the model predicts another class outright; the suggested class is the most
probable such class, and images are ranked by the margin p(suggested) - p(given), worst first. The probabilities
must be out-of-sample: a model repeats the labels it trained on, right or wrong, so only the held-out splits
(validation and test) are checked, unless the training split's probabilities come from cross-validation
(`pipeline.cross_validated`, `--folds K`: K runs trained as the run was, each judging the fold it never saw).

Duplicates: every image of every split, as the run reads it, shrunk to a 16x16 grey thumbnail; images whose
8x8 average hashes agree are compared thumbnail to thumbnail, and pairs in different splits that differ by less
than DUPLICATE_LEVELS grey levels on average are reported (re-saved, resized or re-compressed copies).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.data.registry import is_image_folder
from cnnlab.data.sources import LOAD_ALL_BATCH, Data, Source
from cnnlab.inspect.show import LoadedRun
from cnnlab.runs.predictions import file_names
from cnnlab.training.evaluate import batches_with_positions, infer

SPLITS = ("train", "val", "test")
THUMB = 16  # pixels per side of the thumbnails duplicates are compared on
DUPLICATE_LEVELS = 6.0  # mean absolute difference of two thumbnails (0-255 grey levels) below which they are one image
FLAT_LEVELS = 2.0  # thumbnails with less spread than this (blank images) are never called duplicates
MAX_GROUP = 500  # images of one hash compared pairwise (a larger group is a hash of near-blank images)


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given class the model disputes: `score` is p(suggested) - p(given), -1 to 1, worst highest."""

    file: str
    split: str
    given: str
    suggested: str
    score: float
    given_probability: float
    suggested_probability: float
    kind: str = "label"


@dataclass(frozen=True)
class Duplicate:
    """An image of a later split (val, test) that is (nearly) an image of an earlier one: leakage."""

    file: str
    split: str
    given: str
    duplicate_of: str
    duplicate_split: str
    duplicate_given: str
    difference: float  # mean absolute difference of the thumbnails, grey levels 0-255
    kind: str = "duplicate"

    @property
    def score(self) -> float:
        return 1.0 - self.difference / 255.0


@dataclass
class Findings:
    issues: list[LabelIssue]
    duplicates: list[Duplicate]
    checked: dict[str, int]  # held-out images checked, per split
    thresholds: dict[str, float]  # per-class self-confidence thresholds

    def to_list(self, limit: int | None = None) -> list[dict]:
        """The `--json` list: label issues worst first, then duplicates closest first (at most `limit` of each);
        a duplicate's `suggested` is the class its twin is filed under."""
        return ([asdict(i) for i in self.issues[:limit]]
                + [{**asdict(d), "suggested": d.duplicate_given, "score": round(d.score, 6)}
                   for d in self.duplicates[:limit]])


# ------------------------------------------------------------------------------ the arithmetic
def class_thresholds(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K,) mean self-confidence of each class: p[i, j] averaged over the images labelled j (1.0 for an absent
    class, which then flags nothing)."""
    k = probabilities.shape[1]
    sums = np.bincount(labels, weights=probabilities[np.arange(len(labels)), labels], minlength=k)
    counts = np.bincount(labels, minlength=k)
    return np.divide(sums, counts, out=np.ones(k), where=counts > 0)


def confident_issues(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, suggested classes, scores) of the images flagged by confident learning, worst first.

    probabilities (N, K) out-of-sample, labels (N,) the given classes."""
    n = len(labels)
    thresholds = class_thresholds(probabilities, labels)
    given = probabilities[np.arange(n), labels]
    others = probabilities.copy()
    others[np.arange(n), labels] = -np.inf
    above = others >= thresholds[None, :]  # (N, K) other classes at their threshold
    # the model's outright prediction disputes the label too: with saturated probabilities a class's mean
    # self-confidence (0.995, say) can sit just above a mislabelled image's 0.994
    above[np.arange(n), probabilities.argmax(axis=1)] |= probabilities.argmax(axis=1) != labels
    candidates = np.where(above, others, -np.inf)
    flagged = np.flatnonzero(np.isfinite(candidates.max(axis=1)))
    suggested = candidates[flagged].argmax(axis=1)
    scores = probabilities[flagged, suggested] - given[flagged]
    order = np.argsort(-scores, kind="stable")
    return flagged[order], suggested[order], scores[order]


def thumbnails(images: torch.Tensor) -> np.ndarray:
    """uint8 images (B, C, H, W) -> (B, C, THUMB, THUMB) float32, 0-255: colour kept (a red disc and a green one
    in the same place are two pictures)."""
    return F.adaptive_avg_pool2d(images.float(), THUMB).numpy()


def duplicate_pairs(thumbs: np.ndarray, splits: np.ndarray) -> list[tuple[int, int, float]]:
    """(earlier, later, difference) for thumbnails (N, C, THUMB, THUMB) in different splits that are one picture:
    grouped by the average hash of their grey, then compared channel by channel."""
    n = len(thumbs)
    grey = thumbs.mean(axis=1)  # (N, THUMB, THUMB)
    small = grey.reshape(n, 8, THUMB // 8, 8, THUMB // 8).mean(axis=(2, 4)).reshape(n, 64)
    bits = np.packbits(small > small.mean(axis=1, keepdims=True), axis=1)  # (N, 8) the 64-bit average hash
    groups: dict[bytes, list[int]] = defaultdict(list)
    for k in np.flatnonzero(grey.reshape(n, -1).std(axis=1) >= FLAT_LEVELS).tolist():
        groups[bits[k].tobytes()].append(k)
    pairs: list[tuple[int, int, float]] = []
    for members in groups.values():
        members = members[:MAX_GROUP]
        if len(members) < 2 or len({int(splits[i]) for i in members}) < 2:
            continue
        flat = thumbs[members].reshape(len(members), -1)
        for a, i in enumerate(members):
            difference = np.abs(flat[a + 1:] - flat[a]).mean(axis=1)  # (g - a - 1,) one row at a time: bounded memory
            for b in np.flatnonzero(difference < DUPLICATE_LEVELS).tolist():
                j = members[a + 1 + b]
                if splits[i] != splits[j]:
                    earlier, later = (i, j) if splits[i] < splits[j] else (j, i)
                    pairs.append((earlier, later, float(difference[b])))
    return sorted(pairs, key=lambda p: (p[2], p[1]))


# ------------------------------------------------------------------------------ reading a run
def read_split(loaded: LoadedRun, source: Source, predict: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                          np.ndarray | None]:
    """Positions read, labels, thumbnails and (when `predict`) probabilities of one split, evaluated as the run's
    test was."""
    t = loaded.config.train
    positions, labels, thumbs, probabilities = [], [], [], []
    for images, batch_labels, batch_positions in batches_with_positions(
            source, list(torch.arange(len(source)).split(LOAD_ALL_BATCH))):
        positions.append(batch_positions.numpy())
        labels.append(batch_labels.numpy())
        thumbs.append(thumbnails(images))
        if predict:
            logits = infer(loaded.model, images, t.eval_batch_size, t.channels_last, t.tta, t.tta_shift)
            probabilities.append(torch.softmax(logits, 1).numpy())
    if not positions:
        empty = np.zeros(0, dtype=np.int64)
        k = len(loaded.classes)
        channels = loaded.model.input_shape[2]
        return empty, empty, np.zeros((0, channels, THUMB, THUMB), np.float32), np.zeros((0, k)) if predict else None
    return (np.concatenate(positions), np.concatenate(labels), np.concatenate(thumbs),
            np.concatenate(probabilities) if predict else None)


def held_out_splits(config_dataset: str) -> tuple[str, ...]:
    """The splits whose predictions are out-of-sample: validation and test for an image folder; the test set of a
    named dataset (its validation images are named by no file of their own)."""
    return ("val", "test") if is_image_folder(config_dataset) else ("test",)


def find_label_issues(loaded: LoadedRun, data: Data | None = None,
                      by_folds: dict[int, np.ndarray] | None = None) -> Findings:
    """Label issues in the held-out splits and duplicates across all splits of a run's dataset; with `by_folds`
    (the training images' out-of-sample probabilities by position, `pipeline.cross_validated`), in the training
    split too."""
    data = data if data is not None else loaded.data()
    checked = held_out_splits(loaded.config.data.dataset)
    if by_folds:
        checked = ("train", *checked)
    names, split_of, labels_all, thumbs_all = [], [], [], []
    pooled_p, pooled_labels, pooled_names, pooled_splits = [], [], [], []
    for number, split in enumerate(SPLITS):
        source: Source = getattr(data, split)
        positions, labels, thumbs, probabilities = read_split(loaded, source, split in checked and split != "train")
        split_names = file_names(source)
        named = [split_names[p] for p in positions.tolist()]
        names += named
        split_of.append(np.full(len(positions), number))
        labels_all.append(labels)
        thumbs_all.append(thumbs)
        pooled = named, labels
        if split == "train" and by_folds:  # judged by the fold runs: the images they could read
            kept = [k for k, position in enumerate(positions.tolist()) if position in by_folds]
            probabilities = np.array([by_folds[p] for p in positions[kept].tolist()], dtype=np.float64).reshape(
                len(kept), len(loaded.classes))
            pooled = [named[k] for k in kept], labels[kept]
        if probabilities is not None:
            pooled_p.append(probabilities)
            pooled_labels.append(pooled[1])
            pooled_names += pooled[0]
            pooled_splits += [split] * len(pooled[0])
    classes = loaded.classes
    probabilities, labels = np.concatenate(pooled_p), np.concatenate(pooled_labels)
    indices, suggested, scores = confident_issues(probabilities, labels)
    issues = [LabelIssue(pooled_names[i], pooled_splits[i], classes[labels[i]], classes[s], round(float(score), 6),
                         round(float(probabilities[i, labels[i]]), 6), round(float(probabilities[i, s]), 6))
              for i, s, score in zip(indices.tolist(), suggested.tolist(), scores.tolist())]
    splits, labels_every = np.concatenate(split_of), np.concatenate(labels_all)
    duplicates = [Duplicate(names[j], SPLITS[splits[j]], classes[labels_every[j]], names[i], SPLITS[splits[i]],
                            classes[labels_every[i]], round(d, 3))
                  for i, j, d in duplicate_pairs(np.concatenate(thumbs_all), splits)]
    counts = {split: int(sum(1 for s in pooled_splits if s == split)) for split in checked}
    thresholds = dict(zip(classes, class_thresholds(probabilities, labels).round(6).tolist()))
    return Findings(issues, duplicates, counts, thresholds)
