"""What every search returns: :class:`Strata`, nested subgraphs labelled per edge, and the target
sizes they are cut at. Built from an edge order (s-Trace, random) or from nested masks (paper A)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.graph import Graph

DEFAULT_SIZES: tuple[float, ...] = (
    1e-5, 2e-5, 4e-5, 8e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1e-3, 1.2e-3, 1.4e-3, 2e-3, 3e-3, 4e-3, 6e-3, 8e-3,
    1e-2, 2e-2, 4e-2, 6e-2, 8e-2, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0,
)
"""Paper B's 26 target sizes, then the full graph."""

NOT_IN_ANY = np.iinfo(np.int32).max
"""Label of an edge outside every stratum (only non-ancestor slots of the edge space)."""


@dataclass(frozen=True)
class Strata:
    """Nested subgraphs of one graph, ascending in size; the last is the full graph.

    ``labels[e]`` is the smallest stratum containing edge ``e`` (:data:`NOT_IN_ANY` for slots that
    are not graph edges), so stratum ``k`` is ``labels <= k`` and holds ``counts[k]`` edges.
    ``sizes`` are the x-axis of every curve: the target sizes σ for s-Trace, the realised sizes
    ``counts / |E|`` for threshold and nucleus strata. ``params`` are what defined each stratum
    (σ or τ). ``rank`` is the order in which a search added edges (-1 where it did not).
    """

    method: str
    sizes: Float[Tensor, "stratum"]
    counts: Int[Tensor, "stratum"]
    params: Float[Tensor, "stratum"]
    labels: Int[Tensor, "edge"]
    rank: Int[Tensor, "edge"]

    @property
    def n_strata(self) -> int:
        return int(self.sizes.numel())

    def mask(self, k: int) -> Bool[Tensor, "edge"]:
        """Membership of stratum ``k`` over the flat edge space."""
        return self.labels <= k


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------
def check_sizes(sizes: Sequence[float] | None) -> tuple[float, ...]:
    """Validate target sizes: each in (0, 1], strictly increasing; the full graph (1.0) is appended.

    >>> check_sizes([1e-3, 0.1])
    (0.001, 0.1, 1.0)
    """
    if sizes is None:
        return DEFAULT_SIZES
    try:
        vals = [float(s) for s in sizes]
    except (TypeError, ValueError) as e:
        raise InputError(f"Sizes must be numbers in (0, 1]; got {sizes!r}.") from e
    if not vals:
        raise InputError("Sizes must not be empty; pass None for the 26 paper sizes.")
    bad = [s for s in vals if not (0.0 < s <= 1.0) or math.isnan(s)]
    if bad:
        raise InputError(f"Sizes must lie in (0, 1] (a fraction of the graph's edges); got {bad}.")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise InputError(
            f"Sizes must be strictly increasing without duplicates; got {vals}. "
            f"Did you mean {sorted(set(vals))}?"
        )
    if vals[-1] != 1.0:
        vals.append(1.0)
    return tuple(vals)


def target_counts(sizes: Sequence[float], n_edges: int) -> list[int]:
    """How many of ``n_edges`` units a stratum of size σ keeps: the one rule for token edges and
    for components. ``floor(σ · n)`` computed exactly for the decimal σ as written (no float
    round-off: 0.29 of 100 is 29), except that σ·n within 1e-9 *below* an integer counts as that
    integer, so a float ``k/n`` (5/300 = 0.01666…6) keeps ``k``, not ``k − 1``. The tolerance
    never moves a σ with at most 8 decimals (σ·n is then an integer or at least 1e-8 from one).

    >>> target_counts([0.29, 5 / 300, 1.0], 100), target_counts([5 / 300], 300)
    ([29, 1, 100], [5])
    """
    tol = Fraction(1, 10**9)
    return [min(n_edges, math.floor(Fraction(repr(float(s))) * n_edges + tol)) for s in sizes]


# ---------------------------------------------------------------------------------------------
# Strata from an order or from masks
# ---------------------------------------------------------------------------------------------
def index_dtype(n: int) -> torch.dtype:
    """The narrowest of int32 / int64 that numbers ``n`` units (and holds :data:`NOT_IN_ANY`): ranks
    and labels over the edge space take 4 bytes per slot instead of 8 (issue 17)."""
    return torch.int32 if n < NOT_IN_ANY else torch.int64


