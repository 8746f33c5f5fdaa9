"""Head and MLP nodes: s-Trace and computation density at component granularity.

Researchers think in attention heads and MLPs. This module answers the s-Trace questions at that
level, in two ways:

1. **Projection of the token-level trace** (:func:`project_trace`): at each size of a token-level
   :class:`~tl_strace.results.StraceResult`, which heads and MLPs its subgraph uses and what share of
   each component's edges.
2. **A component graph searched directly** (:func:`component_strace`): the nodes are components,
   ``s`` = the fraction of components kept; components are ranked by a *scorer* and the strata
   (prefixes of the ranking, so nested by construction) are evaluated by masked forward passes.

Components and names
--------------------
A component is one attention head ``L{l}H{h}`` or one MLP ``MLP{l}``; with ``per_position=True``
it is split per token position, ``L{l}H{h}@{t}`` / ``MLP{l}@{t}`` (the component's contribution
to the residual stream at position ``t``). Names parse back (:func:`parse_component`). In the last
block only position ``T-1`` reaches the output, so per-position components of the last block exist
only there. Components are indexed layer-major, heads before the MLP, positions innermost.

Ablation, on TransformerLens hook points (hooks live only inside ``model.hooks``)
--------------------------------------------------------------------------------
* head ``h`` of block ``l``: ``blocks.{l}.attn.hook_z`` [batch, pos, head, d_head] is replaced by
  ``a + keep·(z − a)`` with ``keep`` per [batch, head] (or [batch, pos, head]). Since the attention
  output is ``Σ_h z_h @ W_O[h] + b_O``, the head's whole contribution ``z_h @ W_O[h]`` is removed
  (``a = 0``, zero ablation, the paper default) or replaced by its mean ``a = E[z_h] @ W_O[h]``
  (mean ablation). ``b_O`` stays: it is not a head's. In sandwich / post-norm blocks (Gemma 2/3,
  OLMo-2) the post-attention norm then acts on what is left, recomputed like everything downstream;
* MLP ``l``: ``blocks.{l}.hook_mlp_out`` is replaced the same way (its bias goes with it; under a
  post-MLP norm ``hook_mlp_out`` is that norm's output, what the block adds to the stream).
Residual connections are never removed: every component subgraph reaches the input.
Mean values come from a :class:`~tl_strace.mean.MeanCache`: position-agnostic by default (one mean
per head / MLP, any input length), per position with ``mean_positions="per_position"`` when the
reference covers the input's positions; ``config["mean_positions"]`` says which was used.

Scorers (:data:`COMPONENT_SCORERS`)
-----------------------------------
* ``"l1"`` (the papers' choice, lifted to components): the component's *local L1 weight* in the
  node it writes into, METHOD.md §2 applied to component vectors. At position ``t`` of block ``l``
  head ``h`` contributes ``c = (z_h[t] − a_h[t]) @ W_O[h]`` (what ablating it removes) and
  ``w = ‖c‖₁ / (‖resid_pre[t]‖₁ + Σ_h' ‖c_h'‖₁)``; the MLP contributes ``c = mlp_out[t] − a[t]``
  with ``w = ‖c‖₁ / (‖resid_mid[t]‖₁ + ‖c‖₁)`` (parallel blocks: heads and MLP write into one node,
  so both share ``‖resid_pre[t]‖₁ + Σ_h' ‖c_h'‖₁ + ‖c_mlp‖₁``). In the last block the vectors go through the
  final norm linearised at the clean run, as in the token-level graph; in sandwich / post-norm
  blocks a head's ``c`` also goes through the post-attention norm linearised at the clean run
  (:meth:`~tl_strace.model.CleanRun.attn_post_norm`). A whole component scores
  the mean of ``w`` over the positions that reach the output (all of them; in the last block only
  ``T-1``). No gradients; one clean forward.
* ``"attribution"`` (attribution patching, one forward + one backward): components are mixed with
  a continuous keep ``m`` (``a + m·(x − a)``, so ``m = 1`` is the model and ``m = 0`` the ablation),
  ``D(m) = KL(p_full ‖ p_m)`` at the last position, and component ``c`` scores
  ``−∂D/∂m_c = (ablated − x)·∂D/∂x`` at ``m = attribution_point`` for every component (default
  0.5). It is the first-order estimate of how much keeping ``c`` lowers the divergence, i.e. a
  one-step (midpoint-rule) version of integrated-gradients attribution patching (EAP-IG). The
  point cannot be 1: KL has zero gradient at the full model; at 0 only direct effects survive
  (every downstream component is ablated), so the midpoint is the default. Components are
  ranked by the score's magnitude, as EAP ranks edges (``weights`` keep the sign): far from the
  full model the sign of a first-order estimate is unreliable, and on SmolLM2 a component the
  model cannot lose (MLP29) can score strongly negative and would otherwise be ranked last.
* ``"greedy"`` (exact steps, the reference for small models): start from nothing; at each step
  add the component whose inclusion gives the lowest TV, by real masked forwards, every candidate
  of a step in one batched forward (ties: lowest index). Costs ``Σ_k (C − k)`` rows;
  ``greedy_steps`` stops it early (larger strata are then not evaluated, except the full model).
  Each step is optimal given the previous ones, so the first stratum is the best single component;
  later strata are not guaranteed optimal (greedy is myopic, and a scorer's prefix can beat it at
  some sizes). The unit tests compare every search with the exhaustive optimum on a tiny model.

Results are ordinary :class:`~tl_strace.results.StraceResult` objects, so density, curves,
``to_dataframe()`` and ``save``/``load`` work unchanged, with these readings:
``config["granularity"] == "component"``; ``n_edges`` and ``counts`` count *components*;
``sizes`` are ``counts / n_components`` (realised fractions, or the σ you passed);
``labels``/``rank``/``weights`` are over the component space (``config["components"]`` names
index ``i``): smallest stratum containing the component, order of the search (-1 unranked),
scorer value (greedy: the TV drop when it was added; NaN unranked). ``reaches_input`` is always
true. ``config["tv_empty"]`` is the TV with every component ablated (k = 0, off the log axis).
``subgraph()`` refuses component results; use :func:`component_table`.
Curves start at ``s = 1/C`` (not 1e-5), so component and token densities are not comparable
numbers; compare within a granularity.

>>> res = component_strace(model, "The capital of France is", scorer="l1")     # doctest: +SKIP
>>> res.density, component_table(res).head()                                      # doctest: +SKIP
>>> means = compute_means(model, reference_texts)                                 # doctest: +SKIP
>>> component_strace(model, text, scorer="greedy", ablation="mean", means=means)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace import options
from tl_strace._version import __version__
from tl_strace.errors import InputError, UnsupportedModelError
from tl_strace.graph import EdgeLayout, check_decomposition, node_vectors
from tl_strace.memory import rows_for_budget
from tl_strace.mean import MEAN_POSITIONS, MeanCache
from tl_strace.metrics import ROW_METRICS, entropy, kl_divergence, row_metrics, target_stats, top_tokens, total_variation
from tl_strace.model import (
    CleanRun,
    ModelSpec,
    attention_output,
    attention_without_heads,
    check_full_graph,
    clean_run,
    describe_model,
    hook_name,
    model_dtype,
    model_guard,
    prepare_tokens,
    require_ready,
    run_hooked,
    serialised,
    str_tokens,
    target_token,
)
from tl_strace.results import StraceResult
from tl_strace.search import NOT_IN_ANY, check_sizes

__all__ = [
    "ABLATIONS",
    "ComponentOptions",
    "COMPONENT_SCORERS",
    "Ablation",
    "ComponentSpace",
    "component_logprobs",
    "component_strace",
    "component_table",
    "evaluate_components",
    "parse_component",
    "project_trace",
]

ABLATIONS: tuple[str, ...] = ("zero", "mean")
"""How a removed component is replaced: by 0 (paper default) or by its mean over a reference corpus."""

# Conditions (tl_strace.ablation.CONDITIONS) as in tl_strace.strace: the kept components alone; a
# random nested ranking of the same sizes (seeded); the model with the kept components ablated
# (every other one kept).

MAX_DEFAULT_STRATA = 512
"""With ``sizes=None`` every count 1..C is a stratum when C is at most this; otherwise a geometric
grid of 64 counts (per-position component spaces are large)."""

_NAME_RE = re.compile(r"^\s*(?:L(\d+)H(\d+)|MLP(\d+))(?:@(\d+))?\s*$")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def parse_component(name: str) -> tuple[int, int, int]:
    """``(layer, head, pos)`` of a component name; ``head = -1`` for an MLP, ``pos = -1`` for the
    whole component (all positions).

    >>> parse_component("L3H7"), parse_component("MLP5"), parse_component("L0H1@4")
    ((3, 7, -1), (5, -1, -1), (0, 1, 4))
    """
    m = _NAME_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise InputError(
            f"{name!r} is not a component name. Heads are named L<layer>H<head> (e.g. 'L3H7'), MLPs "
            "MLP<layer> (e.g. 'MLP5'); add '@<position>' for one token position (e.g. 'L3H7@4')."
        )
    if m.group(3) is not None:
        layer, head = int(m.group(3)), -1
    else:
        layer, head = int(m.group(1)), int(m.group(2))
    return layer, head, int(m.group(4)) if m.group(4) is not None else -1


def _name(layer: int, head: int, pos: int) -> str:
    base = f"MLP{layer}" if head < 0 else f"L{layer}H{head}"
    return base if pos < 0 else f"{base}@{pos}"


@dataclass(frozen=True)
class ComponentSpace:
    """The components of a model over an input of ``n_pos`` tokens, as tensors.

    A *grid* ``[row, layer, slot, p]`` holds one keep value per (block, slot, position): slots
    ``0..H-1`` are heads, slot ``H`` the MLP; ``p`` is ``n_pos`` per position, else 1 (broadcast).
    Components are the grid cells that can reach the output, in grid order.

    >>> sp = ComponentSpace(2, 3, 5)
    >>> sp.size, sp.names()[:5]
    (8, ['L0H0', 'L0H1', 'L0H2', 'MLP0', 'L1H0'])
    >>> ComponentSpace(2, 3, 5, per_position=True).size   # 4·5 in block 0, 4·1 in the last block
    24
    """

    n_layers: int
    n_heads: int
    n_pos: int
    per_position: bool = False

    def __post_init__(self) -> None:
        if min(self.n_layers, self.n_heads, self.n_pos) < 1:
            raise InputError(f"A component space needs at least one layer, head and position; got {self}.")

    @property
    def n_slots(self) -> int:
        return self.n_heads + 1

    @property
    def grid_pos(self) -> int:
        return self.n_pos if self.per_position else 1

    @cached_property
    def cells(self) -> Int[Tensor, "comp"]:
        """Flat grid index (``(l·slots + j)·p + t``) of each component."""
        L, S, P = self.n_layers, self.n_slots, self.grid_pos
        valid = torch.ones(L, S, P, dtype=torch.bool)
        if self.per_position:
            valid[L - 1, :, : P - 1] = False
        return torch.nonzero(valid.flatten()).flatten()

    @property
    def size(self) -> int:
        return int(self.cells.numel())

    def decode(self) -> tuple[Int[Tensor, "comp"], Int[Tensor, "comp"], Int[Tensor, "comp"]]:
        """(layer, head — -1 for an MLP —, position — -1 unless per position) of every component."""
        S, P = self.n_slots, self.grid_pos
        c = self.cells
        layer = torch.div(c, S * P, rounding_mode="floor")
        slot = torch.div(c, P, rounding_mode="floor") % S
        head = torch.where(slot == self.n_heads, torch.full_like(slot, -1), slot)
        pos = c % P if self.per_position else torch.full_like(c, -1)
        return layer, head, pos

    def names(self) -> list[str]:
        layer, head, pos = self.decode()
        return [_name(l, h, t) for l, h, t in zip(layer.tolist(), head.tolist(), pos.tolist())]

    def cells_of(self, name: str) -> list[int]:
        """Grid cells a name selects (a whole component selects every position in per-position grids).

        Raises :class:`InputError` for a malformed name or one outside this model/input.
        """
        layer, head, pos = parse_component(name)
        L, H, T = self.n_layers, self.n_heads, self.n_pos
        if not 0 <= layer < L or head >= H:
            raise InputError(
                f"Unknown component {name!r}: this model has {L} blocks (0..{L - 1}) of {H} heads (0..{H - 1}); "
                f"valid names are L0H0 … L{L - 1}H{H - 1} and MLP0 … MLP{L - 1}."
            )
        if pos >= T:
            raise InputError(f"Unknown component {name!r}: the input has {T} tokens (positions 0..{T - 1}).")
        slot = self.n_heads if head < 0 else head
        base = (layer * self.n_slots + slot) * self.grid_pos
        if pos < 0:
            return list(range(base, base + self.grid_pos))
        if not self.per_position:
            raise InputError(f"{name!r} names one position, but this component space is not split per "
                             "position; pass per_position=True.")
        return [base + pos]

    def index(self, names: Sequence[str]) -> list[int]:
        """Component indices of ``names`` (each must be exactly one component of this space)."""
        lookup = {int(c): i for i, c in enumerate(self.cells.tolist())}
        out = []
        for n in names:
            cells = self.cells_of(n)
            if len(cells) != 1 or cells[0] not in lookup:
                raise InputError(
                    f"{n!r} is not one component of this space"
                    + (" (name one position, e.g. 'L0H1@3')" if self.per_position and len(cells) > 1 else
                       " (in the last block only the last position reaches the output)")
                    + "."
                )
            out.append(lookup[cells[0]])
        return out

    def grid(self, keep: Float[Tensor, "row comp"]) -> Float[Tensor, "row layer slot p"]:
        """Keep values on the full grid; cells that are not components (they cannot reach the
        output) are kept. Differentiable in ``keep``."""
        R = keep.shape[0]
        L, S, P = self.n_layers, self.n_slots, self.grid_pos
        full = torch.ones(R, L * S * P, dtype=keep.dtype, device=keep.device)
        full = full.index_copy(1, self.cells.to(keep.device), keep)
        return full.reshape(R, L, S, P)


# ---------------------------------------------------------------------------------------------
# Ablation values and the masked forward
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ablation:
    """What a removed component is replaced by: ``z``/``mlp`` are ``None`` (zero ablation) or the
    means ``[layer, p, head, d_head]`` / ``[layer, p, d_model]`` with ``p`` 1 or ``n_pos``."""

    mode: str
    positions: str | None = None
    z: Float[Tensor, "layer p head d_head"] | None = None
    mlp: Float[Tensor, "layer p d_model"] | None = None
    source: dict[str, Any] | None = None

    @classmethod
    def build(cls, spec: ModelSpec, n_pos: int, ablation: str, means: Any,
              positions: str, *, model: Any = None) -> "Ablation":
        """Check the options and fetch mean values (before any forward pass). ``means`` is a
        :class:`~tl_strace.mean.MeanCache`, the path of a saved one, or ``None`` (annotated ``Any``:
        anything else is refused here with a one-line :class:`InputError`, not a raw type error).

        With ``model``, a mean cache computed on other weights (another checkpoint or fine-tune of
        the same architecture, told apart by :func:`~tl_strace.model.weights_fingerprint`) is
        refused, not only one of another architecture."""
        if ablation not in ABLATIONS:
            raise InputError(f"Unknown ablation {ablation!r}; choose one of {list(ABLATIONS)}.")
        if positions not in MEAN_POSITIONS:
            raise InputError(f"Unknown mean_positions {positions!r}; choose one of {list(MEAN_POSITIONS)}.")
        if ablation == "zero":
            if means is not None:
                raise InputError("means were given but ablation='zero'; pass ablation='mean' to use them.")
            return cls("zero")
        if means is None:
            raise InputError(
                "ablation='mean' needs mean values from a reference corpus: pass "
                "means=tl_strace.compute_means(model, reference_texts) (or the path of a saved mean cache)."
            )
        if not isinstance(means, (MeanCache, str, os.PathLike)):
            raise InputError(
                f"means must be a MeanCache or the path of a saved one (str or os.PathLike); got "
                f"{type(means).__name__}. Pass means=tl_strace.compute_means(model, reference_texts)."
            )
        cache = means if isinstance(means, MeanCache) else MeanCache.load(means)
        cache.check_model(spec, ("z", "mlp_out"), model=model)
        return cls("mean", positions, cache.values("z", n_pos, positions).float(),
                   cache.values("mlp_out", n_pos, positions).float(), cache.describe())

    def to(self, device: torch.device, dtype: torch.dtype) -> "Ablation":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return Ablation(self.mode, self.positions, mv(self.z), mv(self.mlp), self.source)


class _MixHook:
    """``a + keep·(x − a)`` (or ``keep·x`` when ``a`` is None), a hook for ``hook_z`` / ``hook_mlp_out``.

    A module-level callable rather than a closure: hooks are made for every forward, and a class is
    defined (and, under the test suite's runtime type checking, instrumented) once.
    """

    def __init__(self, keep: Tensor, abl: Tensor | None) -> None:
        self.keep = keep
        self.abl = abl

    def __call__(self, x: Tensor, hook: Any) -> Tensor:
        k = self.keep.to(x.dtype)
        return x * k if self.abl is None else self.abl + k * (x - self.abl)


def _component_hooks(spec: ModelSpec, grid: Tensor, abl: Ablation) -> list[tuple[str, Any]]:
    H = spec.n_heads
    hooks: list[tuple[str, Any]] = []
    for l in range(spec.n_layers):
        zk = grid[:, l, :H, :].transpose(1, 2)[..., None]  # [row, p, head, 1]
        mk = grid[:, l, H, :][..., None]  # [row, p, 1]
        za = None if abl.z is None else abl.z[l]  # [p', head, d_head]
        ma = None if abl.mlp is None else abl.mlp[l]  # [p', d_model]
        hooks += [(hook_name("z", l), _MixHook(zk, za)), (hook_name("mlp_out", l), _MixHook(mk, ma))]
    return hooks


def component_logprobs(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], space: ComponentSpace,
                       keep: Float[Tensor, "row comp"], abl: Ablation, *, chunk: int
                       ) -> Iterator[Float[Tensor, "chunk vocab"]]:
    """Yield float32 last-position log-probabilities for each keep row, ``chunk`` rows per forward.

    ``keep`` is 1 for a kept component and 0 for an ablated one (values between mix the two).
    The caller wraps the evaluation in :func:`tl_strace.model.model_guard`.
    """
    device, dtype = tokens.device, model_dtype(model)
    abl = abl.to(device, dtype)
    for start in range(0, keep.shape[0], chunk):
        part = keep[start:start + chunk].to(device)
        hooks = _component_hooks(spec, space.grid(part), abl)
        logits = run_hooked(model, tokens[None].expand(part.shape[0], -1), hooks, backend=spec.backend)
        yield torch.log_softmax(logits.float(), dim=-1)


_VERIFIED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def verify_component_ablation(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"],
                              b_O: Float[Tensor, "layer d_model"]) -> None:
    """Check once per model that the component hooks reach the output: with every head of block 0
    zeroed at ``hook_z``, ``hook_attn_out`` must be ``b_O`` exactly, and with the MLP of block 0
    zeroed at ``hook_mlp_out`` the block output must be ``resid_mid``. Otherwise this model's
    hook points are not on the computation path, and ablations would silently do nothing."""
    if _VERIFIED.get(model):
        return
    seen: dict[str, Tensor] = {}
    grid = torch.ones(1, spec.n_layers, spec.n_heads + 1, 1, device=tokens.device)
    grid[0, 0] = 0.0
    hooks = _component_hooks(spec, grid, Ablation("zero"))
    hooks += [(hook_name("attn_out", 0), _Grab(seen, "a")), (hook_name("resid_pre", 0), _Grab(seen, "x")),
              (hook_name("resid_post", 0), _Grab(seen, "y"))]
    run_hooked(model, tokens[None], hooks, backend=spec.backend)
    want_a = attention_without_heads(model, spec, 0, b_O[0]).to(seen["a"].device)  # norm_post(b_O) if sandwich
    err_a = float((seen["a"] - want_a).abs().max())
    err_m = float((seen["y"] - (seen["x"] + seen["a"])).abs().max())
    scale = max(1.0, float(seen["x"].abs().max()), float(want_a.abs().max()))
    if not (err_a <= 1e-4 * scale and err_m <= 1e-4 * scale):
        raise UnsupportedModelError(
            f"{spec.name}: ablating every head at blocks.0.attn.hook_z and the MLP at blocks.0.hook_mlp_out does "
            f"not remove them (attention output differs from b_O by {err_a:.3g}; block output differs from the "
            f"stream without the MLP by {err_m:.3g}). This model's hook points are not on its computation path, "
            "so component ablations would silently do nothing; tl_strace refuses it."
        )
    _VERIFIED[model] = True


class _Grab:
    def __init__(self, store: dict[str, Tensor], key: str) -> None:
        self.store, self.key = store, key

    def __call__(self, x: Tensor, hook: Any) -> None:
        self.store[self.key] = x.detach()[0].float()


def _check_finite(spec: ModelSpec, logp: Tensor) -> None:
    if not torch.isfinite(logp).all():
        raise InputError(f"{spec.name} produced non-finite logits under a component mask; run it in float32.")


def _logprobs(model: Any, spec: ModelSpec, tokens: Tensor, space: ComponentSpace, keep: Tensor,
              abl: Ablation, chunk: int) -> Tensor:
    out = torch.cat(list(component_logprobs(model, spec, tokens, space, keep, abl, chunk=chunk)))
    _check_finite(spec, out)
    return out


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------
@dataclass
class _Context:
    model: Any
    spec: ModelSpec
    tokens: Tensor
    space: ComponentSpace
    abl: Ablation
    run: CleanRun
    full: Tensor  # [vocab] clean log-probs
    chunk: int
    options: dict[str, Any]


def _relevant_mean(w: Tensor, space: ComponentSpace) -> Tensor:
    """[layer, slot, T] per-position scores → component scores (mean over positions that reach
    the output; last block: position T-1 only), in component order."""
    L, S, T = w.shape
    if space.per_position:
        return w.reshape(-1)[space.cells.to(w.device)]
    rel = torch.ones(L, 1, T, dtype=w.dtype, device=w.device)
    rel[L - 1, :, : T - 1] = 0
    return ((w * rel).sum(-1) / rel.sum(-1)).reshape(-1)


def score_l1(ctx: _Context) -> tuple[Tensor, Tensor]:
    """The ``"l1"`` scorer (module docstring): local L1 weight of each component's removable
    contribution, averaged over the positions that reach the output."""
    run, spec = ctx.run, ctx.spec
    L, T = spec.n_layers, run.tokens.numel()
    z = run.z  # [L, T, H, dh]
    mlp = run.mlp_out
    if ctx.abl.z is not None:
        z = z - ctx.abl.z.to(z.device)
        mlp = mlp - ctx.abl.mlp.to(mlp.device)
    # [L, T, H, d]; in sandwich / post-norm blocks through the post-attention norm linearised at the
    # clean run (what the block adds to the stream for each head), as in the token-level graph
    heads = run.attn_post_norm(torch.einsum("lthd,lhdm->lthm", z, run.W_O))
    resid_pre, resid_mid = run.resid_pre.clone(), run.resid_mid.clone()
    mlp = mlp.clone()
    # Last block, last position: through the final norm linearised at the clean run.
    f = run.final_norm
    heads[L - 1, T - 1] = f(heads[L - 1, T - 1])
    resid_pre[L - 1, T - 1] = f(resid_pre[L - 1, T - 1])
    resid_mid[L - 1, T - 1] = f(resid_mid[L - 1, T - 1])
    mlp[L - 1, T - 1] = f(mlp[L - 1, T - 1])
    a = heads.abs().sum(-1)  # [L, T, H]
    m = mlp.abs().sum(-1)  # [L, T]
    tot_a = resid_pre.abs().sum(-1) + a.sum(-1)
    tot_m = resid_mid.abs().sum(-1) + m
    if spec.parallel:  # one node per block and position: skip, heads and MLP share its mass
        tot_a = tot_m = tot_a + m
    safe = lambda x: torch.where(x > 0, x, torch.ones_like(x))  # noqa: E731
    w = torch.cat([(a / safe(tot_a)[..., None]).transpose(1, 2), (m / safe(tot_m))[:, None, :]], dim=1)  # [L, S, T]
    score = _relevant_mean(w, ctx.space)
    order = torch.argsort(-score.double(), stable=True)
    return order, score.float()


def score_attribution(ctx: _Context) -> tuple[Tensor, Tensor]:
    """The ``"attribution"`` scorer (module docstring): ``−∂ KL(p_full ‖ p_m) / ∂m`` at
    ``m = attribution_point`` for every component, from one forward and one backward pass."""
    point = float(ctx.options.get("attribution_point", 0.5))
    C = ctx.space.size
    device = ctx.tokens.device
    m = torch.full((1, C), point, dtype=torch.float32, device=device, requires_grad=True)
    abl = ctx.abl.to(device, model_dtype(ctx.model))
    with torch.enable_grad():
        hooks = _component_hooks(ctx.spec, ctx.space.grid(m), abl)
        logits = run_hooked(ctx.model, ctx.tokens[None], hooks, backend=ctx.spec.backend)
        logp = torch.log_softmax(logits.float(), dim=-1)
        div = kl_divergence(ctx.full, logp).sum()
        (grad,) = torch.autograd.grad(div, m)
    score = -grad[0].detach()
    if not torch.isfinite(score).all():
        raise InputError(f"{ctx.spec.name}: attribution scores are not finite; run the model in float32.")
    order = torch.argsort(-score.double().abs().cpu(), stable=True)  # by magnitude, as EAP ranks edges
    return order, score.float().cpu()


def search_greedy(ctx: _Context) -> tuple[Tensor, Tensor]:
    """The ``"greedy"`` search (module docstring): each step adds the component whose inclusion
    gives the lowest TV, every candidate of a step evaluated in one batched forward (chunked).
    Ties go to the lower component index. Returns the first ``greedy_steps`` components."""
    C = ctx.space.size
    steps = ctx.options.get("greedy_steps")
    steps = C if steps is None else min(int(steps), C)
    kept = torch.zeros(C)
    remaining = torch.ones(C, dtype=torch.bool)
    gains = torch.full((C,), float("nan"))
    order: list[int] = []
    prev = float(ctx.options["tv_empty"])
    for _ in range(steps):
        cand = torch.nonzero(remaining).flatten()
        rows = kept.repeat(cand.numel(), 1)
        rows[torch.arange(cand.numel()), cand] = 1.0
        tv = torch.cat([total_variation(ctx.full, lp) for lp in component_logprobs(
            ctx.model, ctx.spec, ctx.tokens, ctx.space, rows, ctx.abl, chunk=ctx.chunk)]).cpu()
        j = int(torch.argmin(tv))  # first minimum: lowest index among ties
        c = int(cand[j])
        order.append(c)
        kept[c] = 1.0
        remaining[c] = False
        gains[c] = prev - float(tv[j])
        prev = float(tv[j])
    return torch.tensor(order, dtype=torch.long), gains


COMPONENT_SCORERS: dict[str, Callable[[_Context], tuple[Tensor, Tensor]]] = {
    "l1": score_l1,
    "attribution": score_attribution,
    "greedy": search_greedy,
}


@dataclass(frozen=True)
class ComponentOptions(options.CommonOptions):
    """Every option of a component-level trace (:func:`component_strace`, the corpus runner with
    ``granularity="component"``): the shared ones (:class:`tl_strace.options.CommonOptions`) plus
    the scorer, the ablation and its means' positions, per-position components, and the scorers'
    own settings; names are checked against :data:`COMPONENT_SCORERS`, :data:`ABLATIONS` and
    :data:`tl_strace.mean.MEAN_POSITIONS`. Constructing one is the check."""

    scorer: Any = "l1"
    ablation: Any = "zero"
    mean_positions: Any = "agnostic"
    per_position: Any = False
    greedy_steps: Any = None
    attribution_point: Any = 0.5

    def __post_init__(self) -> None:
        scorer = options.check_choice("scorer", self.scorer, COMPONENT_SCORERS)
        super().__post_init__()
        point = options.check_float("attribution_point", self.attribution_point)
        if not 0.0 < point < 1.0 and scorer == "attribution":
            raise InputError(f"attribution_point must lie strictly between 0 and 1 (KL has no gradient at the full "
                             f"model, m = 1); got {point}.")
        steps = options.check_int("greedy_steps", self.greedy_steps, minimum=1, optional=True)
        if steps is not None and scorer != "greedy":
            raise InputError(f"greedy_steps applies to scorer='greedy' only (scorer is {scorer!r}); leave it None.")
        for k, v in {"scorer": scorer, "attribution_point": point, "greedy_steps": steps,
                     "ablation": options.check_choice("ablation", self.ablation, ABLATIONS),
                     "mean_positions": options.check_choice("mean_positions", self.mean_positions, MEAN_POSITIONS),
                     "per_position": options.check_bool("per_position", self.per_position)}.items():
            object.__setattr__(self, k, v)
"""Component rankings by name: each returns (component ids in rank order, per-component score)."""


# ---------------------------------------------------------------------------------------------
# Strata
# ---------------------------------------------------------------------------------------------
def _strata_counts(sizes: Sequence[float] | None, C: int, limit: int) -> tuple[list[float], list[int]]:
    """Target sizes and component counts; strata above ``limit`` components (greedy stopped
    early) are dropped, except the full model."""
    if sizes is None:
        if C <= MAX_DEFAULT_STRATA:
            counts = list(range(1, C + 1))
        else:
            counts = sorted({int(round(x)) for x in np.geomspace(1, C, 64)} | {C})
        szs = [k / C for k in counts]
    else:
        szs = list(check_sizes(sizes))
        # floor(σ·C), except that σ·C within 1e-9 of an integer counts as that integer, so the
        # float k/C (e.g. 5/300 = 0.01666…) keeps k components, not k-1.
        counts = [min(C, math.floor(Fraction(repr(s)) * C + Fraction(1, 10**9))) for s in szs]
    keep = [(s, c) for s, c in zip(szs, counts) if c <= limit or c == C]
    return [s for s, _ in keep], [c for _, c in keep]


def _labels(rank: Tensor, counts: Sequence[int]) -> Tensor:
    c = torch.tensor(list(counts), dtype=torch.long)
    labels = torch.full_like(rank, len(counts) - 1)
    ranked = rank >= 0
    labels[ranked] = torch.searchsorted(c, rank[ranked], right=True).clamp(max=len(counts) - 1)
    return labels


@serialised
def component_strace(
    model: Any,
    input: str | Tensor | Sequence[int],
    *,
    scorer: str = "l1",
    ablation: str = "zero",
    means: MeanCache | str | os.PathLike | None = None,
    mean_positions: str = "agnostic",
    per_position: bool = False,
    sizes: Iterable[float] | None = None,
    conditions: Iterable[str] = ("only",),
    greedy_steps: int | None = None,
    attribution_point: float = 0.5,
    target: int | str | Tensor | None = None,
    seed: int = 0,
    top_k: int = 5,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    prepend_bos: bool | None = None,
) -> StraceResult:
    """s-Trace at component granularity: nested sets of heads/MLPs, ranked by ``scorer`` and
    evaluated by batched masked forwards; density as for the token-level trace.

    Args:
        model: a ``TransformerBridge`` / ``HookedTransformer`` in eval mode with no hooks attached.
        input: text or tokens ``[pos]`` / ``[1, pos]``; the prediction after the last token is studied.
        scorer: ``"l1"`` (default), ``"attribution"`` or ``"greedy"`` (see the module docstring).
        ablation: ``"zero"`` (paper default) or ``"mean"`` (needs ``means``).
        means: a :class:`~tl_strace.mean.MeanCache` from :func:`~tl_strace.mean.compute_means`, or
            the path of a saved one.
        mean_positions: ``"agnostic"`` (one mean per component; any input length) or
            ``"per_position"`` (the mean at each position; the reference must cover the input).
        per_position: split every component per token position (``L3H7@5``).
        sizes: fractions of components in (0, 1], increasing; stratum ``k`` keeps
            ``floor(σ_k·C)`` components (``k/C`` keeps exactly ``k``). Default: every count 1..C
            (s = k/C), or a 64-count geometric grid when C > 512.
        conditions: any of ``"only"`` (always), ``"random"``, ``"inverse"``.
        greedy_steps: stop the greedy search after this many components (its cost is
            ``Σ_k (C − k)`` masked rows); larger strata are then not evaluated, except the full model.
        attribution_point: the keep value ``m`` in (0, 1) at which attribution gradients are taken.
        target: the true next token (id or text) for cross-entropy and rank.
        seed: seed of the random condition.
        top_k: top tokens kept per stratum; a value above the vocabulary size keeps every token
            (``config["top_k"]`` records the effective value, ``min(top_k, d_vocab)``).
        batch_size / memory_budget: rows per masked forward / the whole call's memory bound, as in
            :func:`tl_strace.strace` (component calls have no edge space; see :mod:`tl_strace.memory`).
        prepend_bos: passed to ``model.to_tokens`` for text.

    Returns:
        A :class:`~tl_strace.results.StraceResult` with ``config["granularity"] == "component"``.
    """
    t0 = time.perf_counter()
    spec = describe_model(model)
    # Every option, before any work; iterables are read once, scalars made canonical.
    opts = ComponentOptions(sizes=sizes, conditions=conditions, seed=seed, top_k=top_k, batch_size=batch_size,
                            memory_budget=memory_budget, prepend_bos=prepend_bos, scorer=scorer, ablation=ablation,
                            mean_positions=mean_positions, per_position=per_position, greedy_steps=greedy_steps,
                            attribution_point=attribution_point)
    scorer, ablation, mean_positions, per_position = opts.scorer, opts.ablation, opts.mean_positions, opts.per_position
    conds, sizes, attribution_point, greedy_steps = opts.conditions, opts.sizes, opts.attribution_point, opts.greedy_steps
    top_k, seed, batch_size, memory_budget = opts.top_k, opts.seed, opts.batch_size, opts.memory_budget
    prepend_bos = opts.prepend_bos
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=prepend_bos)
    T = int(tokens.numel())
    tgt = target_token(model, spec, target)
    abl = Ablation.build(spec, T, ablation, means, mean_positions, model=model)
    space = ComponentSpace(spec.n_layers, spec.n_heads, T, per_position)
    C = space.size
    limit = C if scorer != "greedy" or greedy_steps is None else min(int(greedy_steps), C)
    szs, counts = _strata_counts(sizes, C, limit)
    # The greedy scorer evaluates up to C candidates per step; the others at most 3 conditions × C.
    chunk = rows_for_budget(spec, T, model_dtype(model), memory_budget=memory_budget, batch_size=batch_size,
                            n_rows=3 * C, edge_space=False, backward=scorer == "attribution")
    timings: dict[str, float] = {}

    with model_guard(model):
        run = clean_run(model, spec, tokens)
        # The identities component ablation relies on (attention output = Σ_h z_h W_O[h] + b_O,
        # block output = stream + attention + MLP, the linearised final norm), and that the hooks
        # really are on the computation path.
        check_decomposition(run, node_vectors(run), rel_tol=1e-4 if model_dtype(model) == torch.float32 else 2e-2)
        verify_component_ablation(model, spec, tokens, run.b_O)
        full = torch.log_softmax(run.logits, dim=-1)
        logit_scale = float(run.logits.abs().max())
        empty = _logprobs(model, spec, tokens, space, torch.zeros(1, C), abl, chunk)
        tv_empty = float(total_variation(full, empty)[0])
        t1 = time.perf_counter()
        timings["forward"] = t1 - t0
        ctx = _Context(model, spec, tokens, space, abl, run, full, chunk,
                       {"attribution_point": attribution_point, "greedy_steps": greedy_steps, "tv_empty": tv_empty})
        order, score = COMPONENT_SCORERS[scorer](ctx)
        t2 = time.perf_counter()
        timings["search"] = t2 - t1
        rank = torch.full((C,), -1, dtype=torch.long)
        rank[order] = torch.arange(order.numel())
        labels = _labels(rank, counts)
        tables = {"only": labels}
        if "random" in conds:
            perm = torch.randperm(C, generator=torch.Generator().manual_seed(int(seed)))
            rrank = torch.empty(C, dtype=torch.long)
            rrank[perm] = torch.arange(C)
            tables["random"] = _labels(rrank, counts)
        K = len(counts)
        ks = torch.arange(K)
        rows = []
        for c in conds:
            lab = tables["random" if c == "random" else "only"]
            kept = (lab[None, :] <= ks[:, None]).float()  # [K, C]
            rows.append(1.0 - kept if c == "inverse" else kept)
        # Metrics chunk by chunk: only per-row numbers are kept, never [rows, vocab].
        out: dict[str, list[Tensor]] = {n: [] for n in ROW_METRICS}
        # The last "only" row keeps every component (the full model): it must give back the clean
        # logits, or something outside the hook points changes the model (tl_strace.model.check_full_graph).
        full_row, start = conds.index("only") * K + K - 1, 0
        for logp in component_logprobs(model, spec, tokens, space, torch.cat(rows), abl, chunk=chunk):
            _check_finite(spec, logp)
            if start <= full_row < start + logp.shape[0]:
                check_full_graph(spec, full, logp[full_row - start], logit_scale, model_dtype(model))
            start += logp.shape[0]
            for n, v in row_metrics(full, logp, tgt, top_k).items():
                out[n].append(v.cpu())
        timings["evaluate"] = time.perf_counter() - t2

    full = full.cpu()
    shape = (len(conds), K)
    rs = lambda x: x.reshape(*shape, *x.shape[1:])  # noqa: E731
    m = {n: rs(torch.cat(v)) for n, v in out.items()}
    if tgt is not None:
        fce, frk = target_stats(full[None], tgt)
        full_ce, full_rank = float(fce[0]), float(frk[0])
    else:
        full_ce, full_rank = float("nan"), float("nan")
    full_ids, full_probs = top_tokens(full[None], top_k)
    top_ids = m["ids"]
    timings["total"] = time.perf_counter() - t0
    config = {
        "granularity": "component", "method": "component", "scorer": scorer, "ablation": ablation,
        "mean_positions": mean_positions if ablation == "mean" else None,
        "means": abl.source,
        "per_position": per_position, "n_components": C, "components": space.names(),
        "greedy_steps": greedy_steps, "attribution_point": attribution_point if scorer == "attribution" else None,
        "sizes": [float(s) for s in szs], "taus": None, "weights": None, "tv_empty": tv_empty,
        # the effective top_k: a top_k above the vocabulary keeps every token and is stored as d_vocab
        "seed": int(seed), "prepend_bos": prepend_bos, "top_k": int(top_ids.shape[-1]), "version": __version__,
    }
    return StraceResult(
        model=spec.to_json(),
        config=config,
        str_tokens=str_tokens(model, tokens.cpu()),
        tokens=tokens.cpu(),
        target=tgt,
        n_edges=C,
        conditions=conds,
        sizes=torch.tensor(szs, dtype=torch.float64),
        counts=torch.tensor(counts, dtype=torch.long),
        params=torch.tensor(szs, dtype=torch.float64),
        tv_all=m["tv"],
        kl_all=m["kl"],
        nucleus_all=m["nucleus"],
        entropy_all=m["entropy"],
        ce_all=m["ce"],
        target_rank_all=m["rank"],
        reaches_input_all=torch.ones(shape, dtype=torch.bool),
        top_ids=top_ids,
        top_probs=m["probs"],
        top_strs=[[str_tokens(model, top_ids[c, k]) for k in range(K)] for c in range(len(conds))],
        full_top_ids=full_ids[0],
        full_top_probs=full_probs[0],
        full_top_strs=str_tokens(model, full_ids[0]),
        full_entropy=float(entropy(full[None])[0]),
        full_ce=full_ce,
        full_target_rank=full_rank,
        labels=labels,
        rank=rank,
        weights=score.float(),
        timings=timings,
    )


# ---------------------------------------------------------------------------------------------
# Evaluating named component sets
# ---------------------------------------------------------------------------------------------
@serialised
def evaluate_components(
    model: Any,
    input: str | Tensor | Sequence[int],
    keep: Sequence[Sequence[str]],
    *,
    ablation: str = "zero",
    means: MeanCache | str | os.PathLike | None = None,
    mean_positions: str = "agnostic",
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    prepend_bos: bool | None = None,
) -> Float[Tensor, "row vocab"]:
    """Last-position log-probabilities with only the named components kept, one row per set.

    Every head and MLP not named is ablated (zero or mean). A name with ``@t`` keeps that
    component at position ``t`` only; the residual stream is always kept.

    >>> evaluate_components(model, "The capital of France is", [["L0H1", "MLP0"], []])  # doctest: +SKIP
    """
    spec = describe_model(model)
    ablation = options.check_choice("ablation", ablation, ABLATIONS)
    mean_positions = options.check_choice("mean_positions", mean_positions, MEAN_POSITIONS)
    batch_size, memory_budget = options.check_batch_size(batch_size), options.check_memory_budget(memory_budget)
    prepend_bos = options.check_optional_bool("prepend_bos", prepend_bos)
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=prepend_bos)
    T = int(tokens.numel())
    if isinstance(keep, str) or any(isinstance(k, str) for k in keep):
        raise InputError("keep is a list of component-name lists, one per row: e.g. [['L0H1', 'MLP2']].")
    per_pos = any("@" in n for row in keep for n in row)
    space = ComponentSpace(spec.n_layers, spec.n_heads, T, per_pos)
    L, S, P = spec.n_layers, space.n_slots, space.grid_pos
    grid = torch.zeros(len(keep), L * S * P)
    for i, row in enumerate(keep):
        for n in row:
            grid[i, space.cells_of(n)] = 1.0
    if per_pos:  # cells that cannot reach the output are irrelevant; keep them like ComponentSpace.grid
        g = grid.reshape(len(keep), L, S, P)
        g[:, L - 1, :, : P - 1] = 1.0
    keep_rows = grid[:, space.cells]
    abl = Ablation.build(spec, T, ablation, means, mean_positions, model=model)
    chunk = rows_for_budget(spec, T, model_dtype(model), memory_budget=memory_budget, batch_size=batch_size,
                            n_rows=len(keep), edge_space=False, outputs=len(keep))
    if not keep:
        return torch.empty(0, spec.d_vocab)
    with model_guard(model):
        b_O = torch.stack([attention_output(model, spec, l)[1].detach().float() for l in range(spec.n_layers)])
        verify_component_ablation(model, spec, tokens, b_O)
        return _logprobs(model, spec, tokens, space, keep_rows, abl, chunk).cpu()


# ---------------------------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------------------------
def component_table(result: StraceResult) -> pd.DataFrame:
    """One row per component of a component-level result, in rank order (unranked last):
    name, layer, head (-1 for MLPs), position (-1 unless per position), kind, rank, score, and
    ``first_size`` — the smallest stratum size that contains it. Filter ``first_size <= s`` for the
    components kept at size ``s``."""
    if result.config.get("granularity") != "component":
        raise InputError("component_table reads component-level results (tl_strace.component_strace); for a "
                         "token-level trace use project_trace(result) or result.subgraph(s).components().")
    names = list(result.config["components"])
    parsed = [parse_component(n) for n in names]
    sizes = result.sizes.tolist()
    df = pd.DataFrame({
        "name": names,
        "layer": [p[0] for p in parsed],
        "head": [p[1] for p in parsed],
        "position": [p[2] for p in parsed],
        "kind": ["mlp" if p[1] < 0 else "head" for p in parsed],
        "rank": result.rank.numpy(),
        "score": result.weights.numpy(),
        "first_size": [sizes[int(k)] for k in result.labels.tolist()],
    })
    key = np.where(df["rank"] >= 0, df["rank"], len(df) + np.arange(len(df)))
    return df.iloc[np.argsort(key, kind="stable")].reset_index(drop=True)


def project_trace(result: StraceResult) -> pd.DataFrame:
    """Way 1: which heads and MLPs a token-level trace uses at each of its sizes.

    One row per (stratum, component): ``size``, ``stratum``, ``component`` (``L3H7``/``MLP3``),
    ``layer``, ``head`` (-1 for MLPs), ``kind``, ``n_edges`` (the component's edges in the
    stratum: attention edges of the head, or MLP edges of the block), ``n_edges_total`` (its edges
    in the full graph), ``share`` = their ratio, ``weight`` (summed local weight of those edges)
    and ``used`` (``n_edges > 0``). Residual edges belong to no component.

    >>> df = project_trace(ts.strace(model, text))                          # doctest: +SKIP
    >>> df[(df["size"] == 1e-3) & df["used"]][["component", "share"]]       # doctest: +SKIP
    """
    if result.config.get("granularity", "token") != "token":
        raise InputError("project_trace projects a token-level trace (tl_strace.strace) onto components; this "
                         "result is already component-level (see component_table).")
    layout: EdgeLayout = result.layout
    L, H = layout.n_layers, layout.n_heads
    K = len(result.sizes)
    # The sizes as configured (exact decimals, so df["size"] == 1e-3 works), else the stored ones.
    cfg_sizes = result.config.get("sizes")
    sizes = [float(x) for x in cfg_sizes] if isinstance(cfg_sizes, list) and len(cfg_sizes) == K \
        else [float(x) for x in result.sizes.tolist()]
    a_lab, _, m_lab, _ = layout.split(result.labels.long())
    a_w, _, m_w, _ = layout.split(result.weights.double())
    a_lab = a_lab.reshape(L, H, -1)
    a_w = a_w.reshape(L, H, -1)
    valid_a = a_lab < NOT_IN_ANY
    valid_m = m_lab < NOT_IN_ANY
    n_tot = torch.cat([valid_a.sum(-1), valid_m.sum(-1)[:, None]], dim=1)  # [L, H+1]
    names = [_name(l, h if h < H else -1, -1) for l in range(L) for h in range(H + 1)]
    frames = []
    for k in range(K):
        ina = valid_a & (a_lab <= k)
        inm = valid_m & (m_lab <= k)
        n = torch.cat([ina.sum(-1), inm.sum(-1)[:, None]], dim=1)
        w = torch.cat([(a_w * ina).sum(-1), (m_w * inm).sum(-1)[:, None]], dim=1)
        frames.append(pd.DataFrame({
            "size": sizes[k],
            "stratum": k,
            "component": names,
            "layer": np.repeat(np.arange(L), H + 1),
            "head": np.tile(np.r_[np.arange(H), -1], L),
            "kind": np.tile(["head"] * H + ["mlp"], L),
            "n_edges": n.reshape(-1).numpy(),
            "n_edges_total": n_tot.reshape(-1).numpy(),
            "weight": w.reshape(-1).numpy(),
        }))
    df = pd.concat(frames, ignore_index=True)
    df["share"] = df["n_edges"] / df["n_edges_total"].where(df["n_edges_total"] > 0, 1)
    df["used"] = df["n_edges"] > 0
    return df[["size", "stratum", "component", "layer", "head", "kind", "n_edges", "n_edges_total", "share",
               "weight", "used"]]
