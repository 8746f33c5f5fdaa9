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
                    chunk: int) -> Iterator[Float[Tensor, "chunk vocab"]]:
    """Yield float32 last-position log-probabilities of every row of ``masks``, ``chunk`` rows per forward.

    Hooks exist only inside each forward (TransformerLens's ``model.hooks`` context); the caller
    wraps the whole evaluation in :func:`tl_strace.model.model_guard`. Raises :class:`InputError`
    when a masked forward overflows (non-finite logits, typically fp16).
    """
    if chunk < 1:
        raise InputError(f"chunk must be a positive number of rows per forward; got {chunk}.")
    for start in range(0, masks.n_rows, chunk):
        stop = min(start + chunk, masks.n_rows)
        batch = tokens[None].expand(stop - start, -1)
        logits = run_hooked(model, batch, masks.hooks(start, stop), backend=spec.backend)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if not torch.isfinite(logp).all():
            raise InputError(f"{spec.name} produced non-finite logits under a masked forward; run the model in float32.")
        yield logp


def evaluate(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], masks: Masks, *,
             clean: Float[Tensor, "vocab"], logit_scale: float, full_row: int, chunk: int,
             target: int | None, top_k: int, shape: tuple[int, int],
             on_rows: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """Every row's metrics (:data:`tl_strace.metrics.ROW_METRICS`), on the CPU, as ``[*shape, ...]``.

    ``clean`` is the clean run's last-position log-probabilities; row ``full_row`` keeps every edge
    (or component), so its output must be the clean one, within the bound of
    :func:`~tl_strace.model.check_full_graph` (``logit_scale`` is the clean ``max |logit|``): checked
    on every call, it catches what :func:`~tl_strace.model.require_ready` cannot see. ``shape`` is
    ``(conditions, strata)``, the rows' order. ``on_rows(n)`` is called after each forward with
    the number of rows it evaluated (a progress bar).
    """
    if shape[0] * shape[1] != masks.n_rows or not 0 <= full_row < masks.n_rows:
        raise ValueError(f"shape {shape} and full_row {full_row} do not fit {masks.n_rows} rows")
    out: dict[str, list[Tensor]] = {n: [] for n in ROW_METRICS}
    start = 0
    for logp in masked_forwards(model, spec, tokens, masks, chunk=chunk):
        if start <= full_row < start + logp.shape[0]:
            check_full_graph(spec, clean, logp[full_row - start], logit_scale, model_dtype(model))
        start += logp.shape[0]
        for name, value in row_metrics(clean, logp, target, top_k).items():
            out[name].append(value)
        if on_rows is not None:
            on_rows(int(logp.shape[0]))
    return {name: torch.cat(parts).cpu().reshape(*shape, *parts[0].shape[1:]) for name, parts in out.items()}
