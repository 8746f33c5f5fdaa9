"""Parallel attention/MLP blocks (GPT-NeoX/Pythia, Phi; GPT-J refused) are exact (METHOD.md §1, issue 13).

``x + attn(ln1 x) + mlp(ln2 x)``: one node per block and position (graph layer 2l+2), whose in-edges
are one skip edge, H·(t+1) attention edges and one MLP edge, all from the previous block's nodes.
Masked forwards must equal the architecture written out by hand
(:func:`tests.tiny_parallel.parallel_reference`) with the same edges removed.

Tolerances: every vector here is float32 with entries of order 1-10 (LayerNorm-ed streams, weights
of scale 0.3) and log-probabilities over 97 tokens of order 1-10; float32 rounding through three
blocks stays near 1e-6 (measured: ≤ 4e-6), so 1e-4 (absolute, on quantities of that size, or
relative to the largest entry) leaves an order of margin while any real error (an MLP reading the
stream after attention, a skip edge left in place) is of order 0.1-10.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch

import tl_strace as ts
from tests.tiny_parallel import PARALLEL_CONFIGS, parallel_reference, tiny_parallel
from tl_strace.ablation import MaskRow, masked_logprobs
from tl_strace.errors import UnsupportedModelError
from tl_strace.graph import EdgeLayout, EdgeType, check_decomposition, node_vectors
from tl_strace.model import clean_run, describe_model, prepare_tokens
from tl_strace.search import (
    NOT_IN_ANY,
    nucleus_strata,
    random_strata,
    reference_strace_order,
    strace_order,
    strace_strata,
    threshold_strata,
)
from tl_strace.weights import compute_weights

TOKENS = [0, 5, 17, 3, 42, 8, 9, 23, 61, 4]
#: Exact on TransformerLens 4.3's bridge. GPT-J's adapter uses the plain AttentionBridge, which fires
#: hook_pattern after the HF module has computed its output, so its attention cannot be ablated
#: (test_gptj_is_refused_because_its_pattern_hook_is_not_applied).
EXACT = ("neox", "phi")


@pytest.fixture(scope="module", params=EXACT)
def parallel(request: pytest.FixtureRequest, tiny_tokenizer_dir: str):
    """(name, bridge, untouched HF copy) for each exact parallel architecture."""
    bridge, ref = tiny_parallel(request.param, tiny_tokenizer_dir)
    return request.param, bridge, ref


def _run(model):
    spec = describe_model(model)
    tokens = prepare_tokens(model, spec, torch.tensor(TOKENS))
    return spec, tokens, clean_run(model, spec, tokens)


def _layout(spec) -> EdgeLayout:
    return EdgeLayout(spec.n_layers, spec.n_heads, len(TOKENS), parallel=spec.parallel)


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.abs().max()) / max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("name", sorted(PARALLEL_CONFIGS))
def test_the_reference_is_the_model(name, tiny_tokenizer_dir):
    """The hand-written forward with every edge kept is the HF model (so it can judge the masks)."""
    bridge, ref = tiny_parallel(name, tiny_tokenizer_dir)
    L, H, T = 3, 4, len(TOKENS)
    ones = torch.ones
    with torch.no_grad():
        mine = parallel_reference(name, ref, torch.tensor(TOKENS), ones(L, H, T, T), ones(L, T), ones(L, T))
        want = ref(torch.tensor([TOKENS])).logits[0, -1]
        got = bridge(torch.tensor([TOKENS]), use_cache=False)[0, -1]
    assert _rel(mine - want, want) < 1e-4
    assert _rel(got - want, want) < 1e-4
    assert describe_model(bridge).block_kind == "parallel"
    assert describe_model(bridge).to_json()["block_kind"] == "parallel"


def test_gptj_is_refused_because_its_pattern_hook_is_not_applied(tiny_tokenizer_dir):
    bridge, _ = tiny_parallel("gptj", tiny_tokenizer_dir)
    with pytest.raises(UnsupportedModelError, match="hook_pattern"):
        ts.check_model(bridge, torch.tensor(TOKENS))
    with pytest.raises(UnsupportedModelError, match="hook_pattern"):
        ts.strace(bridge, torch.tensor(TOKENS), sizes=[0.5, 1.0], conditions=("only",))


def test_check_model_passes(parallel):
    _, bridge, _ = parallel
    errs = ts.check_model(bridge, torch.tensor(TOKENS))
    assert "block node (skip, attention and MLP edges into resid_post)" in errs
    assert "attention node (edges into resid_mid)" not in errs  # no resid_mid node in a parallel graph
    assert max(errs.values()) < 1e-4, errs  # see the module docstring for the scale


def test_edges_sum_to_the_block_node_written_by_hand(parallel):
    """Block node (2l+2, t) = skip + Σ_{h,s} pattern·(v @ W_O[h]) + b_O + mlp_out[t] = resid_post[t]."""
    _, bridge, _ = parallel
    spec, _, run = _run(bridge)
    for l in range(spec.n_layers - 1):
        for t in (0, len(TOKENS) // 2, len(TOKENS) - 1):
            total = run.resid_pre[l, t] + run.b_O[l] + run.mlp_out[l, t]
            for h in range(spec.n_heads):
                for s in range(t + 1):
                    total = total + run.pattern[l, h, t, s] * (run.v[l, s, h] @ run.W_O[l, h])
            assert _rel(total - run.resid_post[l, t], run.resid_post[l, t]) < 1e-4
    assert max(check_decomposition(run, node_vectors(run)).values()) < 1e-4


@pytest.mark.parametrize("L,H,T", [(1, 1, 1), (3, 4, 10), (2, 3, 7)])
def test_edge_count_follows_the_parallel_graph(L, H, T):
    """|E| = (L-1)·(H·T(T+1)/2 + 2T) + H·T + 2, and the valid slots are exactly the ancestors of the
    output node found by walking the graph back from it (node ids from ``node_ids``)."""
    lay = EdgeLayout(L, H, T, parallel=True)
    ids = torch.arange(lay.size)
    kind = lay.decode(ids)["type"]
    d = lay.decode(ids)
    candidate = (kind != EdgeType.RES_MLP) & ((kind != EdgeType.ATTN) | (d["source"] <= d["target"]))
    src, tgt = lay.node_ids(ids)
    into: dict[int, list[int]] = {}
    for e in torch.nonzero(candidate).flatten().tolist():
        into.setdefault(int(tgt[e]), []).append(e)
    seen, todo, edges = {lay.output_node}, deque([lay.output_node]), set()
    while todo:
        for e in into.get(todo.popleft(), []):
            edges.add(e)
            s = int(src[e])
            if s not in seen:
                seen.add(s)
                todo.append(s)
    want = torch.zeros(lay.size, dtype=torch.bool)
    want[list(edges)] = True
    assert torch.equal(lay.ancestors(), want)
    assert lay.n_edges_formula() == int(want.sum()) == (L - 1) * (H * T * (T + 1) // 2 + 2 * T) + H * T + 2
    assert not any((g % 2) for g in torch.div(tgt[want], T, rounding_mode="floor").tolist())  # no resid_mid node
    assert EdgeLayout(L, H, T).n_edges_formula() == (L - 1) * (H * T * (T + 1) // 2 + 3 * T) + H * T + 3


@pytest.mark.parametrize("scheme", ["l1", "ifr"])
def test_weights_are_local_to_the_block_node(parallel, scheme):
    _, bridge, _ = parallel
    spec, _, run = _run(bridge)
    lay = _layout(spec)
    graph = compute_weights(node_vectors(run), lay, scheme)
    assert not bool(graph.weights[~graph.valid].any())
    _, tgt = lay.node_ids(torch.arange(lay.size))
    sums = torch.zeros(lay.n_nodes, dtype=torch.float64).index_add_(0, tgt[graph.valid], graph.weights[graph.valid].double())
    reached = torch.zeros(lay.n_nodes, dtype=torch.bool)
    reached[tgt[graph.valid]] = True
    torch.testing.assert_close(sums[reached], torch.ones(int(reached.sum()), dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool((graph.weights >= 0).all())


def test_fast_search_equals_the_reference_heap(parallel):
    _, bridge, _ = parallel
    spec, _, run = _run(bridge)
    graph = compute_weights(node_vectors(run), _layout(spec))
    assert torch.equal(strace_order(graph), reference_strace_order(graph))
    rnd = random_strata(graph, [5, 50, graph.n_edges], [0.01, 0.1, 1.0], seed=3)
    assert [int(rnd.mask(k).sum()) for k in range(3)] == [5, 50, graph.n_edges]
    assert all(_connected(graph.layout, rnd.mask(k)) for k in range(3))
    uniform = graph.with_weights(torch.rand(graph.layout.size, generator=torch.Generator().manual_seed(3),
                                            dtype=torch.float64))
    assert torch.equal(strace_order(uniform), reference_strace_order(uniform))


def _connected(lay: EdgeLayout, keep: torch.Tensor) -> bool:
    """Every kept edge's target is the output node or the source of another kept edge."""
    src, tgt = lay.node_ids(torch.arange(lay.size))
    sources = set(src[keep].tolist()) | {lay.output_node}
    return all(t in sources for t in tgt[keep].tolist())


