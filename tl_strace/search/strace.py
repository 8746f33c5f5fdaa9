"""s-Trace's order (METHOD.md §3) found by sorting, with a heap only where edges tie.

This docstring is the one account of the algorithm and of why it equals the plain heap; the
functions below refer to its sections.

**The definition** (:func:`~tl_strace.search.reference.reference_strace_order`). A max-heap holds
the *frontier*, keyed on weight, ties broken by insertion order (earlier first). It starts with the
output node's in-edges. Each popped edge joins the trace; the first time its source node is
reached, that node's in-edges are pushed in canonical order (:mod:`tl_strace.search._rows`), each
numbered by one global insertion counter. Stratum ``k`` is the first ``n_k`` edges popped.

**§1 Bottleneck order.** Let ``B(v)`` be the widest-path value of node ``v``: the largest, over
paths from the output node back to ``v``, of the smallest weight on the path (``B(output) = +inf``);
equivalently ``B(v) = max b(g)`` over the edges ``g`` leaving ``v``. The *bottleneck* of an edge is
``b(e) = min(B(target of e), w_e)`` (:func:`bottlenecks`: one max-min recursion per block over
tensors). If the heap pops ``e_1, e_2, …`` then ``b(e_i) = min(w(e_1), …, w(e_i))``, the smallest
weight popped so far:

* ``≥``: ``e_1 … e_{i-1}`` contain a path from the output back to ``e_i``'s target (each target
  was reached by an earlier pop), so ``B(target)`` and ``w(e_i)`` are both ``≥`` that minimum.
* ``≤``: were ``b(e_i) > w(e_j)`` for some ``j < i``, then at step ``j`` the widest path to
  ``e_i``'s target followed by ``e_i`` weighs ``> w(e_j)`` throughout and is not all taken; its
  first untaken edge has a reached target, so it is in the frontier and outweighs ``e_j``, which
  could then not have been popped (and ``b(e_i) ≤ w(e_i)`` by definition).

So the heap pops in non-increasing ``b``, and a stable sort of the edges by ``-b`` puts each edge
at its heap position, except within a *run* of equal ``b``, whose order is left to find. On real
graphs nearly every run is a single edge.

**§2 Inside a run of bottleneck λ** (sorted positions ``[s0, s1)``; :func:`~tl_strace.search._replay.replay_runs`).

* While the run lasts, the heap pops its edges and only its edges (§1). Every other frontier edge
  has ``b < λ`` (those with ``b > λ`` are popped) and weighs ``< λ``: its target was reached by a
  pop of ``b ≥ λ``, so ``B(target) ≥ λ``, and ``b < λ`` forces ``w < λ``; run edges weigh ``≥ λ``.
  So a heap of the run's edges alone, keyed as the plain heap is, pops them in its order.
* A run edge enters the frontier when its target ``v`` is reached. If ``B(v) > λ``, an edge leaving
  ``v`` has ``b > λ`` and was popped before the run: the edge is in the frontier from the start.
  Otherwise ``B(v) = λ``: no edge leaving ``v`` was popped before the run, and ``v`` is reached
  inside the run by the first popped run edge whose source is ``v``; its run edges are pushed then.

**§3 The tie-break.** The plain heap breaks equal weights by its insertion counter. A node's
in-edges are pushed together, right after the pop that reached the node, in canonical order; so
the counter orders edges exactly as the pair *(position of the pop that reached the target (-1 for
the output node), canonical column among the target's in-edges)* does
(:func:`~tl_strace.search._rows._canonical`; one pop reaches at most one node, so the pair is
unique). The replay keys its
heap on ``(-weight, reach position, canonical column)`` and needs no counter. The reach position of
a target reached inside a tied run, this one or an earlier one, is recorded when the replay reaches
it; a target reached before the run and not recorded was reached by the single edge of the run of
bottleneck ``B(target)`` (the first pop leaving ``v`` has ``b = B(v)``, by §1), found by a binary
search of the sorted bottlenecks (``first`` in :func:`strace_order`).

**§4 Cost.** The bottlenecks, the sort and the run bounds are tensor operations. Only members of
tied runs that start before ``n_max`` are replayed, by compiled heap loops over arrays
(:mod:`tl_strace.search._replay`, one call for every stretch of runs; no Python object per edge):
tied runs hold millions of edges on long inputs (12M of 44M at 580 tokens) in hundreds of
thousands of short runs, and the random baseline's uniform weights put most edges into a few huge
runs. Runs of more than ``_TENSOR_RUN`` members are ordered with tensors by
:mod:`tl_strace.search._cascade` (the same argument applied inside the run), whose small
sub-problems use the same compiled heap.

**§5 Cuts only.** Strata need less than the order: which edges are among the first ``c``, for each
stratum's count ``c``. A run that no count falls strictly inside lies in one stratum whatever its
inner order, so ``strace_order(..., cuts=counts)`` replays only the runs a count cuts (at most one
per count, and inside a large run only the sub-runs a count cuts). Skipping a run leaves the reach
positions of the nodes it reaches unknown; they are only ever compared between edges of equal
weight (the heap key is ``(-weight, reach position, column)``), so when two members of a replayed
run weigh the same the whole order is computed instead. The *random* baseline, whose order is not
kept, uses this (its float64 uniform weights practically never tie); s-Trace keeps its whole order
(``rank``: ``subgraph(s)`` at any ``s``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.graph import EdgeLayout, EdgeType, Graph
from tl_strace.search._cascade import SMALL, order_run
from tl_strace.search._replay import (UNSET, distinct_within_runs, exact_numpy, pack_sort_keys_at, replay_runs,
                                      tied_run_bounds, unpack_sort_keys, edge_nodes, gather_runs)
from tl_strace.search._strata import _SLICE, Strata, _strata_from_rank, check_sizes, rank_of, target_counts

_TENSOR_RUN = 1 << 16
"""Tied runs with more members than this are ordered with tensors (:mod:`tl_strace.search._cascade`),
the others by the compiled heap (§4). When the whole order is asked for, the recursion pays
only on very large runs: measured on SmolLM2 graphs, sub-runs are mostly small."""

_TENSOR_RUN_CUTS = 4 * SMALL
"""The same bound when only cuts are asked for (§5): the recursion then skips every sub-run no cut
falls inside, so it pays from a few thousand members."""


def _bottleneck_blocks(graph: Graph, emit: Callable[[EdgeType, int, Tensor], None]) -> Float[Tensor, "node"]:
    """The max-min recursion of §1, one block at a time, top to bottom: ``emit(kind, layer, b)``
    receives each edge type's bottlenecks in block ``layer`` (``[H, T, T]`` for attention, ``[T]``
    otherwise; ``-inf`` on slots that are no edges) as soon as they are known, and may keep them
    however it likes (dense, or only the edges'). Returns every node's ``B(v)``, flattened."""
    layout = graph.layout
    L, T = layout.n_layers, layout.n_pos
    neg = -math.inf
    valid_a, valid_ra, valid_m, valid_rm = layout.split(graph.valid)
    w_a, w_ra, w_m, w_rm = layout.split(graph.weights)  # min/max only: exact in any float dtype
    node_B = torch.full((2 * L + 1, T), neg, dtype=graph.weights.dtype)
    node_B[2 * L, T - 1] = math.inf

    def local(B: Tensor, w: Tensor, valid: Tensor) -> Tensor:
        return torch.minimum(B, w).masked_fill_(~valid, neg)

    for l in range(L - 1, -1, -1):
        B_post = node_B[2 * l + 2]
        if layout.parallel:  # every in-edge of block node (2l+2, t) leaves a node of layer 2l
            b_m, b_ra = local(B_post, w_m[l], valid_m[l]), local(B_post, w_ra[l], valid_ra[l])
            b_rm = torch.full_like(b_m, neg)  # no such edge
            b_a = torch.minimum(B_post[None, :, None], w_a[l]).masked_fill_(~valid_a[l], neg)
            node_B[2 * l] = torch.maximum(torch.maximum(b_ra, b_m), b_a.amax(dim=(0, 1)))
        else:
            b_m, b_rm = local(B_post, w_m[l], valid_m[l]), local(B_post, w_rm[l], valid_rm[l])
            node_B[2 * l + 1] = B_mid = torch.maximum(b_m, b_rm)  # both leave node (2l+1, t)
            b_ra = local(B_mid, w_ra[l], valid_ra[l])
            b_a = torch.minimum(B_mid[None, :, None], w_a[l]).masked_fill_(~valid_a[l], neg)
            node_B[2 * l] = torch.maximum(b_ra, b_a.amax(dim=(0, 1)))  # node (2l, s)
        emit(EdgeType.ATTN, l, b_a)
        del b_a
        emit(EdgeType.RES_ATTN, l, b_ra)
        emit(EdgeType.MLP, l, b_m)
        emit(EdgeType.RES_MLP, l, b_rm)
    return node_B.flatten()


def bottlenecks(graph: Graph) -> tuple[Float[Tensor, "edge"], Float[Tensor, "node"]]:
    """Each edge's bottleneck ``b(e) = min(B(target), w_e)`` and each node's ``B(v)`` (§1): the
    largest, over paths from the output node to ``v``, of the smallest weight on the path (``+inf``
    at the output, ``-inf`` off the graph). One max-min recursion per block, top to bottom.
    """
    b = torch.full_like(graph.weights, -math.inf)
    blocks = graph.layout.split(b)  # written through views: no copy of the edge space

    def into_dense(kind: EdgeType, l: int, v: Tensor) -> None:
        blocks[int(kind)][l] = v

    node_B = _bottleneck_blocks(graph, into_dense)
    return b, node_B


def sorted_bottlenecks(graph: Graph) -> tuple[Float[Tensor, "edge_sorted"], Int[Tensor, "edge_sorted"],
                                              Float[Tensor, "node"]]:
    """The edges (``graph.valid``) sorted by ``-b`` stably (§1): the sorted negated bottlenecks,
    the edge ids in that order, and every node's ``B(v)``. Equal to sorting ``-bottlenecks(graph)[0]``
    over the edges with ``torch.sort(stable=True)``.

    For float32 weights over fewer than 2³² slots, no tensor over the edge space is made (issue
    17): each block's bottlenecks go straight into one 64-bit key per edge (the value's order bits
    above its slot id, :func:`~tl_strace.search._replay.pack_sort_keys_at`), the keys are sorted in
    place, and the values and ids are read back out of them: 12 bytes per edge at the peak (the
    keys and the values read back), instead of a dense float32 bottleneck tensor, int64 ids, the
    negated values, the keys and the sort's copies. Other weights (the random baseline's float64)
    are gathered the same way into one compact tensor of values and sorted by ``torch.sort``; the
    positions it returns become edge ids in place.
    """
    layout = graph.layout
    # Where each (edge type, layer) block's edges start among the edges in slot order.
    valid_blocks = layout.split(graph.valid)
    counts = torch.stack([v.reshape(layout.n_layers, -1).sum(1) for v in valid_blocks])  # [4, L]
    start = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).reshape(4, layout.n_layers)
    per_slot = [layout.n_heads * layout.n_pos * layout.n_pos] + [layout.n_pos] * 3
    n = int(counts.sum())
    packed = (graph.weights.dtype == torch.float32 and layout.size < 1 << 32
              and not bool(torch.isnan(graph.weights).any()))
    keys = np.empty(n, dtype=np.uint64) if packed else None
    vals = None if packed else torch.empty(n, dtype=graph.weights.dtype)

    def compact(kind: EdgeType, l: int, v: Tensor) -> None:
        k = int(kind)
        slots = torch.nonzero(valid_blocks[k][l].flatten()).flatten()
        if slots.numel() == 0:
            return
        lo, hi = int(start[k, l]), int(start[k, l]) + slots.numel()
        if keys is None:  # the values alone, negated, in slot order
            torch.neg(v.flatten()[slots], out=vals[lo:hi])
            return
        neg = v.flatten()[slots].neg_().add_(0.0)  # + 0.0: -0.0 becomes +0.0, as torch.sort compares
        pack_sort_keys_at(neg.numpy().view(np.int32), slots.numpy(), layout.offset(kind) + l * per_slot[k],
                          keys[lo:hi])

    node_B = _bottleneck_blocks(graph, compact)
    if keys is None:  # other dtypes (the random baseline's float64), NaN, or 2^32 slots and more
        neg_sb, order = torch.sort(vals, stable=True)
        del vals
        ids = torch.nonzero(graph.valid).flatten()
        for a in range(0, n, _SLICE):  # positions among the edges -> edge ids, in place
            order[a:a + _SLICE] = ids[order[a:a + _SLICE]]
        return neg_sb, order, node_B
    keys.sort()
    bits = np.empty(keys.size, dtype=np.int32)
    unpack_sort_keys(keys, bits)
    return torch.from_numpy(bits.view(np.float32)), torch.from_numpy(keys.view(np.int64)), node_B


class _TiedRuns(NamedTuple):
    """The runs of equal bottleneck (§1) with more than one edge that start before ``n_max``. Their
    edges, the *members*, are numbered run after run."""

    start: Int[Tensor, "run"]  # sorted position of the run's first edge
    size: Int[Tensor, "run"]  # edges in the run
    offset: Int[Tensor, "run"]  # member number of the run's first edge


def _tied_runs(neg_b_sorted: Tensor, n_max: int, cuts: Tensor | None = None) -> _TiedRuns:
    """Bounds of the tied runs of the sorted (negated) bottlenecks; no Python step per edge. With
    ``cuts`` (sorted positions), only the runs a cut falls strictly inside."""
    start_np, size_np = tied_run_bounds(exact_numpy(neg_b_sorted), n_max)
    start, size = torch.from_numpy(start_np), torch.from_numpy(size_np)
    if cuts is not None:
        keep = _straddles(cuts, start, start + size)
        start, size = start[keep], size[keep]
    return _TiedRuns(start, size, torch.cumsum(size, 0) - size)


def _straddles(cuts: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Whether some cut ``c`` (sorted) has ``start < c < end``, per span."""
    if cuts.numel() == 0:
        return torch.zeros_like(starts, dtype=torch.bool)
    nxt = torch.searchsorted(cuts, starts, right=True)  # first cut > start
    return cuts[nxt.clamp(max=cuts.numel() - 1)].lt(ends) & (nxt < cuts.numel())


