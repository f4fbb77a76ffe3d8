"""A matplotlib Figure that shows itself in a notebook (as PNG), with no pyplot and no backend set up:
the playground's pictures and those of `cnnlab.inspect.notebook` are one. Imported only when a picture
is drawn (matplotlib is not light)."""
from __future__ import annotations

import io

from matplotlib.figure import Figure


class InlineFigure(Figure):
    """A Figure whose notebook display is its PNG."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()