def rank_of(order: Int[Tensor, "taken"], n: int) -> Int[Tensor, "unit"]:
    """Each unit's position in ``order`` (a search order over ``n`` units), -1 if not in it
    (int32 when ``n`` allows: :func:`index_dtype`)."""
    dt = index_dtype(n)
    rank = torch.full((n,), -1, dtype=dt)
    rank[order] = torch.arange(order.numel(), dtype=dt)
    return rank


def labels_from_rank(rank: Int[Tensor, "unit"], counts: Int[Tensor, "stratum"],
                     inside: Bool[Tensor, "unit"] | None = None) -> Int[Tensor, "unit"]:
    """Each unit's first stratum, for edges and components alike: stratum ``k`` is the first
    ``counts[k]`` units of the order; units the order never reached (it stops at the largest
    partial stratum) belong to the last, full stratum only; units outside ``inside`` (slots that
    are not edges) to none (:data:`NOT_IN_ANY`)."""
    K = int(counts.numel())
    c = counts.to(rank.dtype)
    labels = torch.empty_like(rank)
    # In slices of the edge space, so the transients (an int64 search result among them) stay small
    # whatever the input's length (issue 17).
    for a in range(0, rank.numel(), _SLICE):
        r, lab = rank[a:a + _SLICE], labels[a:a + _SLICE]
        lab.fill_(K - 1)
        if inside is not None:
            lab.masked_fill_(~inside[a:a + _SLICE], NOT_IN_ANY)
        ranked = r >= 0
        lab[ranked] = torch.searchsorted(c, r[ranked], right=True).clamp_(max=K - 1).to(rank.dtype)
    return labels


_SLICE = 1 << 22
"""Slots per slice where a whole-edge-space operation is done a slice at a time (16 MiB of int32)."""


def _strata_from_order(method: str, graph: Graph, order: Tensor, sizes: Sequence[float],
                       counts: Sequence[int], params: Sequence[float]) -> Strata:
    """Stratum ``k`` is the first ``counts[k]`` edges of ``order``; edges past its end (the search
    stops at the largest partial target) belong to the final, full stratum only."""
    return _strata_from_rank(method, graph, rank_of(order, graph.layout.size), sizes, counts, params)


def _strata_from_rank(method: str, graph: Graph, rank: Tensor, sizes: Sequence[float],
                      counts: Sequence[int], params: Sequence[float]) -> Strata:
    """:func:`_strata_from_order` from the order's :func:`rank_of` (so a caller can let the order go
    before the labels are made: ``_strata_from_rank(..., rank_of(search(...), n), ...)``)."""
    c = torch.tensor(list(counts), dtype=torch.long)
    labels = labels_from_rank(rank, c, graph.valid)
    return Strata(method=method, sizes=torch.tensor(list(sizes), dtype=torch.float64), counts=c,
                  params=torch.tensor(list(params), dtype=torch.float64), labels=labels, rank=rank)


def _strata_from_masks(method: str, graph: Graph, masks: list[Tensor], params: list[float]) -> Strata:
    """Build Strata from nested masks ordered sparse → dense (the full graph is appended)."""
    masks = [m & graph.valid for m in masks] + [graph.valid]
    params = list(params) + [0.0 if method == "threshold" else 1.0]
    E = graph.n_edges
    dt = index_dtype(graph.layout.size)
    labels = torch.full((graph.layout.size,), NOT_IN_ANY, dtype=dt)
    for k in range(len(masks) - 1, -1, -1):
        labels[masks[k]] = k
    counts = [int(m.sum()) for m in masks]
    # Rank: by stratum, then by weight within a stratum (for display order only).
    key = labels.double() * 2.0 - graph.weights.double()
    rank = torch.full((graph.layout.size,), -1, dtype=dt)
    order = torch.argsort(key[graph.valid], stable=True)
    rank[torch.nonzero(graph.valid).flatten()[order]] = torch.arange(order.numel(), dtype=dt)
    return Strata(method=method, sizes=torch.tensor([c / E for c in counts], dtype=torch.float64),
                  counts=torch.tensor(counts, dtype=torch.long), params=torch.tensor(params, dtype=torch.float64),
                  labels=labels, rank=rank)
