"""The TV and shared-nucleus curves as inline SVG (no JavaScript, no plotting library).

Drawn in Python so they show even where scripts do not run; each point carries an SVG ``<title>``
(the browser's own tooltip). A vertical marker (class ``tls-marker``, with the strata's x positions
in ``data-xs``) is moved by the circuit view's size slider.
"""

from __future__ import annotations

import math

from tl_strace.results import TraceResult
from tl_strace.views._html import esc, n_of

__all__ = ["CONDITION_STYLES", "PHASES", "curves_svg"]

CONDITION_STYLES: dict[str, tuple[str, str, float]] = {
    # condition: (colour, SVG dash pattern, line width)
    "only": ("#111827", "", 2.0),
    "random": ("#6b7280", "5 3", 1.5),
    "inverse": ("#dc2626", "2 2", 1.5),
}
"""How each evaluation condition is drawn (shared with the matplotlib plots)."""

PHASES: tuple[tuple[str, float, float, str], ...] = (
    ("construction", 1e-4, 1e-2, "#dbeafe"),
    ("refinement", 1e-2, 1.0, "#dcfce7"),
)
"""Paper B's two phases of computation, as (name, s from, s to, fill colour)."""


def _f(x: float) -> str:
    """Coordinates with one decimal: short, deterministic text."""
    return f"{x:.1f}"


def _fmt_s(s: float) -> str:
    return f"{s:.0e}".replace("e-0", "e-").replace("e+00", "") if s < 0.1 else f"{s:g}"


