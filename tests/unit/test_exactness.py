"""The identities that define the method (METHOD.md §1, §4), on every architecture we claim.

* the edges into every node sum to the node's vector;
* keeping every edge reproduces the model's logits;
* a masked forward equals a hand-written GPT-2 forward with the same edges removed;
* removing attention edges really changes the output (the attention mask is applied).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tl_strace.ablation import MaskRow, masked_logprobs
from tl_strace.graph import EdgeLayout, EdgeType, check_decomposition, node_vectors
from tl_strace.model import clean_run, describe_model, prepare_tokens

TOKENS = [0, 5, 17, 3, 42, 8, 9, 23, 61, 4]


def _run(model):
    spec = describe_model(model)
    tokens = prepare_tokens(model, spec, torch.tensor(TOKENS))
    return spec, tokens, clean_run(model, spec, tokens)


def test_edges_into_every_node_sum_to_the_node(tiny_model):
    spec, tokens, run = _run(tiny_model)
    vec = node_vectors(run)
    errs = check_decomposition(run, vec)
    assert max(errs.values()) < 1e-5
    # Independently of the einsum inside the check: materialise every in-edge of a few nodes.
    rep = spec.n_heads // spec.n_kv_heads
    for l in range(spec.n_layers - 1):
        for t in (0, len(TOKENS) // 2, len(TOKENS) - 1):
            total = run.resid_pre[l, t].clone() + run.b_O[l]
            for h in range(spec.n_heads):
                for s in range(t + 1):
                    total += run.pattern[l, h, t, s] * (run.v[l, s, h // rep] @ run.W_O[l, h])
            torch.testing.assert_close(total, run.resid_pre[l, t] + run.attn_out[l, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(run.resid_pre[l, t] + run.attn_out[l, t] + run.mlp_out[l, t],
                                       run.resid_post[l, t], atol=1e-5, rtol=1e-5)


def test_output_node_is_the_normalised_final_state(tiny_model):
    spec, tokens, run = _run(tiny_model)
    vec = node_vectors(run)
    last = spec.n_layers - 1
    out = vec.resid_post[last, -1] + run.norm_b
    torch.testing.assert_close(out, run.final_out, atol=1e-5, rtol=1e-5)
    logits = tiny_model(tokens[None])[0, -1]
    torch.testing.assert_close(run.logits, logits.float(), atol=1e-5, rtol=1e-5)


def _full_labels(layout: EdgeLayout) -> torch.Tensor:
    return torch.zeros(layout.size, dtype=torch.long)  # every edge in stratum 0


def test_keeping_every_edge_reproduces_the_logits(tiny_model):
    spec, tokens, run = _run(tiny_model)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, len(TOKENS))
    (logp,) = list(masked_logprobs(tiny_model, spec, tokens, layout, [_full_labels(layout)], [MaskRow(0, 0)], chunk=4))
    want = torch.log_softmax(tiny_model(tokens[None])[0, -1].float(), -1)
    assert (logp[0] - want).abs().max() <= 1e-4


def test_removing_all_attention_edges_changes_the_output_and_leaves_b_O(tiny_model):
    spec, tokens, run = _run(tiny_model)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, len(TOKENS))
    lab = _full_labels(layout)
    a, *_ = layout.split(lab)
    a.fill_(1)  # attention edges only in stratum 1: stratum 0 = everything but attention
    seen = {}

    from tl_strace.model import hook_name

    def grab(x, hook):
        seen["a"] = x.detach().clone()

    rows = [MaskRow(0, 0), MaskRow(0, 1)]
    with tiny_model.hooks(fwd_hooks=[(hook_name("attn_out", 1), grab)]):
        logp = torch.cat(list(masked_logprobs(tiny_model, spec, tokens, layout, [lab], rows, chunk=2)))
    assert (logp[0] - logp[1]).abs().max() > 1e-3
    # With every pattern entry zeroed, the attention output of block 1 is its bias alone.
    torch.testing.assert_close(seen["a"][0], run.b_O[1].expand_as(seen["a"][0]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# A hand-written GPT-2 forward with edge masks, independent of hooks and of TransformerLens.
# --------------------------------------------------------------------------------------------
def _gpt2_reference(hf, tokens, attn_keep, ra_keep, mlp_keep, rm_keep):
    """Logits at the last position of GPT-2 with edges removed exactly as METHOD.md §4 says."""
    tr = hf.transformer
    T = tokens.numel()
    x = tr.wte(tokens) + tr.wpe(torch.arange(T))
    for l, blk in enumerate(tr.h):
        H = blk.attn.num_heads
        d = x.shape[-1]
        h_in = blk.ln_1(x)
        q, k, v = blk.attn.c_attn(h_in).split(d, dim=-1)
        q, k, v = (z.reshape(T, H, d // H).transpose(0, 1) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // H)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        pattern = scores.softmax(-1) * attn_keep[l]
        z = (pattern @ v).transpose(0, 1).reshape(T, d)
        a = blk.attn.c_proj(z)
        mid = ra_keep[l][:, None] * x + a
        m = blk.mlp(blk.ln_2(mid))
        x = rm_keep[l][:, None] * mid + mlp_keep[l][:, None] * m
    return hf.lm_head(tr.ln_f(x))[-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_forward_matches_hand_written_gpt2(gpt2_model, seed):
    spec, tokens, run = _run(gpt2_model)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, len(TOKENS))
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 2, (layout.size,), generator=g)  # stratum 0: a random half of the edges
    a, ra, m, rm = (x == 0 for x in layout.split(lab))
    hf = gpt2_model.original_model
    with torch.no_grad():
        want = torch.log_softmax(_gpt2_reference(hf, tokens, a.float(), ra.float(), m.float(), rm.float()), -1)
        inv_want = torch.log_softmax(
            _gpt2_reference(hf, tokens, (~a).float(), torch.ones_like(ra).float(), (~m).float(),
                            torch.ones_like(rm).float()), -1)
    got = torch.cat(list(masked_logprobs(gpt2_model, spec, tokens, layout, [lab], [MaskRow(0, 0), MaskRow(0, 0, True)], chunk=2)))
    assert (got[0] - want).abs().max() < 1e-4
    assert (got[1] - inv_want).abs().max() < 1e-4


def test_removing_one_mlp_edge_changes_exactly_that_contribution(gpt2_model):
    """Remove the MLP edge of block 0 at one position: equal to zeroing that MLP output in the HF
    model with a plain torch hook, and different from the full model."""
    spec, tokens, run = _run(gpt2_model)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, len(TOKENS))
    lab = torch.zeros(layout.size, dtype=torch.long)
    t = 4
    lab[layout.offset(EdgeType.MLP) + 0 * layout.n_pos + t] = 1
    (got,) = list(masked_logprobs(gpt2_model, spec, tokens, layout, [lab], [MaskRow(0, 0)], chunk=1))
    hf = gpt2_model.original_model

    def zero_t(module, inputs, output):
        output = output.clone()
        output[:, t] = 0
        return output

    h = hf.transformer.h[0].mlp.register_forward_hook(zero_t)
    try:
        with torch.no_grad():
            want = torch.log_softmax(hf(tokens[None]).logits[0, -1], -1)
    finally:
        h.remove()
    assert (got[0] - want).abs().max() < 1e-5
    assert (got[0] - torch.log_softmax(run.logits, -1)).abs().max() > 1e-6


def test_check_model_reports_every_identity(tiny_model):
    import tl_strace as ts

    errs = ts.check_model(tiny_model, torch.tensor(TOKENS))
    assert "full graph logits" in errs and "attention node (edges into resid_mid)" in errs
    assert max(errs.values()) < 1e-4
