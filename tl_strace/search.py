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

:func:`strace_order` is the fast implementation: edges sorted by their *bottleneck* (a max-min
recursion over tensors), with a heap replay only inside runs of equal bottleneck.
:func:`reference_strace_order` is the plain heap of METHOD.md §3, kept as the definition the
tests compare against.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout, EdgeType, Graph

__all__ = [
    "DEFAULT_SIZES",
    "STRATIFICATIONS",
    "Strata",
    "check_sizes",
    "nucleus_strata",
    "random_order",
    "random_strata",
    "reference_strace_order",
    "strace_order",
    "strace_strata",
    "target_counts",
    "threshold_strata",
]

DEFAULT_SIZES: tuple[float, ...] = (
    1e-5, 2e-5, 4e-5, 8e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1e-3, 1.2e-3, 1.4e-3, 2e-3, 3e-3, 4e-3, 6e-3, 8e-3,
    1e-2, 2e-2, 4e-2, 6e-2, 8e-2, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0,
)
"""Paper B's 26 target sizes, then the full graph."""

DEFAULT_THRESHOLD_TAUS: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 1e-3, 5e-4, 2e-4, 1e-4)
DEFAULT_NUCLEUS_TAUS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)

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
    """``floor(σ · |E|)`` computed exactly for the decimal σ as written (no float round-off).

    >>> target_counts([0.29, 1.0], 100)
    [29, 100]
    """
    return [math.floor(Fraction(repr(float(s))) * n_edges) for s in sizes]


# ---------------------------------------------------------------------------------------------
# Per-node sorted in-edge lists
# ---------------------------------------------------------------------------------------------
def _rows(layout: EdgeLayout, weights: Tensor) -> tuple[Tensor, ...]:
    """In-edge rows per target node: (weights, edge ids, source nodes, valid) for attention nodes
    ``[L, T, 1+H·T]`` and MLP nodes ``[L, T, 2]``, columns in canonical order.

    Parallel blocks: the first rows are the block nodes ``(2l+2, t)``, ``[L, T, 1+H·T+1]`` (skip,
    attention edges, then the MLP edge), and the MLP rows are empty ``[L, T, 0]``."""
    L, H, T = layout.n_layers, layout.n_heads, layout.n_pos
    w_a, w_ra, w_m, w_rm = layout.split(weights.double())
    lidx = torch.arange(L)[:, None]
    tidx = torch.arange(T)[None, :]
    ids_ra = layout.offset(EdgeType.RES_ATTN) + lidx * T + tidx  # [L, T]
    # each destination node (l, t) lists its attention in-edges head-major: column h·T + s
    by_node = "layer head dst src -> layer dst (head src)"
    ids_a = rearrange(torch.arange(layout.n_attn).reshape(L, H, T, T), by_node)
    W_att = torch.cat([w_ra[..., None], rearrange(w_a, by_node)], dim=-1)
    I_att = torch.cat([ids_ra[..., None], ids_a], dim=-1)
    s_src = torch.arange(T).repeat(H)  # source position per attention column
    S_att = torch.cat([(2 * lidx * T + tidx)[..., None], (2 * lidx * T)[..., None] + s_src[None, None, :].expand(L, T, H * T)], dim=-1)
    V_att = torch.cat([torch.ones(L, T, 1, dtype=torch.bool),
                       (s_src[None, :] <= torch.arange(T)[:, None]).expand(L, T, H * T)], dim=-1)
    W_mlp = torch.stack([w_rm, w_m], dim=-1)
    I_mlp = torch.stack([layout.offset(EdgeType.RES_MLP) + lidx * T + tidx, layout.offset(EdgeType.MLP) + lidx * T + tidx], dim=-1).expand(L, T, 2)
    S_mlp = ((2 * lidx + 1) * T + tidx)[..., None].expand(L, T, 2)
    V_mlp = torch.ones(L, T, 2, dtype=torch.bool)
    if layout.parallel:  # the MLP edge (source (2l, t)) joins the block node's row; no MLP nodes
        W_att = torch.cat([W_att, w_m[..., None]], dim=-1)
        I_att = torch.cat([I_att, I_mlp[..., 1:]], dim=-1)
        S_att = torch.cat([S_att, S_att[..., :1]], dim=-1)
        V_att = torch.cat([V_att, torch.ones(L, T, 1, dtype=torch.bool)], dim=-1)
        W_mlp, I_mlp, S_mlp, V_mlp = W_mlp[..., :0], I_mlp[..., :0], S_mlp[..., :0], V_mlp[..., :0]
    return W_att, I_att, S_att, V_att, W_mlp, I_mlp, S_mlp, V_mlp


