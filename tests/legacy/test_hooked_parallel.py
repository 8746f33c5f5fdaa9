"""Parallel attention/MLP blocks on the legacy HookedTransformer (``cfg.parallel_attn_mlp``; TL 3.x only).

GPT-NeoX, GPT-J and Phi converted with TransformerLens's own weight conversion from the random HF
models of :mod:`tests.tiny_parallel`: the graph of METHOD.md §1 for parallel blocks must be exact
(GPT-J too: HookedTransformer computes attention from ``hook_pattern`` itself, unlike TL 4.3's GPT-J
bridge), and masked forwards must equal :func:`tests.tiny_parallel.parallel_reference`.

Tolerances as in tests/unit/test_parallel_blocks.py: float32 quantities of order 1-10, rounding
near 1e-6, so 1e-4 leaves margin while a wrong graph moves log-probabilities by 0.1-10.
"""

from __future__ import annotations

import pytest
import torch

import tl_strace as ts
from tests.tiny_parallel import PARALLEL_CONFIGS, hooked_parallel, parallel_reference
from tl_strace.ablation import MaskRow, masked_logprobs
from tl_strace.graph import EdgeLayout, node_vectors
from tl_strace.model import clean_run, describe_model, prepare_tokens
from tl_strace.search import random_strata, strace_strata
from tl_strace.weights import compute_weights

pytestmark = pytest.mark.hooked

TOKENS = torch.tensor([0, 5, 17, 3, 42, 8, 9, 23, 61, 4])


@pytest.fixture(scope="module", params=sorted(PARALLEL_CONFIGS))
def hooked(request: pytest.FixtureRequest, tiny_tokenizer_dir: str):
    model, ref = hooked_parallel(request.param, tiny_tokenizer_dir)
    return request.param, model, ref


def test_check_model_and_strace_are_exact(hooked):
    _, model, _ = hooked
    assert describe_model(model).block_kind == "parallel"
    errs = ts.check_model(model, TOKENS)
    assert "block node (skip, attention and MLP edges into resid_post)" in errs
    assert max(errs.values()) < 1e-4, errs
    res = ts.strace(model, TOKENS, sizes=[0.05, 0.2, 1.0])
    assert res.n_edges == EdgeLayout(3, 4, 10, parallel=True).n_edges_formula() == 522
    assert float(res.full_graph_tv) <= 1e-6
    comp = ts.component_strace(model, TOKENS, sizes=[0.25, 1.0])
    assert float(comp.full_graph_tv) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_forward_matches_hand_written_parallel_block(hooked, seed):
    name, model, ref = hooked
    spec = describe_model(model)
    tokens = prepare_tokens(model, spec, TOKENS)
    lay = EdgeLayout(spec.n_layers, spec.n_heads, tokens.numel(), parallel=True)
    graph = compute_weights(node_vectors(clean_run(model, spec, tokens)), lay)
    g = torch.Generator().manual_seed(seed)
    tables = [torch.randint(0, 2, (lay.size,), generator=g), strace_strata(graph, [0.01, 0.1, 0.4, 1.0]).labels,
              random_strata(graph, [5, 52, 208, graph.n_edges], [0.01, 0.1, 0.4, 1.0], seed=seed).labels]
    rows = [MaskRow(i, k, inv) for i in range(3) for k in (0, 1) for inv in (False, True)]
    got = torch.cat(list(masked_logprobs(model, spec, tokens, lay, tables, rows, chunk=4)))
    with torch.no_grad():
        for r, row in enumerate(rows):
            a, ra, m, _ = (x <= row.k for x in lay.split(tables[row.table]))
            keep = ((~a).float(), torch.ones_like(ra).float(), (~m).float()) if row.inverse else \
                (a.float(), ra.float(), m.float())
            want = torch.log_softmax(parallel_reference(name, ref, tokens, *keep), -1)
            assert (got[r] - want).abs().max() < 1e-4, (row, float((got[r] - want).abs().max()))


def test_processed_weights_stay_exact(hooked):
    """TransformerLens's default processing (fold_ln, centring, fold_value_biases) on parallel blocks."""
    import copy

    from tests.legacy.hooked_models import DEFAULT_PROCESSING

    _, model, _ = hooked
    proc = copy.deepcopy(model)
    proc.load_and_process_state_dict(model.state_dict(), **DEFAULT_PROCESSING)
    proc.eval()
    errs = ts.check_model(proc, TOKENS)
    assert max(errs.values()) < 1e-4, errs