def strace_order(graph: Graph, n_max: int | None = None, *, cuts: Sequence[int] | None = None
                 ) -> Int[Tensor, "taken"]:
    """Edge ids in the order s-Trace takes them, the first ``n_max`` (default: all of |E|).

    Equal to :func:`~tl_strace.search.reference.reference_strace_order`, ties included, without a
    Python step per edge (module docstring): the edges sorted by bottleneck (§1), then each tied
    run replayed with a heap of its own edges (§2, §3), compiled (§4).

    ``cuts`` (edge counts) asks for less: only that the first ``c`` edges are the heap's first
    ``c`` as a *set*, for every ``c`` in ``cuts`` (what strata need; §5). Runs no cut falls inside
    are then left in sorted order.
    """
    n_max = graph.n_edges if n_max is None else min(n_max, graph.n_edges)
    neg_sb, order, node_B = sorted_bottlenecks(graph)
    cut_t = None if cuts is None else torch.tensor(sorted({int(c) for c in cuts}), dtype=torch.long)
    runs = _tied_runs(neg_sb, n_max, cut_t)
    if runs.start.numel() == 0:
        return order[:n_max]
    layout = graph.layout
    members = torch.empty(int(runs.size.sum()), dtype=order.dtype)
    gather_runs(order.numpy(), runs.start.numpy(), runs.size.numpy(), runs.offset.numpy(), members.numpy())
    weight = graph.weights[members]
    w_np = exact_numpy(weight)  # the compiled loops compare in float64 (exact for every float dtype)
    if cut_t is not None and not distinct_within_runs(runs.offset.numpy(), runs.size.numpy(), w_np):
        del neg_sb, order, members, weight, w_np  # not held through the second search
        return strace_order(graph, n_max)  # equal weights make tie keys matter (§5): order exactly
    # Source, target and canonical column of each member (§3), int32, in one compiled pass.
    src, tgt, canon = (torch.empty(members.numel(), dtype=torch.int32) for _ in range(3))
    edge_nodes(members.numpy(), layout.n_heads, layout.n_pos, layout.n_attn, layout.n_local, layout.parallel,
               src.numpy(), tgt.numpy(), canon.numpy())
    # Where each node was reached if that happened in a single-edge run: the position of the
    # (only) edge whose bottleneck is B(node) (§3); per node, read by the members' targets.
    first = torch.searchsorted(neg_sb, (-node_B).to(neg_sb.dtype).contiguous(), side="left")
    lam = -neg_sb[runs.start]
    del neg_sb  # everything after reads the nodes' `first` positions instead (issue 17: memory)
    reach = torch.full((layout.n_nodes,), UNSET, dtype=torch.long)  # §3: where tied runs reached each node
    # one compiled call per stretch of small runs; large runs (the random baseline's) in between
    limit = _TENSOR_RUN if cut_t is None else _TENSOR_RUN_CUTS
    large = torch.nonzero(runs.size > limit).flatten().tolist()
    arrays = (runs.start.numpy(), runs.size.numpy(), runs.offset.numpy(), lam.double().numpy(), members.numpy(),
              src.numpy(), tgt.numpy(), first.numpy(), w_np, canon.numpy(),
              node_B.double().numpy(), reach.numpy(), layout.output_node, order.numpy())  # pops into `order`
    r = 0
    for big in large + [runs.size.numel()]:
        if r < big and replay_runs(r, big, *arrays) != -1:  # pragma: no cover - the bottleneck argument is violated
            raise AssertionError("s-Trace tie replay did not take every edge of a tied run")
        if big < runs.size.numel():  # a large run (the random baseline's): ordered with tensors (_cascade)
            o, n = int(runs.offset[big]), int(runs.size[big])
            _order_large_run(layout, order, members[o:o + n], src[o:o + n], tgt[o:o + n],
                             weight[o:o + n], canon[o:o + n], first, node_B, reach, float(lam[big]),
                             int(runs.start[big]), cut_t)
        r = big + 1
    return order[:n_max]


