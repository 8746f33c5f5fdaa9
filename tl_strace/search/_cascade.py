"""The pop order of one large tied run of s-Trace's heap, found with tensors (issue 17).

:mod:`tl_strace.search.strace` sorts the edges by bottleneck and replays each *run* of equal
bottleneck with a heap (its §2, §3). On a real graph runs are short; under the *random*
baseline's uniform weights a few runs hold most of the graph (77 % of the edges at 59 tokens, runs
of millions at a few hundred tokens), and a Python heap over them costs microseconds and about 250
bytes per edge. This module orders such a run with the same two ideas applied again, inside it.

**A run of bottleneck λ** (members ``M``; ``strace`` §2): every member weighs ``≥ λ``; the members
in the frontier when the run starts (their target was reached before it) weigh exactly ``λ``; the
others wait for their target, a node of widest-path value ``B = λ``, to be reached inside the run.
Call members of weight ``λ`` *level* members and the others *heavy*.

**Phases** (:func:`_run`). The heap pops the heaviest available edge. Whenever no heavy member is
available, it pops the level member of smallest tie key ``(reach position, canonical column)``
(``strace`` §3); that pop may reach a node, releasing its waiting members; the heavy ones among them
start a *cascade*: every heavy member that becomes available is popped before the next level member,
so the cascade is exactly the heap's pops until no heavy member is available. Level members
released during a cascade wait, with their tie keys, for the cascade to end.

**A cascade is s-Trace again** (:func:`_order`). A heap that starts from some frontier and pops
the heaviest available edge pops in non-increasing bottleneck ``b(e) = min(B(target), w_e)`` where
``B`` is now the widest-path value from that frontier (``B = +inf`` at reached nodes): the proof of
``strace`` §1 uses nothing about the starting frontier. So the cascade's members are sorted by that
``b`` (one max-min pass per graph layer, over the members only); members of ``b = -inf`` are not
reachable from this frontier and belong to later phases; each run of equal ``b`` inside the cascade
is again a run (``strace`` §2 holds as stated), ordered by :func:`_run`, or by the plain heap
(:func:`_heap`) when it is small.

Every sub-run weighs more than the run it came from, so the recursion ends; a run with many level
members (many phases, each scanning what is left) is handed to :func:`_heap` whole, so the cost is
bounded by the plain heap's.

State shared by the whole recursion (:class:`_State`): which nodes are reached and at which pop
position (the tie key of the edges into them), as tensors over the graph's nodes.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_strace.search._replay import exact_numpy, heap_order, tied_run_bounds

SMALL = 2048
"""Sub-problems with at most this many members are ordered by the plain heap (:func:`_heap`)."""

MAX_PHASES = 64
"""A run with more level members than this is ordered by the plain heap: each phase scans the
members left, so many phases would cost more than the heap."""


@dataclass
class _State:
    """One large run's members (tensors indexed by member) and the reach state of every node."""

    src: Int[Tensor, "member"]  # source node id
    tgt: Int[Tensor, "member"]  # target node id
    weight: Float[Tensor, "member"]
    canon: Int[Tensor, "member"]  # column among the target's in-edges (_rows._canonical)
    layer: Int[Tensor, "member"]  # graph layer of the target node
    reached: Bool[Tensor, "node"]
    reach_pos: Int[Tensor, "node"]  # position of the pop that reached the node (-1: the output node)
    cuts: Tensor | None = None  # sorted positions: order only the sub-runs one falls inside (strace §5)

    def needed(self, start: int, n: int) -> bool:
        """Whether the pops at positions ``[start, start + n)`` must be put in the heap's order."""
        if self.cuts is None:
            return True
        i = int(torch.searchsorted(self.cuts, torch.tensor(start), right=True))
        return i < self.cuts.numel() and int(self.cuts[i]) < start + n


