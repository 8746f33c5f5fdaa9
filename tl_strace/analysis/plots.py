"""The analyses as matplotlib figures (a new Figure each; no pyplot, no global style or backend change)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tl_strace.ablation import attention_label
from tl_strace.analysis._base import (
    BOUNDARY,
    LAYER_COLUMNS,
    MINIMAL_CORE,
    RunLike,
    SHARE_COLUMNS,
    _labels,
    _run,
    _runs,
)
from tl_strace.analysis.stats import spearman
from tl_strace.analysis.tables import edge_shares, interpolated_curves, lorenz_curves, mean_curve, unigram_frequency
from tl_strace.errors import InputError


def _figure(w: float = 6.4, h: float = 4.0, ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover
        raise InputError("Plots need matplotlib: pip install matplotlib (the analyses themselves do not).") from e
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(w * ncols, h), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend is; no global state touched
    axes = fig.subplots(1, ncols)
    return fig, axes


def _safe(text: str) -> str:
    """Text matplotlib shows literally (a ``$`` would otherwise start mathtext)."""
    return str(text).replace("$", r"\$")


def _phase_lines(ax: Any) -> None:
    ax.axvline(BOUNDARY, color="0.4", ls="--", lw=1)
    ax.axvline(MINIMAL_CORE, color="0.7", ls=":", lw=1)


def _size_axis(ax: Any, ylabel: str, *, xlabel: str = "subgraph size s") -> None:
    """The x-axis every curve shares: log s with paper B's phases marked, and a legend."""
    _phase_lines(ax)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")


def plot_density_distribution(runs: RunLike | Sequence[RunLike]):
    """Histogram of per-passage density, one per run."""
    rs = _runs(runs)
    fig, ax = _figure()
    for r, label in zip(rs, _labels(rs)):
        ax.hist(r.table["density"].astype(float).dropna(), bins=30, alpha=0.5, label=_safe(label))
    ax.set_xlabel("density (area under TV over log10 s)")
    ax.set_ylabel("passages")
    ax.legend(fontsize="small")
    return fig


def plot_tv_curves(runs: RunLike | Sequence[RunLike], column: str = "tv"):
    """Mean (and inter-quartile band) of a per-stratum column against s, one line per run."""
    rs = _runs(runs)
    fig, ax = _figure()
    for r, label in zip(rs, _labels(rs)):
        c = mean_curve(r, column)
        ax.plot(c["size"], c["mean"], marker=".", label=_safe(label))
        ax.fill_between(c["size"], c["q25"], c["q75"], alpha=0.2)
    _size_axis(ax, f"{column} (mean, IQR)", xlabel="subgraph size s (fraction of edges)")
    return fig


def plot_interpolated_curves(runs: RunLike | Sequence[RunLike], column: str = "tv", *, band: str = "iqr"):
    """The picture a reader of paper B compares first: each run's curves resampled on the paper's
    grid (np.logspace(-5, 0, 150)) and averaged, one line per run with its spread (``band="iqr"``:
    inter-quartile range; ``"std"``: mean ± one standard deviation). One run: its own figure; several:
    the overlay. A run whose attention was never ablated says so in its label."""
    if band not in ("iqr", "std"):
        raise InputError(f"band must be 'iqr' or 'std'; got {band!r}.")
    rs = _runs(runs)
    fig, ax = _figure()
    for r, label in zip(rs, _labels(rs)):
        c = interpolated_curves(r, column)
        lo, hi = (c["q25"], c["q75"]) if band == "iqr" else (c["mean"] - c["std"], c["mean"] + c["std"])
        ax.plot(c["size"], c["mean"], label=_safe(f"{label} (n = {int(c['n'].iloc[0])})"))
        ax.fill_between(c["size"], lo, hi, alpha=0.2)
    what = "IQR" if band == "iqr" else "± 1 sd"
    _size_axis(ax, f"{column} to the full model (mean, {what})", xlabel="subgraph size s (fraction of edges)")
    ax.legend(fontsize="small", loc="lower left")  # TV curves fall to the right: the lower left is free
    return fig


def plot_entropy_density(run: RunLike):
    """Scatter of full-model entropy against density, with Spearman rho in the title."""
    r = _run(run)
    fig, ax = _figure()
    ax.scatter(r.table["full_entropy"], r.table["density"], s=8, alpha=0.6)
    rho, p, n = spearman(r.table["full_entropy"], r.table["density"])
    ax.set_title(f"{_safe(r.name)}: Spearman rho = {rho:.3f} (p = {p:.2g}, n = {n})", fontsize="medium")
    ax.set_xlabel("entropy of the full model's next-token distribution (nats)")
    ax.set_ylabel("density")
    return fig


