"""The static rendering every view carries: a PNG of the curves (and, at token level, of the
component grid at the stratum the view opens on), inlined as ``<img src="data:image/png;base64,...">``.

It is what a reader sees where scripts do not run: a notebook opened but not executed (untrusted:
JupyterLab sanitizes the HTML: ``@jupyterlab/apputils``'s sanitizer drops ``<script>`` and
``<style>`` and the ``<svg>`` tags (keeping their text), but keeps ``<img>`` with an embedded
``src`` and the ``hidden`` attribute), a notebook preview (GitHub, nbviewer), a printed page. The
scripted part of the view is ``hidden`` until its script has drawn it, then the script hides this
picture; so without scripts a reader sees the key numbers as text and this picture, nothing else. Drawn with matplotlib on the Agg canvas, never
through pyplot; numbers rounded as on screen; equal results give equal bytes.
"""

from __future__ import annotations

import base64
import math
from typing import Any


from tl_strace.results import TraceResult
from tl_strace.views._html import esc, n_of

__all__ = ["static_img_html", "static_png"]

_KIND_COLOURS = ("#2563eb", "#ea580c", "#6b7280")  # head, MLP, skip (as the interactive grid)
STATIC_DPI = 80.0
"""Resolution of the static image: 80 dpi gives about 860 × 260 px, ~40-70 kB of PNG."""


def _grid(ax: Any, res: TraceResult, k: int) -> None:
    """The component grid at stratum ``k``: layers (output on top) × heads, MLP, skip; a cell is
    filled when the component is in the trace, its opacity its summed edge weight (square root)."""
    from matplotlib.patches import Rectangle

    from tl_strace.views._data import component_stats

    st = component_stats(res)
    L, H = st.n_layers, st.n_heads
    w = st.weight[k].double()
    present = st.n_edges[k] > 0
    top = float(w.max()) if bool(present.any()) else 1.0
    for c in range(st.n_components):
        kind, layer = int(st.kind[c]), int(st.layer[c])
        col = int(st.head[c]) if kind == 0 else H + kind - 1 + (kind > 0) * 0.2
        on = bool(present[c])
        alpha = 0.15 + 0.85 * math.sqrt(max(float(w[c]), 0.0) / top) if on and top > 0 else 0.0
        ax.add_patch(Rectangle((col, layer), 0.9, 0.9, facecolor=_KIND_COLOURS[kind] if on else "#f8fafc",
                               alpha=1.0 if not on else alpha, edgecolor="#e5e7eb" if not on else "none", lw=0.5))
    ax.set_xlim(-0.2, H + 2.3)
    ax.set_ylim(-0.2, L + 0.1)
    step = max(1, L // 8)
    ax.set_yticks([l + 0.45 for l in range(0, L, step)], [str(l) for l in range(0, L, step)], fontsize=7)
    ax.set_xticks([H / 2 - 0.05, H + 0.65, H + 1.65], ["heads", "MLP", "skip"], fontsize=7, rotation=35,
                  ha="right")
    ax.tick_params(length=0)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_ylabel("layer", fontsize=8)
    n = int(res.counts[k])
    ax.set_title(f"components in the trace\nat s = {float(res.sizes[k]):g} ({n_of(n)})",
                 fontsize=9)


def static_png(res: TraceResult, k: int | None = None, *, grid: bool = True, dpi: float = STATIC_DPI) -> bytes:
    """PNG of the TV and shared-nucleus curves (the stratum ``k`` marked) and, with ``grid`` and a
    token-level result, the component grid at stratum ``k`` (default: the stratum views open on)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tl_strace.views._data import default_stratum, is_token_level
    from tl_strace.views._figure import StraceFigure, png_bytes
    from tl_strace.views.plots import plot_curves

    k = default_stratum(res) if k is None else int(k)
    grid = grid and is_token_level(res)
    fig = StraceFigure(figsize=(10.8 if grid else 8.4, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if grid else 2, squeeze=False,
                        width_ratios=[1.0, 1.0, 0.75] if grid else [1.0, 1.0])[0]
    # a fixed layout (one draw, not three: the constrained layout and a tight crop each draw again)
    fig.subplots_adjust(left=0.06 if grid else 0.08, right=0.99, bottom=0.15, top=0.86 if grid else 0.91, wspace=0.3)
    for ax, metric in zip(axes, ("tv", "nucleus")):
        plot_curves(res, metric, ax=ax)
        ax.axvline(float(res.sizes[k]), color="#7c3aed", lw=1.2, zorder=4)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
        ax.tick_params(labelsize=7)
        leg = ax.get_legend()
        if leg is not None and metric == "nucleus":
            leg.remove()
    if grid:
        _grid(axes[2], res, k)
    return png_bytes(fig, dpi=dpi, tight=False)


def static_img_html(res: TraceResult, k: int | None = None, *, grid: bool = True) -> str:
    """The static rendering as one ``<img class="tls-static-img">`` with a PNG data URI and, as its
    ``alt`` text, the key numbers of the stratum it shows."""
    from tl_strace.views._data import default_stratum

    k = default_stratum(res) if k is None else int(k)
    png = static_png(res, k, grid=grid)
    only = list(res.conditions).index("only") if "only" in res.conditions else 0
    n = int(res.counts[k])
    alt = (f"TV and shared nucleus against size s; marked: s = {float(res.sizes[k]):g} "
           f"({n_of(n, res.UNIT.rstrip('s'))}), TV {float(res.tv_all[only, k]):.3f}, "
           f"top token {res.top_strs[only][k][0]!r}")
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<img class="tls-static-img" alt="{esc(alt)}" src="{src}" '
            'style="max-width:100%;height:auto">')