def test_strata_are_connected_and_paper_a_strata_run(parallel):
    _, bridge, _ = parallel
    spec, _, run = _run(bridge)
    lay = _layout(spec)
    graph = compute_weights(node_vectors(run), lay)
    for strata in (strace_strata(graph, [0.01, 0.1, 0.5]), threshold_strata(graph), nucleus_strata(graph)):
        assert int(strata.counts[-1]) == graph.n_edges
        assert bool((strata.labels[~graph.valid] == NOT_IN_ANY).all())
        for k in range(strata.n_strata):
            assert _connected(lay, strata.mask(k))


def test_strace_is_exact_at_full_size(parallel):
    _, bridge, _ = parallel
    res = ts.strace(bridge, torch.tensor(TOKENS), sizes=[0.05, 0.2, 1.0])
    assert res.n_edges == _layout(describe_model(bridge)).n_edges_formula() == 522
    assert float(res.full_graph_tv) <= 1e-6
    assert bool(res.reaches_input_all[0, -1])
    assert res.density > 0
    ts.project_trace(res)  # the component projection follows the graph
    sg = res.subgraph(0.05)
    assert sg.edge_id.numel() > 0 and not bool((sg.type == EdgeType.RES_MLP).any())


def test_removing_attention_edges_changes_the_output(parallel):
    _, bridge, _ = parallel
    spec, tokens, _ = _run(bridge)
    lay = _layout(spec)
    lab = torch.zeros(lay.size, dtype=torch.long)
    lay.split(lab)[0].fill_(1)  # attention edges only in stratum 1
    logp = torch.cat(list(masked_logprobs(bridge, spec, tokens, lay, [lab], [MaskRow(0, 0), MaskRow(0, 1)], chunk=2)))
    assert (logp[0] - logp[1]).abs().max() > 1e-3


