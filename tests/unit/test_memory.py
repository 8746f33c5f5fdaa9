"""The memory bound behind ``memory_budget`` (tl_strace.memory): its formula, and that a budget
bounds the rows of every masked forward and refuses, before any work, what it cannot fit."""

from __future__ import annotations

import pytest
import torch

import tl_strace as ts
from tl_strace.ablation import bytes_per_row
from tl_strace.errors import InputError
from tl_strace.memory import (
    DEFAULT_ROWS_BUDGET,
    EDGE_SLOT_BYTES,
    OVERHEAD_BYTES,
    PATTERN_SLOT_BYTES,
    estimate_memory,
    rows_for_budget,
)
from tl_strace.model import _attached_hooks, describe_model

TOKS = torch.tensor([0, 5, 17, 3, 42, 8, 11, 2])


def test_estimate_is_the_documented_formula(gpt2_model):
    spec = describe_model(gpt2_model)
    L, H, T, d = spec.n_layers, spec.n_heads, len(TOKS), spec.d_model
    est = estimate_memory(spec, T, 5)
    assert est.edge_space == EDGE_SLOT_BYTES * L * H * T * T
    assert est.activations == 4 * (L * T * d * (H + 8) + L * H * spec.d_head * d + T * spec.d_vocab)
    assert est.rows == 5 * bytes_per_row(spec, T, torch.float32) and est.per_row == bytes_per_row(spec, T, torch.float32)
    assert est.total == est.edge_space + est.activations + est.rows + OVERHEAD_BYTES
    comp = estimate_memory(spec, T, 5, edge_space=False)
    assert comp.edge_space == PATTERN_SLOT_BYTES * L * H * T * T and comp.total < est.total
    assert "rows" in est.describe() and "MiB" in est.describe()


def test_rows_grow_with_the_budget_and_never_exceed_it(gpt2_model):
    spec = describe_model(gpt2_model)
    T = len(TOKS)
    fixed, per_row = estimate_memory(spec, T, 0).fixed, bytes_per_row(spec, T, torch.float32)
    for k in (1, 2, 7, 30):
        rows = rows_for_budget(spec, T, torch.float32, memory_budget=fixed + k * per_row, batch_size=None, n_rows=100)
        assert rows == k
        assert estimate_memory(spec, T, rows).total <= fixed + k * per_row
    # never more rows than the call evaluates; without a budget, rows fill DEFAULT_ROWS_BUDGET
    assert rows_for_budget(spec, T, torch.float32, memory_budget=None, batch_size=None, n_rows=3) == 3
    assert rows_for_budget(spec, 1000, torch.float32, memory_budget=None, batch_size=None, n_rows=10**9) == \
        DEFAULT_ROWS_BUDGET // bytes_per_row(spec, 1000, torch.float32)
    assert rows_for_budget(spec, T, torch.float32, memory_budget=None, batch_size=4, n_rows=100) == 4


def test_budget_chunks_the_strata_without_changing_numbers(gpt2_model):
    spec = describe_model(gpt2_model)
    est = estimate_memory(spec, len(TOKS), 0)
    a = ts.strace(gpt2_model, TOKS, conditions=["only", "random"], target=11)
    b = ts.strace(gpt2_model, TOKS, conditions=["only", "random"], target=11,
                  memory_budget=est.fixed + 3 * est.per_row)  # 3 rows per forward: 18 forwards
    torch.testing.assert_close(a.tv_all, b.tv_all, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.ce_all, b.ce_all, atol=1e-4, rtol=0)
    assert torch.equal(a.labels, b.labels)


def test_too_small_a_budget_is_refused_before_any_work(gpt2_model, monkeypatch):
    calls = []
    monkeypatch.setattr("tl_strace.pipeline.clean_run", lambda *a, **k: calls.append(1))
    spec = describe_model(gpt2_model)
    need = estimate_memory(spec, len(TOKS), 1)
    with pytest.raises(InputError) as e:
        ts.strace(gpt2_model, TOKS, memory_budget=need.total - 1)
    msg = str(e.value)
    assert "needs at least" in msg and f"{need.total / 2**20:,.0f} MiB" in msg and "memory_budget" in msg
    assert calls == [] and _attached_hooks(gpt2_model) == []
    # exactly enough is accepted
    monkeypatch.undo()
    ts.strace(gpt2_model, TOKS, conditions=["only"], memory_budget=need.total)


def test_component_calls_are_bounded_too(llama_model):
    spec = describe_model(llama_model)
    est = estimate_memory(spec, len(TOKS), 1, edge_space=False)
    with pytest.raises(InputError, match="needs at least"):
        ts.component_strace(llama_model, TOKS, memory_budget=est.total - 1)
    a = ts.component_strace(llama_model, TOKS)
    b = ts.component_strace(llama_model, TOKS, memory_budget=est.fixed + 2 * est.per_row)
    torch.testing.assert_close(a.tv_all, b.tv_all, atol=1e-5, rtol=0)