def _row_nodes(layout: EdgeLayout, l: int) -> tuple[tuple[int, int], ...]:
    """``(row kind, graph layer)`` of block ``l``'s target nodes, top first: kind 0 the rows
    ``W_att…`` of :func:`_rows`, kind 1 ``W_mlp…``. Parallel blocks have only the block node."""
    return ((0, 2 * l + 2),) if layout.parallel else ((1, 2 * l + 2), (0, 2 * l + 1))


# ---------------------------------------------------------------------------------------------
# s-Trace
# ---------------------------------------------------------------------------------------------
def bottlenecks(graph: Graph) -> tuple[Float[Tensor, "edge"], Float[Tensor, "node"]]:
    """Each edge's bottleneck ``b(e) = min(B(target), w_e)`` and each node's ``B(v)``: the largest,
    over paths from the output node to ``v``, of the smallest weight on the path (``+inf`` at the
    output, ``-inf`` off the graph). One max-min recursion per block, top to bottom, over tensors.

    s-Trace takes edges in non-increasing order of ``b``: when it pops an edge of weight ``k``,
    every edge of larger bottleneck has been popped already (the first untaken edge on that edge's
    path from the output would otherwise sit in the frontier with weight > k). Only the order
    *within* a run of equal bottlenecks needs a heap (see :func:`strace_order`).
    """
    layout = graph.layout
    L, T = layout.n_layers, layout.n_pos
    neg = -math.inf
    valid_a = layout.split(graph.valid)[0]
    w_a, w_ra, w_m, w_rm = layout.split(graph.weights)  # min/max only: exact in any float dtype
    w_a = w_a.masked_fill(~valid_a, neg)
    b_a, b_ra, b_m, b_rm = (torch.full_like(x, neg) for x in (w_a, w_ra, w_m, w_rm))
    node_B = torch.full((2 * L + 1, T), neg, dtype=graph.weights.dtype)
    node_B[2 * L, T - 1] = math.inf
    for l in range(L - 1, -1, -1):
        B_post = node_B[2 * l + 2]
        if layout.parallel:  # every in-edge of block node (2l+2, t) leaves a node of layer 2l
            b_m[l] = torch.minimum(B_post, w_m[l])
            b_ra[l] = torch.minimum(B_post, w_ra[l])
            b_a[l] = torch.minimum(B_post[None, :, None], w_a[l])
            node_B[2 * l] = torch.maximum(torch.maximum(b_ra[l], b_m[l]), b_a[l].amax(dim=(0, 1)))
            continue
        b_m[l] = torch.minimum(B_post, w_m[l])
        b_rm[l] = torch.minimum(B_post, w_rm[l])
        node_B[2 * l + 1] = B_mid = torch.maximum(b_m[l], b_rm[l])  # both leave node (2l+1, t)
        b_ra[l] = torch.minimum(B_mid, w_ra[l])
        b_a[l] = torch.minimum(B_mid[None, :, None], w_a[l])
        node_B[2 * l] = torch.maximum(b_ra[l], b_a[l].amax(dim=(0, 1)))  # node (2l, s)
    return layout.join(b_a, b_ra, b_m, b_rm).masked_fill(~graph.valid, neg), node_B.flatten()


