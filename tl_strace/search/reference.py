"""METHOD.md §3's s-Trace as written: one heap entry per frontier edge. Slow; it is the definition
the fast search (:mod:`tl_strace.search.strace`) is tested against, ties included."""

from __future__ import annotations

import heapq

import torch
from jaxtyping import Int
from torch import Tensor

from tl_strace.graph import Graph
from tl_strace.search._rows import _in_edge_rows, _row_nodes


def reference_strace_order(graph: Graph, n_max: int | None = None) -> Int[Tensor, "taken"]:
    """METHOD.md §3 verbatim: a heap of every frontier edge keyed on (−weight, insertion index).

    The frontier starts as the output node's in-edges; each popped edge joins the trace, and the
    first time its source node is reached, that node's in-edges are pushed, in canonical order
    (:mod:`tl_strace.search._rows`), each with the next value of one global insertion counter.
    Slow (one Python heap entry per edge); it is the definition the fast search is tested against.
    """
    layout = graph.layout
    n_max = graph.n_edges if n_max is None else min(n_max, graph.n_edges)
    rows = _in_edge_rows(layout, graph.weights)
    T = layout.n_pos
    in_edges: dict[int, list[tuple[float, int, int]]] = {}  # node -> [(weight, edge id, source node)]
    for l in range(layout.n_layers):
        for kind, g in _row_nodes(layout, l):
            r = rows[kind]
            for t in range(T):
                in_edges[g * T + t] = [(float(r.weight[l, t, c]), int(r.edge[l, t, c]), int(r.source[l, t, c]))
                                       for c in range(r.weight.shape[-1]) if r.valid[l, t, c]]
    heap: list[tuple[float, int, int, int]] = []
    counter = 0

    def push(node: int) -> None:
        nonlocal counter
        for w, e, s in in_edges.get(node, []):
            heapq.heappush(heap, (-w, counter, e, s))
            counter += 1

    reached = {layout.output_node}
    push(layout.output_node)
    order: list[int] = []
    while heap and len(order) < n_max:
        _, _, e, s = heapq.heappop(heap)
        order.append(e)
        if s not in reached:
            reached.add(s)
            push(s)
    return torch.tensor(order, dtype=torch.long)
