"""The papers' corpus analyses (METHOD.md §7) over runs recorded by :mod:`tl_strace.corpus`.

Every analysis is a function from one or more :class:`~tl_strace.corpus.CorpusRun` (or run
directories) to a :class:`pandas.DataFrame`; ``plot_*`` functions draw them on a new
:class:`matplotlib.figure.Figure` (no pyplot, no global style or backend change). Nothing here
runs a model: the runs hold every number needed.

>>> from tl_strace.corpus import load_run                      # doctest: +SKIP
>>> run = load_run("runs/smol")                                # doctest: +SKIP
>>> entropy_density(run)                                       # doctest: +SKIP
             run    n       rho         p
0  smollm2-135m  200  0.41  1.2e-09
>>> edge_shares(run).query("size in (0.001, 0.1)")             # doctest: +SKIP

The statistics are SciPy's: Spearman's rho (``scipy.stats.spearmanr``: ranks with ties averaged,
two-sided p from the t approximation with n-2 degrees of freedom), the exact sign test
(``binomtest``) and t p-values; they were hand-written here before 0.2 and gave the same numbers.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from tl_strace.corpus import CorpusRun, load_run
from tl_strace.density import CURVE_GRID, interpolate_curve
from tl_strace.errors import InputError
from tl_strace.fsutil import atomic_write, check_output_path

__all__ = [
    "BOUNDARY",
    "MINIMAL_CORE",
    "attention_ablation_comparison",
    "build_report",
    "component_frequency",
    "cross_model_density",
    "density_distribution",
    "density_vs_context",
    "density_vs_frequency",
    "edge_shares",
    "entropy_density",
    "lorenz_curves",
    "mean_curve",
    "plot_attention_ablation",
    "plot_cross_model",
    "plot_density_distribution",
    "plot_density_vs_context",
    "plot_edge_shares",
    "plot_entropy_density",
    "plot_lorenz",
    "plot_tv_curves",
    "plot_unigram",
    "sign_test",
    "spearman",
    "t_pvalue",
    "unigram_frequency",
    "write_report",
]

BOUNDARY = 1e-2
"""Paper B's boundary between the construction (s < 1e-2) and refinement (s ≥ 1e-2) phases."""
MINIMAL_CORE = 1e-3
"""Paper B's "minimal core" size."""
SHARE_COLUMNS = ("share_attn", "share_mlp", "share_residual")
LAYER_COLUMNS = ("share_layers_0", "share_layers_1", "share_layers_2", "share_layers_3")

RunLike = CorpusRun | str | os.PathLike


def _run(r: RunLike) -> CorpusRun:
    return r if isinstance(r, CorpusRun) else load_run(r)


def _runs(rs: RunLike | Sequence[RunLike]) -> list[CorpusRun]:
    if isinstance(rs, (CorpusRun, str, os.PathLike)):
        return [_run(rs)]
    return [_run(r) for r in rs]


def _need(run: CorpusRun, *cols: str) -> None:
    missing = [c for c in cols if c not in run.table]
    if len(run.table) == 0:
        raise InputError(f"{run.path} has no traced passages yet.")
    if missing:
        raise InputError(f"{run.path} lacks the column(s) {missing} (written by another runner version or method).")


def _labels(runs: Sequence[CorpusRun]) -> list[str]:
    """Run names, made unique by appending the directory name when two coincide."""
    names = [r.name for r in runs]
    return [f"{n} [{r.path.name}]" if names.count(n) > 1 else n for n, r in zip(names, runs)]