def strace_order(graph: Graph, n_max: int | None = None) -> Int[Tensor, "taken"]:
    """Edge ids in the order s-Trace takes them, the first ``n_max`` (default: all of |E|).

    Equal to :func:`reference_strace_order`, ties included, without a Python step per edge: edges
    are sorted by bottleneck (:func:`bottlenecks`), and only runs of equal bottleneck are replayed
    with a heap (:func:`_replay_run`). On real graphs nearly every run is a single edge; tied runs
    (mostly edges of exactly equal weight) are replayed a block of members at a time.
    """
    n_max = graph.n_edges if n_max is None else min(n_max, graph.n_edges)
    b, node_B = bottlenecks(graph)
    ids = torch.nonzero(graph.valid).flatten()
    order = ids[torch.sort(-b[ids], stable=True).indices]
    neg_sb = -b[order]
    change = torch.nonzero(neg_sb[1:] != neg_sb[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change])
    ends = torch.cat([change, torch.tensor([neg_sb.numel()])])
    tied = torch.nonzero((ends - starts > 1) & (starts < n_max)).flatten()
    if tied.numel() == 0:
        return order[:n_max]
    layout = graph.layout
    r_start, r_size = starts[tied], (ends - starts)[tied]
    run_of = torch.repeat_interleave(torch.arange(r_size.numel()), r_size)  # run of each member
    r_off = torch.cumsum(r_size, 0) - r_size  # offset of each run among the members
    at = r_start[run_of] + torch.arange(run_of.numel()) - r_off[run_of]  # positions inside tied runs
    del run_of
    members = order[at]
    src, tgt = layout.node_ids(members)
    # Where each member's target was reached if that happened in a single-edge run: the position
    # of the (only) edge whose bottleneck is B(target).
    first = torch.searchsorted(neg_sb, -node_B[tgt].to(neg_sb.dtype), side="left")
    weight, canon = graph.weights[members], _canonical(layout, members)
    node_B_list, lam, reach = node_B.tolist(), (-neg_sb[r_start]).tolist(), {}
    # Python lists for a block of members at a time: tied runs hold millions of edges on long
    # inputs (12M of 44M at 580 tokens), too many to hold as Python objects at once.
    ctx, b0, b1, done = None, 0, 0, []
    for r, (s0, o, n) in enumerate(zip(r_start.tolist(), r_off.tolist(), r_size.tolist())):
        if ctx is None or o + n > b1:
            if done:  # write the replayed runs of the previous block back in one assignment
                order[at[b0:b0 + len(done)]] = torch.tensor(done, dtype=torch.long)
            b0, b1, done = o, o + max(n, _REPLAY_BLOCK), []
            sl = slice(b0, b1)
            ctx = _RunContext(
                node_B=node_B_list, output=layout.output_node, reach=reach, lam=lam,
                edge=members[sl].tolist(), src=src[sl].tolist(), tgt=tgt[sl].tolist(), first=first[sl].tolist(),
                weight=weight[sl].tolist(), canon=canon[sl].tolist(),
            )
        done += _replay_run(ctx, r, o - b0, s0, s0 + n)
    order[at[b0:b0 + len(done)]] = torch.tensor(done, dtype=torch.long)
    return order[:n_max]


_REPLAY_BLOCK = 1 << 18
"""Tied-run members converted to Python lists at a time by :func:`strace_order`."""


@dataclass
class _RunContext:
    """What replaying one tied run needs, as Python lists over the run's members (``reach`` and
    ``node_B`` are shared by all runs)."""

    node_B: list[float]
    output: int
    reach: dict[int, int]  # position at which nodes reached inside tied runs were reached
    lam: list[float]  # the bottleneck of each tied run
    edge: list[int]
    src: list[int]
    tgt: list[int]
    first: list[int]  # first position whose bottleneck equals B(target)
    weight: list[float]
    canon: list[int]

    def reached_at(self, i: int) -> int:
        """Position at which member ``i``'s target was first reached, for a target reached before
        the current run: inside an earlier tied run (recorded), or by the single edge of
        bottleneck ``B(target)``."""
        t = self.tgt[i]
        if t == self.output:
            return -1
        pos = self.reach.get(t)
        return pos if pos is not None else self.first[i]


