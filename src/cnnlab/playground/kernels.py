"""Named convolution kernels (blur, edges, sharpen, ...) and a parser for custom ones.

`get_kernel` accepts a name ("sobel-x"), a parameterised name ("gaussian:5:1.0", "box:5")
or the weights themselves, rows separated by ';' and values by ',' ("1,0,-1;2,0,-2;1,0,-1").
NumPy only: no torch here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral
from typing import TYPE_CHECKING

from cnnlab.suggest import did_you_mean

if TYPE_CHECKING:
    import numpy as np

# NumPy is imported inside the functions that build kernels: listing the kernels' names (the help of
# `cnnlab convolve`) then loads nothing.
MAX_SIDE = 255  # pixels: box:N and gaussian:N beyond this would be a blur of the whole image anyway


def box(size: int = 3) -> np.ndarray:
    """size x size kernel of 1/size^2: the plain average of the neighbourhood."""
    import numpy as np

    _check_size(size, "box")
    return np.full((size, size), 1.0 / size**2)


def gaussian(size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """size x size Gaussian blur with standard deviation `sigma` pixels, normalised to sum to 1."""
    import numpy as np

    _check_size(size, "gaussian")
    if not (math.isfinite(sigma) and 0 < sigma <= 1000):
        raise ValueError(f"gaussian sigma must be a number of pixels in (0, 1000], got {sigma}")
    offsets = np.arange(size) - (size - 1) / 2           # pixel distances from the centre
    bell = np.exp(-offsets**2 / (2 * sigma**2))          # (size,) one-dimensional Gaussian
    kernel = np.outer(bell, bell)                        # (size, size) separable 2-D Gaussian
    return kernel / kernel.sum()


def _check_size(size: int, name: str) -> None:
    if not isinstance(size, Integral) or not 1 <= size <= MAX_SIDE:
        raise ValueError(f"{name} size must be an int from 1 to {MAX_SIDE}, got {size!r}")


# Each entry: name -> (description, the weights row by row, or None for a parameterised kernel whose
# function builds it). Callers get a new array every time, so nobody can change a shared kernel.
Rows = tuple[tuple[float, ...], ...]
_NAMED: dict[str, tuple[str, Rows | None]] = {
    "identity": ("1 in the centre: output = input", ((0, 0, 0), (0, 1, 0), (0, 0, 0))),
    "blur": ("the lesson's 3x3 kernel of 0.1: 0.9 x the local mean", ((0.1,) * 3,) * 3),
    "box": ("3x3 mean (1/9 each); box:N for N x N", None),
    "gaussian": ("3x3 Gaussian, sigma 1; gaussian:SIZE:SIGMA for others", None),
    "sharpen": ("centre 5, neighbours -1: boosts local contrast", ((0, -1, 0), (-1, 5, -1), (0, -1, 0))),
    "sobel-x": ("Sobel: vertical edges (change from left to right)", ((1, 0, -1), (2, 0, -2), (1, 0, -1))),
    "sobel-y": ("Sobel: horizontal edges (change from top to bottom)", ((1, 2, 1), (0, 0, 0), (-1, -2, -1))),
    "laplacian": ("4-neighbour Laplacian: edges in every direction", ((0, 1, 0), (1, -4, 1), (0, 1, 0))),
    "outline": ("8-neighbour edge detector: centre 8, neighbours -1", ((-1, -1, -1), (-1, 8, -1), (-1, -1, -1))),
    "emboss": ("relief effect lit from the top left", ((-2, -1, 0), (-1, 1, 1), (0, 1, 2))),
}

# Names that take parameters after ':' and the function that builds them.
_PARAMETERISED: dict[str, Callable[..., np.ndarray]] = {"box": box, "gaussian": gaussian}


def list_kernels() -> dict[str, str]:
    """Every kernel name with a one-line description, for `cnnlab convolve --help` and docs."""
    return {name: description for name, (description, _) in _NAMED.items()}


def get_kernel(name_or_spec: str) -> np.ndarray:
    """The kernel for a name, a parameterised name ("gaussian:5:1.0") or literal weights ("1,0;0,-1")."""
    spec = name_or_spec.strip()
    if not spec:
        raise ValueError("kernel is empty: give a name (see list_kernels()) or weights like '1,0,-1;2,0,-2'")
    if any(ch.isdigit() for ch in spec.split(":")[0]) or ";" in spec or "," in spec:
        return parse_kernel(spec)
    name, *params = spec.lower().split(":")
    if params:
        return _parameterised(name, params, spec)
    if name not in _NAMED:
        raise ValueError(f"unknown kernel {spec!r}{did_you_mean(name, _NAMED)} (known: {', '.join(_NAMED)})")
    import numpy as np

    rows = _NAMED[name][1]
    return np.array(rows, dtype=float) if rows is not None else _PARAMETERISED[name]()


def parse_kernel(text: str) -> np.ndarray:
    """Weights written as rows separated by ';' and values by ',' -> (rows, cols) float array."""
    rows = [row.strip() for row in text.strip().strip(";").split(";")]
    values = []
    for number, row in enumerate(rows, start=1):
        try:
            values.append([float(v) for v in row.split(",")])
        except ValueError:
            raise ValueError(f"kernel row {number} {row!r} is not a comma-separated list of numbers "
                             f"(expected e.g. '1,0,-1;2,0,-2;1,0,-1')") from None
    widths = [len(row) for row in values]
    if len(set(widths)) != 1:
        raise ValueError(f"kernel rows must all have the same number of values, got {widths} in {text!r}")
    if not all(math.isfinite(v) for row in values for v in row):
        raise ValueError(f"kernel weights must be finite numbers, got {text!r}")
    import numpy as np

    return np.array(values, dtype=float)


def _parameterised(name: str, params: list[str], spec: str) -> np.ndarray:
    """Build e.g. gaussian:5:1.0 -> gaussian(5, 1.0); the size is an int, the rest floats."""
    if name not in _PARAMETERISED:
        raise ValueError(f"kernel {name!r} takes no parameters{did_you_mean(name, _PARAMETERISED)} "
                         f"(parameterised kernels: {', '.join(f'{n}:SIZE' for n in _PARAMETERISED)}"
                         f", gaussian:SIZE:SIGMA)")
    try:
        size, *rest = params
        args = [int(size), *(float(p) for p in rest)]
        return _PARAMETERISED[name](*args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad parameters in {spec!r}: expected box:SIZE or gaussian:SIZE:SIGMA "
                         f"with SIZE an int >= 1 ({error})") from None
