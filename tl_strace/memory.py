"""How much memory one call needs, before it runs: the formula behind ``memory_budget``.

A token-level :func:`tl_strace.strace` call holds three kinds of data:

* **edge space** — per slot of the flat edge space (``S = L·H·T²`` slots for ``L`` layers, ``H``
  heads, ``T`` tokens): the clean attention patterns, the edge weights and ancestor mask, the
  search's sort keys, order and ranks, the strata labels and their int16 copy for the masked
  forwards. With their transients at the worst moment (the search) that is at most
  :data:`EDGE_SLOT_BYTES` bytes per slot, plus :data:`RANDOM_SLOT_BYTES` when the *random*
  condition adds a second search; always on the CPU, whatever the model's dtype;
* **clean activations** — the float32 copies the graph is built from: four residual streams per
  block, the head outputs ``v·W_O`` (``H`` vectors per position), a float32 copy of ``W_O`` and the
  clean run's logits at every position: ``4·(L·T·d_model·(H + 8) + L·H·d_head·d_model + T·d_vocab)``
  bytes (freed before the search);
* **masked forwards** — ``rows`` copies of the input at a time, each costing
  :func:`tl_strace.ablation.bytes_per_row` (its activations of one block, its mask, its logits and
  the metrics computed from them);

plus :data:`OVERHEAD_BYTES` of small tensors and allocator slack. The estimate is their sum::

    estimate = (24 + 52·[random])·L·H·T² + 4·(L·T·d_model·(H + 8) + L·H·d_head·d_model + T·d_vocab)
               + rows·bytes_per_row(T) + 64 MiB

It is an upper bound, not a prediction: ``benchmarks/bench_memory.py`` measures the peak resident
memory of real calls (SmolLM2-135M from 20 to 300 tokens, a GPT-2-small-shaped model) against it,
and BENCHMARKS.md records the ratios. Component-level calls have no edge space: they hold
:data:`PATTERN_SLOT_BYTES` per slot (the clean attention patterns) instead; the ``attribution``
scorer adds one backward pass (``L`` rows' worth of activations) and
:func:`~tl_strace.components.evaluate_components` the ``[rows, vocab]`` log-probabilities it returns.

>>> spec = describe_model(model)                                         # doctest: +SKIP
>>> print(estimate_memory(spec, n_pos=59, rows=27, random=True).describe())  # doctest: +SKIP

``memory_budget=B`` (bytes) in :func:`tl_strace.strace` and :func:`tl_strace.component_strace`
bounds the whole call by this estimate: the masked forwards get ``(B − fixed) // bytes_per_row``
rows, and a budget below the fixed part plus one row is refused before any work, with the amount
needed (instead of running out of memory half-way). Without a budget the masked forwards are
sized to :data:`DEFAULT_ROWS_BUDGET` and the fixed part is whatever the input needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tl_strace.ablation import bytes_per_row
from tl_strace.errors import InputError
from tl_strace.model import ModelSpec

__all__ = ["DEFAULT_ROWS_BUDGET", "EDGE_SLOT_BYTES", "OVERHEAD_BYTES", "PATTERN_SLOT_BYTES", "RANDOM_SLOT_BYTES",
           "MemoryEstimate", "available_memory", "estimate_memory", "rows_for_budget"]

EDGE_SLOT_BYTES = 24
"""Peak bytes per edge slot (``L·H·T²`` slots) held by the graph, the search and the strata.