def _canonical(layout: EdgeLayout, ids: Tensor) -> Tensor:
    """Each edge's position among its target node's in-edges: residual 0, then attention edges
    head-major and source-minor (1 + h·(t+1) + s), or the MLP edge (1; in a parallel block node,
    after the attention edges: 1 + H·(t+1))."""
    d = layout.decode(ids)
    kind = d["type"]
    attn = 1 + d["head"] * (d["target"] + 1) + d["source"]
    mlp_col = 1 + layout.n_heads * (d["target"] + 1) if layout.parallel else torch.ones_like(ids)
    return torch.where(kind == EdgeType.ATTN, attn, torch.where(kind == EdgeType.MLP, mlp_col, torch.zeros_like(ids)))


def _replay_run(ctx: _RunContext, r: int, offset: int, s0: int, s1: int) -> list[int]:
    """The edges of positions ``[s0, s1)`` — a run of equal bottleneck λ — in the heap's pop order.

    While the run lasts the frontier's best edge is always a run edge (run edges weigh ≥ λ, every
    other frontier edge < λ). The run starts with its edges whose target was reached earlier
    (``B(target) > λ``) and gains a node's run edges when that node is first reached within the
    run. Keys are (−weight, position at which the target was reached, canonical position): the
    last two are the plain heap's insertion order.
    """
    lam = ctx.lam[r]
    heap: list[tuple[float, int, int, int]] = []
    waiting: dict[int, list[tuple[float, int, int]]] = {}
    for i in range(offset, offset + s1 - s0):
        t = ctx.tgt[i]
        if ctx.node_B[t] > lam:
            heap.append((-ctx.weight[i], ctx.reached_at(i), ctx.canon[i], i))
        else:
            waiting.setdefault(t, []).append((-ctx.weight[i], ctx.canon[i], i))
    heapq.heapify(heap)
    out: list[int] = []
    pos = s0
    while heap:
        i = heapq.heappop(heap)[3]
        out.append(ctx.edge[i])
        s = ctx.src[i]
        if ctx.node_B[s] == lam and s not in ctx.reach:
            ctx.reach[s] = pos
            for negw, c, k in waiting.pop(s, ()):
                heapq.heappush(heap, (negw, pos, c, k))
        pos += 1
    if pos != s1:  # pragma: no cover - would mean the bottleneck argument is violated
        raise AssertionError(f"s-Trace tie replay took {pos - s0} of {s1 - s0} edges")
    return out


def reference_strace_order(graph: Graph, n_max: int | None = None) -> Int[Tensor, "taken"]:
    """METHOD.md §3 verbatim: a heap of every frontier edge keyed on (−weight, insertion index).

    Slow (one Python heap entry per edge); it is the definition the fast search is tested against.
    """
    layout = graph.layout
    n_max = graph.n_edges if n_max is None else min(n_max, graph.n_edges)
    W_att, I_att, S_att, V_att, W_mlp, I_mlp, S_mlp, V_mlp = _rows(layout, graph.weights)
    L, T = layout.n_layers, layout.n_pos
    in_edges: dict[int, list[tuple[float, int, int]]] = {}
    for l in range(L):
        for t in range(T):
            row = [(float(W_att[l, t, c]), int(I_att[l, t, c]), int(S_att[l, t, c]))
                   for c in range(W_att.shape[-1]) if V_att[l, t, c]]
            in_edges[(2 * l + 2 if layout.parallel else 2 * l + 1) * T + t] = row
            if not layout.parallel:
                in_edges[(2 * l + 2) * T + t] = [(float(W_mlp[l, t, c]), int(I_mlp[l, t, c]), int(S_mlp[l, t, c]))
                                                 for c in range(2)]
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