def _order_large_run(layout: EdgeLayout, order: Tensor, members: Tensor, src: Tensor, tgt: Tensor,
                     weight: Tensor, canon: Tensor, first: Tensor, node_B: Tensor, reach: Tensor,
                     lam: float, s0: int, cuts: Tensor | None) -> None:
    """Order one large tied run in place (§4, :mod:`tl_strace.search._cascade`): the nodes reached
    before it are those of ``B > lam`` (§2), at the positions of §3; the nodes it reaches are added
    to ``reach`` (per node, :data:`~tl_strace.search._replay.UNSET` where no tied run reached it)."""
    reached = node_B > lam
    # Where each node reached before the run was reached (§3): recorded if inside a tied run, else
    # the single edge of bottleneck B(v) (``first``); the output node's in-edges were pushed first (-1).
    reach_pos = first.clone()
    known = reach != UNSET
    reach_pos[known] = reach[known]
    reach_pos[layout.output_node] = -1
    popped, new_nodes = order_run(src, tgt, weight, canon, layout.n_pos, lam, reached, reach_pos, s0, cuts)
    order[s0:s0 + members.numel()] = members[popped]
    reach[new_nodes] = reach_pos[new_nodes]


def strace_strata(graph: Graph, sizes: Sequence[float] | None = None) -> Strata:
    """Nested s-Trace strata for target ``sizes`` (default: :data:`DEFAULT_SIZES`), in one pass."""
    sizes = check_sizes(sizes)
    counts = target_counts(sizes, graph.n_edges)
    # The full graph needs no search: run the heap only up to the largest partial target.
    partial = [c for c in counts if c < graph.n_edges]
    # The order is let go once ranked, before the labels are made (issue 17: memory per edge).
    rank = rank_of(strace_order(graph, max(partial) if partial else 0), graph.layout.size)
    return _strata_from_rank("strace", graph, rank, sizes, counts, sizes)
