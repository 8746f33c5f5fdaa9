"""Computation density of one input from its TV and shared-nucleus curves (METHOD.md §6).

>>> import numpy as np
>>> sizes = np.array([1e-4, 1e-2, 1.0]); tv = np.array([1.0, 0.5, 0.0])
>>> round(auc_log(sizes, tv), 6)  # trapezoid over log10 s: 2·0.75 + 2·0.25
2.0
>>> size_at_tolerance(sizes, tv, 0.5)
0.01
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "RECOVERY_LEVELS",
    "auc_linear",
    "auc_log",
    "interpolate_curve",
    "recovery_sizes",
    "size_at_tolerance",
]

RECOVERY_LEVELS: tuple[int, ...] = (1, 5, 10, 20, 40, 60, 80, 90)
"""Shared-nucleus levels (percent) whose recovery size is reported."""

CURVE_GRID = np.logspace(-5, 0, 150)
"""Paper B's common grid for aggregating curves across inputs."""


def _xy(sizes: ArrayLike, values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"sizes and values must be 1-D and equally long; got {x.shape} and {y.shape}")
    return x, y


def auc_log(sizes: ArrayLike, tv: ArrayLike, *, clip: float = 1e-8) -> float:
    """Paper B's density: area under TV against log10(s), trapezoid, s clipped to [clip, 1].

    Higher means denser: more of the graph is needed before the subgraph's prediction matches.
    With the default sizes (1e-5 … 1) it lies in [0, 5].
    """
    x, y = _xy(sizes, tv)
    lx = np.log10(np.clip(x, clip, 1.0))
    return float(np.sum((lx[1:] - lx[:-1]) * (y[1:] + y[:-1]) / 2.0))


def auc_linear(sizes: ArrayLike, tv: ArrayLike) -> float:
    """Paper A's density: area under TV against s on a linear axis, in [0, 1]."""
    x, y = _xy(sizes, tv)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def recovery_sizes(sizes: ArrayLike, nucleus: ArrayLike,
                   levels: Sequence[int] = RECOVERY_LEVELS) -> dict[int, float]:
    """For each level k (percent), the smallest s whose shared nucleus is ≥ k (NaN if none)."""
    x, y = _xy(sizes, nucleus)
    out: dict[int, float] = {}
    for k in levels:
        hit = np.nonzero(y >= k)[0]
        out[int(k)] = float(x[hit[0]]) if hit.size else float("nan")
    return out


def size_at_tolerance(sizes: ArrayLike, tv: ArrayLike, eps: float) -> float:
    """The smallest s with TV ≤ ``eps`` (NaN if none): an extension, for a user tolerance."""
    x, y = _xy(sizes, tv)
    hit = np.nonzero(y <= eps)[0]
    return float(x[hit[0]]) if hit.size else float("nan")


def interpolate_curve(sizes: ArrayLike, values: ArrayLike, grid: ArrayLike = CURVE_GRID) -> np.ndarray:
    """A curve resampled onto ``grid`` by linear interpolation in log10 s (for averaging inputs)."""
    x, y = _xy(sizes, values)
    return np.interp(np.log10(np.asarray(grid, dtype=np.float64)), np.log10(np.clip(x, 1e-12, 1.0)), y)
