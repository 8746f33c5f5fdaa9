"""The component scorers (l1, attribution, greedy), registered by name in :data:`COMPONENT_SCORERS`, and
:class:`ComponentOptions`, checked against that registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_strace import options
from tl_strace.components.ablate import Ablation, ComponentMasks, component_logprobs
from tl_strace.components.space import ABLATIONS, ComponentSpace
from tl_strace.errors import InputError
from tl_strace.mean import MEAN_POSITIONS
from tl_strace.metrics import kl_divergence, total_variation
from tl_strace.model import CleanRun, ModelSpec, model_dtype, run_hooked


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
    z = run.z  # [L, T, H, dh]
    mlp = run.mlp_out
    if ctx.abl.z is not None:
        z = z - ctx.abl.z.to(z.device)
        mlp = mlp - ctx.abl.mlp.to(mlp.device)
    # [L, T, H, d]; in sandwich / post-norm blocks through the post-attention norm linearised at the
    # clean run (what the block adds to the stream for each head), as in the token-level graph
    heads = run.attn_post_norm(torch.einsum("lthd,lhdm->lthm", z, run.W_O))
    # The last block through the final norm linearised at the clean run, as in the token-level graph
    # (only its last position is read: _relevant_mean).
    heads, mlp = run.normalise_last_block(heads), run.normalise_last_block(mlp)
    resid_pre, resid_mid = run.normalise_last_block(run.resid_pre), run.normalise_last_block(run.resid_mid)
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
    point = float(ctx.options["attribution_point"])
    C = ctx.space.size
    device = ctx.tokens.device
    m = torch.full((1, C), point, dtype=torch.float32, device=device, requires_grad=True)
    masks = ComponentMasks(ctx.spec, ctx.space, m, ctx.abl, device=device, dtype=model_dtype(ctx.model))
    with torch.enable_grad():
        logits = run_hooked(ctx.model, ctx.tokens[None], masks.hooks(0, 1), backend=ctx.spec.backend)
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
    attribution_point: Any = None

    def __post_init__(self) -> None:
        scorer = options.check_choice("scorer", self.scorer, COMPONENT_SCORERS)
        super().__post_init__()
        # Scorer settings apply to their scorer only, and are refused elsewhere rather than ignored.
        point = None if self.attribution_point is None else options.check_float("attribution_point",
                                                                                self.attribution_point)
        if point is not None and scorer != "attribution":
            raise InputError(f"attribution_point applies to scorer='attribution' only (scorer is {scorer!r}); "
                             "leave it None.")
        if scorer == "attribution":
            point = 0.5 if point is None else point
            if not 0.0 < point < 1.0:
                raise InputError(f"attribution_point must lie strictly between 0 and 1 (KL has no gradient at the "
                                 f"full model, m = 1); got {point}.")
        steps = options.check_int("greedy_steps", self.greedy_steps, minimum=1, optional=True)
        if steps is not None and scorer != "greedy":
            raise InputError(f"greedy_steps applies to scorer='greedy' only (scorer is {scorer!r}); leave it None.")
        self._canonical(scorer=scorer, attribution_point=point, greedy_steps=steps,
                        ablation=options.check_choice("ablation", self.ablation, ABLATIONS),
                        mean_positions=options.check_choice("mean_positions", self.mean_positions, MEAN_POSITIONS),
                        per_position=options.check_bool("per_position", self.per_position))