Measured on SmolLM2-135M (``benchmarks/bench_memory.py``, and stage by stage at 580 and 1,024
tokens): the weights (float32) and ancestor mask stay for the whole call (5 bytes per slot); on top
of them the clean patterns and the weights being filled (the graph stage), the search's 64-bit sort
keys, order and tied-run arrays, then the ranks and labels (int32) and the masks' int16 copy. The
worst stage measured 20.3 bytes per slot at 1,024 tokens (the search). It was 56 while the
bottlenecks, ids and sort copies were dense tensors over the edge space (issue 17)."""

RANDOM_SLOT_BYTES = 52
"""Extra bytes per edge slot when the *random* condition is evaluated: the same search on float64
uniform weights (a dense float64 weight tensor, compact float64 bottlenecks sorted by
``torch.sort``), where most edges tie in a few huge runs, ordered with tensors only where a
stratum's count cuts them (:mod:`tl_strace.search._cascade`, ``strace_order`` §5). Its peak is
the cascade's tensors over the largest run, so it depends on how many edges the draw puts there:
measured on SmolLM2 (the random search alone, above the graph and s-Trace's strata) 52.8 bytes per
slot at 400 tokens, 30.3-46.6 at 512 over three seeds, 23.5 at 700, 23.6 at 1,024; with the 13
bytes held around it that is at most 66 of the 24 + 52 allowed. It was 96 (the whole call measured
99 at 512 tokens) before the compact sort and the int32 member arrays (issue 17)."""

PATTERN_SLOT_BYTES = 8
"""Bytes per slot a component-level call holds: the clean attention patterns and one transient."""

OVERHEAD_BYTES = 64 << 20
"""Budget-independent allowance for small tensors and allocator slack."""

DEFAULT_ROWS_BUDGET = 1 << 30
"""Bytes of masked-forward rows per forward when no ``memory_budget`` is given."""


@dataclass(frozen=True)
class MemoryEstimate:
    """An upper bound on the extra memory of one call, by part (bytes)."""

    edge_space: int
    activations: int
    rows: int
    per_row: int
    n_rows: int
    overhead: int

    @property
    def fixed(self) -> int:
        """Everything that does not depend on the number of rows per forward."""
        return self.edge_space + self.activations + self.overhead

    @property
    def total(self) -> int:
        return self.fixed + self.rows

    def describe(self) -> str:
        mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        return (f"{mib(self.total)} = edge space {mib(self.edge_space)} + clean activations "
                f"{mib(self.activations)} + {self.n_rows} row{'' if self.n_rows == 1 else 's'} × {mib(self.per_row)} + "
                f"overhead {mib(self.overhead)}")


def _activation_bytes(spec: ModelSpec, n_pos: int) -> int:
    L, H, T, d = spec.n_layers, spec.n_heads, n_pos, spec.d_model
    return 4 * (L * T * d * (H + 8) + L * H * spec.d_head * d + T * spec.d_vocab)


def estimate_memory(spec: ModelSpec, n_pos: int, rows: int, *, dtype: torch.dtype = torch.float32,
                    edge_space: bool = True, random: bool = False, backward: bool = False,
                    outputs: int = 0) -> MemoryEstimate:
    """Upper bound on the extra memory of one call on ``n_pos`` tokens with ``rows`` masked rows per
    forward.

    ``edge_space=False`` for component-level calls (no token-level graph); ``random=True`` when the
    *random* condition is evaluated (a second set of strata); ``backward=True`` when the
    call takes one gradient through the model (the component ``attribution`` scorer: every block's
    activations of one row are kept, ``L · bytes_per_row``); ``outputs`` counts ``[vocab]`` float32
    rows the call returns (:func:`tl_strace.components.evaluate_components`).
    """
    per_row = bytes_per_row(spec, n_pos, dtype)
    slots = spec.n_layers * spec.n_heads * n_pos * n_pos
    return MemoryEstimate(
        edge_space=((EDGE_SLOT_BYTES + (RANDOM_SLOT_BYTES if random else 0)) if edge_space else PATTERN_SLOT_BYTES)
        * slots,
        activations=_activation_bytes(spec, n_pos) + (spec.n_layers * per_row if backward else 0)
        + 4 * spec.d_vocab * int(outputs),
        rows=int(rows) * per_row,
        per_row=per_row,
        n_rows=int(rows),
        overhead=OVERHEAD_BYTES,
    )


def rows_for_budget(spec: ModelSpec, n_pos: int, dtype: torch.dtype, *, memory_budget: int | None,
                    batch_size: int | None, n_rows: int, edge_space: bool = True, random: bool = False,
                    backward: bool = False, outputs: int = 0) -> int:
    """Rows per masked forward (at most ``n_rows``, the rows the call evaluates).

    ``batch_size`` wins when given (checked against ``memory_budget`` if both are). A
    ``memory_budget`` bounds the whole call's :func:`estimate_memory` (same keyword arguments);
    without one, rows are sized so that a forward's rows stay within :data:`DEFAULT_ROWS_BUDGET`.
    """
    n_rows = max(1, int(n_rows))
    if memory_budget is not None and int(memory_budget) <= 0:
        raise InputError(f"memory_budget is in bytes and must be positive; got {memory_budget}.")
    if batch_size is not None and int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1; got {batch_size}.")
    per_row = bytes_per_row(spec, n_pos, dtype)
    if memory_budget is None:
        rows = int(batch_size) if batch_size is not None else DEFAULT_ROWS_BUDGET // per_row
        return max(1, min(rows, n_rows))
    kw = {"dtype": dtype, "edge_space": edge_space, "random": random, "backward": backward, "outputs": outputs}
    est = estimate_memory(spec, n_pos, 1, **kw)
    fit = (int(memory_budget) - est.fixed) // per_row
    if fit < 1:
        raise InputError(
            f"memory_budget={int(memory_budget) / 2**20:,.0f} MiB is too small for {n_pos} tokens on {spec.name}: "
            f"one call needs at least {est.total / 2**20:,.0f} MiB ({est.describe()}). Raise memory_budget, "
            "shorten the input, or pass memory_budget=None to size only the masked forwards."
        )
    if batch_size is not None:
        if int(batch_size) > fit:
            raise InputError(
                f"batch_size={int(batch_size)} does not fit memory_budget={int(memory_budget) / 2**20:,.0f} MiB "
                f"for {n_pos} tokens on {spec.name}: at most {fit} rows do "
                f"({estimate_memory(spec, n_pos, int(batch_size), **kw).describe()}). Give one of the two.")
        return min(int(batch_size), n_rows)
    return min(fit, n_rows)


def available_memory() -> int | None:
    """Bytes of host memory a new allocation can get now, or None when it cannot be told.

    The machine's available memory (``psutil``, else ``MemAvailable`` of ``/proc/meminfo``), and no
    more than what is left under this process's cgroup limit (``memory.max`` of cgroup v2, as in a
    container). The corpus runner checks each passage against it when no ``memory_budget`` is given.
    """
    avail: int | None = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported here
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                left = int(limit) - int(f.read().strip())
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail
