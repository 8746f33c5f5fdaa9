"""Static matplotlib figures of a result, for papers: PNG and SVG.

Figures are built as ``matplotlib.figure.Figure`` objects on the Agg canvas, never through
``pyplot``: nothing global changes on import or on use (no backend switch, no style, no rcParams),
and no figure is left registered with a GUI manager. Jupyter displays the returned figures as PNG
with any backend, ``%matplotlib inline`` or not (:class:`tl_strace.views._figure.StraceFigure`).

>>> fig = plot_curves(res)                                  # doctest: +SKIP
>>> save_plots(res, "figures/austen")                       # doctest: +SKIP
['figures/austen_curves.png', 'figures/austen_curves.svg', 'figures/austen_shares.png', ...]
"""

from __future__ import annotations

import math
import os
from typing import Any

from tl_strace.ablation import attention_label
from tl_strace.errors import InputError
from tl_strace.results import TraceResult
from tl_strace.views._data import edge_shares
from tl_strace.views.curves import CONDITION_STYLES, PHASES

__all__ = ["figure_svg", "plot_curves", "plot_shares", "save_figure", "save_plots"]

_TITLES = {"tv": "total variation to the full model", "nucleus": "shared nucleus (%)", "kl": "KL(full ‖ subgraph)",
           "entropy": "entropy of the subgraph output (nats)", "ce": "cross-entropy of the true token (nats)",
           "target_rank": "rank of the true token"}

_SHARE_COLOURS = {"attn": "#2563eb", "mlp": "#ea580c", "residual": "#6b7280"}
_GROUP_COLOURS = ("#0f766e", "#65a30d", "#ca8a04", "#b91c1c", "#7c3aed", "#0369a1", "#be185d", "#4b5563")


def _plain(text: object) -> str:
    """Text matplotlib shows literally (a ``$`` would otherwise start mathtext)."""
    return str(text).replace("$", r"\$")


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tl_strace.views._figure import StraceFigure

    fig = StraceFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _shade_phases(ax: Any, lo: float) -> None:
    for name, a, b, colour in PHASES:
        ax.axvspan(max(a, lo), b, color=colour, alpha=0.8, lw=0, zorder=0)
        ax.text(math.sqrt(max(a, lo) * b), 0.02, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=8, color="#475569")


def plot_curves(res: TraceResult, metric: str = "tv", *, ax: Any = None) -> Any:
    """``metric`` (default TV) against s on a log axis for every condition of ``res`` (the trace, and
    the random and inverse baselines when present), with paper B's construction [1e-4, 1e-2] and
    refinement [1e-2, 1] phases shaded. Draws into ``ax`` if given; returns the figure."""
    if metric not in _TITLES:
        raise InputError(f"Unknown metric {metric!r}; choose one of {sorted(_TITLES)}.")
    if ax is None:
        fig, axes = _new_figure(5.2, 3.2)
        ax = axes[0]
    fig = ax.figure
    x = res.sizes.double().numpy()
    lo = 10.0 ** math.floor(math.log10(max(float(x.min()), 1e-8)) + 1e-6)
    _shade_phases(ax, lo)
    for c, cond in enumerate(res.conditions):
        colour, dash, lw = CONDITION_STYLES.get(cond, ("#7c3aed", "", 1.5))
        y = res.curve(metric, cond).double().numpy()
        ls = "-" if not dash else ("--" if dash.startswith("5") else ":")
        ax.plot(x, y, ls, color=colour, lw=lw, marker="o" if cond == "only" else None, ms=2.5,
                label=cond if cond != "only" else "trace (only)", zorder=3)
    ax.set_xscale("log")
    ax.set_xlim(lo, 1.0)
    if metric == "tv":
        ax.set_ylim(-0.02, 1.02)
    elif metric == "nucleus":
        ax.set_ylim(-2, 102)
    ax.set_xlabel("subgraph size s (fraction of edges)")
    ax.set_ylabel(_TITLES[metric])
    name = _plain(res.model.get("name", ""))
    title = f"{name}: density {res.density:.3f}" if metric == "tv" else name
    if res.attention != "faithful":  # never shown unlabelled
        title += f"\n{attention_label(res.attention)}"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return fig


