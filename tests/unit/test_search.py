"""s-Trace and paper A's strata: the fast search equals METHOD.md §3's plain heap, ties included,
and every stratification is nested, connected to the output node and exactly sized."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout, Graph
from tl_strace.search import (
    DEFAULT_SIZES,
    check_sizes,
    nucleus_strata,
    random_order,
    random_strata,
    reference_strace_order,
    strace_order,
    strace_strata,
    target_counts,
    threshold_strata,
)


def random_graph(L: int, H: int, T: int, seed: int, levels: int | None = None, *, parallel: bool = False) -> Graph:
    """Random local weights; with ``levels`` they take few distinct values, so ties abound."""
    layout = EdgeLayout(L, H, T, parallel=parallel)
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(layout.size, generator=g, dtype=torch.float64)
    if levels:
        w = torch.floor(w * levels) / levels
    valid = layout.ancestors()
    return Graph(layout, w.masked_fill(~valid, 0.0), valid)


@pytest.mark.parametrize("seed", range(40))
def test_fast_search_equals_plain_heap(seed):
    L, H, T = 1 + seed % 3, 1 + seed % 4, 2 + seed % 6
    graph = random_graph(L, H, T, seed, levels=[None, 3, 1, 8][seed % 4])
    fast = strace_order(graph)
    ref = reference_strace_order(graph)
    assert fast.tolist() == ref.tolist()
    assert fast.numel() == graph.n_edges  # every ancestor edge is reachable: s = 1 is the full graph
    # Prefixes too (the search stops at the largest partial target).
    n = graph.n_edges // 3
    assert strace_order(graph, n).tolist() == ref[:n].tolist()


def test_edge_count_formula():
    for L, H, T in [(1, 1, 1), (2, 3, 5), (30, 9, 53)]:
        lay = EdgeLayout(L, H, T)
        assert int(lay.ancestors().sum()) == lay.n_edges_formula()


def _connected_to_output(layout: EdgeLayout, mask: torch.Tensor) -> bool:
    """Every edge's target is the output node or the source of another edge in the mask."""
    ids = torch.nonzero(mask).flatten()
    src, tgt = layout.node_ids(ids)
    sources = set(src.tolist()) | {layout.output_node}
    return all(t in sources for t in tgt.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_strace_strata_are_nested_connected_and_exact(seed):
    graph = random_graph(3, 4, 7, seed, levels=5 if seed % 2 else None)
    sizes = (0.01, 0.05, 0.1, 0.29, 0.5, 0.8, 1.0)
    strata = strace_strata(graph, sizes)
    E = graph.n_edges
    prev = torch.zeros_like(graph.valid)
    for k, s in enumerate(sizes):
        m = strata.mask(k)
        assert int(m.sum()) == math.floor(Fraction(str(s)) * E) == int(strata.counts[k])
        assert bool((prev <= m).all()), "strata must be nested"
        assert bool((m <= graph.valid).all())
        assert _connected_to_output(graph.layout, m)
        prev = m
    assert bool((strata.mask(len(sizes) - 1) == graph.valid).all())


def test_random_strata_are_seeded_connected_and_same_size():
    graph = random_graph(2, 3, 6, 0)
    sizes = (0.1, 0.3, 0.6, 1.0)
    counts = target_counts(sizes, graph.n_edges)
    a = random_strata(graph, counts, sizes, seed=3)
    b = random_strata(graph, counts, sizes, seed=3)
    c = random_strata(graph, counts, sizes, seed=4)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    for k in range(len(sizes)):
        assert int(a.mask(k).sum()) == counts[k]
        assert _connected_to_output(graph.layout, a.mask(k))


@pytest.mark.parametrize("limit", [2, 3, 7])
def test_compiled_replay_between_tensor_ordered_runs_equals_plain_heap(limit, monkeypatch):
    """Runs up to ``limit`` members go to one compiled call per stretch, larger ones to the tensor
    cascade in between; the two share where each node was reached (strace §3), so the interleaving
    must change nothing."""
    import tl_strace.search._cascade as cascade
    import tl_strace.search.strace as strace

    monkeypatch.setattr(strace, "_TENSOR_RUN", limit)
    monkeypatch.setattr(cascade, "SMALL", 2)
    for seed in range(8):
        graph = random_graph(2, 3, 5, seed, levels=[3, 1][seed % 2])
        assert strace_order(graph).tolist() == reference_strace_order(graph).tolist()


@pytest.mark.parametrize("seed", range(6))
def test_random_order_grows_back_from_the_output_one_edge_at_a_time(seed):
    """Every prefix of the random baseline's order is connected: each edge's target node is the
    output or the source of an edge taken before it. All edges are taken once."""
    graph = random_graph(3, 2, 5, seed)
    order = random_order(graph, seed=seed).tolist()
    assert sorted(order) == torch.nonzero(graph.valid).flatten().tolist()
    src, tgt = graph.layout.node_ids(torch.tensor(order))
    reached = {graph.layout.output_node}
    for s_, t_ in zip(src.tolist(), tgt.tolist()):
        assert t_ in reached
        reached.add(s_)
    # a prefix is what random_order(n_max) returns
    assert random_order(graph, 7, seed=seed).tolist() == order[:7]


@pytest.mark.parametrize("fn", [threshold_strata, nucleus_strata])
def test_paper_a_strata_are_nested_and_connected(fn):
    graph = random_graph(3, 2, 6, 1)
    # local weights, as METHOD.md §2 makes them: normalise per target node
    layout = graph.layout
    src, tgt = layout.node_ids(torch.arange(layout.size))
    w = graph.weights.clone()
    tot = torch.zeros(layout.n_nodes, dtype=w.dtype).index_add_(0, tgt, w)
    graph = graph.with_weights(torch.where(graph.valid, w / tot[tgt], 0.0))
    strata = fn(graph)
    prev = torch.zeros_like(graph.valid)
    for k in range(strata.n_strata):
        m = strata.mask(k)
        assert bool((prev <= m).all())
        assert _connected_to_output(layout, m)
        assert int(m.sum()) == int(strata.counts[k])
        prev = m
    assert torch.all(strata.sizes[1:] >= strata.sizes[:-1])
    assert float(strata.sizes[-1]) == 1.0


def test_nucleus_keeps_at_least_one_edge_per_reached_node():
    graph = random_graph(2, 2, 4, 2)
    strata = nucleus_strata(graph, [0.0001])
    m = strata.mask(0)
    # a single chain back from the output: one in-edge per reached node
    _, tgt = graph.layout.node_ids(torch.nonzero(m).flatten())
    assert len(set(tgt.tolist())) == int(m.sum())


def test_default_sizes_are_the_papers():
    assert len(DEFAULT_SIZES) == 27 and DEFAULT_SIZES[-1] == 1.0 and DEFAULT_SIZES[8] == 1e-3


@pytest.mark.parametrize("bad", [[0.0, 0.5], [-0.1], [1.5], [0.2, 0.1], [0.1, 0.1], [], [float("nan")]])
def test_bad_sizes_raise_with_the_problem_named(bad):
    with pytest.raises(InputError) as e:
        check_sizes(bad)
    assert "Sizes" in str(e.value)


def test_target_counts_are_exact_decimal_floors():
    assert target_counts([0.29, 0.57, 1.0], 100) == [29, 57, 100]
    assert target_counts([1e-5], 391140) == [3]


@pytest.mark.parametrize("parallel", [False, True])
def test_canonical_column_is_the_order_the_plain_heap_pushes_a_nodes_in_edges(parallel):
    """The fast search breaks weight ties by (reach position, ``_canonical``), standing in for the
    plain heap's insertion counter; that holds because ``_canonical`` is each edge's index among
    its node's valid in-edges in ``_in_edge_rows``, the order the plain heap pushes them in. The
    rows also list each edge once, under its own target node, with its own source node."""
    from tl_strace.search._rows import _canonical, _in_edge_rows, _row_nodes

    layout = EdgeLayout(3, 4, 6, parallel=parallel)
    rows = _in_edge_rows(layout, torch.rand(layout.size, generator=torch.Generator().manual_seed(0)))
    T, seen = layout.n_pos, []
    for l in range(layout.n_layers):
        for kind, g in _row_nodes(layout, l):
            r = rows[kind]
            for t in range(T):
                ids = r.edge[l, t][r.valid[l, t]]
                assert _canonical(layout, ids).tolist() == list(range(ids.numel()))
                src, tgt = layout.node_ids(ids)
                assert tgt.tolist() == [g * T + t] * ids.numel()
                assert src.tolist() == r.source[l, t][r.valid[l, t]].tolist()
                seen += ids.tolist()
    assert len(seen) == len(set(seen))
    assert set(seen) >= set(torch.nonzero(layout.ancestors()).flatten().tolist())


def _uniform_graph(L: int, H: int, T: int, seed: int) -> Graph:
    """The random baseline's case: i.i.d. float64 uniform weights, a few huge runs of equal bottleneck."""
    layout = EdgeLayout(L, H, T)
    valid = layout.ancestors()
    w = torch.rand(layout.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Graph(layout, w.masked_fill(~valid, 0.0), valid)


@pytest.mark.parametrize("small,phases", [(0, 1000), (2, 64), (3, 1)])
def test_large_runs_ordered_with_tensors_equal_plain_heap(small, phases, monkeypatch):
    """Runs above the threshold go through tl_strace.search._cascade (phases, cascades sorted by
    their own bottleneck, sub-runs recursively); with the thresholds lowered every tied run of these
    small graphs takes that path (small=0: no plain heap at all), ties included."""
    import tl_strace.search._cascade as cascade
    import tl_strace.search.strace as strace

    monkeypatch.setattr(cascade, "SMALL", small)
    monkeypatch.setattr(cascade, "MAX_PHASES", phases)
    monkeypatch.setattr(strace, "_TENSOR_RUN", 1)
    calls = []
    run = cascade._run
    monkeypatch.setattr(cascade, "_run", lambda *a: calls.append(1) or run(*a))
    for seed in range(24):
        L, H, T = 1 + seed % 3, 1 + seed % 4, 2 + seed % 7
        graph = random_graph(L, H, T, seed, levels=[None, 3, 1, 8, 50, None][seed % 6])
        if seed % 6 == 5:
            graph = _uniform_graph(L, H, T, seed)
        assert strace_order(graph).tolist() == reference_strace_order(graph).tolist(), seed
    assert calls, "the tensor path was not exercised"


@pytest.mark.parametrize("small", [0, 2, 2048])
def test_cuts_give_the_heaps_first_edges_at_every_cut(small, monkeypatch):
    """strace_order(..., cuts=...) (§5): for every cut c the first c edges are the plain heap's first
    c as a set, also when equal weights force the exact order (levels) and inside large runs."""
    import random

    import tl_strace.search._cascade as cascade
    import tl_strace.search.strace as strace

    monkeypatch.setattr(cascade, "SMALL", small)
    monkeypatch.setattr(strace, "_TENSOR_RUN_CUTS", 1)
    for seed in range(30):
        L, H, T = 1 + seed % 3, 1 + seed % 4, 2 + seed % 7
        graph = random_graph(L, H, T, seed, levels=[None, 3, 1, 8, 50][seed % 5]) if seed % 2 else _uniform_graph(L, H, T, seed)
        ref = reference_strace_order(graph).tolist()
        rng = random.Random(seed)
        cuts = sorted({rng.randrange(1, graph.n_edges + 1) for _ in range(rng.randrange(1, 6))})
        got = strace_order(graph, max(cuts), cuts=cuts).tolist()
        assert len(got) == len(set(got)) == max(cuts)
        for c in cuts:
            assert set(got[:c]) == set(ref[:c]), (seed, c)


def test_random_strata_equal_those_of_the_whole_order():
    """random_strata orders only where a count cuts a run (§5); its strata are those of the whole
    random order, on a graph whose uniform weights put most edges into one huge run."""
    from tl_strace.search._strata import _strata_from_order

    graph = random_graph(3, 4, 24, 0)
    counts = target_counts(DEFAULT_SIZES, graph.n_edges)
    fast = random_strata(graph, counts, DEFAULT_SIZES, seed=3)
    whole = _strata_from_order("random", graph, random_order(graph, seed=3), DEFAULT_SIZES, counts, DEFAULT_SIZES)
    assert torch.equal(fast.labels, whole.labels)
    assert fast.counts.tolist() == counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parallel", [False, True])
def test_sorted_bottlenecks_equal_a_stable_sort_of_the_dense_bottlenecks(dtype, parallel):
    """strace §1/§4: the compact sort (float32: packed 64-bit keys holding the slot id; other dtypes:
    one compact tensor of values) gives exactly what a stable torch sort of the dense bottleneck
    tensor gives over the edges: the same values, the same edge ids, ties by slot, -0.0 == +0.0."""
    from tl_strace.search.strace import bottlenecks, sorted_bottlenecks

    for seed in range(6):
        graph = random_graph(2 + seed % 2, 3, 4 + seed, seed, levels=[None, 3, 1][seed % 3], parallel=parallel)
        graph = Graph(graph.layout, graph.weights.to(dtype), graph.valid)
        b, node_B = bottlenecks(graph)
        ids = torch.nonzero(graph.valid).flatten()
        want = torch.sort(-b[ids], stable=True)
        neg_sb, order, got_B = sorted_bottlenecks(graph)
        assert neg_sb.dtype == dtype and torch.equal(neg_sb, want.values), seed
        assert order.tolist() == ids[want.indices].tolist(), seed
        assert torch.equal(got_B, node_B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(12))
def test_fast_search_on_narrow_float_weights_equals_plain_heap(seed, dtype):
    """Real graphs' weights are float32, whose bottlenecks are sorted as packed keys (strace §4):
    the order is still the plain heap's, ties included (few distinct levels, zero weights). A graph
    built by hand in float16 / bfloat16 takes the compact path, its values widened exactly for the
    compiled loops (neither NumPy nor numba takes those dtypes); with cuts too."""
    L, H, T = 1 + seed % 3, 1 + seed % 4, 2 + seed % 7
    graph = random_graph(L, H, T, seed, levels=[None, 3, 1, 8][seed % 4], parallel=bool(seed % 5 == 4))
    graph = Graph(graph.layout, graph.weights.to(dtype), graph.valid)
    ref = reference_strace_order(graph).tolist()
    assert strace_order(graph).tolist() == ref
    cuts = sorted({max(1, graph.n_edges // 5), graph.n_edges // 2})
    got = strace_order(graph, max(cuts), cuts=cuts).tolist()
    assert all(set(got[:c]) == set(ref[:c]) for c in cuts)


def test_compiled_edge_nodes_equal_the_layouts_decoding():
    """The replay's compiled source / target / canonical column (``_replay.edge_nodes``) are
    ``EdgeLayout.node_ids`` and ``_rows._canonical`` for every slot, in both block kinds."""
    import numpy as np

    from tl_strace.search._replay import edge_nodes
    from tl_strace.search._rows import _canonical

    for parallel in (False, True):
        layout = EdgeLayout(3, 4, 7, parallel=parallel)
        ids = torch.arange(layout.size)
        src, tgt, canon = (np.empty(layout.size, dtype=np.int32) for _ in range(3))
        edge_nodes(ids.numpy(), layout.n_heads, layout.n_pos, layout.n_attn, layout.n_local, parallel, src, tgt, canon)
        want_src, want_tgt = layout.node_ids(ids)
        assert src.tolist() == want_src.tolist() and tgt.tolist() == want_tgt.tolist()
        assert canon.tolist() == _canonical(layout, ids).tolist()


def test_tied_run_bounds_are_the_runs_of_equal_sorted_values():
    """``_replay.tied_run_bounds``: every run of equal consecutive values with more than one member
    that starts before ``n_max``, against a plain Python scan."""
    import numpy as np

    from tl_strace.search._replay import tied_run_bounds

    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 7, 300):
        x = np.sort(rng.integers(0, max(1, n // 3), n)).astype(np.float32)
        if n > 4:
            x[1] = -0.0
            x[2] = 0.0
            x = np.sort(x)
        for n_max in (0, 1, n // 2, n):
            runs, i = [], 0
            while i < min(n, n_max):
                j = i + 1
                while j < n and x[j] == x[i]:
                    j += 1
                if j - i > 1:
                    runs.append((i, j - i))
                i = j
            start, size = tied_run_bounds(x, n_max)
            assert list(zip(start.tolist(), size.tolist())) == runs


def test_distinct_within_runs_finds_equal_weights_in_short_and_long_runs():
    """strace §5's check: a repeat inside any one run (short runs compared pairwise, long ones
    sorted) is found; equal weights in different runs are not a repeat."""
    import numpy as np

    from tl_strace.search._replay import distinct_within_runs

    rng = np.random.default_rng(0)
    sizes = np.array([2, 5, 40, 300, 3], dtype=np.int64)
    offset = np.cumsum(sizes) - sizes
    w = rng.random(int(sizes.sum()))
    assert distinct_within_runs(offset, sizes, w)
    for r in range(len(sizes)):  # a repeat inside run r
        v = w.copy()
        v[offset[r] + sizes[r] - 1] = v[offset[r]]
        assert not distinct_within_runs(offset, sizes, v), r
    v = w.copy()
    v[offset[1]] = v[offset[0]]  # equal weights across two runs: still distinct within each
    assert distinct_within_runs(offset, sizes, v)