def plot_cross_model(matrix: pd.DataFrame):
    """Heat map of a :func:`cross_model_density` matrix."""
    import textwrap

    # Run names ("qwen2.5-coder-0.5b, 20 words, attention never ablated ...") wrapped, and the figure
    # sized by the matrix and its longest label line, so the axes never collapse to nothing.
    def label(c: Any) -> str:
        return "\n".join(textwrap.wrap(_safe(c), 26)) or " "

    xl, yl = [label(c) for c in matrix.columns], [label(c) for c in matrix.index]
    longest = max((len(line) for lab in xl + yl for line in lab.split("\n")), default=1)
    n = len(matrix)
    fig, ax = _figure(max(5.5, 2.0 + 0.7 * n + 0.08 * longest), max(4.5, 1.5 + 0.6 * n + 0.06 * longest))
    im = ax.imshow(matrix.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), xl, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(n), yl, fontsize="small")
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            ax.text(j, i, f"{matrix.iat[i, j]:.2f}", ha="center", va="center", fontsize="small")
    fig.colorbar(im, ax=ax, label="Spearman rho of density")
    return fig


def plot_edge_shares(run: RunLike):
    """Two panels: edge-type shares and layer-group shares of the trace against s."""
    df = edge_shares(run)
    fig, (a, b) = _figure(ncols=2)
    for col, lab in zip(SHARE_COLUMNS, ("attention", "MLP", "residual")):
        a.plot(df["size"], df[col], marker=".", label=lab)
    L = int(_run(run).config.get("model", {}).get("n_layers") or 4)
    for g, col in enumerate(LAYER_COLUMNS):
        lo, hi = -(-g * L // 4), -(-(g + 1) * L // 4) - 1
        if lo > hi:  # fewer than four blocks: this group is empty
            continue
        b.plot(df["size"], df[col], marker=".", label=f"layers {lo}–{hi}")
    for ax, t in ((a, "edge type"), (b, "layer group")):
        _phase_lines(ax)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("subgraph size s")
        ax.set_ylabel(f"share of the trace's edges ({t})")
        ax.legend(fontsize="small")
    return fig


def plot_lorenz(run: RunLike, sizes: Sequence[float] | None = None):
    """Lorenz curves of component use, one per recorded size, with Gini coefficients."""
    df = lorenz_curves(run, sizes)
    fig, ax = _figure(5.0, 4.5)
    for s, g in df.groupby("size"):
        ax.plot(g["x"], g["y"], label=f"s = {s:g} (Gini {g['gini'].iloc[0]:.2f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    ax.set_xlabel("cumulative share of components (least used first)")
    ax.set_ylabel("cumulative share of uses")
    ax.legend(fontsize="small")
    return fig


def plot_unigram(run: RunLike):
    """Mean log10 frequency of the trace's top token against s, with the full model's as a line."""
    df = unigram_frequency(run)
    fig, ax = _figure()
    ax.plot(df["size"], df["mean_log10_freq"], marker=".", label="top token of the trace at s")
    ax.axhline(df["full_mean_log10_freq"].iloc[0], color="k", lw=1, label="top token of the full model")
    _size_axis(ax, "mean log10 unigram frequency", xlabel="subgraph size s")
    return fig


def plot_density_vs_context(runs: Sequence[RunLike]):
    """Density distributions per context length (box plot)."""
    rs = sorted(_runs(runs), key=lambda r: r.context_words or 0)
    fig, ax = _figure()
    ax.boxplot([r.table["density"].astype(float).dropna() for r in rs],
               tick_labels=[f"{r.context_words} words" for r in rs])
    ax.set_ylabel("density")
    return fig


def plot_density_along_text(run: RunLike):
    """Density against the prediction's context length, over every position of every passage
    (an every-position run): the mean with its inter-quartile band, per context length."""
    r = _run(run)
    if r.profile is None:
        raise InputError(f"{r.path} is not an every-position run (tl-strace run --every-position).")
    g = r.profile.groupby("n_tokens")["density"]
    x = np.asarray(g.mean().index, dtype=float)
    fig, ax = _figure()
    ax.plot(x, g.mean().to_numpy(), marker=".", label="mean")
    ax.fill_between(x, g.quantile(0.25).to_numpy(), g.quantile(0.75).to_numpy(), alpha=0.2, label="IQR")
    ax.set_xlabel("tokens of context (the prefix the prediction sees)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return fig


def plot_attention_ablation(faithful: RunLike, kept: RunLike):
    """Mean TV against s for the faithful run and the run with attention never ablated."""
    a, b = _run(faithful), _run(kept)
    fig, ax = _figure()
    for r, lab in ((a, "attention ablated (faithful)"), (b, attention_label("never-ablated"))):
        c = mean_curve(r, "tv")
        ax.plot(c["size"], c["mean"], marker=".", label=lab)
        ax.fill_between(c["size"], c["q25"], c["q75"], alpha=0.2)
    _size_axis(ax, "TV to the full model (mean, IQR)", xlabel="subgraph size s")
    return fig