def plot_shares(res: TraceResult, *, n_groups: int = 4) -> Any:
    """Paper B's composition plot: the shares of attention, MLP and residual edges in the trace (left)
    and of ``n_groups`` equal layer groups (right), against s on a log axis."""
    df = edge_shares(res, n_groups=n_groups)
    fig, (a1, a2) = _new_figure(9.0, 3.2, ncols=2)
    x = df["size"].to_numpy()
    lo = 10.0 ** math.floor(math.log10(max(float(x.min()), 1e-8)) + 1e-6)
    for ax in (a1, a2):
        _shade_phases(ax, lo)
    for name in ("attn", "mlp", "residual"):
        a1.plot(x, df[name].to_numpy(), "-o", ms=2.5, lw=1.6, color=_SHARE_COLOURS[name],
                label={"attn": "attention", "mlp": "MLP", "residual": "residual"}[name], zorder=3)
    groups = [c for c in df.columns if c.startswith("layers ")]
    for i, name in enumerate(groups):
        a2.plot(x, df[name].to_numpy(), "-o", ms=2.5, lw=1.6, color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)],
                label=name, zorder=3)
    for ax, title in ((a1, "edge types in the trace"), (a2, "layer groups in the trace")):
        ax.set_xscale("log")
        ax.set_xlim(lo, 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("subgraph size s")
        ax.set_ylabel("share of the trace's edges")
        ax.set_title(f"{_plain(res.model.get('name', ''))}: {title}", fontsize=10)
        ax.grid(True, which="major", color="#e5e7eb", lw=0.6)
        ax.legend(fontsize=8, frameon=False, loc="center left")
    return fig


def _freeze_layout(fig: Any) -> None:
    """Run the constrained layout once at the figure's own dpi and keep it, so every later save (PNG
    at 200 dpi, SVG) uses the same positions and equal figures give equal files."""
    if fig.get_layout_engine() is not None:
        fig.canvas.draw()
        fig.set_layout_engine("none")


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """Save ``fig`` (format from the suffix); SVGs get fixed ids and no date, so equal figures give
    equal files, and keep their text as glyph outlines. Returns the path.

    The file is written atomically (:func:`tl_strace.fsutil.write_with`): a full disk leaves no
    truncated figure, a directory or device node at ``path`` is refused. The format is passed to
    matplotlib explicitly (the temporary file has no suffix); a path without a suffix gets the
    format's, as matplotlib does (``savefig.format``, PNG by default)."""
    import matplotlib

    from tl_strace.fsutil import write_with

    _freeze_layout(fig)
    path = os.fspath(path)
    fmt = kwargs.pop("format", None) or os.path.splitext(path)[1][1:].lower()
    if not fmt:
        fmt = str(matplotlib.rcParams["savefig.format"])
        path = f"{path}.{fmt}"
    fmt = str(fmt).lower()
    if fmt == "svg":
        def write(tmp: Any) -> None:
            with matplotlib.rc_context({"svg.hashsalt": "tl_strace"}):
                fig.savefig(tmp, format=fmt, metadata={"Date": None}, **kwargs)
    else:
        kwargs.setdefault("dpi", 200)

        def write(tmp: Any) -> None:
            fig.savefig(tmp, format=fmt, **kwargs)
    write_with(path, write, what="figure file")
    return path


def figure_svg(fig: Any) -> str:
    """``fig`` as inline SVG markup for an HTML page: text kept as text (small), fixed ids, no date."""
    import io

    import matplotlib

    _freeze_layout(fig)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "tl_strace", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def save_plots(res: TraceResult, prefix: str | os.PathLike, formats: tuple[str, ...] = ("png", "svg")) -> list[str]:
    """Save the curve and composition figures as ``{prefix}_curves.{fmt}`` and
    ``{prefix}_shares.{fmt}`` for each format; returns the paths written."""
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise InputError(f"Unknown figure formats {bad}; choose from png, svg, pdf.")
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    out = []
    fig_c, fig_s = plot_curves(res), plot_shares(res)
    for name, fig in (("curves", fig_c), ("shares", fig_s)):
        for fmt in formats:
            out.append(save_figure(fig, f"{prefix}_{name}.{fmt}"))
    return out
