"""The legacy HookedTransformer backend on tiny random models (TransformerLens 3.x only).

The shared exactness tests (tests/unit/test_exactness.py) already run on HookedTransformer twins
through the parametrised fixtures of tests/conftest.py. These tests add what only makes sense with
both backends at hand, or with TransformerLens's weight processing:

* a HookedTransformer converted from the same HF weights as a bridge records the same clean run and
  gives the same strata and TV values;
* processed weights (fold_ln, center_writing_weights, center_unembed, fold_value_biases) keep every
  sum-of-edges identity exact, including a folded final norm that has no weight or bias left;
* ``ungroup_grouped_query_attention`` (``hook_v`` per query head) is read per key/value head;
* a model without a final norm is refused before any forward pass.
"""

from __future__ import annotations

import pytest
import torch

import tl_strace as ts
from tl_strace.ablation import MaskRow, masked_logprobs
from tl_strace.errors import UnsupportedModelError
from tl_strace.graph import EdgeLayout, check_decomposition, node_vectors
from tl_strace.model import _attached_hooks, clean_run, describe_model, prepare_tokens
from tests.legacy.hooked_models import hooked_config, tiny_hf, tiny_hooked
from tests.tiny import TINY_CONFIGS, tiny_bridge

pytestmark = pytest.mark.hooked

TOKENS = torch.tensor([0, 5, 17, 3, 42, 8, 9, 23, 61, 4])
RUN_FIELDS = ("resid_pre", "attn_out", "mlp_out", "resid_post", "pattern", "v", "z", "W_O", "b_O",
              "final_scale", "final_out", "norm_w", "norm_b", "logits")


def _run(model):
    spec = describe_model(model)
    return spec, clean_run(model, spec, prepare_tokens(model, spec, TOKENS))


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def twins(request, tiny_tokenizer_dir):
    """(bridge, raw HookedTransformer) computing the same function from the same HF weights."""
    return (tiny_bridge(request.param, tiny_tokenizer_dir),
            tiny_hooked(request.param, tiny_tokenizer_dir))


def test_hooked_twin_records_the_same_clean_run(twins):
    bridge, hooked = twins
    (sb, rb), (sh, rh) = _run(bridge), _run(hooked)
    assert (sb.backend, sh.backend) == ("bridge", "hooked")
    assert (sb.n_layers, sb.n_heads, sb.n_kv_heads, sb.d_model) == (sh.n_layers, sh.n_heads, sh.n_kv_heads, sh.d_model)
    assert rb.norm_centre == rh.norm_centre
    for field in RUN_FIELDS:
        torch.testing.assert_close(getattr(rh, field), getattr(rb, field), atol=1e-5, rtol=1e-5, msg=field)


def test_strace_gives_the_same_strata_and_tv_on_both_backends(twins):
    bridge, hooked = twins
    rb = ts.strace(bridge, TOKENS, conditions=["only", "random", "inverse"])
    rh = ts.strace(hooked, TOKENS, conditions=["only", "random", "inverse"])
    assert torch.equal(rb.labels, rh.labels)
    assert torch.equal(rb.counts, rh.counts)
    assert (rb.tv_all - rh.tv_all).abs().max() <= 1e-4
    assert abs(rb.density - rh.density) <= 1e-4
    assert _attached_hooks(hooked) == [] and not hooked.training


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_folded_final_norm_keeps_the_decomposition_exact(name, tiny_tokenizer_dir):
    """With fold_ln the final norm has no parameters (its weight lives in W_U): the output node is
    centre(u)/scale (LayerNorm) or u/scale (RMSNorm), and every identity still holds."""
    raw = tiny_hooked(name, tiny_tokenizer_dir)
    proc = tiny_hooked(name, tiny_tokenizer_dir, processing=True)
    assert type(proc.ln_final).__name__ in ("LayerNormPre", "RMSNormPre")
    assert not hasattr(proc.ln_final, "w") and not hasattr(proc.ln_final, "b")
    spec, run = _run(proc)
    assert torch.equal(run.norm_w, torch.ones(spec.d_model)) and torch.equal(run.norm_b, torch.zeros(spec.d_model))
    assert run.norm_centre == (name == "gpt2")
    errs = check_decomposition(run, node_vectors(run))
    assert max(errs.values()) < 1e-5, errs
    u = run.resid_post[-1, -1]
    if run.norm_centre:
        u = u - u.mean()
    torch.testing.assert_close(u / run.final_scale, run.final_out, atol=1e-6, rtol=1e-6)
    out = node_vectors(run).resid_post[-1, -1] + run.norm_b  # the output node, built from its edges
    torch.testing.assert_close(out @ proc.W_U + proc.b_U, run.logits, atol=1e-5, rtol=1e-5)
    # Processing does not change the function the model computes.
    _, run_raw = _run(raw)
    torch.testing.assert_close(torch.log_softmax(run.logits, -1), torch.log_softmax(run_raw.logits, -1),
                               atol=1e-5, rtol=1e-5)


