"""Masked forward passes (METHOD.md §4): many subgraphs evaluated in one batched forward.

A subgraph is given by a *label table* (for each edge, the smallest stratum containing it, as in
:class:`~tl_strace.search.Strata`) and a stratum index ``k``: the subgraph is ``labels <= k``. A
batch row is ``(table, k, inverse)``; every row of a batch is the same input, each with its own mask,
so the K strata of one input cost one forward of K copies. Masks are computed inside the hooks from
the compact int16 tables, one block at a time, so memory does not grow with the number of layers.

Zero ablation, recomputing everything downstream:

* attention edge (l, h, t, s) removed → ``pattern[h, t, s] = 0`` (no renormalisation);
* MLP edge (l, t) removed → ``mlp_out[t] = 0``;
* residual edge removed → the skip is dropped while the sublayer still reads its normal input:
  ``out[t] = keep · in[t] + sublayer(in)[t]``. The hook subtracts ``(1 − keep) · in[t]`` from the
  sublayer output, because TransformerBridge's ``hook_resid_mid`` is the second norm's input, not the
  stream itself (editing it would leave the skip connection untouched).

*inverse* rows remove the subgraph's attention and MLP edges and keep every residual edge.

Parallel attention/MLP blocks (``layout.parallel``): the block's one skip edge (the ``res_attn``
slot) removed → ``out[t] = attn_out[t] + mlp_out[t]`` while both sublayers still read the block
input; the hook subtracts ``(1 − keep) · resid_pre[t]`` from the MLP output.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.errors import InputError, UnsupportedModelError
from tl_strace.graph import EdgeLayout
from tl_strace.model import ModelSpec, attention_without_heads, hook_name, run_hooked

__all__ = ["CONDITIONS", "MaskRow", "bytes_per_row", "masked_logprobs", "verify_attention_masking"]

_SENTINEL = torch.iinfo(torch.int16).max


CONDITIONS: tuple[str, ...] = ("only", "random", "inverse")
"""Evaluation conditions: the subgraph alone, a random connected subgraph of the same size (the same
search on seeded uniform weights), and the subgraph's complement with every residual edge kept."""


@dataclass(frozen=True)
class MaskRow:
    """One subgraph to evaluate: stratum ``k`` of label table ``table``; ``inverse`` evaluates its
    complement (attention and MLP edges outside it, every residual edge)."""

    table: int
    k: int
    inverse: bool = False


def compact_labels(labels: Int[Tensor, "edge"]) -> Int[Tensor, "edge"]:
    """Labels as int16 (stratum indices are small); edges in no stratum map to the sentinel."""
    return labels.clamp(max=_SENTINEL).to(torch.int16)


