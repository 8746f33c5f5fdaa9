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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.engine import masked_forwards
from tl_strace.errors import InputError, UnsupportedModelError
from tl_strace.graph import EdgeLayout
from tl_strace.model import ModelSpec, attention_without_heads, hook_name, run_hooked

__all__ = ["ATTENTION_MODES", "CONDITIONS", "MaskRow", "TokenMasks", "attention_label", "attention_mode", "bytes_per_row",
           "masked_logprobs", "verify_attention_masking"]

_SENTINEL = torch.iinfo(torch.int16).max


CONDITIONS: tuple[str, ...] = ("only", "random", "inverse")
"""Evaluation conditions: the subgraph alone, a random connected subgraph of the same size (the same
search on seeded uniform weights), and the subgraph's complement with every residual edge kept."""

ATTENTION_MODES: dict[str, str] = {
    "faithful": "every edge outside the subgraph is removed, attention edges included (the method as defined; "
                "the default)",
    "never-ablated": "attention edges are never removed, whatever the subgraph: what the authors' published "
                     "pipeline computes, since its attention masks are never applied (METHOD.md, 'Known "
                     "pitfalls'); reproduces the published curves, not a faithful measurement",
}
"""How attention edges are treated when a subgraph is evaluated. ``"never-ablated"`` exists only to
reproduce the published numbers and is labelled wherever its results appear (:func:`attention_label`)."""


def attention_mode(config: Mapping[str, Any]) -> str:
    """The attention mode a result's or a run's config records. Files store the boolean
    ``ablate_attention`` (every run directory since 0.1; results add ``attention`` beside it, kept
    consistent by their schema), absent meaning faithful."""
    return "faithful" if config.get("ablate_attention", True) else "never-ablated"


def attention_label(mode: str) -> str:
    """The label a result of attention mode ``mode`` carries in tables, plots and reports ("" for faithful)."""
    return "" if mode == "faithful" else "attention never ablated (reference pipeline)"


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


_ATTN, _RES_ATTN, _MLP, _RES_MLP = range(4)  # the edge types, in the order of EdgeLayout.split


class _BlockMask:
    """The masks of one block for one forward, as hook methods, for rows ``tab`` (label table),
    ``k`` (stratum) and ``inv`` (inverse) of the batch.

    The residual edges need the block's input stream, which only ``hook_resid_pre`` sees, so the
    hooks share it through this object. TransformerLens fires a block's hooks in forward order —
    ``resid_pre`` → ``pattern`` → ``attn_out`` → ``mlp_out`` — and every forward builds new
    objects, so ``x`` (the block input) and ``mid`` (the stream between the sublayers, sequential
    blocks only) always belong to this block and this forward.
    """

    def __init__(self, layer: int, tables: tuple[Tensor, Tensor, Tensor, Tensor], tab: Tensor, k: Tensor,
                 inv: Tensor) -> None:
        self.layer, self.tables, self.tab, self.k, self.inv = layer, tables, tab, k, inv
        self.x: Tensor | None = None
        self.mid: Tensor | None = None

    # Each mask is built when its hook fires, from this block's int16 labels (never all blocks at once).
    def _labels(self, which: int) -> Tensor:
        return self.tables[which][self.tab, self.layer]  # [row, ...] labels of this block

    def _kept(self, which: int) -> Tensor:
        """Attention or MLP edges kept [row, ...]: in the stratum, or outside it for an inverse row."""
        lab = self._labels(which)
        shape = (-1,) + (1,) * (lab.dim() - 1)
        return (lab <= self.k.view(shape)) ^ self.inv.view(shape)

    def _dropped_skip(self, which: int) -> Tensor:
        """Skip edges (around attention, or a parallel block's one skip; around the MLP) removed [row, pos]: outside the stratum; an inverse row keeps every residual edge."""
        return ~((self._labels(which) <= self.k[:, None]) | self.inv[:, None])

    def resid_pre(self, x: Tensor, hook: Any) -> None:
        self.x = x

    def pattern(self, p: Tensor, hook: Any) -> Tensor:
        return p * self._kept(_ATTN).to(p.dtype)

    def attn_out(self, a: Tensor, hook: Any) -> Tensor:
        """``out = keep·x + attn(x)``: drop the skip by subtracting ``x`` from the attention output."""
        a = a - self._dropped_skip(_RES_ATTN)[..., None].to(a.dtype) * self.x
        self.mid = self.x + a
        return a

    def mlp_out(self, m: Tensor, hook: Any) -> Tensor:
        """``out = keep·mid + keep_m·mlp(mid)``: the MLP read the unmasked ``mid`` (its own input)."""
        mid, self.mid = self.mid, None
        return self._kept(_MLP)[..., None].to(m.dtype) * m - self._dropped_skip(_RES_MLP)[..., None].to(m.dtype) * mid

    def parallel_mlp_out(self, m: Tensor, hook: Any) -> Tensor:
        """Parallel blocks: ``out = keep·x + attn(x) + keep_m·mlp(x)``, the skip dropped here."""
        x, self.x = self.x, None
        return self._kept(_MLP)[..., None].to(m.dtype) * m - self._dropped_skip(_RES_ATTN)[..., None].to(m.dtype) * x


