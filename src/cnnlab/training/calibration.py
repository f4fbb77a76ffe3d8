"""Are the probabilities honest? Calibration of a classifier's confidence, from its test predictions.

A model is calibrated when, of the images it gives 80% confidence, 80% are right. The test images are
put in equal-width bins of confidence (the top class's probability), and each bin's accuracy is set
against its mean confidence: the reliability diagram draws them, and the expected calibration error
(ECE, Guo et al. 2017, "On Calibration of Modern Neural Networks") is their gap averaged over the
images, `sum_b (n_b / N) |accuracy_b - confidence_b|`: 0 for honest probabilities, in [0, 1].
NumPy only: it is a few lines, and cnnlab does not depend on scikit-learn. Computing only: the reliability
diagram is drawn by `inspect.reliability_diagram`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BINS = 15  # Guo et al.'s choice, and torchmetrics' default


@dataclass(frozen=True)
class Calibration:
    """Per-bin confidence and accuracy of a model's top-class predictions, and the summary numbers.

    Bins are equal-width over [0, 1] and right-closed: bin b holds confidences in (b/B, (b+1)/B];
    empty bins have count 0 and NaN confidence and accuracy (drawn as nothing, counted as nothing).
    """

    bins: int
    counts: list[int]  # images per bin
    confidence: list[float]  # mean top-class probability per bin
    accuracy: list[float]  # fraction right per bin
    ece: float  # expected calibration error: the count-weighted mean gap
    mce: float  # maximum calibration error: the largest gap of a non-empty bin
    mean_confidence: float  # over all images: above the accuracy means overconfident
    accuracy_overall: float

    @property
    def edges(self) -> np.ndarray:
        """The bins' B + 1 edges, 0 to 1."""
        return np.linspace(0.0, 1.0, self.bins + 1)

    @property
    def verdict(self) -> str:
        """One phrase for a reader: overconfident, underconfident or about right, from the means."""
        gap = self.mean_confidence - self.accuracy_overall
        if abs(gap) < 0.01:
            return "about right on average"
        return f"{'over' if gap > 0 else 'under'}confident by {abs(gap):.1%} on average"

    def to_dict(self) -> dict:
        """JSON-ready (NaN of empty bins as null)."""
        data = asdict(self)
        for key in ("confidence", "accuracy"):
            data[key] = [None if np.isnan(v) else v for v in data[key]]
        return data


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> Calibration:
    """Calibration of predictions `probabilities` (N, classes), rows summing to 1, against `labels` (N,)."""
    if len(probabilities) != len(labels) or len(labels) == 0:
        raise ValueError(f"calibration needs as many labels as predictions, at least one (got "
                         f"{len(labels)} labels for {len(probabilities)} predictions)")
    confidence = probabilities.max(axis=1).astype(np.float64)
    right = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    # right-closed bins: confidence 1.0 lands in the last bin, and 1/B exactly in the first
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: NaN, by design
        mean_confidence = np.bincount(which, confidence, minlength=bins) / counts
        accuracy = np.bincount(which, right, minlength=bins) / counts
    filled = counts > 0
    gaps = np.abs(accuracy - mean_confidence)[filled]
    return Calibration(bins=bins, counts=counts.tolist(), confidence=mean_confidence.tolist(),
                       accuracy=accuracy.tolist(), ece=float((counts[filled] * gaps).sum() / len(labels)),
                       mce=float(gaps.max()), mean_confidence=float(confidence.mean()),
                       accuracy_overall=float(right.mean()))