# ============================================================================ statistics
def t_pvalue(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom (SciPy's ``t.sf``).

    >>> round(t_pvalue(1.0, 1.0), 6)   # Cauchy: P(|T| > 1) = 1/2
    0.5
    >>> round(t_pvalue(2.228139, 10.0), 4)
    0.05
    """
    return float(2.0 * stats.t.sf(abs(t), df))


def spearman(x: Any, y: Any) -> tuple[float, float, int]:
    """Spearman's rho, its two-sided p-value (t approximation) and n, over pairs where both are finite.

    >>> rho, p, n = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    >>> round(rho, 4), n
    (0.8208, 5)
    """
    a = pd.Series(np.asarray(x, dtype=np.float64))
    b = pd.Series(np.asarray(y, dtype=np.float64))
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(len(a))
    if n < 3:
        return float("nan"), float("nan"), n
    if a.nunique() < 2 or b.nunique() < 2:  # constant input: no rank correlation (SciPy would warn)
        return float("nan"), float("nan"), n
    res = stats.spearmanr(a.to_numpy(), b.to_numpy())  # ties averaged; two-sided p from the t approximation
    return float(res.statistic), float(res.pvalue), n


def sign_test(diff: Any) -> tuple[int, int, float]:
    """Exact two-sided sign test: (number > 0, number < 0, p-value); zeros and NaN are left out."""
    d = np.asarray(diff, dtype=np.float64)
    d = d[np.isfinite(d)]
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return pos, neg, float("nan")
    return pos, neg, float(stats.binomtest(pos, n, 0.5).pvalue)


# ============================================================================ curves
def _common_sizes(run: CorpusRun) -> np.ndarray | None:
    sizes = run.table["sizes"].tolist()
    first = sizes[0]
    return np.asarray(first, dtype=np.float64) if all(s == first for s in sizes) else None


def _on_grid(run: CorpusRun, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, values [passage, size]): the runs' own sizes when shared, else CURVE_GRID."""
    _need(run, "sizes", column)
    common = _common_sizes(run)
    if common is not None:
        return common, run.curves(column)
    vals = np.stack([interpolate_curve(s, v) for s, v in zip(run.table["sizes"], run.table[column])])
    return CURVE_GRID.copy(), vals


def mean_curve(run: RunLike, column: str = "tv") -> pd.DataFrame:
    """A per-stratum column averaged over passages: size, mean, median, q25, q75, n."""
    r = _run(run)
    x, v = _on_grid(r, column)
    with warnings.catch_warnings():  # all-NaN columns (strata with no edge) give NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return pd.DataFrame({"size": x, "mean": np.nanmean(v, 0), "median": np.nanmedian(v, 0),
                             "q25": np.nanpercentile(v, 25, 0), "q75": np.nanpercentile(v, 75, 0),
                             "n": np.isfinite(v).sum(0)})


def _value_at(run: CorpusRun, column: str, s: float) -> np.ndarray:
    """Per passage, a per-stratum column at size s (the nearest stratum on a log scale)."""
    x, v = _on_grid(run, column)
    k = int(np.argmin(np.abs(np.log10(x) - math.log10(s))))
    return v[:, k]


# ============================================================================ analyses
def density_distribution(runs: RunLike | Sequence[RunLike]) -> pd.DataFrame:
    """Per run: n, mean/std/quantiles of density (log-s AUC, paper B) and mean linear-s density (paper A)."""
    rows = []
    for r, label in zip(rs := _runs(runs), _labels(rs)):
        _need(r, "density")
        d = r.table["density"].astype(float)
        rows.append({"run": label, "n": int(d.notna().sum()), "mean": d.mean(), "std": d.std(), "min": d.min(),
                     "q10": d.quantile(0.1), "median": d.median(), "q90": d.quantile(0.9), "max": d.max(),
                     "mean_linear": r.table["density_linear"].astype(float).mean(),
                     "median_top_token_size": r.table["recovery_1"].astype(float).median()
                     if "recovery_1" in r.table else float("nan")})
    return pd.DataFrame(rows)


def entropy_density(runs: RunLike | Sequence[RunLike]) -> pd.DataFrame:
    """Per run: Spearman rho between full-model entropy and density, with p-value and n (finding 2)."""
    rows = []
    for r, label in zip(rs := _runs(runs), _labels(rs)):
        _need(r, "density", "full_entropy")
        rho, p, n = spearman(r.table["full_entropy"], r.table["density"])
        rho_l, p_l, _ = spearman(r.table["full_entropy"], r.table["density_linear"])
        rows.append({"run": label, "n": n, "rho": rho, "p": p, "rho_linear": rho_l, "p_linear": p_l})
    return pd.DataFrame(rows)


def cross_model_density(runs: Sequence[RunLike], *, column: str = "density") -> pd.DataFrame:
    """Spearman rho between runs' per-passage densities, over the passages they share (by id):
    a square matrix indexed by run name (finding 4). ``df.attrs["n"]`` / ``["p"]`` hold the pair
    counts and p-values."""
    rs = _runs(runs)
    labels = _labels(rs)
    series = [r.table.set_index("id")[column].astype(float) for r in rs]
    m = len(rs)
    rho, p, n = np.eye(m), np.zeros((m, m)), np.zeros((m, m), dtype=int)
    for i in range(m):
        n[i, i] = int(series[i].notna().sum())
        for j in range(i + 1, m):
            both = pd.concat([series[i], series[j]], axis=1, join="inner")
            rho[i, j], p[i, j], n[i, j] = spearman(both.iloc[:, 0], both.iloc[:, 1])
            rho[j, i], p[j, i], n[j, i] = rho[i, j], p[i, j], n[i, j]
    df = pd.DataFrame(rho, index=labels, columns=labels)
    df.attrs["n"] = pd.DataFrame(n, index=labels, columns=labels)
    df.attrs["p"] = pd.DataFrame(p, index=labels, columns=labels)
    return df


