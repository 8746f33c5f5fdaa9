"""Local edge weights (METHOD.md §2), computed from one clean run without gradients.

Each scheme maps :class:`~tl_strace.graph.NodeVectors` to a flat weight tensor over the edge space;
weights sum to 1 over every node's in-edges. Schemes are registered by name in :data:`WEIGHTS`:

* ``"l1"`` (paper B default): ``w_j = ‖z_j‖₁ / Σ_k ‖z_k‖₁``. Since ``‖pattern · u‖₁ = pattern · ‖u‖₁``,
  attention-edge weights never materialise the per-edge vectors.
* ``"ifr"`` (paper A option): proximity ``p_j = ‖y‖₁ − ‖y − z_j‖₁`` shifted by ``|min_k p_k|`` (no clamp at
  0), normalised to sum to 1 over the node's in-edges. This one does materialise the attention edge
  vectors, one target position at a time.

In parallel attention/MLP blocks (``vec.parallel``) a block node's in-edges are its skip, its
attention edges and its MLP edge, normalised together (:func:`_normalise_parallel`); the ``res_mlp``
block of the result is all 0 (no such edge).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout, Graph, NodeVectors

__all__ = ["WEIGHTS", "compute_weights", "ifr_weights", "l1_weights"]


def _normalise(attn: Tensor, res_attn: Tensor, mlp: Tensor, res_mlp: Tensor, causal: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Divide each node's in-edge scores by their sum (uniform where a node's scores sum to 0)."""
    attn = attn * causal
    tot_a = res_attn + attn.sum(dim=(1, 3))  # [L, T]
    n_in_a = 1 + causal.sum(dim=(1, 3))
    tot_m = mlp + res_mlp
    safe = lambda tot: torch.where(tot > 0, tot, torch.ones_like(tot))  # noqa: E731
    za, zm = tot_a <= 0, tot_m <= 0
    attn = torch.where(za[:, None, :, None], causal / n_in_a[:, None, :, None], attn / safe(tot_a)[:, None, :, None])
    res_attn = torch.where(za, 1.0 / n_in_a, res_attn / safe(tot_a))
    mlp_w = torch.where(zm, torch.full_like(mlp, 0.5), mlp / safe(tot_m))
    res_mlp_w = torch.where(zm, torch.full_like(res_mlp, 0.5), res_mlp / safe(tot_m))
    return attn, res_attn, mlp_w, res_mlp_w