def _panel(res: TraceResult, metric: str, x0: float, y0: float, w: float, h: float, lo: float,
           title: str, ymax: float, yticks: list[float], yfmt: str) -> list[str]:
    """One plot panel (axes, phases, one line per condition, marker) as SVG elements."""
    out: list[str] = []
    pad_l, pad_b, pad_t = 38.0, 26.0, 18.0
    ax0, ax1 = x0 + pad_l, x0 + w - 8.0
    ay0, ay1 = y0 + pad_t, y0 + h - pad_b

    def X(s: float) -> float:
        return ax0 + (math.log10(max(s, 10.0 ** lo)) - lo) / (0.0 - lo) * (ax1 - ax0)

    def Y(v: float) -> float:
        return ay1 - min(max(v, 0.0), ymax) / ymax * (ay1 - ay0)

    out.append(f'<text x="{_f(ax0)}" y="{_f(y0 + 12)}" class="tls-cg-ttl">{esc(title)}</text>')
    for name, a, b, fill in PHASES:
        if b <= 10.0 ** lo:
            continue
        xa, xb = X(max(a, 10.0 ** lo)), X(b)
        out.append(f'<rect x="{_f(xa)}" y="{_f(ay0)}" width="{_f(xb - xa)}" height="{_f(ay1 - ay0)}" '
                   f'fill="{fill}"><title>{esc(name)} phase: s in [{a:g}, {b:g}]</title></rect>')
        out.append(f'<text x="{_f((xa + xb) / 2)}" y="{_f(ay1 - 4)}" class="tls-cg-ph">{esc(name)}</text>')
    for v in yticks:
        yy = Y(v)
        out.append(f'<line x1="{_f(ax0)}" x2="{_f(ax1)}" y1="{_f(yy)}" y2="{_f(yy)}" class="tls-cg-grid"/>')
        out.append(f'<text x="{_f(ax0 - 4)}" y="{_f(yy + 3)}" class="tls-cg-yt">{format(v, yfmt)}</text>')
    for d in range(int(lo), 1):
        xx = X(10.0 ** d)
        out.append(f'<line x1="{_f(xx)}" x2="{_f(xx)}" y1="{_f(ay1)}" y2="{_f(ay1 + 3)}" class="tls-cg-axis"/>')
        out.append(f'<text x="{_f(xx)}" y="{_f(ay1 + 13)}" class="tls-cg-xt">{"1" if d == 0 else f"1e{d}"}</text>')
    out.append(f'<text x="{_f((ax0 + ax1) / 2)}" y="{_f(ay1 + 24)}" class="tls-cg-xt">size s (log)</text>')
    out.append(f'<rect x="{_f(ax0)}" y="{_f(ay0)}" width="{_f(ax1 - ax0)}" height="{_f(ay1 - ay0)}" '
               'class="tls-cg-frame"/>')
    sizes = [float(s) for s in res.sizes]
    counts = [int(c) for c in res.counts]
    for c, cond in enumerate(res.conditions):
        colour, dash, lw = CONDITION_STYLES.get(cond, ("#7c3aed", "", 1.5))
        vals = [float(v) for v in getattr(res, f"{metric}_all")[c]]
        pts = [(X(s), Y(v)) for s, v in zip(sizes, vals) if math.isfinite(v)]
        if not pts:
            continue
        d = " ".join(f"{_f(x)},{_f(y)}" for x, y in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="{lw}"{dash_attr}/>')
        if cond == "only":
            for s, v, n in zip(sizes, vals, counts):
                if not math.isfinite(v):
                    continue
                out.append(f'<circle cx="{_f(X(s))}" cy="{_f(Y(v))}" r="2.2" fill="{colour}"><title>'
                           f'{esc(cond)} · s = {s:g} ({n_of(n)}) · {metric} = {v:.4g}</title></circle>')
    xs = ",".join(_f(X(s)) for s in sizes)
    out.append(f'<line class="tls-marker" data-xs="{xs}" x1="{_f(ax1)}" x2="{_f(ax1)}" y1="{_f(ay0)}" '
               f'y2="{_f(ay1)}" stroke="#7c3aed" stroke-width="1.5" visibility="hidden"/>')
    return out


def curves_svg(res: TraceResult, *, width: int = 820, height: int = 210) -> str:
    """TV (left) and shared nucleus (right) against log s for every condition of ``res``, with
    paper B's construction and refinement phases shaded, and a legend."""
    lo = math.floor(math.log10(max(min(float(s) for s in res.sizes), 1e-8)) + 1e-6)  # sizes are float32
    lo = min(lo, -1)
    half = (width - 110) / 2
    parts = _panel(res, "tv", 0.0, 0.0, half, float(height), float(lo), "total variation to the full model", 1.0,
                   [0.0, 0.25, 0.5, 0.75, 1.0], ".2f")
    parts += _panel(res, "nucleus", half, 0.0, half, float(height), float(lo), "shared nucleus (%)", 100.0,
                    [0.0, 25.0, 50.0, 75.0, 100.0], ".0f")
    lx = 2 * half + 10
    for i, cond in enumerate(res.conditions):
        colour, dash, lw = CONDITION_STYLES.get(cond, ("#7c3aed", "", 1.5))
        y = 30 + 18 * i
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{_f(lx)}" x2="{_f(lx + 22)}" y1="{y}" y2="{y}" stroke="{colour}" '
                     f'stroke-width="{lw}"{dash_attr}/>')
        parts.append(f'<text x="{_f(lx + 27)}" y="{y + 4}" class="tls-cg-lg">{esc(cond)}</text>')
    style = ("<style>.tls-cg-ttl{font:600 12px sans-serif;fill:#111827}.tls-cg-ph{font:10px sans-serif;fill:#475569;"
             "text-anchor:middle}.tls-cg-yt{font:10px sans-serif;fill:#374151;text-anchor:end}.tls-cg-xt{font:10px "
             "sans-serif;fill:#374151;text-anchor:middle}.tls-cg-lg{font:11px sans-serif;fill:#111827}.tls-cg-grid{"
             "stroke:#e5e7eb;stroke-width:1}.tls-cg-axis{stroke:#374151}.tls-cg-frame{fill:none;stroke:#9ca3af}</style>")
    return (f'<svg class="tls-curves" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="TV and shared nucleus against size">'
            f'{style}{"".join(parts)}</svg>')