def _keeps(lay: EdgeLayout, lab: torch.Tensor, k: int, inverse: bool):
    a, ra, m, _ = (x <= k for x in lay.split(lab))
    if inverse:  # attention and MLP edges outside the subgraph; every skip edge
        return (~a).float(), torch.ones_like(ra).float(), (~m).float()
    return a.float(), ra.float(), m.float()


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_forward_matches_hand_written_parallel_block(parallel, seed):
    """Issue 13 acceptance 3: random masks, the trace's own strata, and a random connected baseline,
    as "only" and "inverse" rows, each equal to the hand-written forward with those edges removed."""
    name, bridge, ref = parallel
    spec, tokens, run = _run(bridge)
    lay = _layout(spec)
    g = torch.Generator().manual_seed(seed)
    rand_lab = torch.randint(0, 2, (lay.size,), generator=g)
    graph = compute_weights(node_vectors(run), lay)
    trace = strace_strata(graph, [0.01, 0.1, 0.4, 1.0]).labels
    rnd = random_strata(graph, [5, 52, 208, graph.n_edges], [0.01, 0.1, 0.4, 1.0], seed=seed).labels
    tables = [rand_lab, trace, rnd]
    rows = [MaskRow(i, k, inv) for i, ks in ((0, (0,)), (1, (0, 1, 2)), (2, (1, 2))) for k in ks for inv in (False, True)]
    got = torch.cat(list(masked_logprobs(bridge, spec, tokens, lay, tables, rows, chunk=4)))
    with torch.no_grad():
        full = torch.log_softmax(ref(tokens[None]).logits[0, -1], -1)
        for r, row in enumerate(rows):
            keep = _keeps(lay, tables[row.table], row.k, row.inverse)
            want = torch.log_softmax(parallel_reference(name, ref, tokens, *keep), -1)
            assert (got[r] - want).abs().max() < 1e-4, (row, float((got[r] - want).abs().max()))
        rand_only = torch.log_softmax(parallel_reference(name, ref, tokens, *_keeps(lay, rand_lab, 0, False)), -1)
    assert (rand_only - full).abs().max() > 1e-2  # the removal is visible: the comparison is not vacuous


