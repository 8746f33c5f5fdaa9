"""Sandwich / post-norm blocks (Gemma 2, Gemma 3, OLMo-2) are exact (METHOD.md §1, issue 13).

``x + norm_post(attn(norm_pre x))`` (OLMo-2: no pre-norm): the post-attention norm is linearised at
the clean run like the final norm, so every attention edge passes through it and the edges still sum
to every node; masked forwards recompute everything, and must equal the architecture written out by
hand (:func:`tests.tiny_sandwich.sandwich_reference`) with the same edges removed.

Tolerances: every vector here is float32 with entries of order 1-10 (RMS-normalised streams,
sqrt(d_model)-scaled embeddings) and log-probabilities over 97 tokens of order 1-10; float32
rounding through three blocks stays near 1e-6, so 1e-4 (absolute, on quantities of that size, or
relative to the largest entry) leaves two orders of margin while any real error (a wrong norm
weight, a missing post-norm) is of order 0.1-10.
"""

from __future__ import annotations

import pytest
import torch

import tl_strace as ts
from tests.tiny_sandwich import PLACEMENT, SANDWICH_CONFIGS, sandwich_reference, tiny_sandwich
from tl_strace.ablation import MaskRow, masked_logprobs
from tl_strace.errors import UnsupportedModelError
from tl_strace.graph import EdgeLayout, check_decomposition, node_vectors
from tl_strace.model import clean_run, describe_model, hook_name, prepare_tokens

TOKENS = [0, 5, 17, 3, 42, 8, 9, 23, 61, 4]


import importlib.metadata  # noqa: E402

#: TransformerLens 3.9's OLMo-2 bridge exposes no hook on the post-norm's input, so the post-norm
#: cannot be linearised there; tl_strace refuses the model (test_olmo2_is_refused_on_tl39) instead.
_TL3 = importlib.metadata.version("transformer-lens").startswith("3.")


@pytest.fixture(scope="module", params=sorted(SANDWICH_CONFIGS))
def sandwich(request: pytest.FixtureRequest, tiny_tokenizer_dir: str):
    """(name, bridge, untouched HF copy) for each sandwich / post-norm architecture."""
    if _TL3 and request.param == "olmo2":
        pytest.skip("TransformerLens 3.9's OLMo-2 bridge has no post-norm hook: refused there (see "
                    "test_olmo2_is_refused_on_tl39)")
    bridge, ref = tiny_sandwich(request.param, tiny_tokenizer_dir)
    return request.param, bridge, ref


@pytest.mark.skipif(not _TL3, reason="TransformerLens 3.9 only")
def test_olmo2_is_refused_on_tl39(tiny_tokenizer_dir: str) -> None:
    """Never traced approximately: without the post-norm hook the identities fail and it is refused."""
    bridge, _ = tiny_sandwich("olmo2", tiny_tokenizer_dir)
    with pytest.raises(ts.StraceError):
        ts.check_model(bridge, torch.tensor(TOKENS))


def _run(model):
    spec = describe_model(model)
    tokens = prepare_tokens(model, spec, torch.tensor(TOKENS))
    return spec, tokens, clean_run(model, spec, tokens)


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.abs().max()) / max(1.0, float(ref.abs().max()))


def test_the_reference_is_the_model(sandwich):
    """The hand-written forward with every edge kept is the HF model (so it can judge the masks)."""
    name, bridge, ref = sandwich
    L, H, T = 3, 4, len(TOKENS)
    ones = torch.ones
    with torch.no_grad():
        mine = sandwich_reference(name, ref, torch.tensor(TOKENS), ones(L, H, T, T), ones(L, T), ones(L, T), ones(L, T))
        want = ref(torch.tensor([TOKENS])).logits[0, -1]
        got = bridge(torch.tensor([TOKENS]), use_cache=False)[0, -1]
    assert _rel(mine - want, want) < 1e-4
    assert _rel(got - want, want) < 1e-4


def test_describe_model_accepts_sandwich_blocks(sandwich):
    name, bridge, _ = sandwich
    spec = describe_model(bridge)
    assert spec.norm_placement == PLACEMENT[name]
    assert spec.to_json()["norm_placement"] == PLACEMENT[name]


def test_check_model_passes(sandwich):
    _, bridge, _ = sandwich
    errs = ts.check_model(bridge, torch.tensor(TOKENS))
    assert "post-attention norm (linearised at the clean run, vs hook_attn_out)" in errs
    assert "attention node (edges into resid_mid)" in errs
    assert max(errs.values()) < 1e-4, errs  # see the module docstring for the scale