def edge_shares(run: RunLike) -> pd.DataFrame:
    """Mean over passages, per size, of the trace's shares of attention / MLP / residual edges and of
    four equal layer groups (``share_layers_0`` = the first quarter of the blocks), with the phase
    (construction below :data:`BOUNDARY`, refinement from it)."""
    r = _run(run)
    out: dict[str, Any] = {}
    for col in SHARE_COLUMNS + LAYER_COLUMNS:
        x, v = _on_grid(r, col)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[col] = np.nanmean(v, 0)
        out["size"] = x
    df = pd.DataFrame(out)[["size", *SHARE_COLUMNS, *LAYER_COLUMNS]]
    # s = 1e-2 opens the refinement phase (whether sizes were stored in float32 or float64)
    df["phase"] = np.where(df["size"] < BOUNDARY * (1 - 1e-6), "construction", "refinement")
    return df


def component_frequency(run: RunLike, sizes: Sequence[float] | None = None) -> pd.DataFrame:
    """For each recorded size and each component (head ``L3H7`` / ``MLP3``): the fraction of passages
    whose trace uses it, and its mean edge count there. Components never used get frequency 0."""
    r = _run(run)
    _need(r, "components")
    recorded = sorted({k for c in r.table["components"] for k in c}, key=float)
    want = recorded if sizes is None else [f"{float(s):g}" for s in sizes]
    missing = [s for s in want if s not in recorded]
    if missing:
        raise InputError(f"{r.path} recorded components at sizes {recorded}, not at {missing}; rerun the corpus "
                         "with record_sizes including them.")
    L = int(r.config.get("model", {}).get("n_layers") or 0)
    H = int(r.config.get("model", {}).get("n_heads") or 0)
    universe = [f"L{l}H{h}" for l in range(L) for h in range(H)] + [f"MLP{l}" for l in range(L)]
    rows = []
    n = len(r.table)
    for s in want:
        counts: dict[str, list[int]] = {c: [] for c in universe}
        for comp in r.table["components"]:
            for name, e in comp.get(s, {}).items():
                counts.setdefault(name, []).append(int(e))
        for name, es in counts.items():
            rows.append({"size": float(s), "component": name, "kind": "mlp" if name.startswith("MLP") else "head",
                         "layer": int(name[3:] if name.startswith("MLP") else name[1:].split("H")[0]),
                         "frequency": len(es) / n, "mean_edges": float(np.mean(es)) if es else 0.0})
    df = pd.DataFrame(rows)
    return df.sort_values(["size", "frequency", "layer"], ascending=[True, False, True]).reset_index(drop=True)


def lorenz_curves(run: RunLike, sizes: Sequence[float] | None = None) -> pd.DataFrame:
    """Lorenz curves of component use per size: components sorted from least to most used; ``x`` the
    cumulative share of components, ``y`` the cumulative share of (passage, component) uses; and
    the Gini coefficient per size (0 = every component used equally, → 1 = a few used always)."""
    freq = component_frequency(run, sizes)
    rows = []
    for s, g in freq.groupby("size"):
        f = np.sort(g["frequency"].to_numpy())
        tot = f.sum()
        y = np.concatenate([[0.0], np.cumsum(f) / tot]) if tot > 0 else np.linspace(0, 1, len(f) + 1)
        x = np.linspace(0.0, 1.0, len(f) + 1)
        area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
        gini = 1.0 - 2.0 * area if tot > 0 else float("nan")
        rows += [{"size": s, "x": a, "y": b, "gini": gini} for a, b in zip(x, y)]
    return pd.DataFrame(rows)


def _log_freq(run: CorpusRun) -> tuple[dict[int, float], float]:
    if not run.unigram:
        raise InputError(f"{run.path} has no unigram counts (unigram.json); the model had no tokenizer.")
    total = float(sum(run.unigram.values()))
    vocab = float(len(run.unigram))
    return {k: math.log10((v + 1) / (total + vocab)) for k, v in run.unigram.items()}, math.log10(1 / (total + vocab))