class TokenMasks:
    """Token-edge rows for :func:`tl_strace.engine.masked_forwards`: each :class:`MaskRow` is
    stratum ``k`` of one of ``label_tables`` (or its inverse), masks built inside the hooks from the
    compact int16 tables one block at a time.

    ``ablate_attention=False`` leaves every attention edge in place whatever the masks say: what a
    pipeline whose attention mask silently fails to apply computes (for comparison only).
    """

    def __init__(self, spec: ModelSpec, layout: EdgeLayout, label_tables: Sequence[Int[Tensor, "edge"]],
                 rows: Sequence[MaskRow], *, device: torch.device, ablate_attention: bool = True) -> None:
        if layout.parallel != spec.parallel:
            raise InputError(f"{spec.name}: the edge layout (parallel={layout.parallel}) does not match the model's "
                             f"blocks ({spec.block_kind}); build it as EdgeLayout(..., parallel=spec.parallel).")
        self.spec, self.parallel, self.ablate_attention = spec, layout.parallel, ablate_attention
        self.rows, self.device = list(rows), device
        stacked = torch.stack([compact_labels(t) for t in label_tables]).to(device)
        self.tables = layout.split(stacked)

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def hooks(self, start: int, stop: int) -> list[tuple[str, Any]]:
        part = self.rows[start:stop]
        tab = torch.tensor([r.table for r in part], device=self.device)
        k = torch.tensor([r.k for r in part], device=self.device, dtype=torch.int16)
        inv = torch.tensor([r.inverse for r in part], device=self.device)
        hooks: list[tuple[str, Any]] = []
        for l in range(self.spec.n_layers):
            block = _BlockMask(l, self.tables, tab, k, inv)
            hooks.append((hook_name("resid_pre", l), block.resid_pre))
            if self.ablate_attention:
                hooks.append((hook_name("pattern", l), block.pattern))
            if self.parallel:  # attention output untouched; skip and MLP edges act on the MLP output
                hooks.append((hook_name("mlp_out", l), block.parallel_mlp_out))
            else:
                hooks += [(hook_name("attn_out", l), block.attn_out), (hook_name("mlp_out", l), block.mlp_out)]
        return hooks


def masked_logprobs(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], layout: EdgeLayout,
                    label_tables: Sequence[Int[Tensor, "edge"]], rows: Sequence[MaskRow], *,
                    chunk: int, ablate_attention: bool = True) -> Iterator[Float[Tensor, "row vocab"]]:
    """Yield float32 log-probabilities at the last position for ``rows``, ``chunk`` rows per forward
    (:class:`TokenMasks` through :func:`tl_strace.engine.masked_forwards`).

    The caller wraps the whole evaluation in :func:`tl_strace.model.model_guard`.
    """
    masks = TokenMasks(spec, layout, label_tables, rows, device=tokens.device, ablate_attention=ablate_attention)
    yield from masked_forwards(model, spec, tokens, masks, chunk=chunk)


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
