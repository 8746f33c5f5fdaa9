"""The one evaluation engine: masks → hooks → batched masked forwards → metrics (METHOD.md §4).

Token edges (:class:`tl_strace.ablation.TokenMasks`) and components
(:class:`tl_strace.components.ComponentMasks`) differ only in *which* hooks a batch of rows needs;
everything after that is here, written once:

* :func:`masked_forwards` runs the rows ``chunk`` at a time (``chunk`` comes from
  :func:`tl_strace.memory.rows_for_budget`), every row of a forward the same input with its own
  mask, and yields float32 last-position log-probabilities, refusing non-finite ones;
* :func:`evaluate` reduces each chunk to the per-row numbers a result keeps
  (:func:`tl_strace.metrics.row_metrics`) as soon as it is computed, so memory never grows with
  rows × vocabulary, and checks on the way that the row keeping everything gives back the clean
  logits (:func:`tl_strace.model.check_full_graph`).

A new kind of node (a new granularity) plugs in by writing a :class:`Masks`; a new metric goes in
:mod:`tl_strace.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.metrics import ROW_METRICS, row_metrics
from tl_strace.model import ModelSpec, check_full_graph, model_dtype, run_hooked

__all__ = ["Masks", "evaluate", "masked_forwards"]

Hook = tuple[str, Callable[..., Any]]


@runtime_checkable
class Masks(Protocol):
    """A batch of subgraphs of one input, as hooks: ``n_rows`` rows, and for any run of rows
    ``[start, stop)`` the hooks that apply their masks to a forward of ``stop - start`` copies of
    the input (row ``i`` of that forward is row ``start + i``)."""

    @property
    def n_rows(self) -> int: ...

    def hooks(self, start: int, stop: int) -> list[Hook]: ...


def masked_forwards(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], masks: Masks, *,
                    chunk: int, first: int = 0) -> Iterator[Float[Tensor, "chunk vocab"]]:
    """Yield float32 last-position log-probabilities of every row of ``masks``, ``chunk`` rows per forward.

    The forwards cover rows ``[0, chunk)``, ``[chunk, 2·chunk)``, ...; ``first`` names a row whose
    forward runs before the others (the rest follow in order), so a caller can read that row
    before reducing any other: the batches are the same whatever ``first`` is, so every row's
    numbers are too. Hooks exist only inside each forward (TransformerLens's ``model.hooks``
    context); the caller wraps the whole evaluation in :func:`tl_strace.model.model_guard`.
    Raises :class:`InputError` when a masked forward overflows (non-finite logits, typically fp16).
    """
    if chunk < 1:
        raise InputError(f"chunk must be a positive number of rows per forward; got {chunk}.")
    for start in _forward_starts(masks.n_rows, chunk, first):
        stop = min(start + chunk, masks.n_rows)
        batch = tokens[None].expand(stop - start, -1)
        logits = run_hooked(model, batch, masks.hooks(start, stop), backend=spec.backend)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if not torch.isfinite(logp).all():
            raise InputError(f"{spec.name} produced non-finite logits under a masked forward; run the model in float32.")
        yield logp


def _forward_starts(n_rows: int, chunk: int, first: int) -> list[int]:
    """The first row of each forward, in the order they run: row ``first``'s forward, then the rest in order."""
    starts = list(range(0, n_rows, chunk))
    if starts and 0 <= first < n_rows:
        starts.insert(0, starts.pop(first // chunk))
    return starts


def evaluate(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], masks: Masks, *,
             clean: Float[Tensor, "vocab"], logit_scale: float, full_row: int, chunk: int,
             target: int | None, top_k: int, shape: tuple[int, int],
             on_rows: Callable[[int], None] | None = None) -> tuple[dict[str, Tensor], Float[Tensor, "vocab"]]:
    """Every row's metrics (:data:`tl_strace.metrics.ROW_METRICS`), on the CPU, as ``[*shape, ...]``,
    and the reference distribution they are measured against.

    Row ``full_row`` keeps every edge (or component). Its forward runs first, and its output is
    **the reference**: every row's TV, KL, nucleus are measured against it (METHOD.md §4). Every
    mask of that row is an exact identity, so it is the model's own output, computed in the same
    batched forward as its neighbours: the float rounding that depends on how a forward is shaped
    (a batch of 1 against a batch of 27 rows, a prefix sliced from a longer run; BLAS picks
    kernels by shape) stays out of the curves, the full stratum's TV is 0 exactly, and a density
    profile's value at a position is :func:`tl_strace.strace` of the prefix bit for bit.

    ``clean`` is the clean run's last-position log-probabilities: the reference must agree with it
    within the bound of :func:`~tl_strace.model.check_full_graph` (``logit_scale`` is the clean
    ``max |logit|``), checked on every call; it catches what :func:`~tl_strace.model.require_ready`
    cannot see (a raw hook, a patched module, another thread). ``shape`` is ``(conditions,
    strata)``, the rows' order. ``on_rows(n)`` is called after each forward with the number of
    rows it evaluated (a progress bar).
    """
    if chunk < 1:
        raise InputError(f"chunk must be a positive number of rows per forward; got {chunk}.")
    if shape[0] * shape[1] != masks.n_rows or not 0 <= full_row < masks.n_rows:
        raise ValueError(f"shape {shape} and full_row {full_row} do not fit {masks.n_rows} rows")
    parts: list[tuple[int, dict[str, Tensor]]] = []
    reference: Tensor | None = None
    starts = _forward_starts(masks.n_rows, chunk, full_row)
    done = 0
    for start, logp in zip(starts, masked_forwards(model, spec, tokens, masks, chunk=chunk, first=full_row)):
        if reference is None:
            reference = logp[full_row - start].clone()
            check_full_graph(spec, clean, reference, logit_scale, model_dtype(model))
        parts.append((start, row_metrics(reference, logp, target, top_k)))
        done += int(logp.shape[0])
        if on_rows is not None:
            on_rows(int(logp.shape[0]))
    assert reference is not None and done == masks.n_rows
    parts.sort(key=lambda p: p[0])
    out = {name: torch.cat([m[name] for _, m in parts]).cpu() for name in ROW_METRICS}
    return {name: v.reshape(*shape, *v.shape[1:]) for name, v in out.items()}, reference.cpu()