def unigram_frequency(run: RunLike) -> pd.DataFrame:
    """Per size: how frequent (log10 relative unigram frequency in the corpus, under the model's
    tokenizer, add-one smoothed) the trace's top token is, against the full model's top token
    (finding 3). Columns: size, mean/median log10 frequency of the stratum's top token, the same for
    the full model, the mean paired difference, the fraction of passages where the stratum's top
    token is more / less frequent than the full model's, a sign-test p-value, the fraction where
    they are the same token, and the fraction of strata that reach an input node (below that size
    the trace's output does not depend on the input, so its top token is a constant)."""
    r = _run(run)
    _need(r, "top_ids", "full_top_id")
    lf, floor = _log_freq(r)
    x, _ = _on_grid(r, "tv")
    if _common_sizes(r) is None:
        raise InputError("unigram_frequency needs runs whose strata share their sizes (method='strace').")
    top = r.curves("top_ids").astype(np.int64)
    reach = r.curves("reaches_input") if "reaches_input" in r.table else np.full(top.shape, np.nan)
    full = r.table["full_top_id"].to_numpy(dtype=np.int64)
    f_top = np.vectorize(lambda i: lf.get(int(i), floor))(top)
    f_full = np.array([lf.get(int(i), floor) for i in full])
    rows = []
    for k, s in enumerate(x):
        d = f_top[:, k] - f_full
        more, less, p = sign_test(d)
        rows.append({"size": float(s), "mean_log10_freq": f_top[:, k].mean(),
                     "median_log10_freq": np.median(f_top[:, k]),
                     "full_mean_log10_freq": f_full.mean(), "mean_diff": d.mean(),
                     "frac_more_frequent": more / len(d), "frac_less_frequent": less / len(d), "sign_p": p,
                     "frac_same_token": float((top[:, k] == full).mean()),
                     "frac_reaches_input": float(np.nanmean(reach[:, k])) if np.isfinite(reach[:, k]).any()
                     else float("nan")})
    return pd.DataFrame(rows)


def density_vs_frequency(run: RunLike, *, bins: int = 5, token: str = "predicted") -> pd.DataFrame:
    """Density against the corpus frequency of the predicted token (the full model's top token;
    ``token="target"`` for the true next token): mean density per frequency quantile bin, with
    Spearman rho over all passages in ``df.attrs`` (paper A: rarer predictions need more density)."""
    r = _run(run)
    col = {"predicted": "full_top_id", "target": "target_id"}.get(token)
    if col is None:
        raise InputError(f"token must be 'predicted' or 'target'; got {token!r}.")
    _need(r, "density", col)
    lf, floor = _log_freq(r)
    ids = r.table[col]
    f = np.array([lf.get(int(i), floor) if pd.notna(i) else np.nan for i in ids])
    d = r.table["density"].to_numpy(dtype=float)
    ok = np.isfinite(f)
    rho, p, n = spearman(f, d)
    q = pd.qcut(pd.Series(f[ok]).rank(method="first"), q=min(bins, int(ok.sum())), labels=False)
    df = pd.DataFrame({"bin": q.to_numpy(), "log10_freq": f[ok], "density": d[ok]})
    out = df.groupby("bin").agg(n=("density", "size"), log10_freq_min=("log10_freq", "min"),
                                log10_freq_max=("log10_freq", "max"), mean_density=("density", "mean"),
                                median_density=("density", "median")).reset_index()
    out.attrs.update(rho=rho, p=p, n=n, token=token)
    return out


def density_vs_context(runs: Sequence[RunLike]) -> pd.DataFrame:
    """Density against context length, over runs of the same passages cut to different lengths
    (e.g. the shipped ``austen-10/20/40``): per run, its context length, n, mean/median density,
    and against the longest context (paired by passage id) the mean difference and the fraction of
    passages whose density is lower with the longer context. ``df.attrs`` has the Spearman rho
    between context length and density over all (passage, length) pairs."""
    rs = _runs(runs)
    if len(rs) < 2:
        raise InputError("density_vs_context needs runs of at least two context lengths.")
    cws = [r.context_words for r in rs]
    if any(c is None for c in cws) or len(set(cws)) != len(cws):
        raise InputError(f"Each run must have one distinct context length; got {cws}.")
    order = sorted(range(len(rs)), key=lambda i: cws[i])
    longest = rs[order[-1]].table.set_index("id")["density"].astype(float)
    rows, pooled_x, pooled_y = [], [], []
    for i in order:
        r = rs[i]
        d = r.table.set_index("id")["density"].astype(float)
        both = pd.concat([d, longest], axis=1, join="inner").dropna()
        diff = both.iloc[:, 1] - both.iloc[:, 0]  # longest minus this one
        rows.append({"run": r.name, "context_words": cws[i], "n": int(d.notna().sum()), "mean_density": d.mean(),
                     "median_density": d.median(), "mean_tokens": r.table["n_tokens"].mean(),
                     "n_paired_with_longest": len(both), "mean_diff_longest_minus_this": diff.mean(),
                     "frac_longest_lower": float((diff < 0).mean()) if len(both) else float("nan")})
        pooled_x += [cws[i]] * int(d.notna().sum())
        pooled_y += d.dropna().tolist()
    df = pd.DataFrame(rows)
    rho, p, n = spearman(pooled_x, pooled_y)
    df.attrs.update(rho=rho, p=p, n=n)
    return df


