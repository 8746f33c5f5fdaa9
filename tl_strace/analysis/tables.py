"""The papers' corpus analyses (METHOD.md section 7) as DataFrames: curves, density vs entropy, shares, frequency, context."""

from __future__ import annotations

import math
import warnings
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
    _need,
    _run,
    _runs,
)
from tl_strace.analysis.stats import sign_test, spearman
from tl_strace.corpus import CorpusRun
from tl_strace.density import CURVE_GRID, interpolate_curve
from tl_strace.errors import InputError


def _common_sizes(run: CorpusRun) -> np.ndarray | None:
    sizes = run.table["sizes"].tolist()
    first = sizes[0]
    return np.asarray(first, dtype=np.float64) if all(s == first for s in sizes) else None


def _grid_sizes(run: CorpusRun) -> np.ndarray:
    """The sizes the analyses read a run on: its own when every passage shares them, else CURVE_GRID."""
    common = _common_sizes(run)
    return common if common is not None else CURVE_GRID.copy()


def _on_grid(run: CorpusRun, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, values [passage, size]) on :func:`_grid_sizes`: the run's own curves, or each
    passage's curve interpolated onto CURVE_GRID."""
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


def interpolated_curves(run: RunLike, column: str = "tv") -> pd.DataFrame:
    """Every passage's curve resampled onto paper B's grid (:data:`tl_strace.density.CURVE_GRID`,
    ``np.logspace(-5, 0, 150)``, linear in log10 s; METHOD.md §6), then averaged: size, mean, std,
    q25, median, q75, n. Unlike :func:`mean_curve` (the recorded strata), runs with different sizes
    land on one grid, so models can be overlaid."""
    r = _run(run)
    _need(r, "sizes", column)
    v = np.stack([interpolate_curve(x, y) for x, y in zip(r.table["sizes"], r.table[column])])
    return pd.DataFrame({"size": CURVE_GRID.copy(), "mean": v.mean(0), "std": v.std(0, ddof=1) if len(v) > 1
                         else np.full(len(CURVE_GRID), np.nan), "q25": np.percentile(v, 25, 0),
                         "median": np.median(v, 0), "q75": np.percentile(v, 75, 0), "n": len(v)})


def _nearest(sizes: np.ndarray, s: float) -> int:
    """The index of the size nearest ``s`` on a log scale: where an analysis reads "at s"."""
    return int(np.argmin(np.abs(np.log10(np.asarray(sizes, dtype=np.float64)) - math.log10(s))))


def _value_at(run: CorpusRun, column: str, s: float) -> np.ndarray:
    """Per passage, a per-stratum column at size s (the nearest stratum on a log scale)."""
    x, v = _on_grid(run, column)
    return v[:, _nearest(x, s)]


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


def density_along_text(run: RunLike, *, bins: int = 8) -> pd.DataFrame:
    """Density at every position of the passages, for a run that recorded them
    (``run_corpus(..., every_position=True)``; :attr:`CorpusRun.profile`): per bin of context
    length (the tokens the prediction sees), n, mean, median and quartiles of density and the mean
    full-model entropy. ``df.attrs``: Spearman rho (p, n) of context tokens against density over
    every position (paper A: longer contexts are sparser, here within one text); of full-model
    entropy against density over every position (finding 2 at the token level); and ``step``, the
    mean absolute change of density from one position to the next within a passage (how dynamic
    the computation is along a text)."""
    r = _run(run)
    prof = r.profile
    if prof is None:
        raise InputError(f"{r.path} recorded the last position of each passage only; density along the text "
                         "needs a run made with every_position=True (tl-strace run --every-position).")
    d = prof["density"].astype(float)
    ctx = prof["n_tokens"].astype(int)
    if not len(prof):
        raise InputError(f"{r.path} has no traced passage yet.")
    edges = np.unique(np.linspace(ctx.min(), ctx.max() + 1, max(int(bins), 1) + 1).round().astype(int))
    which = np.clip(np.searchsorted(edges, ctx.to_numpy(), side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        sel = which == b
        if not sel.any():
            continue
        db = d[sel]
        rows.append({"context_tokens": f"{edges[b]}-{edges[b + 1] - 1}", "n": int(sel.sum()), "mean_density": db.mean(),
                     "median_density": db.median(), "q25": db.quantile(0.25), "q75": db.quantile(0.75),
                     "mean_entropy": prof.loc[sel, "full_entropy"].astype(float).mean()})
    df = pd.DataFrame(rows)
    rho, p, n = spearman(ctx, d)
    rho_e, p_e, n_e = spearman(prof["full_entropy"].astype(float), d)
    same = prof["index"].to_numpy()[1:] == prof["index"].to_numpy()[:-1]
    steps = np.abs(np.diff(d.to_numpy()))[same]
    df.attrs.update(rho=rho, p=p, n=n, rho_entropy=rho_e, p_entropy=p_e, n_entropy=n_e,
                    step=float(steps.mean()) if steps.size else float("nan"), passages=int(prof["index"].nunique()))
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
    for label, r in (("attention ablated (faithful)", a), (attention_label("never-ablated"), b)):
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
