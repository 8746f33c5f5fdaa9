"""Real behaviour on the real SmolLM2-135M-Instruct (offline): exactness and what s-Trace finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tl_strace as ts
from tl_strace.ablation import MaskRow, masked_logprobs
from tl_strace.graph import EdgeLayout, check_decomposition, node_vectors
from tl_strace.model import clean_run, describe_model, prepare_tokens

pytestmark = pytest.mark.real

PASSAGES = [line.strip() for line in (Path(__file__).parent.parent / "data" / "passages_en.txt").read_text().splitlines()
            if line.strip()]


def test_bundled_model_predicts_paris(smollm2):
    toks = smollm2.to_tokens("The capital of France is")
    assert smollm2.to_string(smollm2(toks)[0, -1].argmax()) == " Paris"


def test_exactness_on_smollm2(smollm2):
    spec = describe_model(smollm2)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads) == (30, 9, 3)
    tokens = prepare_tokens(smollm2, spec, PASSAGES[0])
    run = clean_run(smollm2, spec, tokens)
    errs = check_decomposition(run, node_vectors(run))
    # Relative to the streams: SmolLM2's residual stream reaches ~1e4 in a few dimensions, where one
    # fp32 rounding step is ~1e-3, and the sums run over up to 9·T + 1 terms whose order changes with
    # the thread count. 1e-6 of the largest value is ~8 rounding steps at that magnitude: loose
    # enough for any summation order, far below any real decomposition error (the refused
    # sandwich-norm models miss by > 1e-1 relative).
    scale = float(torch.cat([run.resid_pre.flatten(), run.resid_post.flatten()]).abs().max())
    assert max(errs.values()) <= 1e-6 * scale, (errs, scale)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, tokens.numel())
    full = torch.zeros(layout.size, dtype=torch.long)
    no_attn = full.clone()
    layout.split(no_attn)[0].fill_(1)
    logp = torch.cat(list(masked_logprobs(smollm2, spec, tokens, layout, [full, no_attn],
                                          [MaskRow(0, 0), MaskRow(1, 0)], chunk=2)))
    want = torch.log_softmax(smollm2(tokens[None])[0, -1].float(), -1)
    # every edge kept: the model's own logits, to 1e-4 relative (log-probs here reach ~|30|; fp32
    # forwards with another batch size / thread count differ by ~1e-5 in them)
    assert (logp[0] - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert 0.5 * (logp[1].exp() - want.exp()).abs().sum() > 0.1  # no attention edges: a different output


def test_strace_beats_random_on_real_passages(smollm2):
    assert len(PASSAGES) >= 20
    sizes = np.array(ts.DEFAULT_SIZES)
    window = (sizes >= 1e-2) & (sizes <= 0.4)
    wins = total = 0
    for text in PASSAGES:
        res = ts.strace(smollm2, text, conditions=["only", "random"])
        assert float(res.nucleus[-1]) == 99.0
        assert float(res.full_graph_tv) < 1e-4  # TV is a probability mass in [0, 1]: 1e-4 is relative already
        tv, rnd = res.tv.numpy()[window], res.curve("tv", "random").numpy()[window]
        wins += int((tv < rnd).sum())
        total += int(window.sum())
    assert wins > total / 2, f"s-Trace beat random at {wins}/{total} (passage, size) pairs in [1e-2, 0.4]"


@pytest.mark.parametrize("weights", ["l1", "ifr"])
def test_fast_search_equals_plain_heap_on_real_graphs(smollm2, weights):
    """On SmolLM2's own graphs (1 in 20 edges in runs of equal bottleneck, mostly exact weight
    ties) the fast search takes exactly the plain heap's order, and the random baseline's order
    grows connected from the output."""
    from tl_strace.search import random_order, reference_strace_order, strace_order
    from tl_strace.weights import compute_weights

    spec = describe_model(smollm2)
    tokens = prepare_tokens(smollm2, spec, PASSAGES[1])[:30]
    graph = compute_weights(node_vectors(clean_run(smollm2, spec, tokens)),
                            EdgeLayout(spec.n_layers, spec.n_heads, 30), weights)
    assert torch.equal(strace_order(graph), reference_strace_order(graph))
    order = random_order(graph, seed=1)
    src, tgt = graph.layout.node_ids(order)
    first_out = torch.full((graph.layout.output_node + 1,), graph.n_edges, dtype=torch.long)
    first_out.scatter_reduce_(0, src, torch.arange(order.numel()), reduce="amin")
    first_out[graph.layout.output_node] = -1
    assert bool((first_out[tgt] < torch.arange(order.numel())).all())  # each target reached before