def _normalise_parallel(attn: Tensor, res: Tensor, mlp: Tensor, causal: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_normalise` for a parallel block node (2l+2, t), whose 2 + H·(t+1) in-edges are the skip
    (``res``, in the ``res_attn`` slot), the attention edges and the MLP edge (uniform where the
    scores sum to 0). Returns the four blocks, ``res_mlp`` all 0."""
    attn = attn * causal
    tot = res + attn.sum(dim=(1, 3)) + mlp  # [L, T]
    n_in = 2 + causal.sum(dim=(1, 3))
    zero = tot <= 0
    safe = torch.where(zero, torch.ones_like(tot), tot)
    attn = torch.where(zero[:, None, :, None], causal / n_in[:, None, :, None], attn / safe[:, None, :, None])
    res = torch.where(zero, 1.0 / n_in, res / safe)
    mlp = torch.where(zero, 1.0 / n_in, mlp / safe)
    return attn, res, mlp, torch.zeros_like(mlp)


def _causal(vec: NodeVectors) -> Tensor:
    L, H, T, _ = vec.pattern.shape
    return torch.ones(T, T, dtype=vec.pattern.dtype, device=vec.pattern.device).tril().expand(L, H, T, T)


def _l1_scores(vec: NodeVectors) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The unnormalised L1 scores that are not per edge slot, over every block at once (cheap:
    ``[L, …]`` vectors): ``‖vo‖₁`` ``[L, S, H]`` and the token-local edges' ``‖·‖₁`` ``[L, T]``
    (``res_mlp`` is None in parallel blocks). Reduced over whole tensors, as always, so they round
    the same whatever the device splits a reduction by."""
    res_mlp = None if vec.parallel else vec.resid_mid.abs().sum(-1)
    return vec.vo.abs().sum(-1), vec.resid_pre.abs().sum(-1), vec.mlp_out.abs().sum(-1), res_mlp


def _l1_layer(vec: NodeVectors, l: int, scores: tuple[Tensor, Tensor, Tensor, Tensor | None], causal: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The L1 weights of block ``l`` (``scores``: :func:`_l1_scores`; ``causal``: ``[H, T, T]``):
    attention ``[1, H, T, T]`` and the three token-local edge types ``[1, T]``."""
    vo_l1, res_attn, mlp, res_mlp = scores
    attn = vec.pattern[l] * vo_l1[l].permute(1, 0)[:, None, :]  # [H, T, S]
    if res_mlp is None:
        return _normalise_parallel(attn[None], res_attn[l, None], mlp[l, None], causal[None])
    return _normalise(attn[None], res_attn[l, None], mlp[l, None], res_mlp[l, None], causal[None])


def l1_weights(vec: NodeVectors) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L1 weights per block: (attn [L,H,T,T], res_attn [L,T], mlp [L,T], res_mlp [L,T]).

    Computed one block at a time (:func:`_l1_layer`; :func:`compute_weights` writes each block
    straight into the flat edge space, so only one block's transients exist at a time)."""
    L, H, T, _ = vec.pattern.shape
    dt = torch.promote_types(vec.pattern.dtype, vec.vo.dtype)
    out = [torch.empty(L, H, T, T, dtype=dt, device=vec.pattern.device)] + [
        torch.empty(L, T, dtype=dt, device=vec.pattern.device) for _ in range(3)]
    _l1_into(vec, out)
    return out[0], out[1], out[2], out[3]


def _l1_into(vec: NodeVectors, out: Sequence[Tensor]) -> None:
    """Write the L1 weights of every block into ``out`` (four tensors shaped as :func:`l1_weights`'
    result, on any device: each block is computed where the vectors are and copied)."""
    L, H, T, _ = vec.pattern.shape
    scores = _l1_scores(vec)
    causal = torch.ones(T, T, dtype=vec.pattern.dtype, device=vec.pattern.device).tril().expand(H, T, T)
    for l in range(L):
        for dst, block in zip(out, _l1_layer(vec, l, scores, causal)):
            dst[l].copy_(block[0])


def ifr_weights(vec: NodeVectors) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """IFR proximity weights per block (see module docstring)."""
    L, H, T, _ = vec.pattern.shape
    causal = _causal(vec)
    attn = torch.zeros_like(vec.pattern)
    res_attn = torch.zeros(L, T, dtype=vec.pattern.dtype, device=vec.pattern.device)
    # attention-node vectors, b_O included: the node is Σ edges + b_O (parallel blocks: the block node)
    y_a = vec.resid_post if vec.parallel else vec.resid_mid
    y_norm = y_a.abs().sum(-1)  # [L, T]
    for t in range(T):  # per target position: [L, H, t+1, d] edge vectors at a time
        z = vec.pattern[:, :, t, : t + 1, None] * vec.vo[:, : t + 1].permute(0, 2, 1, 3)  # [L, H, S, d]
        attn[:, :, t, : t + 1] = y_norm[:, t, None, None] - (y_a[:, t, None, None, :] - z).abs().sum(-1)
    res_attn = y_norm - (y_a - vec.resid_pre).abs().sum(-1)
    if vec.parallel:  # one node: skip, attention and MLP proximities share one shift
        mlp = y_norm - (y_a - vec.mlp_out).abs().sum(-1)
        big = torch.finfo(attn.dtype).max
        lo = torch.minimum(torch.minimum(res_attn, mlp), attn.masked_fill(causal == 0, big).amin(dim=(1, 3)))
        shift = lo.abs()
        return _normalise_parallel((attn + shift[:, None, :, None]) * causal, res_attn + shift, mlp + shift, causal)
    y_m = vec.resid_post
    ym_norm = y_m.abs().sum(-1)
    mlp = ym_norm - (y_m - vec.mlp_out).abs().sum(-1)
    res_mlp = ym_norm - (y_m - vec.resid_mid).abs().sum(-1)
    # Shift each node's proximities by |min| over its in-edges, then normalise.
    big = torch.finfo(attn.dtype).max
    min_a = torch.minimum(res_attn, attn.masked_fill(causal == 0, big).amin(dim=(1, 3)))  # [L, T]
    attn = (attn + min_a.abs()[:, None, :, None]) * causal
    res_attn = res_attn + min_a.abs()
    min_m = torch.minimum(mlp, res_mlp)
    mlp, res_mlp = mlp + min_m.abs(), res_mlp + min_m.abs()
    return _normalise(attn, res_attn, mlp, res_mlp, causal)


WEIGHTS: dict[str, Callable[[NodeVectors], tuple[Tensor, Tensor, Tensor, Tensor]]] = {
    "l1": l1_weights,
    "ifr": ifr_weights,
}


def compute_weights(vec: NodeVectors, layout: EdgeLayout, scheme: str = "l1") -> Graph:
    """The weighted graph of one input under weighting ``scheme`` (a key of :data:`WEIGHTS`)."""
    if scheme not in WEIGHTS:
        raise InputError(f"Unknown weight scheme {scheme!r}; choose one of {sorted(WEIGHTS)}.")
    if layout.parallel != vec.parallel:
        raise InputError(f"The edge layout (parallel={layout.parallel}) does not match the node vectors "
                         f"(parallel={vec.parallel}); build both from the same model spec (spec.parallel).")
    # The flat edge space is made once and filled block by block (no second copy of it: issue 17).
    flat: Float[Tensor, "edge"] = torch.empty(layout.size, dtype=torch.float32)
    if scheme == "l1":
        _l1_into(vec, layout.split(flat))
    else:
        for dst, block in zip(layout.split(flat), WEIGHTS[scheme](vec)):
            dst.copy_(block)
    valid = layout.ancestors()
    return Graph(layout=layout, weights=flat.masked_fill_(~valid, 0.0), valid=valid)
