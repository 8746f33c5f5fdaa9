"""Zero and mean ablation of components (:class:`Ablation`), their hooks, batched masked forwards, and the
check that the hooks are on the computation path."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from jaxtyping import Float, Int
from typing import Any

import torch
from torch import Tensor

from tl_strace.components.space import ABLATIONS, ComponentSpace
from tl_strace.engine import masked_forwards
from tl_strace.errors import InputError, UnsupportedModelError
from tl_strace.mean import MEAN_POSITIONS, MeanCache
from tl_strace.model import ModelSpec, attention_without_heads, hook_name, model_dtype, run_hooked


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
        # x·k + abl·(1 − k): exactly x where k = 1 and exactly abl where k = 0 (abl + k·(x − abl)
        # rounds at k = 1), so a row keeping every component is the model's own output, bit for bit
        return x * k if self.abl is None else x * k + self.abl * (1 - k)


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


class ComponentMasks:
    """Component rows for :func:`tl_strace.engine.masked_forwards`: row ``i`` keeps component ``c``
    with weight ``keep[i, c]`` (1 kept, 0 ablated to ``abl``; values between mix the two, which the
    attribution scorer differentiates through)."""

    def __init__(self, spec: ModelSpec, space: ComponentSpace, keep: Float[Tensor, "row comp"], abl: Ablation,
                 *, device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.space, self.keep, self.device = spec, space, keep, device
        self.abl = abl.to(device, dtype)

    @property
    def n_rows(self) -> int:
        return int(self.keep.shape[0])

    def hooks(self, start: int, stop: int) -> list[tuple[str, Any]]:
        return _component_hooks(self.spec, self.space.grid(self.keep[start:stop].to(self.device)), self.abl)


def component_logprobs(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], space: ComponentSpace,
                       keep: Float[Tensor, "row comp"], abl: Ablation, *, chunk: int
                       ) -> Iterator[Float[Tensor, "chunk vocab"]]:
    """Yield float32 last-position log-probabilities for each keep row, ``chunk`` rows per forward
    (:class:`ComponentMasks` through :func:`tl_strace.engine.masked_forwards`).

    ``keep`` is 1 for a kept component and 0 for an ablated one (values between mix the two).
    The caller wraps the evaluation in :func:`tl_strace.model.model_guard`.
    """
    masks = ComponentMasks(spec, space, keep, abl, device=tokens.device, dtype=model_dtype(model))
    yield from masked_forwards(model, spec, tokens, masks, chunk=chunk)


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


def _logprobs(model: Any, spec: ModelSpec, tokens: Tensor, space: ComponentSpace, keep: Tensor,
              abl: Ablation, chunk: int) -> Tensor:
    return torch.cat(list(component_logprobs(model, spec, tokens, space, keep, abl, chunk=chunk)))