def attention_ablation_comparison(faithful: RunLike, kept: RunLike,
                                  sizes: Sequence[float] = (1e-3, 1e-2, 0.1, 0.4)) -> pd.DataFrame:
    """The faithful run beside the same run with attention edges never ablated, over the passages
    both traced: mean/median density, median size at which the top token is recovered, fraction
    recovered by s = 1e-2, mean TV at ``sizes``, early-layer share at 1e-3, and (as ``attrs``) the
    Spearman rho between the two runs' densities."""
    a, b = _run(faithful), _run(kept)
    ids = sorted(set(a.table["id"]) & set(b.table["id"]))
    if not ids:
        raise InputError(f"{a.path} and {b.path} share no passages.")
    rows = []
    for label, r in (("attention ablated (faithful)", a), ("attention never ablated", b)):
        t = r.table.set_index("id").loc[ids].reset_index()
        sub = CorpusRun(r.path, r.config, r.versions, t, r.skipped, r.unigram)
        row: dict[str, Any] = {"run": label, "n": len(t), "mean_density": t["density"].mean(),
                               "median_density": t["density"].median(),
                               "median_top_token_size": t["recovery_1"].median(),
                               "frac_top_token_by_1e-2": float((t["recovery_1"] <= BOUNDARY).mean())}
        for s in sizes:
            row[f"mean_tv@{s:g}"] = float(np.nanmean(_value_at(sub, "tv", s)))
        if "share_layers_0" in t:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                row["early_share@1e-3"] = float(np.nanmean(_value_at(sub, "share_layers_0", MINIMAL_CORE)))
        rows.append(row)
    df = pd.DataFrame(rows)
    ja = a.table.set_index("id").loc[ids, "density"]
    jb = b.table.set_index("id").loc[ids, "density"]
    df.attrs["rho"], df.attrs["p"], df.attrs["n"] = spearman(ja, jb)
    return df


# ============================================================================ plots
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
    _phase_lines(ax)
    ax.set_xscale("log")
    ax.set_xlabel("subgraph size s (fraction of edges)")
    ax.set_ylabel(f"{column} (mean, IQR)")
    ax.legend(fontsize="small")
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
    fig, ax = _figure(5.5, 4.5)
    im = ax.imshow(matrix.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(matrix)), [_safe(c) for c in matrix.columns], rotation=45, ha="right",
                  fontsize="small")
    ax.set_yticks(range(len(matrix)), [_safe(c) for c in matrix.index], fontsize="small")
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
    _phase_lines(ax)
    ax.set_xscale("log")
    ax.set_xlabel("subgraph size s")
    ax.set_ylabel("mean log10 unigram frequency")
    ax.legend(fontsize="small")
    return fig


def plot_density_vs_context(runs: Sequence[RunLike]):
    """Density distributions per context length (box plot)."""
    rs = sorted(_runs(runs), key=lambda r: r.context_words or 0)
    fig, ax = _figure()
    ax.boxplot([r.table["density"].astype(float).dropna() for r in rs],
               tick_labels=[f"{r.context_words} words" for r in rs])
    ax.set_ylabel("density")
    return fig


def plot_attention_ablation(faithful: RunLike, kept: RunLike):
    """Mean TV against s for the faithful run and the run with attention never ablated."""
    a, b = _run(faithful), _run(kept)
    fig, ax = _figure()
    for r, lab in ((a, "attention ablated (faithful)"), (b, "attention never ablated")):
        c = mean_curve(r, "tv")
        ax.plot(c["size"], c["mean"], marker=".", label=lab)
        ax.fill_between(c["size"], c["q25"], c["q75"], alpha=0.2)
    _phase_lines(ax)
    ax.set_xscale("log")
    ax.set_xlabel("subgraph size s")
    ax.set_ylabel("TV to the full model (mean, IQR)")
    ax.legend(fontsize="small")
    return fig


