"""The distance metrics of METHOD.md §5, against plain-Python definitions."""

from __future__ import annotations

import math

import pytest
import torch

from tl_strace.metrics import (
    NUCLEUS_LEVELS,
    entropy,
    kl_divergence,
    shared_nucleus,
    target_stats,
    total_variation,
)


def _top_p(p: list[float], level: float) -> list[int]:
    """The shortest prefix of tokens sorted by probability (stable) whose mass reaches ``level``."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    out, mass = [], 0.0
    for i in order:
        out.append(i)
        mass += p[i]
        if mass >= level:
            break
    return out


def _shared_nucleus_reference(full: list[float], sub: list[float]) -> float:
    best = 0.0
    for lvl in NUCLEUS_LEVELS:
        if _top_p(full, lvl / 100) == _top_p(sub, lvl / 100):
            best = max(best, float(lvl))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_shared_nucleus_matches_the_definition(seed):
    g = torch.Generator().manual_seed(seed)
    V = int(torch.randint(2, 40, (1,), generator=g))
    full = torch.randn(V, generator=g, dtype=torch.float64) * 3
    sub = full[None] + torch.randn(6, V, generator=g, dtype=torch.float64) * torch.tensor([0, 0.01, 0.1, 0.5, 1, 5])[:, None]
    if seed % 3 == 0:  # ties
        full, sub = full.round(), sub.round()
    lf, ls = torch.log_softmax(full, -1), torch.log_softmax(sub, -1)
    got = shared_nucleus(lf, ls).tolist()
    pf = lf.exp().tolist()
    want = [_shared_nucleus_reference(pf, row) for row in ls.exp().tolist()]
    assert got == want
    assert got[0] == 99.0  # identical distributions share every level


def test_shared_nucleus_by_hand():
    full = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    swapped = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.3, 0.5, 0.2]]))
    # the same top token, then a different second: levels up to 50 % agree (prefix [0]).
    assert shared_nucleus(full, swapped).tolist() == [50.0, 0.0]


def test_distances_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    assert total_variation(p.log(), q.log()).item() == pytest.approx(0.25)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    assert entropy(p.log()[None]).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    ce, rank = target_stats(q.log(), 2)
    assert ce.item() == pytest.approx(-math.log(0.5)) and rank.item() == 1
