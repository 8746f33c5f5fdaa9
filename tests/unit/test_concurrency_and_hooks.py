"""Issue 12, silent wrong results 1 and 4: concurrent calls on one model, and raw PyTorch hooks.

1. Calls on one model from several threads are serialised (a per-model lock held for the whole
   call), so each returns what a sequential call returns; calls on different models do not wait
   for each other.
4. A raw ``register_forward_hook`` (or pre-hook, or global module hook) outside TransformerLens's
   hook points is refused before any forward pass; a change the scan cannot see (a patched
   submodule) is caught by checking, on every call, that keeping every edge reproduces the clean
   logits.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import tl_strace as ts
from tl_strace.errors import DecompositionError, InputError
from tl_strace.model import exclusive

TOKS = torch.tensor([0, 5, 17, 3, 42, 8, 9, 23])
SIZES = [0.01, 0.05, 0.2, 0.5]
#: Generous limit on a thread's run: only guards against a hang (a deadlock), never measures speed.
HANG_GUARD_S = 300.0


def _run_threads(fn: Any, n_threads: int) -> list[Any]:
    """Run ``fn(i)`` in ``n_threads`` threads started together; return results (or exceptions)."""
    barrier = threading.Barrier(n_threads)
    out: list[Any] = [None] * n_threads

    def work(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as e:  # reported by the test, not lost in the thread
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    return out


# ---------------------------------------------------------------------------------------------
# 1. Concurrent calls on one model
# ---------------------------------------------------------------------------------------------
def test_concurrent_calls_on_one_model_equal_a_sequential_call(gpt2_model, llama_model):
    # (fixtures taken directly, not by request.getfixturevalue: under TransformerLens 3.9 they are
    # parametrized by backend, which getfixturevalue cannot do)
    for model in (gpt2_model, llama_model):
        _assert_concurrent_equals_sequential(model)


def _assert_concurrent_equals_sequential(model: Any) -> None:
    ref = ts.strace(model, TOKS, sizes=SIZES, conditions=("only", "inverse"))
    n_threads, n_calls = 4, 4

    def calls(i: int) -> list[Any]:
        return [ts.strace(model, TOKS, sizes=SIZES, conditions=("only", "inverse")) for _ in range(n_calls)]

    results = _run_threads(calls, n_threads)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"concurrent calls failed: {errors[0]!r}"
    for per_thread in results:
        for res in per_thread:
            # Same input, same masks, same batch shapes: the same arithmetic, so only the order of
            # threads differs. TV lies in [0, 1]; 1e-6 is far above fp32 rounding of a TV (~1e-7)
            # and far below what a lost or foreign hook does (1e-2 or more on these models).
            assert torch.allclose(res.tv_all, ref.tv_all, rtol=0, atol=1e-6), (res.tv_all - ref.tv_all).abs().max()
    assert not model.hook_dict["blocks.0.hook_resid_pre"]._forward_hooks  # nothing left behind


def test_concurrent_component_calls_and_means_equal_sequential(gpt2_model):
    ref = ts.component_strace(gpt2_model, TOKS)
    ref_means = ts.compute_means(gpt2_model, [TOKS[:5], TOKS[1:6]])

    def calls(i: int) -> Any:
        if i % 2:
            return ts.component_strace(gpt2_model, TOKS).tv_all
        return ts.compute_means(gpt2_model, [TOKS[:5], TOKS[1:6]]).means["z"]

    results = _run_threads(calls, 4)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"concurrent calls failed: {errors[0]!r}"
    for i, r in enumerate(results):
        want = ref.tv_all if i % 2 else ref_means.means["z"]
        # TV in [0, 1] and means of O(1) activations: 1e-6 is fp32 rounding headroom, far below
        # the effect of a foreign hook.
        assert torch.allclose(r, want, rtol=0, atol=1e-6)


def test_a_call_on_another_model_is_not_blocked(gpt2_model, llama_model):
    done = threading.Event()
    with exclusive(gpt2_model):  # as if a long call on the GPT-2 model were running
        other = threading.Thread(target=lambda: (ts.strace(llama_model, TOKS, sizes=SIZES), done.set()), daemon=True)
        other.start()
        other.join(HANG_GUARD_S)
        assert done.is_set(), "a call on model B waited for model A's lock"
        # ... while a call on the held model does wait: it cannot finish before the lock is released.
        same_done = threading.Event()
        same = threading.Thread(target=lambda: (ts.strace(gpt2_model, TOKS, sizes=SIZES), same_done.set()),
                                daemon=True)
        same.start()
        same.join(0.5)
        assert not same_done.is_set()
    same.join(HANG_GUARD_S)
    assert same_done.is_set()


def test_nested_use_in_one_thread_does_not_deadlock(gpt2_model):
    with exclusive(gpt2_model), exclusive(gpt2_model):
        res = ts.strace(gpt2_model, TOKS, sizes=SIZES)
    assert float(res.full_graph_tv) <= 1e-6


# ---------------------------------------------------------------------------------------------
# 4a. Raw hooks that can be seen are refused up front
# ---------------------------------------------------------------------------------------------
def _mlp(model: Any) -> torch.nn.Module:
    return model.blocks[0].mlp


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "forward_kwargs", "backward"])
def test_a_raw_hook_on_a_submodule_is_refused_before_any_forward(gpt2_model, kind):
    mlp = _mlp(gpt2_model)
    calls = []

    def hook(*args: Any, **kwargs: Any) -> None:
        calls.append(1)

    if kind == "forward":
        handle = mlp.register_forward_hook(hook)
    elif kind == "forward_pre":
        handle = mlp.register_forward_pre_hook(hook)
    elif kind == "forward_kwargs":
        handle = mlp.register_forward_hook(hook, with_kwargs=True)
    else:
        handle = mlp.register_full_backward_hook(hook)
    try:
        with pytest.raises(InputError, match=r"blocks\.0\.mlp.*handle\.remove\(\)") as exc:
            ts.strace(gpt2_model, TOKS, sizes=SIZES)
        assert "\n" not in str(exc.value)
        assert not calls  # refused before any forward pass
        with pytest.raises(InputError, match="raw PyTorch"):
            ts.check_model(gpt2_model, TOKS)
        with pytest.raises(InputError, match="raw PyTorch"):
            ts.component_strace(gpt2_model, TOKS)
    finally:
        handle.remove()
    # The model is left usable afterwards.
    assert float(ts.strace(gpt2_model, TOKS, sizes=SIZES).full_graph_tv) <= 1e-6


def test_a_global_module_hook_is_refused(gpt2_model):
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(InputError, match="register_module_forward_hook"):
            ts.strace(gpt2_model, TOKS, sizes=SIZES)
    finally:
        handle.remove()


def test_a_freshly_loaded_model_is_accepted_after_many_kinds_of_calls(tiny_model):
    # TransformerLens and transformers register hooks of their own on a model's first forward
    # passes (the bridge's capture pre-hooks, transformers' output-capturing hooks): they are part
    # of a clean model and must never be refused.
    tiny_model(TOKS[None])
    tiny_model.run_with_cache(TOKS[None])
    for _ in range(2):  # accepted, and exact, on the first call and again after one
        res = ts.strace(tiny_model, TOKS, sizes=SIZES)
        assert float(res.full_graph_tv) <= 1e-6  # TV in [0, 1]; the full graph reproduces the model


# ---------------------------------------------------------------------------------------------
# 4b. What the scan cannot see: the full graph must reproduce the clean logits
# ---------------------------------------------------------------------------------------------
class _BatchMixing(torch.nn.Module):
    """An activation that leaks across batch rows (as a stateful or batch-dependent patch would):
    the clean run (one row) and the masked runs (many rows) then compute different functions."""

    def __init__(self, act: Any) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(x)
        return y + y.mean(0, keepdim=True)


@contextlib.contextmanager
def _patched_activation(model: Any) -> Iterator[None]:
    """Replace block 0's MLP activation without any hook (invisible to a scan of the hook dicts),
    and put the original back afterwards."""
    mlp = _mlp(model)
    target = getattr(mlp, "original_component", None) or mlp
    for attr in ("act", "act_fn"):
        old = getattr(target, attr, None)
        if old is not None:
            break
    else:
        raise AssertionError(f"no activation found on {type(target).__name__}")
    new = _BatchMixing(old).eval() if isinstance(old, torch.nn.Module) else (lambda x, f=old: _BatchMixing(f)(x))
    setattr(target, attr, new)
    try:
        yield
    finally:
        setattr(target, attr, old)


@pytest.mark.parametrize("method", ["strace", "threshold"])
def test_a_hidden_patch_that_breaks_the_full_graph_is_detected(gpt2_model, method):
    kwargs: dict[str, Any] = {"sizes": SIZES} if method == "strace" else {"taus": [0.1, 0.01]}
    with _patched_activation(gpt2_model):
        with pytest.raises(DecompositionError, match="keeping every edge") as exc:
            ts.strace(gpt2_model, TOKS, method=method, **kwargs)
    assert "\n" not in str(exc.value)
    # Unpatched, the same call works and its full graph is the clean model.
    assert float(ts.strace(gpt2_model, TOKS, method=method, **kwargs).full_graph_tv) <= 1e-6


def test_a_hidden_patch_is_detected_by_component_strace(gpt2_model):
    with _patched_activation(gpt2_model), pytest.raises(DecompositionError, match="keeping every"):
        ts.component_strace(gpt2_model, TOKS)


def test_instance_forward_patch_meta_weights_and_mixed_dtypes_are_refused_up_front(tiny_tokenizer_dir):
    """Model states no hook scan sees, refused before any forward pass with a one-line fix."""
    import copy

    from tests.tiny import tiny_bridge

    model = tiny_bridge("gpt2", tiny_tokenizer_dir)
    mlp = dict(model.named_modules())["blocks.0._original_component.mlp"]
    orig = type(mlp).forward
    vars(mlp)["forward"] = lambda *a, **k: 2 * orig(mlp, *a, **k)  # an instance-level patch
    with pytest.raises(InputError, match=r"forward replaced on the instance at blocks\.0\.mlp"):
        ts.strace(model, TOKS, sizes=SIZES)
    del vars(mlp)["forward"]
    ts.strace(model, TOKS, sizes=SIZES)  # restored: traces again

    mixed = copy.deepcopy(model)
    mixed.blocks[1].to(torch.float64)
    with pytest.raises(InputError, match="several floating dtypes.*model.to"):
        ts.strace(mixed, TOKS, sizes=SIZES)

    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(InputError, match="meta device"):
        ts.strace(meta, TOKS, sizes=SIZES)