def order_run(src: Tensor, tgt: Tensor, weight: Tensor, canon: Tensor, n_pos: int, lam: float,
              reached: Tensor, reach_pos: Tensor, s0: int, cuts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The plain heap's pop order of one run of bottleneck ``lam`` starting at sorted position ``s0``.

    ``reached``/``reach_pos`` (over all nodes) say which nodes were reached before the run and where;
    they are updated in place with the nodes the run reaches. Returns the members (indices into the
    given arrays) in pop order, and the nodes reached inside the run. With ``cuts`` (sorted global
    positions), only the pops a cut falls among are ordered (strace §5): a sub-run no cut falls
    inside keeps its sorted order, and the reach positions it records are then not the heap's.
    """
    st = _State(src=src, tgt=tgt, weight=weight, canon=canon, layer=torch.div(tgt, n_pos, rounding_mode="floor"),
                reached=reached, reach_pos=reach_pos, cuts=cuts)
    before = reached.clone()
    idx = torch.arange(src.numel())
    out = _run(st, idx, lam, s0)
    if out.numel() != idx.numel():  # pragma: no cover - would mean the bottleneck argument is violated
        raise AssertionError(f"s-Trace tie replay took {out.numel()} of {idx.numel()} edges")
    return out, torch.nonzero(reached & ~before).flatten()


def _mark(st: _State, members: Tensor, base: int) -> None:
    """Record the nodes first reached by ``members``, popped in this order from position ``base``."""
    if members.numel() == 0:
        return
    s = st.src[members]
    new = ~st.reached[s]
    if not bool(new.any()):
        return
    pos = base + torch.nonzero(new).flatten()
    nodes, inv = torch.unique(s[new], return_inverse=True)
    first = torch.full((nodes.numel(),), torch.iinfo(torch.long).max, dtype=torch.long)
    first.scatter_reduce_(0, inv, pos, reduce="amin")
    st.reached[nodes] = True
    st.reach_pos[nodes] = first


def _heap(st: _State, idx: Tensor, base: int) -> Tensor:
    """The plain heap on the sub-problem ``idx``: members whose target is reached are in the frontier
    (key: that node's reach position), the others wait for their target. Members never released
    are not popped. Exact by definition (``strace`` §3's key); compiled
    (:func:`tl_strace.search._replay.heap_order`), updating ``st.reached``/``st.reach_pos`` in place."""
    n = idx.numel()
    if n == 0:
        return idx
    out = np.empty(n, dtype=np.int64)
    k = heap_order(st.src[idx].numpy(), st.tgt[idx].numpy(), st.weight[idx].double().numpy(), st.canon[idx].numpy(),
                   st.reached.numpy(), st.reach_pos.numpy(), base, out)
    return idx[torch.from_numpy(out[:k])]


def _bottlenecks(st: _State, idx: Tensor) -> Tensor:
    """``b(e) = min(B(target), w_e)`` for the members ``idx``, with ``B`` the widest-path value from
    the sub-problem's frontier (``+inf`` at reached nodes, ``-inf`` where no member path leads). One
    max-min pass per graph layer, top down: a member's source is one or two layers below its
    target, so every ``B`` is final before it is read. ``B`` is held for every graph node (few: no
    renumbering of the members' nodes, which took several int64 arrays per member)."""
    src, tgt, w = st.src[idx], st.tgt[idx], st.weight[idx]
    B = torch.full((st.reached.numel(),), -math.inf, dtype=w.dtype)
    B[st.reached] = math.inf
    layer = st.layer[idx]
    by_layer = torch.argsort(layer, descending=True, stable=True)
    lay_sorted = layer[by_layer]
    bounds = torch.nonzero(lay_sorted[1:] != lay_sorted[:-1]).flatten() + 1
    del layer, lay_sorted
    b = torch.empty_like(w)
    for g in torch.tensor_split(by_layer, bounds):
        bb = torch.minimum(B[tgt[g]], w[g])
        b[g] = bb
        B.scatter_reduce_(0, src[g].long(), bb, reduce="amax")
    return b


def _order(st: _State, idx: Tensor, base: int) -> Tensor:
    """The heap's pops of the sub-problem ``idx`` from position ``base`` (module docstring: a
    cascade), as member indices; unreachable members are left out."""
    if idx.numel() <= SMALL:
        return _heap(st, idx, base)
    b = _bottlenecks(st, idx)
    keep = b > -math.inf
    idx, b = idx[keep], b[keep]
    del keep
    b.neg_()
    neg_b, srt = torch.sort(b, stable=True)
    del b
    idx = idx[srt]
    del srt
    starts, sizes = tied_run_bounds(exact_numpy(neg_b), idx.numel())  # runs of more than one member
    out = idx.clone()
    done = 0  # sorted positions before `done` are final and marked
    for s0, n in zip(starts.tolist(), sizes.tolist()):
        if not st.needed(base + s0, n):
            continue  # no cut inside: its members stay in sorted order (strace §5)
        _mark(st, out[done:s0], base + done)  # the runs before this tied run
        run = idx[s0:s0 + n]
        lam = float(-neg_b[s0])
        popped = _heap(st, run, base + s0) if n <= SMALL else _run(st, run, lam, base + s0)
        if popped.numel() != n:  # pragma: no cover - would mean the bottleneck argument is violated
            raise AssertionError(f"s-Trace tie replay took {popped.numel()} of {n} edges")
        out[s0:s0 + n] = popped
        done = s0 + n
    _mark(st, out[done:], base + done)
    return out


def _run(st: _State, idx: Tensor, lam: float, base: int) -> Tensor:
    """The heap's pops of one run of bottleneck ``lam`` (members ``idx``), by phases (module
    docstring)."""
    w = st.weight[idx]
    level = w == lam
    n_level = int(level.sum())
    if idx.numel() <= SMALL or n_level > MAX_PHASES:
        return _heap(st, idx, base)
    lev, heavy = idx[level], idx[~level]
    lev_tgt = st.tgt[lev]
    if bool(st.reached[st.tgt[heavy]].any()):  # pragma: no cover - strace §2: such members weigh lam
        raise AssertionError("a heavy member of a tied run is in the frontier when the run starts")
    pool: list[tuple[int, int, int]] = []  # available level members: (reach position, canon, member)
    queued = torch.zeros(lev.numel(), dtype=torch.bool)

    def release() -> None:
        ready = st.reached[lev_tgt] & ~queued
        if bool(ready.any()):
            j = torch.nonzero(ready).flatten()
            queued[j] = True
            for k, r, c in zip(j.tolist(), st.reach_pos[lev_tgt[j]].tolist(), st.canon[lev[j]].tolist()):
                heapq.heappush(pool, (r, c, k))

    release()
    out: list[Tensor] = []
    pos = base
    left = heavy
    while pool:
        k = heapq.heappop(pool)[2]
        e = lev[k:k + 1]
        out.append(e)
        v = int(st.src[e])
        pos += 1
        if bool(st.reached[v]):
            continue
        st.reached[v] = True
        st.reach_pos[v] = pos - 1
        if left.numel():
            casc = _order(st, left, pos)
            if casc.numel():
                out.append(casc)
                pos += casc.numel()
                gone = torch.zeros(st.src.numel(), dtype=torch.bool)
                gone[casc] = True
                left = left[~gone[left]]
        release()
    return torch.cat(out) if out else idx[:0]
