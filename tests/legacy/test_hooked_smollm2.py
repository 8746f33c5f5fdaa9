"""SmolLM2-135M as a legacy HookedTransformer (TransformerLens 3.x only; offline).

Issue 8's acceptance on the real model: the same passage gives the same strata and TV values
through the bridge and through a HookedTransformer loaded without weight processing; with folded
norms (TransformerLens's default processing) the decomposition still holds exactly. (Processing
re-parametrises the model: the function is the same, but edge vectors, hence weights and strata,
can differ; tl_strace.load_model loads without processing so both backends give the same graph.) The shared
real-model tests (tests/real/test_smollm2.py) run on both backends too, through the `smollm2` fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tl_strace as ts
from tl_strace.graph import check_decomposition, node_vectors
from tl_strace.model import _attached_hooks, clean_run, describe_model, prepare_tokens

pytestmark = [pytest.mark.hooked, pytest.mark.real]

PASSAGES = [line.strip() for line in (Path(__file__).parent.parent / "data" / "passages_en.txt").read_text().splitlines()
            if line.strip()]


def test_load_model_builds_a_hooked_smollm2_offline(smollm2_hooked):
    from transformer_lens import HookedTransformer

    m = smollm2_hooked
    assert isinstance(m, HookedTransformer) and not m.training
    assert next(m.parameters()).dtype == torch.float32
    assert (m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_key_value_heads, m.cfg.normalization_type) == (30, 9, 3, "RMS")
    assert m.cfg.model_name == "smollm2-135m"
    assert describe_model(m).backend == "hooked"


def test_same_strata_and_tv_through_bridge_and_hooked(smollm2_bridge, smollm2_hooked):
    tokens = smollm2_bridge.to_tokens(PASSAGES[0])
    assert torch.equal(tokens, smollm2_hooked.to_tokens(PASSAGES[0]))  # same BOS handling
    with torch.no_grad():
        lb = smollm2_bridge(tokens)[0, -1].float().log_softmax(-1)
        lh = smollm2_hooked(tokens)[0, -1].float().log_softmax(-1)
    # Two implementations of one fp32 function (HF modules behind the bridge vs TransformerLens's own
    # einsums), so they differ by rounding, relative to the log-probs' magnitude (~25 here): 4e-6 of
    # it was measured with one thread on a busy machine; 2e-5 leaves headroom, and is far below what
    # a real difference between the backends (a missing bias, another norm) would give (> 1e-2).
    assert (lb - lh).abs().max() <= 2e-5 * max(1.0, float(lb.abs().max()))
    conditions = ["only", "random", "inverse"]
    rb = ts.strace(smollm2_bridge, PASSAGES[0], conditions=conditions)
    rh = ts.strace(smollm2_hooked, PASSAGES[0], conditions=conditions)
    assert torch.equal(rb.labels, rh.labels)
    assert torch.equal(rb.counts, rh.counts)
    only, rnd, inv = (rb.conditions.index(c) for c in conditions)
    tv_diff = (rb.tv_all - rh.tv_all).abs().max(-1).values
    assert tv_diff[only] <= 1e-4 and tv_diff[inv] <= 1e-4
    assert torch.equal(rb.nucleus_all[only], rh.nucleus_all[only])
    assert abs(rb.density - rh.density) <= 1e-4
    # The random subgraphs are the same edges (seeded, and the graph is the same), but removing them
    # leaves near-degenerate streams whose output is ill-conditioned: the bridge alone moves its random
    # TV by ~1e-3 between float32 and float64 (measured), so the backends agree to that, not to 1e-4.
    assert tv_diff[rnd] <= 5e-3
    assert _attached_hooks(smollm2_hooked) == []


def test_folded_norms_keep_the_decomposition_exact(smollm2_hooked, smollm2_hooked_processed):
    proc = smollm2_hooked_processed
    assert type(proc.ln_final).__name__ == "RMSNormPre" and not hasattr(proc.ln_final, "w")
    spec = describe_model(proc)
    assert spec.normalization == "RMSPre"
    tokens = prepare_tokens(proc, spec, PASSAGES[1])
    run = clean_run(proc, spec, tokens)
    assert not run.norm_centre and torch.equal(run.norm_w, torch.ones(spec.d_model))
    errs = check_decomposition(run, node_vectors(run))
    # relative to the streams, as in tests/real/test_smollm2.py (values reach ~1e4; see the reason there)
    scale = float(torch.cat([run.resid_pre.flatten(), run.resid_post.flatten()]).abs().max())
    assert max(errs.values()) <= 1e-6 * scale, (errs, scale)
    torch.testing.assert_close(run.resid_post[-1, -1] / run.final_scale, run.final_out, atol=1e-6, rtol=1e-6)
    raw_spec = describe_model(smollm2_hooked)
    raw = clean_run(smollm2_hooked, raw_spec, tokens)
    # ln_final.w now lives in W_U: the same logits (folding RMSNorm is a reparametrisation) ...
    want = raw.logits.log_softmax(-1)
    assert (run.logits.log_softmax(-1) - want).abs().max() <= 2e-5 * max(1.0, float(want.abs().max()))  # as above
    # ... but not the same edge weights: the last block's edge vectors are no longer multiplied by
    # ln_final.w (it lives in W_U), so strata may differ from the raw model's. The pipeline runs and
    # the full graph reproduces the model.
    res = ts.strace(proc, tokens, sizes=[1e-3, 1e-2, 0.1], conditions=["only"])
    assert float(res.full_graph_tv) < 1e-4
    assert _attached_hooks(proc) == []