def _strata_from_order(method: str, graph: Graph, order: Tensor, sizes: Sequence[float],
                       counts: Sequence[int], params: Sequence[float]) -> Strata:
    E = graph.layout.size
    rank = torch.full((E,), -1, dtype=torch.long)
    rank[order] = torch.arange(order.numel())
    labels = torch.full((E,), NOT_IN_ANY, dtype=torch.long)
    c = torch.tensor(list(counts), dtype=torch.long)
    taken = rank >= 0
    labels[taken] = torch.searchsorted(c, rank[taken], right=True)
    # Edges beyond the largest partial target belong to the final (full) stratum only.
    labels[graph.valid & ~taken] = len(counts) - 1
    return Strata(method=method, sizes=torch.tensor(list(sizes), dtype=torch.float64), counts=c,
                  params=torch.tensor(list(params), dtype=torch.float64), labels=labels, rank=rank)


def strace_strata(graph: Graph, sizes: Sequence[float] | None = None) -> Strata:
    """Nested s-Trace strata for target ``sizes`` (default: :data:`DEFAULT_SIZES`), in one pass."""
    sizes = check_sizes(sizes)
    counts = target_counts(sizes, graph.n_edges)
    # The full graph needs no search: run the heap only up to the largest partial target.
    partial = [c for c in counts if c < graph.n_edges]
    order = strace_order(graph, max(partial) if partial else 0)
    return _strata_from_order("strace", graph, order, sizes, counts, sizes)


def random_order(graph: Graph, n_max: int | None = None, *, seed: int = 0) -> Int[Tensor, "taken"]:
    """Edge ids in the order the *random* baseline takes them: the s-Trace search run on i.i.d.
    uniform weights from ``torch.Generator().manual_seed(seed)`` — a random connected subgraph
    grown back from the output node, one edge at a time (every edge after its target node).

    Under uniform weights most edges share a few huge runs of equal bottleneck (77 % of them on
    SmolLM2 at 59 tokens), so this is the tie replay's heaviest case.
    """
    gen = torch.Generator().manual_seed(int(seed))
    rnd = torch.rand(graph.layout.size, generator=gen, dtype=torch.float64)
    return strace_order(Graph(graph.layout, rnd.masked_fill(~graph.valid, 0.0), graph.valid), n_max)


def random_strata(graph: Graph, counts: Sequence[int], sizes: Sequence[float], *, seed: int = 0) -> Strata:
    """The *random* baseline (METHOD.md §4): connected subgraphs grown back from the output node in
    the order of :func:`random_order` (s-Trace on seeded uniform weights), one per stratum, nested,
    with exactly ``counts`` edges each."""
    partial = [c for c in counts if c < graph.n_edges]
    order = random_order(graph, max(partial) if partial else 0, seed=seed)
    return _strata_from_order("random", graph, order, sizes, counts, sizes)


# ---------------------------------------------------------------------------------------------
# Paper A's stratifications
# ---------------------------------------------------------------------------------------------
def _by_target_layer(layout: EdgeLayout) -> tuple[Tensor, Tensor, list[Tensor]]:
    ids = torch.arange(layout.size)
    src, tgt = layout.node_ids(ids)
    tgt_layer = torch.div(tgt, layout.n_pos, rounding_mode="floor")
    groups = [torch.nonzero(tgt_layer == g).flatten() for g in range(2 * layout.n_layers + 1)]
    return src, tgt, groups


def _connected(layout: EdgeLayout, keep: Bool[Tensor, "edge"], src: Tensor, tgt: Tensor,
               groups: list[Tensor]) -> Bool[Tensor, "edge"]:
    """Kept edges whose target is reachable from the output node through kept edges."""
    reach = torch.zeros(layout.n_nodes, dtype=torch.bool)
    reach[layout.output_node] = True
    out = torch.zeros_like(keep)
    for g in range(2 * layout.n_layers, 0, -1):
        idx = groups[g]
        sel = idx[keep[idx] & reach[tgt[idx]]]
        out[sel] = True
        reach[src[sel]] = True
    return out


