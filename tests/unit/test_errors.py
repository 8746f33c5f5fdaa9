"""Bad input gets a clear error, and the model is left exactly as it was (no hooks, same logits)."""

from __future__ import annotations

import pytest
import torch

import tl_strace as ts
from tl_strace import metrics
from tl_strace.errors import InputError, UnsupportedModelError
from tl_strace.model import _attached_hooks
from tests.tiny import REFUSED_CONFIGS, tiny_bridge

TOKS = torch.tensor([0, 5, 17, 3, 42, 8])


def _clean_and_unchanged(model, before):
    assert _attached_hooks(model) == []
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(TOKS[None]), before)


@pytest.fixture()
def before(gpt2_model):
    with torch.no_grad():
        return gpt2_model(TOKS[None])


@pytest.mark.parametrize(
    "inp, kwargs, words",
    [
        ("", {}, "empty"),
        ("   ", {}, "empty"),
        (torch.tensor([], dtype=torch.long), {}, "empty"),
        (torch.zeros(2, 5, dtype=torch.long), {}, "one sequence"),
        (torch.tensor([0.5, 1.0]), {}, "integers"),
        (torch.tensor([0, 500]), {}, "vocabulary"),
        (torch.arange(65) % 90, {}, "context of 64"),
        (" ".join(f"w{i % 90 + 2}" for i in range(80)), {}, "context of 64"),
        (TOKS, {"sizes": [0.0, 0.5]}, "(0, 1]"),
        (TOKS, {"sizes": [0.5, 1.2]}, "(0, 1]"),
        (TOKS, {"sizes": [0.1, 0.1, 0.5]}, "strictly increasing"),
        (TOKS, {"sizes": [0.5, 0.1]}, "strictly increasing"),
        (TOKS, {"method": "magic"}, "Unknown method"),
        (TOKS, {"weights": "l2"}, "Unknown weights"),
        (TOKS, {"conditions": ["only", "bogus"]}, "Conditions"),
        (TOKS, {"method": "threshold", "sizes": [0.1]}, "taus"),
        (TOKS, {"target": 10_000}, "outside the vocabulary"),
        (TOKS, {"memory_budget": 1 << 20}, "needs at least"),
        (TOKS, {"memory_budget": 0}, "must be positive"),
        (TOKS, {"batch_size": 0}, "at least 1"),
        (TOKS, {"batch_size": 10_000, "memory_budget": 65 << 20}, "does not fit"),
    ],
)
def test_bad_input_names_the_problem(gpt2_model, before, inp, kwargs, words):
    with pytest.raises(InputError) as e:
        ts.strace(gpt2_model, inp, **kwargs)
    assert words in str(e.value)
    _clean_and_unchanged(gpt2_model, before)


@pytest.mark.parametrize("obj", [torch.nn.Linear(3, 3), "gpt2", object()])
def test_unsupported_objects_are_refused_naming_the_supported_kinds(obj):
    with pytest.raises(UnsupportedModelError) as e:
        ts.strace(obj, "w3 w4")
    assert "TransformerBridge" in str(e.value) and "HookedTransformer" in str(e.value)


@pytest.mark.parametrize("name", sorted(REFUSED_CONFIGS))
def test_parallel_blocks_are_traced_on_the_bridge(name, tiny_tokenizer_dir):
    """Once refused (issue 13): parallel attention/MLP blocks now have their own exact graph."""
    model = tiny_bridge(name, tiny_tokenizer_dir)
    res = ts.strace(model, TOKS, sizes=[0.5, 1.0], conditions=("only",))
    assert res.model["block_kind"] == "parallel"
    assert float(res.full_graph_tv) <= 1e-6  # the full graph is the model (float32 rounding ~1e-7)


def test_training_mode_is_refused_and_left_alone(gpt2_model, before):
    gpt2_model.train()
    try:
        with pytest.raises(InputError, match=r"model.eval\(\)"):
            ts.strace(gpt2_model, TOKS)
        assert gpt2_model.training  # we do not change the user's model behind their back
    finally:
        gpt2_model.eval()
    _clean_and_unchanged(gpt2_model, before)


def test_attached_hooks_are_refused(gpt2_model, before):
    with gpt2_model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: x)]):
        with pytest.raises(InputError, match="reset_hooks"):
            ts.strace(gpt2_model, TOKS)
    _clean_and_unchanged(gpt2_model, before)


def test_failure_during_evaluation_leaves_no_hooks(gpt2_model, before, monkeypatch):
    calls = {"n": 0}

    def boom(full, sub):
        calls["n"] += 1
        raise RuntimeError("metric exploded")

    monkeypatch.setattr("tl_strace.metrics.total_variation", boom)
    with pytest.raises(RuntimeError, match="metric exploded"):
        ts.strace(gpt2_model, TOKS, batch_size=3)
    assert calls["n"] == 1
    _clean_and_unchanged(gpt2_model, before)
    assert torch.is_grad_enabled()


def test_failure_inside_a_hook_leaves_no_hooks(gpt2_model, before, monkeypatch):
    import tl_strace.ablation as ab

    real = ab.compact_labels

    def bad(labels):
        raise MemoryError("simulated out-of-memory while building masks")

    monkeypatch.setattr(ab, "compact_labels", bad)
    with pytest.raises(MemoryError):
        ts.strace(gpt2_model, TOKS)
    monkeypatch.setattr(ab, "compact_labels", real)
    _clean_and_unchanged(gpt2_model, before)


def test_nan_logits_are_reported(gpt2_model, before):
    p = next(iter(gpt2_model.original_model.lm_head.parameters()))
    saved = p.detach().clone()
    with torch.no_grad():
        p[0, 0] = float("nan")
    try:
        with pytest.raises(InputError, match="non-finite"):
            ts.strace(gpt2_model, TOKS)
    finally:
        with torch.no_grad():
            p.copy_(saved)
    _clean_and_unchanged(gpt2_model, before)


def test_text_needs_a_tokenizer_or_tokens(gpt2_model):
    tok = gpt2_model.tokenizer
    gpt2_model.tokenizer = None
    try:
        with pytest.raises(InputError, match="token tensor"):
            ts.strace(gpt2_model, "w3 w4")
    finally:
        gpt2_model.tokenizer = tok


def test_metrics_module_is_pure():
    full = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert float(metrics.total_variation(full, full[None])[0]) == 0.0
