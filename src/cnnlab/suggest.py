"""'Did you mean ...?' for a misspelt name: one rule for config keys, presets, datasets, kernels, layers."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, options: Iterable[object], prefix: str = "") -> str:
    """'; did you mean 'X'?' for the option closest to `name` (difflib ratio >= 0.5), else ''.

    `prefix` is put before the suggestion, e.g. 'train.' when `options` are a section's bare keys.
    """
    near = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{near[0]}'?" if near else ""
