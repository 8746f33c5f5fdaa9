"""The *random* baseline (METHOD.md §4): a random connected subgraph grown back from the output
node, with exactly s-Trace's edge counts — the s-Trace search run on seeded i.i.d. uniform weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_strace.graph import Graph
from tl_strace.search._strata import Strata, _strata_from_rank, rank_of
from tl_strace.search.strace import strace_order


def random_order(graph: Graph, n_max: int | None = None, *, seed: int = 0,
                 cuts: Sequence[int] | None = None) -> Int[Tensor, "taken"]:
    """Edge ids in the order the *random* baseline takes them: the s-Trace search run on i.i.d.
    uniform weights from ``torch.Generator().manual_seed(seed)`` — a random connected subgraph
    grown back from the output node, one edge at a time (every edge after its target node).

    Under uniform weights most edges share a few huge runs of equal bottleneck (77 % of them on
    SmolLM2 at 59 tokens), so this is the tie replay's heaviest case. ``cuts``: only the first ``c``
    edges as a set are the heap's, for each ``c`` (:func:`~tl_strace.search.strace_order`, §5).
    """
    gen = torch.Generator().manual_seed(int(seed))
    rnd = torch.rand(graph.layout.size, generator=gen, dtype=torch.float64).masked_fill_(~graph.valid, 0.0)
    return strace_order(Graph(graph.layout, rnd, graph.valid), n_max, cuts=cuts)


def random_strata(graph: Graph, counts: Sequence[int], sizes: Sequence[float], *, seed: int = 0) -> Strata:
    """The *random* baseline (METHOD.md §4): connected subgraphs grown back from the output node in
    the order of :func:`random_order` (s-Trace on seeded uniform weights), one per stratum, nested,
    with exactly ``counts`` edges each."""
    partial = [c for c in counts if c < graph.n_edges]
    # Strata need only which edges are among the first count of each stratum, not their order (§5).
    rank = rank_of(random_order(graph, max(partial) if partial else 0, seed=seed, cuts=partial), graph.layout.size)
    return _strata_from_rank("random", graph, rank, sizes, counts, sizes)
