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
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.graph import EdgeLayout, Graph
from tl_strace.search._cascade import SMALL, order_run
from tl_strace.search._replay import UNSET, distinct_within_runs, pack_sort_keys, replay_runs
from tl_strace.search._rows import _canonical
from tl_strace.search._strata import Strata, _strata_from_order, check_sizes, target_counts

_TENSOR_RUN = 1 << 16
"""Tied runs with more members than this are ordered with tensors (:mod:`tl_strace.search._cascade`),
the others by the compiled heap (§4). When the whole order is asked for, the recursion pays
only on very large runs: measured on SmolLM2 graphs, sub-runs are mostly small."""

_TENSOR_RUN_CUTS = 4 * SMALL
"""The same bound when only cuts are asked for (§5): the recursion then skips every sub-run no cut
falls inside, so it pays from a few thousand members."""


def stable_sort(x: Float[Tensor, "n"]) -> tuple[Float[Tensor, "n"], Int[Tensor, "n"]]:
    """``torch.sort(x, stable=True)`` (values and indices), faster and in less memory for float32 (§4).

    A float32 value and its index fit one 64-bit key: the value's bits mapped to an unsigned
    integer of the same order (``-0.0`` counted as ``+0.0``, as ``torch.sort`` compares them) above
    the index. The keys are distinct, so NumPy's unstable sort of the keys alone (vectorised
    quicksort) gives the stable order: 0.7 s instead of 2.3 s for 11.8 M edges, 12 bytes per
    element at the peak (the keys and a copy of ``x``; torch's sort: values, int64 indices and a
    copy), the keys becoming the indices in place. Other dtypes, NaN, or 2³² elements and more:
    ``torch.sort`` itself.
    """
    n = x.numel()
    if x.dtype != torch.float32 or n >= 1 << 32 or bool(torch.isnan(x).any()):
        return torch.sort(x, stable=True)
    key = np.empty(n, dtype=np.uint64)
    pack_sort_keys((x + 0.0).numpy().view(np.int32), key)  # + 0.0: -0.0 becomes +0.0
    key.sort()
    key &= np.uint64(0xFFFFFFFF)
    perm = torch.from_numpy(key.view(np.int64))
    return x[perm], perm


def bottlenecks(graph: Graph) -> tuple[Float[Tensor, "edge"], Float[Tensor, "node"]]:
    """Each edge's bottleneck ``b(e) = min(B(target), w_e)`` and each node's ``B(v)`` (§1): the
    largest, over paths from the output node to ``v``, of the smallest weight on the path (``+inf``
    at the output, ``-inf`` off the graph). One max-min recursion per block, top to bottom.
    """
    layout = graph.layout
    L, T = layout.n_layers, layout.n_pos
    neg = -math.inf
    valid_a = layout.split(graph.valid)[0]
    w_a, w_ra, w_m, w_rm = layout.split(graph.weights)  # min/max only: exact in any float dtype
    # One output tensor written through views of its four blocks: no copy of the edge space.
    b = torch.full_like(graph.weights, neg)
    b_a, b_ra, b_m, b_rm = layout.split(b)
    node_B = torch.full((2 * L + 1, T), neg, dtype=graph.weights.dtype)
    node_B[2 * L, T - 1] = math.inf
    for l in range(L - 1, -1, -1):
        B_post = node_B[2 * l + 2]
        if layout.parallel:  # every in-edge of block node (2l+2, t) leaves a node of layer 2l
            b_m[l] = torch.minimum(B_post, w_m[l])
            b_ra[l] = torch.minimum(B_post, w_ra[l])
            torch.minimum(B_post[None, :, None], w_a[l], out=b_a[l])
            b_a[l].masked_fill_(~valid_a[l], neg)
            node_B[2 * l] = torch.maximum(torch.maximum(b_ra[l], b_m[l]), b_a[l].amax(dim=(0, 1)))
            continue
        b_m[l] = torch.minimum(B_post, w_m[l])
        b_rm[l] = torch.minimum(B_post, w_rm[l])
        node_B[2 * l + 1] = B_mid = torch.maximum(b_m[l], b_rm[l])  # both leave node (2l+1, t)
        b_ra[l] = torch.minimum(B_mid, w_ra[l])
        torch.minimum(B_mid[None, :, None], w_a[l], out=b_a[l])
        b_a[l].masked_fill_(~valid_a[l], neg)
        node_B[2 * l] = torch.maximum(b_ra[l], b_a[l].amax(dim=(0, 1)))  # node (2l, s)
    return b.masked_fill_(~graph.valid, neg), node_B.flatten()


class _TiedRuns(NamedTuple):
    """The runs of equal bottleneck (§1) with more than one edge that start before ``n_max``. Their
    edges, the *members*, are numbered run after run."""

    start: Int[Tensor, "run"]  # sorted position of the run's first edge
    size: Int[Tensor, "run"]  # edges in the run
    offset: Int[Tensor, "run"]  # member number of the run's first edge
    at: Int[Tensor, "member"]  # sorted position of each member


