"""The matplotlib figure class of the views: a plain ``Figure`` on the Agg canvas that displays
itself in Jupyter as a PNG whatever the backend (``_repr_png_``).

IPython shows a bare ``Figure`` as the text ``<Figure size 520x320 with 1 Axes>`` unless matplotlib's
inline backend has registered its own PNG printer for ``Figure`` (``%matplotlib inline``). With that
printer registered, IPython uses it (it wins over ``_repr_png_`` and gives the same single image);
the figures are never registered with pyplot, so the inline backend does not show them a second
time at the end of the cell. Imported lazily: importing :mod:`tl_strace.views` does not import
matplotlib.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure

__all__ = ["StraceFigure", "png_bytes"]


def png_bytes(fig: Figure, *, dpi: float = 100.0, tight: bool = True) -> bytes:
    """``fig`` as PNG bytes (``tight``: cropped to the drawn area; no software tag: equal figures
    give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None, metadata={"Software": None})
    return buf.getvalue()


class StraceFigure(Figure):
    """A ``matplotlib.figure.Figure`` that Jupyter displays as a PNG with any backend."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)
