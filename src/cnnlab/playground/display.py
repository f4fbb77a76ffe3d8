"""How playground results are shown: rescaling raw outputs to pixels, and the animations' limits (NumPy only)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

RESCALE_RULES = {
    "auto": "clip if the output already lies in [0, 1], else minmax",
    "clip": "values below 0 -> black, above 1 -> white",
    "minmax": "smallest value -> black, largest -> white",
    "abs": "|value| / largest |value|: strong responses of either sign -> white",
}
MAX_FRAMES = 200        # hard cap on animation frames, whatever --steps says (keeps files small)
FRAME_MS = 700          # time each GIF frame is shown, milliseconds


def rescale(values: np.ndarray, rule: str = "auto") -> tuple[np.ndarray, str]:
    """Map raw conv outputs to [0, 1] for display; returns (image, the rule actually applied)."""
    import numpy as np  # here, not at the top: the help of `cnnlab convolve` reads RESCALE_RULES only

    if rule == "auto":
        rule = "clip" if values.min() >= 0 and values.max() <= 1 else "minmax"
    if rule == "clip":
        return np.clip(values, 0, 1), rule
    if rule == "minmax":
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values), rule
    if rule == "abs":
        peak = float(np.abs(values).max())
        return np.abs(values) / peak if peak > 0 else np.zeros_like(values), rule
    raise ValueError(f"rescale rule must be one of {', '.join(RESCALE_RULES)}, got {rule!r}")