def group_runs(runs: Sequence[CorpusRun]) -> dict[str, Any]:
    """Which runs go together in a report: by model weights, context length and attention ablation.

    Returns ``{"faithful": [...], "attention_pairs": [(faithful, kept)], "context_groups": [[...]],
    "cross_model": [...]}``.
    """
    def key(r: CorpusRun) -> str:
        return str(r.config.get("model", {}).get("weights_sha256"))

    faithful = [r for r in runs if r.config.get("ablate_attention", True)]
    kept = [r for r in runs if not r.config.get("ablate_attention", True)]
    pairs = []
    for k in kept:
        for f in faithful:
            if key(f) == key(k) and f.context_words == k.context_words and \
                    set(f.table.get("id", [])) & set(k.table.get("id", [])):
                pairs.append((f, k))
                break
    by_model: dict[str, list[CorpusRun]] = {}
    for f in faithful:
        by_model.setdefault(key(f), []).append(f)
    ctx = []
    for g in by_model.values():
        one_per_length: dict[int, CorpusRun] = {}
        for r in g:
            if r.context_words is not None:
                one_per_length.setdefault(r.context_words, r)
        runs_ = list(one_per_length.values())
        if len(runs_) > 1 and set.intersection(*(set(r.table["id"]) for r in runs_)):
            ctx.append(runs_)
    cross: list[CorpusRun] = []
    if len(by_model) > 1:  # one run per model, the longest context
        cross = [max(g, key=lambda r: r.context_words or 0) for g in by_model.values()]
    return {"faithful": faithful, "attention_pairs": pairs, "context_groups": ctx, "cross_model": cross}


def as_runs(items: Sequence[RunLike] | Mapping[str, RunLike]) -> list[CorpusRun]:
    """Load run directories (or pass runs through)."""
    vals = list(items.values()) if isinstance(items, Mapping) else list(items)
    return [_run(v) for v in vals]


# ============================================================================ report
REPORT_SIZES = (1e-4, 1e-3, 1e-2, 0.1, 0.4, 1.0)
"""Sizes shown in the report's tables (the nearest stratum of each run)."""


def _rows_at(df: pd.DataFrame, sizes: Sequence[float] = REPORT_SIZES) -> pd.DataFrame:
    """Rows of a per-size table nearest (in log s) to each of ``sizes``, without repeats."""
    ls = np.log10(df["size"].to_numpy(dtype=float))
    idx = sorted({int(np.argmin(np.abs(ls - math.log10(s)))) for s in sizes})
    return df.iloc[idx].reset_index(drop=True)


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–" if math.isnan(v) else str(v)
        return f"{v:.4g}"
    return str(v)