def _strata_from_masks(method: str, graph: Graph, masks: list[Tensor], params: list[float]) -> Strata:
    """Build Strata from nested masks ordered sparse → dense (the full graph is appended)."""
    masks = [m & graph.valid for m in masks] + [graph.valid]
    params = list(params) + [0.0 if method == "threshold" else 1.0]
    E = graph.n_edges
    labels = torch.full((graph.layout.size,), NOT_IN_ANY, dtype=torch.long)
    for k in range(len(masks) - 1, -1, -1):
        labels[masks[k]] = k
    counts = [int(m.sum()) for m in masks]
    # Rank: by stratum, then by weight within a stratum (for display order only).
    key = labels.double() * 2.0 - graph.weights.double()
    rank = torch.full((graph.layout.size,), -1, dtype=torch.long)
    order = torch.argsort(key[graph.valid], stable=True)
    rank[torch.nonzero(graph.valid).flatten()[order]] = torch.arange(order.numel())
    return Strata(method=method, sizes=torch.tensor([c / E for c in counts], dtype=torch.float64),
                  counts=torch.tensor(counts, dtype=torch.long), params=torch.tensor(params, dtype=torch.float64),
                  labels=labels, rank=rank)


def _check_taus(taus: Sequence[float], name: str) -> list[float]:
    vals = [float(t) for t in taus]
    if not vals or any(not (0.0 <= t <= 1.0) for t in vals) or len(set(vals)) != len(vals):
        raise InputError(f"{name} values must be distinct numbers in [0, 1]; got {list(taus)}.")
    return vals


def threshold_strata(graph: Graph, taus: Sequence[float] | None = None) -> Strata:
    """Paper A's threshold strata: edges with weight > τ, connected to the output; one per τ."""
    taus = sorted(_check_taus(taus or DEFAULT_THRESHOLD_TAUS, "Threshold"), reverse=True)
    src, tgt, groups = _by_target_layer(graph.layout)
    masks = [_connected(graph.layout, graph.valid & (graph.weights > t), src, tgt, groups) for t in taus]
    return _strata_from_masks("threshold", graph, masks, taus)


def nucleus_strata(graph: Graph, taus: Sequence[float] | None = None) -> Strata:
    """Paper A's nucleus strata: at each reached node the shortest weight-sorted prefix of its
    in-edges whose cumulative weight reaches τ (at least one); one stratum per τ."""
    taus = sorted(_check_taus(taus or DEFAULT_NUCLEUS_TAUS, "Nucleus"))
    layout = graph.layout
    L, T = layout.n_layers, layout.n_pos
    W_att, I_att, S_att, V_att, W_mlp, I_mlp, S_mlp, V_mlp = _rows(layout, graph.weights)
    sorted_rows = []
    for W, I, S, V in ((W_att, I_att, S_att, V_att), (W_mlp, I_mlp, S_mlp, V_mlp)):
        key = torch.where(V, -W, torch.full_like(W, math.inf))
        _, order = torch.sort(key, dim=-1, stable=True)
        Ws = torch.gather(torch.where(V, W, torch.zeros_like(W)), -1, order)
        sorted_rows.append((Ws.cumsum(-1), torch.gather(I, -1, order), torch.gather(S, -1, order), V.sum(-1)))
    masks = []
    for tau in taus:
        reach = torch.zeros(layout.n_nodes, dtype=torch.bool)
        reach[layout.output_node] = True
        keep = torch.zeros(layout.size, dtype=torch.bool)
        for l in range(L - 1, -1, -1):
            for kind, g in _row_nodes(layout, l):
                cum, ids, srcs, cnt = (x[l] for x in sorted_rows[kind])
                n_keep = torch.clamp((cum < tau - 1e-12).sum(-1) + 1, max=cnt)  # [T]
                row_on = reach[g * T + torch.arange(T)]
                sel = (torch.arange(cum.shape[-1])[None, :] < n_keep[:, None]) & row_on[:, None]
                keep[ids[sel]] = True
                reach[srcs[sel]] = True
        masks.append(keep)
    return _strata_from_masks("nucleus", graph, masks, taus)


STRATIFICATIONS: dict[str, Callable[..., Strata]] = {
    "strace": strace_strata,
    "threshold": threshold_strata,
    "nucleus": nucleus_strata,
}