def _tied_runs(neg_b_sorted: Tensor, n_max: int, cuts: Tensor | None = None) -> _TiedRuns:
    """Bounds of the tied runs of the sorted (negated) bottlenecks; no Python step per edge. With
    ``cuts`` (sorted positions), only the runs a cut falls strictly inside."""
    change = torch.nonzero(neg_b_sorted[1:] != neg_b_sorted[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change])
    ends = torch.cat([change, torch.tensor([neg_b_sorted.numel()])])
    keep = (ends - starts > 1) & (starts < n_max)
    if cuts is not None:
        keep &= _straddles(cuts, starts, ends)
    tied = torch.nonzero(keep).flatten()
    start, size = starts[tied], (ends - starts)[tied]
    run_of = torch.repeat_interleave(torch.arange(size.numel()), size)  # run of each member
    offset = torch.cumsum(size, 0) - size
    return _TiedRuns(start, size, offset, start[run_of] + torch.arange(run_of.numel()) - offset[run_of])


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
    b, node_B = bottlenecks(graph)
    ids = torch.nonzero(graph.valid).flatten()
    neg_b = b[ids].neg_()
    del b  # the edge space's largest transients go before the sort (issue 17)
    neg_sb, srt = stable_sort(neg_b)
    del neg_b
    order = ids[srt]
    del ids, srt
    cut_t = None if cuts is None else torch.tensor(sorted({int(c) for c in cuts}), dtype=torch.long)
    runs = _tied_runs(neg_sb, n_max, cut_t)
    if runs.start.numel() == 0:
        return order[:n_max]
    layout = graph.layout
    members = order[runs.at]
    weight = graph.weights[members]
    weight64 = weight.double().numpy()  # the compiled loops compare float64 (exact for float32 weights)
    if cut_t is not None and not distinct_within_runs(runs.offset.numpy(), runs.size.numpy(), weight64):
        return strace_order(graph, n_max)  # equal weights make tie keys matter (§5): order exactly
    src, tgt = layout.node_ids(members)
    # Where each member's target was reached if that happened in a single-edge run: the position
    # of the (only) edge whose bottleneck is B(target) (§3).
    first = torch.searchsorted(neg_sb, -node_B[tgt].to(neg_sb.dtype), side="left")
    canon = _canonical(layout, members)
    lam = -neg_sb[runs.start]
    reach = torch.full((layout.n_nodes,), UNSET, dtype=torch.long)  # §3: where tied runs reached each node
    out = torch.empty_like(members)  # replayed runs' pops, by member number
    replayed = torch.ones(members.numel(), dtype=torch.bool)
    # one compiled call per stretch of small runs; large runs (the random baseline's) in between
    limit = _TENSOR_RUN if cut_t is None else _TENSOR_RUN_CUTS
    large = torch.nonzero(runs.size > limit).flatten().tolist()
    arrays = (runs.start.numpy(), runs.size.numpy(), runs.offset.numpy(), lam.double().numpy(), members.numpy(),
              src.numpy(), tgt.numpy(), first.numpy(), weight64, canon.numpy(),
              node_B.double().numpy(), reach.numpy(), layout.output_node, out.numpy())
    r = 0
    for big in large + [runs.size.numel()]:
        if r < big and replay_runs(r, big, *arrays) != -1:  # pragma: no cover - the bottleneck argument is violated
            raise AssertionError("s-Trace tie replay did not take every edge of a tied run")
        if big < runs.size.numel():  # a large run (the random baseline's): ordered with tensors (_cascade)
            o, n = int(runs.offset[big]), int(runs.size[big])
            replayed[o:o + n] = False
            _order_large_run(layout, order, runs.at[o:o + n], members[o:o + n], src[o:o + n], tgt[o:o + n],
                             weight[o:o + n], canon[o:o + n], neg_sb, node_B, reach, float(lam[big]),
                             int(runs.start[big]), cut_t)
        r = big + 1
    order[runs.at[replayed]] = out[replayed]
    return order[:n_max]


def _order_large_run(layout: EdgeLayout, order: Tensor, at: Tensor, members: Tensor, src: Tensor, tgt: Tensor,
                     weight: Tensor, canon: Tensor, neg_sb: Tensor, node_B: Tensor, reach: Tensor,
                     lam: float, s0: int, cuts: Tensor | None) -> None:
    """Order one large tied run in place (§4, :mod:`tl_strace.search._cascade`): the nodes reached
    before it are those of ``B > lam`` (§2), at the positions of §3; the nodes it reaches are added
    to ``reach`` (per node, :data:`~tl_strace.search._replay.UNSET` where no tied run reached it)."""
    reached = node_B > lam
    # Where each node reached before the run was reached (§3): recorded if inside a tied run, else
    # the single edge of bottleneck B(v); the output node's in-edges were pushed first (-1).
    reach_pos = torch.searchsorted(neg_sb, (-node_B).to(neg_sb.dtype).contiguous(), side="left")
    known = reach != UNSET
    reach_pos[known] = reach[known]
    reach_pos[layout.output_node] = -1
    popped, new_nodes = order_run(src, tgt, weight, canon, layout.n_pos, lam, reached, reach_pos, s0, cuts)
    order[at] = members[popped]
    reach[new_nodes] = reach_pos[new_nodes]


def strace_strata(graph: Graph, sizes: Sequence[float] | None = None) -> Strata:
    """Nested s-Trace strata for target ``sizes`` (default: :data:`DEFAULT_SIZES`), in one pass."""
    sizes = check_sizes(sizes)
    counts = target_counts(sizes, graph.n_edges)
    # The full graph needs no search: run the heap only up to the largest partial target.
    partial = [c for c in counts if c < graph.n_edges]
    order = strace_order(graph, max(partial) if partial else 0)
    return _strata_from_order("strace", graph, order, sizes, counts, sizes)
