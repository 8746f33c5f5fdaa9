"""Subgraph search: s-Trace (paper B) and paper A's stratifications, all producing nested strata.

Every search returns :class:`Strata`: for each edge, the smallest stratum that contains it
(``labels``), so stratum ``k`` is ``labels <= k``. Strata are nested by construction, and the last
one is always the full graph (s = 1). Searches are registered by name in :data:`STRATIFICATIONS`.

* ``strace`` (METHOD.md §3, default): a max-priority frontier of edges keyed on weight (ties:
  insertion order), seeded with the output node's in-edges; each popped edge joins the trace, and
  its source node's in-edges join the frontier the first time that node is reached. Stratum ``k``
  is the first ``n_k = floor(σ_k · |E|)`` edges taken.
* ``threshold``: edges with weight > τ, then the part connected to the output node.
* ``nucleus``: walk back from the output node; at each reached node keep the shortest prefix of its
  in-edges (by weight) whose cumulative weight reaches τ (at least one edge).
* :func:`random_strata`: the *random* baseline — the s-Trace search run on i.i.d. uniform weights
  from a seeded generator (:func:`random_order`), i.e. a random connected subgraph grown back from
  the output node, with exactly the same edge counts.

Modules:

* :mod:`._strata` — :class:`Strata`, the target sizes, strata from an order or from masks;
* :mod:`._rows` — each node's in-edges as tensor rows in canonical column order;
* :mod:`.strace` — :func:`strace_order`, the fast search (edges sorted by bottleneck, a heap replay
  only inside runs of equal bottleneck); its docstring states the algorithm and why it equals the
  plain heap;
* :mod:`.reference` — :func:`reference_strace_order`, the plain heap of METHOD.md §3, kept as the
  definition the tests compare against;
* :mod:`.random_baseline` — :func:`random_order`, :func:`random_strata`;
* :mod:`.paper_a` — :func:`threshold_strata`, :func:`nucleus_strata`.
"""

from __future__ import annotations

from collections.abc import Callable

# The package is split by job; these names are its interface. NOT_IN_ANY, the default taus and
# bottlenecks stay importable from here as before the split, outside __all__ (``X as X``: a re-export).
from tl_strace.search._strata import DEFAULT_SIZES, Strata, check_sizes, labels_from_rank, rank_of, target_counts
from tl_strace.search._strata import NOT_IN_ANY as NOT_IN_ANY
from tl_strace.search.paper_a import DEFAULT_NUCLEUS_TAUS as DEFAULT_NUCLEUS_TAUS
from tl_strace.search.paper_a import DEFAULT_THRESHOLD_TAUS as DEFAULT_THRESHOLD_TAUS
from tl_strace.search.paper_a import nucleus_strata, threshold_strata
from tl_strace.search.random_baseline import random_order, random_strata
from tl_strace.search.reference import reference_strace_order
from tl_strace.search.strace import bottlenecks as bottlenecks
from tl_strace.search.strace import strace_order, strace_strata

__all__ = [
    "DEFAULT_SIZES",
    "STRATIFICATIONS",
    "Strata",
    "check_sizes",
    "labels_from_rank",
    "nucleus_strata",
    "rank_of",
    "random_order",
    "random_strata",
    "reference_strace_order",
    "strace_order",
    "strace_strata",
    "target_counts",
    "threshold_strata",
]

STRATIFICATIONS: dict[str, Callable[..., Strata]] = {
    "strace": strace_strata,
    "threshold": threshold_strata,
    "nucleus": nucleus_strata,
}
"""The stratifications by name: each maps a graph (and its sizes or taus) to :class:`Strata`."""
