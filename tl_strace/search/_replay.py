"""The tie replay of :mod:`tl_strace.search.strace` (its §2, §3) as compiled loops (issue 17).

Inside a run of equal bottleneck the order is a heap's: a Python heap costs microseconds per
edge and converts every tied edge to Python objects; on real graphs the tied edges come in
hundreds of thousands of short runs (483,089 runs holding 1.2 M edges on SmolLM2 at 300 tokens), so
the per-run Python overhead dominated the search. Here one call replays every run in a range, over
NumPy arrays, with a binary heap of four parallel key arrays, compiled by **numba** (the one loop
in tl_strace that cannot be written as tensor operations: each pop may change what the next pop
is). Why numba and not hand-written C: no compiler at install time, no build step, wheels for every
platform PyTorch has, and the loop stays readable Python that the plain-heap reference checks.

The kernels do exactly what the Python heaps they replace did, key for key:

* :func:`replay_runs` — ``strace`` §2: the members of run ``r`` whose target has ``B > λ`` are in the
  frontier from the start, keyed ``(-weight, reach position of the target, canonical column,
  member)``; the others wait for their target, which a pop inside the run reaches;
* :func:`heap_order` — :func:`tl_strace.search._cascade._heap`'s sub-problems: a member is available
  when its target is reached; a pop whose source is not reached reaches it.

``reach`` (one int64 per graph node, :data:`UNSET` where no pop inside a tied run reached it yet) is
updated in place: later runs read where earlier ones reached their nodes (§3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, no_type_check

import numpy as np
import torch
from numba import njit

def exact_numpy(x: Any) -> np.ndarray:
    """A CPU tensor as the NumPy array the compiled loops take: float32, float64 and integer
    tensors as they are (no copy), other floats (float16, bfloat16: neither NumPy nor numba takes
    them) widened to float64, which is exact, so comparisons are unchanged."""
    if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
        x = x.double()
    return x.numpy()


UNSET = -2
"""``reach[v]`` for a node no tied run has reached (the output node's in-edges use -1)."""


def _compiled(fn: Callable[..., Any]) -> Any:
    """``numba.njit`` with its on-disk cache (beside the package, else the user's cache directory),
    so the loops compile once per install; where no cache directory can be written, compiled once
    per process instead of failing the import (numba raises at decoration then)."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:
        return njit(nogil=True)(fn)


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def _before(h0: np.ndarray, h1: np.ndarray, h2: np.ndarray, h3: np.ndarray, i: int, j: int) -> bool:
    """Whether heap slot ``i``'s key is smaller than slot ``j``'s (lexicographic on the 4 parts)."""
    if h0[i] != h0[j]:
        return h0[i] < h0[j]
    if h1[i] != h1[j]:
        return h1[i] < h1[j]
    if h2[i] != h2[j]:
        return h2[i] < h2[j]
    return h3[i] < h3[j]


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def _swap(h0: np.ndarray, h1: np.ndarray, h2: np.ndarray, h3: np.ndarray, i: int, j: int) -> None:
    h0[i], h0[j] = h0[j], h0[i]
    h1[i], h1[j] = h1[j], h1[i]
    h2[i], h2[j] = h2[j], h2[i]
    h3[i], h3[j] = h3[j], h3[i]


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def _push(h0: np.ndarray, h1: np.ndarray, h2: np.ndarray, h3: np.ndarray, n: int,
          k0: float, k1: int, k2: int, k3: int) -> int:
    """Push key ``(k0, k1, k2, k3)`` onto the heap of ``n`` entries; returns the new size."""
    h0[n], h1[n], h2[n], h3[n] = k0, k1, k2, k3
    i = n
    while i > 0:
        p = (i - 1) >> 1
        if _before(h0, h1, h2, h3, i, p):
            _swap(h0, h1, h2, h3, i, p)
            i = p
        else:
            break
    return n + 1


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def _pop(h0: np.ndarray, h1: np.ndarray, h2: np.ndarray, h3: np.ndarray, n: int) -> int:
    """Remove the smallest key of the heap of ``n`` entries; returns its last part (the member)."""
    top = h3[0]
    n -= 1
    h0[0], h1[0], h2[0], h3[0] = h0[n], h1[n], h2[n], h3[n]
    i = 0
    while True:
        a = 2 * i + 1
        if a >= n:
            break
        b = a + 1
        c = b if b < n and _before(h0, h1, h2, h3, b, a) else a
        if _before(h0, h1, h2, h3, c, i):
            _swap(h0, h1, h2, h3, c, i)
            i = c
        else:
            break
    return top


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def _scratch(n: int, n_nodes: int) -> tuple:
    """A heap of ``n`` keys (four part arrays) and the waiting lists: ``head[node]`` (-1: none) and
    ``nxt[member]``, each member waiting for its target node."""
    return (np.empty(n, np.float64), np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
            np.full(n_nodes, -1, np.int64), np.empty(n, np.int64))


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def replay_runs(r_lo: int, r_hi: int, run_start: np.ndarray, run_size: np.ndarray, run_offset: np.ndarray,
                lam: np.ndarray, edge: np.ndarray, src: np.ndarray, tgt: np.ndarray, first: np.ndarray,
                weight: np.ndarray, canon: np.ndarray, node_B: np.ndarray, reach: np.ndarray, output: int,
                out: np.ndarray) -> int:
    """Replay runs ``r_lo … r_hi - 1`` (``strace`` §2, §3): ``out[run_start[r] + j]`` (the sorted
    positions of run ``r``, whose members are numbered from ``run_offset[r]``) receives the run's
    edges in pop order: ``out`` is the order itself, rewritten in place. Member arrays are indexed by
    member number; ``first`` and ``node_B`` by node (``first[v]``: the sorted position of the single
    edge of bottleneck ``B(v)``, §3). Returns -1, or the first run whose pops did not take all its members (which
    would mean the bottleneck argument is violated)."""
    biggest = 0
    for r in range(r_lo, r_hi):
        biggest = max(biggest, run_size[r])
    h0, h1, h2, h3, head, nxt = _scratch(biggest, node_B.shape[0])
    for r in range(r_lo, r_hi):
        o, n, lm = run_offset[r], run_size[r], lam[r]
        hn = 0
        for i in range(o, o + n):
            t = tgt[i]
            if node_B[t] > lm:  # target reached before the run: in the frontier from the start
                if t == output:
                    key = -1
                elif reach[t] != UNSET:
                    key = reach[t]
                else:
                    key = first[t]
                hn = _push(h0, h1, h2, h3, hn, -weight[i], key, canon[i], i)
            else:  # B(target) == lam: waits until a pop of this run reaches its target
                nxt[i - o] = head[t]
                head[t] = i
        pos = run_start[r]
        k = o
        while hn > 0:
            i = _pop(h0, h1, h2, h3, hn)
            hn -= 1
            out[pos] = edge[i]
            k += 1
            s = src[i]
            if node_B[s] == lm and reach[s] == UNSET:  # the pop at `pos` reaches s
                reach[s] = pos
                m = head[s]
                head[s] = -1
                while m != -1:
                    hn = _push(h0, h1, h2, h3, hn, -weight[m], pos, canon[m], m)
                    m = nxt[m - o]
            pos += 1
        if k != o + n:
            return r
    return -1


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def heap_order(src: np.ndarray, tgt: np.ndarray, weight: np.ndarray, canon: np.ndarray, reached: np.ndarray,
               reach_pos: np.ndarray, base: int, out: np.ndarray) -> int:
    """The plain heap on one sub-problem (:func:`tl_strace.search._cascade._heap`): member ``i`` is
    available when ``reached[tgt[i]]`` (key ``(-weight, reach_pos[tgt], canon, i)``), else it waits
    for a pop whose source is its target. Writes the popped members to ``out`` and marks the nodes
    they reach in ``reached``/``reach_pos`` (pop positions from ``base``); returns how many were
    popped (members never released are not)."""
    n = src.shape[0]
    h0, h1, h2, h3, head, nxt = _scratch(n, reached.shape[0])
    hn = 0
    for i in range(n):
        t = tgt[i]
        if reached[t]:
            hn = _push(h0, h1, h2, h3, hn, -weight[i], reach_pos[t], canon[i], i)
        else:
            nxt[i] = head[t]
            head[t] = i
    pos = base
    k = 0
    while hn > 0:
        i = _pop(h0, h1, h2, h3, hn)
        hn -= 1
        out[k] = i
        k += 1
        s = src[i]
        if not reached[s]:
            reached[s] = True
            reach_pos[s] = pos
            m = head[s]
            while m != -1:
                hn = _push(h0, h1, h2, h3, hn, -weight[m], pos, canon[m], m)
                m = nxt[m]
        pos += 1
    return k


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def _small_runs_distinct(offset: np.ndarray, size: np.ndarray, weight: np.ndarray, largest: int) -> bool:
    """Whether no two members of one run of at most ``largest`` members weigh the same (every pair
    compared; larger runs are skipped)."""
    for r in range(offset.shape[0]):
        o, n = offset[r], size[r]
        if n > largest:
            continue
        for i in range(o, o + n):
            for j in range(i + 1, o + n):
                if weight[i] == weight[j]:
                    return False
    return True


def distinct_within_runs(offset: np.ndarray, size: np.ndarray, weight: np.ndarray) -> bool:
    """Whether no two members of one run weigh the same (members numbered run after run from
    ``offset[r]``, ``size[r]`` each): ``strace`` §5's condition for skipping the runs no cut falls in.
    Short runs (most of them) pair by pair, compiled; long ones (the random baseline has a few of
    millions) sorted by NumPy."""
    small = 32
    if not _small_runs_distinct(offset, size, weight, small):
        return False
    for r in np.flatnonzero(size > small):
        w = np.sort(weight[offset[r]:offset[r] + size[r]])
        if bool((w[1:] == w[:-1]).any()):
            return False
    return True


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def pack_sort_keys_at(bits: np.ndarray, ids: np.ndarray, base: int, out: np.ndarray) -> None:
    """``out[i] = order_key(bits[i]) << 32 | (base + ids[i])`` for float32 values given as their
    int32 ``bits`` (``-0.0`` already made ``+0.0``): the unsigned ``order_key`` orders as IEEE
    floats do (non-negative values as their bits, negative ones reversed, all below the
    non-negative ones), and the low half is the edge-space slot the value came from (below 2³²),
    so sorting the keys alone is a stable sort of the values (``strace`` §4)."""
    for i in range(bits.shape[0]):
        b = np.int64(bits[i])
        if b < 0:
            b ^= 0x7FFFFFFF
        out[i] = np.uint64(b + 2147483648) << np.uint64(32) | np.uint64(base + ids[i])


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def unpack_sort_keys(keys: np.ndarray, bits: np.ndarray) -> None:
    """The inverse of :func:`pack_sort_keys_at` for the value part: ``bits[i]`` (int32 bits of a
    float32) from ``keys[i] >> 32``; then ``keys[i]`` keeps its low 32 bits (the index) in place."""
    for i in range(keys.shape[0]):
        b = np.int64(keys[i] >> np.uint64(32)) - 2147483648
        if b < 0:
            b ^= 0x7FFFFFFF
        bits[i] = np.int32(b)
        keys[i] = keys[i] & np.uint64(0xFFFFFFFF)


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def _scan_runs(values: np.ndarray, n_max: int, start: np.ndarray, size: np.ndarray, write: bool) -> int:
    """Count the runs of :func:`tied_run_bounds` (and, with ``write``, store their bounds)."""
    n = values.shape[0]
    count = 0
    i = 0
    while i < n and i < n_max:
        j = i + 1
        while j < n and values[j] == values[i]:
            j += 1
        if j - i > 1:
            if write:
                start[count] = i
                size[count] = j - i
            count += 1
        i = j
    return count


def tied_run_bounds(values: np.ndarray, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """``(start, size)`` (int64) of every run of equal consecutive ``values`` with more than one
    member that starts before ``n_max``: two compiled passes over the sorted values and nothing per
    edge (a tensor version holds several int64 arrays over every edge, nearly all singleton runs)."""
    none = np.empty(0, dtype=np.int64)
    count = _scan_runs(values, int(n_max), none, none, False)
    start, size = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
    _scan_runs(values, int(n_max), start, size, True)
    return start, size


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def edge_nodes(edge: np.ndarray, n_heads: int, n_pos: int, n_attn: int, n_local: int, parallel: bool,
               src: np.ndarray, tgt: np.ndarray, canon: np.ndarray) -> None:
    """Source node, target node and canonical column of flat edge ids, one pass and no transients:
    what :meth:`tl_strace.graph.EdgeLayout.node_ids` and :func:`tl_strace.search._rows._canonical`
    compute with tensors (a dozen int64 arrays per edge), the same numbers (tests compare them)."""
    H, T = n_heads, n_pos
    for i in range(edge.shape[0]):
        e = edge[i]
        if e < n_attn:
            layer = e // (H * T * T)
            head = (e // (T * T)) % H
            t = (e // T) % T
            s = e % T
            g = 2 * layer
            tgt_g = g + 2 if parallel else g + 1
            c = 1 + head * (t + 1) + s
        else:
            rel = e - n_attn
            kind = 1 + rel // n_local
            loc = rel % n_local
            layer = loc // T
            t = loc % T
            s = t
            if parallel:
                g = 2 * layer
                tgt_g = g + 2
            else:
                g = 2 * layer if kind == 1 else 2 * layer + 1
                tgt_g = g + 1
            if kind == 2:
                c = 1 + H * (t + 1) if parallel else 1
            else:
                c = 0
        src[i] = g * T + s
        tgt[i] = tgt_g * T + t
        canon[i] = c


@_compiled
@no_type_check  # compiled: the test suite's jaxtyping import hook must leave it alone
def gather_runs(order: np.ndarray, start: np.ndarray, size: np.ndarray, offset: np.ndarray, out: np.ndarray) -> None:
    """``out[offset[r] + j] = order[start[r] + j]``: the members of every run, numbered run after
    run, without an index array over them."""
    for r in range(start.shape[0]):
        o, s = offset[r], start[r]
        for j in range(size[r]):
            out[o + j] = order[s + j]