def test_edges_sum_to_every_node_with_the_norm_written_by_hand(sandwich):
    """Each attention node = skip + Σ_{h,s} pattern·(v @ W_O[h]) through the post-attention norm,
    with that norm's weight and scale computed here from the HF weights (Gemma: 1 + w)."""
    name, bridge, ref = sandwich
    spec, tokens, run = _run(bridge)
    rep = spec.n_heads // spec.n_kv_heads
    gemma = name.startswith("gemma")
    eps = ref.config.rms_norm_eps
    for l in range(spec.n_layers - 1):
        w = ref.model.layers[l].post_attention_layernorm.weight.detach()
        w_eff = 1.0 + w if gemma else w
        raw = torch.einsum("thd,hdm->tm", run.z[l], run.W_O[l])  # the attention output before the norm
        for t in (0, len(TOKENS) // 2, len(TOKENS) - 1):
            gain = torch.rsqrt(raw[t].pow(2).mean() + eps)
            total = run.resid_pre[l, t].clone()
            for h in range(spec.n_heads):
                for s in range(t + 1):
                    total += run.pattern[l, h, t, s] * (run.v[l, s, h // rep] @ run.W_O[l, h]) * w_eff * gain
            want = run.resid_pre[l, t] + run.attn_out[l, t]
            assert _rel(total - want, want) < 1e-4
    # and the library's own edge vectors agree
    errs = check_decomposition(run, node_vectors(run))
    assert max(errs.values()) < 1e-4


def test_final_norm_uses_the_effective_weight(sandwich):
    """Gemma's final RMSNorm multiplies by 1 + weight: the linearised final norm must too."""
    name, bridge, ref = sandwich
    _, _, run = _run(bridge)
    w = ref.model.norm.weight.detach()
    torch.testing.assert_close(run.norm_w, 1.0 + w if name.startswith("gemma") else w, atol=1e-6, rtol=1e-6)
    out = node_vectors(run).resid_post[-1, -1] + run.norm_b
    assert _rel(out - run.final_out, run.final_out) < 1e-4


def test_heads_through_the_post_norm_sum_to_the_attention_output(sandwich):
    """Component level: a head's contribution is z_h @ W_O[h] through the linearised post-norm."""
    _, bridge, _ = sandwich
    _, _, run = _run(bridge)
    heads = run.attn_post_norm(torch.einsum("lthd,lhdm->lthm", run.z, run.W_O))
    got = heads.sum(2) + run.attn_const
    assert _rel(got - run.attn_out, run.attn_out) < 1e-4


def test_strace_is_exact_at_full_size(sandwich):
    _, bridge, _ = sandwich
    res = ts.strace(bridge, torch.tensor(TOKENS), sizes=[0.05, 0.2, 1.0], conditions=("only",))
    assert float(res.full_graph_tv) < 1e-5


def test_component_strace_is_exact_at_full_size(sandwich):
    _, bridge, _ = sandwich
    res = ts.component_strace(bridge, torch.tensor(TOKENS), sizes=[0.25, 1.0])
    assert float(res.full_graph_tv) < 1e-5


def test_removing_attention_edges_changes_the_output(sandwich):
    """With every pattern entry zeroed, block 1 adds norm_post(b_O) = 0 (no attention bias)."""
    _, bridge, _ = sandwich
    spec, tokens, _ = _run(bridge)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, len(TOKENS))
    lab = torch.zeros(layout.size, dtype=torch.long)
    layout.split(lab)[0].fill_(1)  # attention edges only in stratum 1
    seen = {}

    def grab(x, hook):
        seen["a"] = x.detach().clone()

    with bridge.hooks(fwd_hooks=[(hook_name("attn_out", 1), grab)]):
        logp = torch.cat(list(masked_logprobs(bridge, spec, tokens, layout, [lab], [MaskRow(0, 0), MaskRow(0, 1)],
                                              chunk=2)))
    assert (logp[0] - logp[1]).abs().max() > 1e-3
    assert float(seen["a"][0].abs().max()) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_forward_matches_hand_written_sandwich(sandwich, seed):
    """Issue 13 acceptance 3: a random half of the edges removed, "only" and "inverse" rows."""
    name, bridge, ref = sandwich
    spec, tokens, _ = _run(bridge)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, len(TOKENS))
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 2, (layout.size,), generator=g)
    a, ra, m, rm = (x == 0 for x in layout.split(lab))
    one = torch.ones_like(ra).float()
    with torch.no_grad():
        keep = (a.float(), ra.float(), m.float(), rm.float())
        want = torch.log_softmax(sandwich_reference(name, ref, tokens, *keep), -1)
        inv = torch.log_softmax(sandwich_reference(name, ref, tokens, (~a).float(), one, (~m).float(), one), -1)
        full = torch.log_softmax(ref(tokens[None]).logits[0, -1], -1)
    got = torch.cat(list(masked_logprobs(bridge, spec, tokens, layout, [lab], [MaskRow(0, 0), MaskRow(0, 0, True)],
                                         chunk=2)))
    assert (got[0] - want).abs().max() < 1e-4
    assert (got[1] - inv).abs().max() < 1e-4
    assert (want - full).abs().max() > 1e-2  # the removal is visible: the comparison is not vacuous


class HookedTransformer:  # noqa: D101 - a stand-in: describe_model recognises the backend by class name
    def __init__(self) -> None:
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(model_name="gemma-2-on-hooked", use_normalization_before_and_after=True,
                                   n_heads=4, n_layers=2, d_head=8, d_model=32)


def test_sandwich_on_hooked_transformer_is_refused_naming_the_bridge():
    """HookedTransformer exposes no hook on the post-attention norm's input: refused, naming the bridge."""
    with pytest.raises(UnsupportedModelError, match="TransformerBridge"):
        describe_model(HookedTransformer())