def test_skip_edge_removal_keeps_the_sublayers_reading_the_block_input(parallel):
    """Only the skip edges of block 1 removed: the block adds attn + mlp of its normal input."""
    name, bridge, ref = parallel
    spec, tokens, _ = _run(bridge)
    lay = _layout(spec)
    lab = torch.zeros(lay.size, dtype=torch.long)
    lay.split(lab)[1][1] = 1  # block 1's skip edges only in stratum 1
    (got,) = list(masked_logprobs(bridge, spec, tokens, lay, [lab], [MaskRow(0, 0)], chunk=1))
    L, H, T = spec.n_layers, spec.n_heads, len(TOKENS)
    res = torch.ones(L, T)
    res[1] = 0
    with torch.no_grad():
        want = torch.log_softmax(parallel_reference(name, ref, tokens, torch.ones(L, H, T, T), res, torch.ones(L, T)), -1)
    assert (got[0] - want).abs().max() < 1e-4


def test_component_strace_is_exact_at_full_size(parallel):
    _, bridge, _ = parallel
    res = ts.component_strace(bridge, torch.tensor(TOKENS), sizes=[0.25, 1.0])
    assert float(res.full_graph_tv) <= 1e-6


def test_circuit_view_renders_a_parallel_result(parallel):
    _, bridge, _ = parallel
    res = ts.strace(bridge, torch.tensor(TOKENS), sizes=[0.1, 1.0], conditions=("only",))
    from tl_strace.views import circuit_view

    html = circuit_view(res)._repr_html_()
    assert "<svg" in html or "<div" in html


def test_flow_of_the_full_parallel_graph_reaches_the_input_whole(parallel):
    """Mass 1 at the output, passed back through block nodes by local weight: in the full graph all
    of it reaches the embedding (every in-edge of a block node leaves layer 2l), none is lost."""
    from tl_strace.views._data import component_stats

    _, bridge, _ = parallel
    res = ts.strace(bridge, torch.tensor(TOKENS), sizes=[0.1, 1.0], conditions=("only",))
    st = component_stats(res)
    assert abs(float(st.token_flow[-1].sum()) - 1.0) < 1e-6  # float64 sums of ~500 weights in [0, 1]
    assert float(st.token_flow[0].sum()) <= 1.0 + 1e-9


def test_result_round_trips_with_its_layout(parallel, tmp_path):
    _, bridge, _ = parallel
    res = ts.strace(bridge, torch.tensor(TOKENS), sizes=[0.1, 1.0], conditions=("only",))
    assert res.layout.parallel
    path = tmp_path / "r.safetensors"
    res.save(path)
    back = ts.StraceResult.load(path)
    assert back.layout.parallel and torch.equal(back.labels, res.labels)


def test_sequential_neox_stays_sequential(tiny_tokenizer_dir):
    """GPT-NeoX with use_parallel_residual=False is a sequential model: the sequential graph, exact."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from tests.tiny import VOCAB

    cls_name, arch, kwargs = PARALLEL_CONFIGS["neox"]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls_name)(vocab_size=VOCAB, **dict(kwargs, use_parallel_residual=False))).eval()
    bridge = TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    bridge.eval()
    assert describe_model(bridge).block_kind == "sequential"
    errs = ts.check_model(bridge, torch.tensor(TOKENS))
    assert "attention node (edges into resid_mid)" in errs and max(errs.values()) < 1e-4
