"""Views of a :class:`~tl_strace.results.DensityProfile`: the text coloured by density (circuitsvis
``ColoredTokens``, offline, tokens escaped) and a density-by-position matplotlib figure.

>>> profile_view(prof)          # Jupyter: the coloured text and the per-position table   # doctest: +SKIP
>>> plot_profile(prof)          # a matplotlib figure                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from tl_strace.results import DensityProfile
from tl_strace.views._html import HTMLView, esc, round_sig
from tl_strace.views.detail import CircuitsvisFigure, _as_html_text, figures_html

__all__ = ["plot_profile", "profile_figure", "profile_view", "save_profile_html"]


def profile_figure(prof: DensityProfile) -> CircuitsvisFigure:
    """circuitsvis ``ColoredTokens`` of the text, token ``t`` coloured by the density of the
    prediction after it (paper B's area under TV over log10 s).

    The colour scale runs from the lowest to the highest density of the profile; tokens whose
    prediction was not traced get the lowest value (the table beside the figure lists the traced
    ones). Token text is entity-escaped (circuitsvis puts it into ``innerHTML``; see
    :func:`tl_strace.views.detail._as_html_text`) and the props reach the page through
    :func:`~tl_strace.views._html.script_json` (:func:`~tl_strace.views.detail.figures_html`).
    """
    dens = [float(d) for d in prof.density]
    lo, hi = min(dens), max(dens)
    values = [lo] * len(prof.str_tokens)
    for t, d in zip(prof.positions, dens):
        values[t] = d
    toks = list(prof.str_tokens)
    table: list[tuple[str, ...]] = [("position", "token", "next token", "predicted", "density")]
    for t, r, d in zip(prof.positions, prof.results, dens):
        table.append((str(t), repr(toks[t]), repr(toks[t + 1]) if t + 1 < len(toks) else "",
                      repr(r.full_top_strs[0]), f"{d:.4f}"))
    name = str(prof.model.get("name", ""))
    return CircuitsvisFigure(
        "ColoredTokens",
        {"tokens": _as_html_text(list(prof.str_tokens)), "values": [round_sig(v, 4) for v in values],
         "minValue": round_sig(lo, 4), "maxValue": round_sig(hi if hi > lo else lo + 1e-9, 4)},
        title=f"{name}: density of the prediction after each token ({len(prof.positions)} positions; "
              f"{lo:.3f} to {hi:.3f})",
        note="Each token is coloured by the density (area under TV over log10 s) of the model's prediction of "
             "the next token; hover a token for its value. Untraced tokens take the lowest colour.",
        table=tuple(table))


def profile_view(prof: DensityProfile) -> HTMLView:
    """The coloured text (:func:`profile_figure`) as a self-contained view (circuitsvis bundle inlined)."""
    fig = profile_figure(prof)
    return HTMLView(figures_html([fig]), title=fig.title, text=repr(prof))


def save_profile_html(prof: DensityProfile, path: str | os.PathLike) -> str:
    """Write :func:`profile_view` as a standalone page (offline); returns the path."""
    view = profile_view(prof)
    body = f"<h1>{esc(view.title)}</h1>\n{view.html}"
    return HTMLView(body, title=view.title).save(path)


def plot_profile(prof: DensityProfile, *, ax: Any = None) -> Any:
    """Density against position (tokens on the x-axis), a matplotlib figure (no pyplot); draws into
    ``ax`` if given."""
    from tl_strace.views.plots import _new_figure, _plain

    if ax is None:
        _, axes = _new_figure(max(5.2, 0.28 * len(prof.positions) + 2.0), 3.2)
        ax = axes[0]
    fig = ax.figure
    x = list(prof.positions)
    ax.plot(x, prof.density.numpy(), "-o", ms=3, lw=1.6, color="#2563eb", zorder=3)
    if len(x) <= 60:  # beyond that the labels overlap: positions only
        ax.set_xticks(x)
        ax.set_xticklabels([_plain(repr(prof.str_tokens[t])) for t in x], rotation=90, fontsize=7)
    ax.set_xlabel("position (the prediction after this token)")
    ax.set_ylabel("density (area under TV over log10 s)")
    ax.set_title(f"{_plain(prof.model.get('name', ''))}: density along the text", fontsize=10)
    ax.grid(True, which="major", color="#e5e7eb", lw=0.6)
    return fig