_MD_ENTITIES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))
_MD_PUNCT = re.compile(r"([\\`*_\[\]|~#])")
_MD_BLOCK_START = re.compile(r"^(\s*(?:\d+)?)([-+=.)])")


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown inline text: copied text (model names, directories, tokens,
    passage text, reasons) can neither format, link, break a table nor inject HTML.

    ``&``, ``<`` and ``>`` become entities (so no raw HTML or autolink survives); Markdown's active
    punctuation (backslash, backtick, ``*``, ``_``, ``[``, ``]``, ``|``, ``~``, ``#``) is
    backslash-escaped; line breaks become spaces, and a leading list/heading marker (``-``, ``+``,
    ``=``, ``1.``) is escaped so a paragraph stays a paragraph.

    >>> markdown_text("<script>alert(1)</script> | *x* [a](b)")
    '&lt;script&gt;alert(1)&lt;/script&gt; \\\\| \\\\*x\\\\* \\\\[a\\\\](b)'
    """
    s = " ".join(str(text).splitlines())
    for ch, ent in _MD_ENTITIES:
        s = s.replace(ch, ent)
    s = _MD_PUNCT.sub(r"\\\1", s)
    return _MD_BLOCK_START.sub(lambda m: m.group(1) + "\\" + m.group(2), s, count=1)


class _Doc:
    """A report built once and written as HTML (self-contained) and/or Markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", (df, caption)))

    def figure(self, fig: Any, name: str, caption: str = "") -> None:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=96)
        self.blocks.append(("fig", (buf.getvalue(), name, caption)))

    def html(self) -> str:
        import base64
        import html

        e = html.escape
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:90%}"
               "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}"
               "td:first-child{text-align:left}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
               "img{max-width:100%}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, x in self.blocks:
            if kind == "h":
                out.append(f"<h2>{e(x)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(x)}</p>")
            elif kind == "table":
                df, cap = x
                body = df.to_html(index=False, escape=True, formatters={c: _fmt for c in df.columns}, border=0)
                out.append((f"<p><em>{e(cap)}</em></p>" if cap else "") + body)
            else:
                png, _, cap = x
                out.append(f"<figure><img alt='{e(cap)}' src='data:image/png;base64,"
                           f"{base64.b64encode(png).decode('ascii')}'><figcaption>{e(cap)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def markdown(self, assets: Path) -> str:
        # Every text is escaped (markdown_text): run names carry the model name, and tables copy
        # directories, data sources and skip reasons, which may quote passage text.
        def cell(v: Any) -> str:
            if isinstance(v, (bool, int, float, np.number)):
                return _fmt(v)  # digits, '.', '-', 'e', 'inf', '–': nothing Markdown acts on inside a cell
            return markdown_text(_fmt(v))

        md = markdown_text
        out = [f"# {md(self.title)}", ""]
        for kind, x in self.blocks:
            if kind == "h":
                out += [f"## {md(x)}", ""]
            elif kind == "p":
                out += [md(x), ""]
            elif kind == "table":
                df, cap = x
                if cap:
                    out += [f"*{md(cap)}*", ""]
                out.append("| " + " | ".join(cell(c) for c in df.columns) + " |")
                out.append("|" + "---|" * len(df.columns))
                out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
                out.append("")
            else:
                png, name, cap = x
                assets.mkdir(parents=True, exist_ok=True)
                # atomically, like every file tl_strace writes: a full disk leaves no truncated figure
                atomic_write(assets / f"{name}.png", png, what="report figure")
                from urllib.parse import quote

                src = quote(f"{assets.name}/{name}.png")  # the directory is the user's --out: spaces, ')'...
                out += [f"![{md(cap)}]({src})", "", f"*{md(cap)}*", ""]
        return "\n".join(out)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "run"


def build_report(runs: Sequence[RunLike], *, title: str = "tl_strace corpus report") -> _Doc:
    """Every analysis that applies to ``runs``, as a document (see :func:`write_report`)."""
    rs = as_runs(runs)
    if not rs:
        raise InputError("A report needs at least one run directory.")
    rs = [r for r in rs if len(r.table)] or rs
    doc = _Doc(title)
    labels = _labels(rs)
    doc.h("Runs")
    doc.table(pd.DataFrame([{
        "run": lab, "directory": str(r.path), "passages": len(r.table), "skipped": len(r.skipped),
        "data": r.config.get("data", {}).get("source"), "context words": r.context_words,
        "granularity": r.config.get("granularity"), "ablation": r.config.get("ablation"),
        "attention ablated": r.config.get("ablate_attention", True), "tl_strace": r.versions.get("tl_strace"),
    } for r, lab in zip(rs, labels)]))
    traced = [r for r in rs if len(r.table)]
    if not traced:
        doc.p("No passage has been traced yet.")
        return doc
    groups = group_runs(traced)

    doc.h("Density")
    doc.p("Density is the area under the TV-to-the-full-model curve over log10 s (paper B; higher = denser, "
          "range 0–5 with the default sizes); 'mean_linear' is the area over linear s (paper A). "
          "'median_top_token_size' is the median smallest s whose subgraph has the full model's top token.")
    doc.table(density_distribution(traced))
    doc.figure(plot_density_distribution(traced), "density-hist", "Per-passage density")
    doc.figure(plot_tv_curves(traced), "tv-curves",
               "TV to the full model against s (mean and inter-quartile band); dashed: s = 1e-2 "
               "(construction / refinement), dotted: s = 1e-3 (minimal core)")

    doc.h("Finding 2: density and the model's uncertainty")
    doc.table(entropy_density(traced), "Spearman rho between full-model entropy and density (t-approximation p)")
    for r, lab in zip(traced, _labels(traced)):
        doc.figure(plot_entropy_density(r), f"entropy-{_slug(lab)}", f"{lab}: entropy against density")

    for r, lab in zip(traced, _labels(traced)):
        if r.config.get("granularity") == "component" or "share_attn" not in r.table:
            continue
        doc.h(f"Finding 1: what the trace is made of — {lab}")
        doc.table(_rows_at(edge_shares(r)), "Mean share of the trace's edges by type and by layer group "
                  "(share_layers_0 = first quarter of the blocks)")
        doc.figure(plot_edge_shares(r), f"shares-{_slug(lab)}", "Edge-type and layer-group shares against s")

    for r, lab in zip(traced, _labels(traced)):
        if "components" not in r.table or not any(r.table["components"].map(bool)):
            continue
        doc.h(f"Components in the traces — {lab}")
        lz = lorenz_curves(r)
        freq = component_frequency(r)
        top = freq.groupby("size").head(8)[["size", "component", "frequency", "mean_edges"]]
        doc.table(lz.groupby("size")["gini"].first().reset_index(), "Gini coefficient of component use per size")
        doc.table(top, "Most frequent components per size (fraction of passages whose trace uses them)")
        doc.figure(plot_lorenz(r), f"lorenz-{_slug(lab)}", "Lorenz curves of component use")

    for r, lab in zip(traced, _labels(traced)):
        if not r.unigram or _common_sizes(r) is None:
            continue
        doc.h(f"Finding 3: sparse strata and unigram frequency — {lab}")
        uf = _rows_at(unigram_frequency(r))
        doc.table(uf, "log10 corpus frequency of the trace's top token vs the full model's; frac_more_frequent: "
                  "passages whose stratum predicts a more frequent token than the full model (sign-test p)")
        doc.figure(plot_unigram(r), f"unigram-{_slug(lab)}", "Frequency of the predicted token against s")
        dv = density_vs_frequency(r)
        doc.table(dv, f"Paper A: density by frequency bin of the predicted token (Spearman rho "
                  f"{dv.attrs['rho']:.3f}, p = {dv.attrs['p']:.2g}, n = {dv.attrs['n']})")

    for g in groups["context_groups"]:
        doc.h("Paper A: density and context length")
        dc = density_vs_context(g)
        doc.table(dc, f"Same passages (same next word) cut to different lengths; Spearman rho(length, density) = "
                  f"{dc.attrs['rho']:.3f} (p = {dc.attrs['p']:.2g}, n = {dc.attrs['n']})")
        doc.figure(plot_density_vs_context(g), f"context-{_slug(g[0].name)}", "Density per context length")

    if len(groups["cross_model"]) > 1:
        doc.h("Finding 4: density across models")
        m = cross_model_density(groups["cross_model"])
        doc.table(m.reset_index(names="run"), "Spearman rho between models' per-passage densities")
        doc.figure(plot_cross_model(m), "cross-model", "Density correlation across models")

    for f, k in groups["attention_pairs"]:
        doc.h("Attention edges never ablated (what a silently failing attention mask computes)")
        cmp = attention_ablation_comparison(f, k)
        doc.table(cmp, f"Same passages; Spearman rho between the two runs' densities {cmp.attrs['rho']:.3f} "
                  f"(n = {cmp.attrs['n']})")
        doc.figure(plot_attention_ablation(f, k), f"attention-{_slug(f.name)}", "TV against s, with and without "
                   "attention ablation")

    skipped = pd.concat([r.skipped.assign(run=lab) for r, lab in zip(rs, labels)], ignore_index=True)
    doc.h("Skipped passages")
    if len(skipped):
        doc.table(skipped[["run", "id", "line", "reason"]].head(100),
                  f"{len(skipped)} passage(s) or line(s) skipped (first 100)")
    else:
        doc.p("None.")
    return doc


def write_report(runs: Sequence[RunLike], out: str | os.PathLike | None = None, *,
                 formats: Sequence[str] = ("html", "md"), title: str = "tl_strace corpus report") -> list[Path]:
    """Write a report of ``runs``: ``<out>.html`` (self-contained: plots inlined as PNG, text
    escaped, no network) and/or ``<out>.md`` (plots in ``<out>_assets/``). ``out`` defaults to
    ``<first run>/report``. Returns the paths written.

    Every file is written atomically (:func:`tl_strace.fsutil.atomic_write`): a full disk leaves no
    truncated file under the final name and raises an :class:`~tl_strace.fsutil.OutputPathError`
    naming the file. A target that is a directory or a special file (device node, FIFO) is refused
    before the report is built."""
    if isinstance(formats, str):
        raise InputError(f"formats must be a list of formats, e.g. [{formats!r}]; got the string {formats!r}.")
    formats = list(formats)
    bad = [f for f in formats if f not in ("html", "md")]
    if bad or not formats:
        raise InputError(f"formats must be among ['html', 'md']; got {list(formats)}.")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise InputError(f"out must be a path (str or os.PathLike) or None; got {out!r} ({type(out).__name__}).")
    if out is not None and os.fspath(out) == "":
        raise InputError("out is empty; give the report's path without suffix (e.g. 'runs/report'), or None for "
                         "<first run>/report.")
    rs = as_runs(runs)
    base = Path(out) if out is not None else rs[0].path / "report"
    if base.suffix in (".html", ".md"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    targets = {fmt: base.with_suffix(f".{fmt}") for fmt in ("html", "md") if fmt in formats}
    for p in targets.values():  # before the report is built: a directory, a device node, a FIFO
        check_output_path(p, what="report file")
    doc = build_report(rs, title=title)
    written = []
    if "html" in targets:
        written.append(atomic_write(targets["html"], doc.html(), what="report file"))
    if "md" in targets:
        text = doc.markdown(base.parent / f"{base.name}_assets")
        written.append(atomic_write(targets["md"], text, what="report file"))
    return written
