"""The statistics of the analyses, from SciPy: Spearman's rho with its p-value, the exact sign test, t p-values."""

from __future__ import annotations

from scipy import stats
from typing import Any

import numpy as np
import pandas as pd




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