def _random_rows(spec, seed=0):
    layout = EdgeLayout(spec.n_layers, spec.n_heads, TOKENS.numel())
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (layout.size,), generator=g)
    rows = [MaskRow(0, 0), MaskRow(0, 1), MaskRow(0, 0, True), MaskRow(0, 2)]
    return layout, labels, rows


def _masked(model, seed=0):
    spec = describe_model(model)
    tokens = prepare_tokens(model, spec, TOKENS)
    layout, labels, rows = _random_rows(spec, seed)
    return torch.cat(list(masked_logprobs(model, spec, tokens, layout, [labels], rows, chunk=4)))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_processed_weights_give_the_same_masked_outputs_without_value_biases(name, tiny_tokenizer_dir):
    """fold_ln is a reparametrisation and centring is undone by the next LayerNorm, so masked forwards
    agree with the raw model (these random models have no value biases to fold)."""
    raw = tiny_hooked(name, tiny_tokenizer_dir)
    proc = tiny_hooked(name, tiny_tokenizer_dir, processing=True)
    for seed in (0, 1):
        assert (_masked(raw, seed) - _masked(proc, seed)).abs().max() <= 1e-4


def test_folded_value_biases_become_a_constant_of_the_attention_node(tiny_tokenizer_dir):
    """fold_value_biases moves Σ_h b_V[kv(h)] @ W_O[h] into b_O. Removing attention edges (pattern
    entries) then keeps the value biases, which the raw model removes with them: processed and raw
    models are different graphs once edges are removed, while the full graph agrees. Load without
    processing (tl_strace.load_model does) to match the bridge."""
    raw = tiny_hooked("qwen2_bias", tiny_tokenizer_dir)
    proc = tiny_hooked("qwen2_bias", tiny_tokenizer_dir, processing=True)
    spec = describe_model(raw)
    rep = spec.n_heads // spec.n_kv_heads
    for l in range(spec.n_layers):
        a_raw, a_proc = raw.blocks[l].attn, proc.blocks[l].attn
        b_V = a_raw._b_V.repeat_interleave(rep, dim=0)  # [head, d_head]
        want = a_raw.b_O + torch.einsum("hd,hdm->m", b_V, a_raw.W_O)
        torch.testing.assert_close(a_proc.b_O, want, atol=1e-5, rtol=1e-5)
    diff = (_masked(raw) - _masked(proc)).abs().amax(-1)
    assert diff.max() > 1e-3  # edges removed: the folded biases stay
    _, run_raw = _run(raw)
    _, run_proc = _run(proc)
    torch.testing.assert_close(run_proc.logits.log_softmax(-1), run_raw.logits.log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_ungrouped_gqa_values_are_read_per_kv_head(tiny_tokenizer_dir):
    grouped = tiny_hooked("llama_gqa", tiny_tokenizer_dir)
    ungrouped = tiny_hooked("llama_gqa", tiny_tokenizer_dir, ungroup=True)
    spec, run_g = _run(grouped)
    _, run_u = _run(ungrouped)
    assert spec.n_kv_heads < spec.n_heads and run_u.v.shape == run_g.v.shape
    torch.testing.assert_close(run_u.v, run_g.v, atol=1e-6, rtol=1e-6)
    rg, ru = ts.strace(grouped, TOKENS, conditions=["only"]), ts.strace(ungrouped, TOKENS, conditions=["only"])
    assert torch.equal(rg.labels, ru.labels)
    assert (rg.tv - ru.tv).abs().max() <= 1e-4


def test_hooked_model_without_final_norm_is_refused(tiny_tokenizer_dir):
    from transformer_lens import HookedTransformer

    cfg = hooked_config(tiny_hf("gpt2").config, normalization_type=None)
    model = HookedTransformer(cfg, move_to_device=False).eval()
    with pytest.raises(UnsupportedModelError, match="final norm is missing"):
        ts.strace(model, TOKENS)
    assert _attached_hooks(model) == []


def test_load_model_refuses_a_local_directory_for_the_hooked_backend(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ts.ModelLoadError, match="backend='bridge'"):
        ts.load_model(str(tmp_path), backend="hooked")


def test_hub_names_load_without_weight_processing(monkeypatch, tiny_tokenizer_dir):
    """load_model(name, backend="hooked") asks TransformerLens for the unprocessed weights (the
    bridge's graph); the hub itself is replaced by a stub here (tests run offline)."""
    from transformer_lens import HookedTransformer

    from tl_strace.io import models

    calls = []

    def fake(cls, name, **kwargs):
        calls.append((name, kwargs))
        return tiny_hooked("gpt2", tiny_tokenizer_dir).train()

    monkeypatch.setattr(models, "_hub_offline_by_env", lambda: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", classmethod(fake))
    monkeypatch.setattr(HookedTransformer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("processed weights were requested")))
    model = ts.load_model("gpt2", backend="hooked", device="cpu")
    assert isinstance(model, HookedTransformer) and not model.training
    assert calls == [("gpt2", {"device": "cpu", "dtype": torch.float32})]