def bytes_per_row(spec: ModelSpec, n_pos: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes one batch row adds to a masked forward (activations of one block at a
    time under no_grad, the mask built in a hook, the last-position logits and the metrics).

    ``H·T²·(3 + 3·b) + T·(8·d_mlp + 10·d_model)·b + 6·V·4`` with ``b`` bytes per element: the
    attention scores/pattern/masked pattern, the int16 label gather and bool mask, the MLP hidden
    activations (8 per unit: the tanh-approximated GELU of GPT-2 makes five temporaries), the
    streams kept by the hooks, and the float32 logits, log-probabilities and the metrics' sorted
    copies. :func:`tl_strace.memory.estimate_memory` adds what one call holds besides its rows.
    """
    b = torch.finfo(dtype).bits // 8
    H, T = spec.n_heads, n_pos
    d_mlp = spec.d_mlp
    return H * T * T * (3 + 3 * b) + T * (8 * d_mlp + 10 * spec.d_model) * b + 6 * spec.d_vocab * 4


def _hooks(spec: ModelSpec, layout: EdgeLayout, tables: tuple[Tensor, Tensor, Tensor, Tensor],
           tab: Tensor, k: Tensor, inv: Tensor, ablate_attention: bool) -> list[tuple[str, Any]]:
    attn_t, ra_t, m_t, rm_t = tables
    state: dict[str, Tensor] = {}
    hooks: list[tuple[str, Any]] = []
    k4, inv4 = k[:, None, None, None], inv[:, None, None, None]
    k2, inv2 = k[:, None], inv[:, None]

    for l in range(spec.n_layers):
        def pattern_hook(p: Tensor, hook: Any, l: int = l) -> Tensor:
            keep = (attn_t[tab, l] <= k4) ^ inv4
            return p * keep.to(p.dtype)

        def pre_hook(x: Tensor, hook: Any) -> None:
            state["x"] = x

        def attn_out_hook(a: Tensor, hook: Any, l: int = l) -> Tensor:
            x = state["x"]
            drop = ~((ra_t[tab, l] <= k2) | inv2)  # residual edges: inverse keeps them all
            a = a - drop[..., None].to(a.dtype) * x
            state["mid"] = x + a
            return a

        def mlp_out_hook(m: Tensor, hook: Any, l: int = l) -> Tensor:
            keep_m = ((m_t[tab, l] <= k2) ^ inv2)[..., None].to(m.dtype)
            drop_r = (~((rm_t[tab, l] <= k2) | inv2))[..., None].to(m.dtype)
            return keep_m * m - drop_r * state.pop("mid")

        def parallel_mlp_out_hook(m: Tensor, hook: Any, l: int = l) -> Tensor:
            keep_m = ((m_t[tab, l] <= k2) ^ inv2)[..., None].to(m.dtype)
            drop_r = (~((ra_t[tab, l] <= k2) | inv2))[..., None].to(m.dtype)  # the block's one skip edge
            return keep_m * m - drop_r * state.pop("x")

        hooks += [(hook_name("resid_pre", l), pre_hook)]
        if ablate_attention:
            hooks.append((hook_name("pattern", l), pattern_hook))
        if layout.parallel:  # attention output untouched; skip and MLP edges act on the MLP output
            hooks.append((hook_name("mlp_out", l), parallel_mlp_out_hook))
        else:
            hooks += [(hook_name("attn_out", l), attn_out_hook), (hook_name("mlp_out", l), mlp_out_hook)]
    return hooks


def masked_logprobs(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], layout: EdgeLayout,
                    label_tables: Sequence[Int[Tensor, "edge"]], rows: Sequence[MaskRow], *,
                    chunk: int, ablate_attention: bool = True) -> Iterator[Float[Tensor, "row vocab"]]:
    """Yield float32 log-probabilities at the last position for ``rows``, ``chunk`` rows per forward.

    ``ablate_attention=False`` leaves every attention edge in place whatever the masks say: what a
    pipeline whose attention mask silently fails to apply computes (for comparison only).

    Hooks exist only inside each forward (TransformerLens's ``model.hooks`` context); the caller
    wraps the whole evaluation in :func:`tl_strace.model.model_guard`.
    """
    if layout.parallel != spec.parallel:
        raise InputError(f"{spec.name}: the edge layout (parallel={layout.parallel}) does not match the model's "
                         f"blocks ({spec.block_kind}); build it as EdgeLayout(..., parallel=spec.parallel).")
    device = tokens.device
    stacked = torch.stack([compact_labels(t) for t in label_tables]).to(device)
    tables = layout.split(stacked)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        tab = torch.tensor([r.table for r in part], device=device)
        k = torch.tensor([r.k for r in part], device=device, dtype=torch.int16)
        inv = torch.tensor([r.inverse for r in part], device=device)
        hooks = _hooks(spec, layout, tables, tab, k, inv, ablate_attention)
        batch = tokens[None].expand(len(part), -1)
        logits = run_hooked(model, batch, hooks, backend=spec.backend)
        yield torch.log_softmax(logits.float(), dim=-1)


_VERIFIED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def verify_attention_masking(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"],
                             b_O: Float[Tensor, "layer d_model"]) -> None:
    """Check once per model that zeroing ``hook_pattern`` really reaches the attention output.

    A known failure of pipelines built on other code is an attention mask that is computed but
    never applied, so "removed" attention edges stay in the model. Here, with every pattern entry of
    block 0 set to 0, ``hook_attn_out`` must equal the output bias ``b_O`` exactly (in sandwich /
    post-norm blocks: ``b_O`` through the post-attention norm, which ``hook_attn_out`` follows);
    otherwise this model's attention does not read the hooked pattern and tl_strace refuses it.
    """
    if _VERIFIED.get(model):
        return
    seen: dict[str, Tensor] = {}

    def zero(p: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(p)

    def grab(a: Tensor, hook: Any) -> None:
        seen["a"] = a.detach()[0].float()

    run_hooked(model, tokens[None], [(hook_name("pattern", 0), zero), (hook_name("attn_out", 0), grab)],
               backend=spec.backend)
    want = attention_without_heads(model, spec, 0, b_O[0]).to(seen["a"].device)  # norm_post(b_O) in sandwich blocks
    err = float((seen["a"] - want).abs().max())
    if not err <= 1e-4 * max(1.0, float(want.abs().max())):
        raise UnsupportedModelError(
            f"{spec.name}: setting blocks.0.attn.hook_pattern to zero does not remove attention "
            f"(attention output differs from b_O by {err:.3g}). This attention implementation does not "
            "read the hooked pattern, so attention edges could not be ablated; tl_strace refuses to "
            "report numbers that would silently keep them."
        )
    _VERIFIED[model] = True
