"""The numbers every view draws, computed from a :class:`~tl_strace.results.StraceResult` alone.

No model is needed: strata labels, ranks and local weights over the flat edge space (see
:class:`tl_strace.graph.EdgeLayout`) are enough to aggregate a trace of any size to components, and
to push the output's unit of weight back through the kept edges (*flow*, below).

Components are indexed ``c``: heads ``l·H + h`` first, then the MLP of each layer (``L·H + l``),
then each layer's two skip connections together (``L·H + L + l``).

**Flow.** Put mass 1 on the output node and walk the graph backwards: every node passes its mass to
its in-edges in proportion to their local weights (which sum to 1 over a node's in-edges), keeping
only the edges of the stratum. The mass an edge carries is its *flow*; a component's flow is the sum
over its edges, and an input token's contribution is the mass that reaches its embedding node. In
the full graph the flows into each graph layer sum to 1, so token contributions sum to 1; in a
stratum they sum to at most 1 (the rest is lost at dropped edges).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.results import StraceResult, TraceResult

__all__ = [
    "KIND_NAMES",
    "ComponentStats",
    "component_stats",
    "default_stratum",
    "edge_shares",
    "is_token_level",
    "require_token_level",
    "stratum_index",
    "token_contributions",
    "token_edges",
]

KIND_NAMES = ("head", "mlp", "skip")
"""Component kinds, indexed by :attr:`ComponentStats.kind`."""


@dataclass(frozen=True)
class ComponentStats:
    """Per stratum and component: edges in the trace, their summed local weight, and their flow.

    Every ``[stratum, component]`` table is cumulative: row ``k`` describes stratum ``k`` (edges with
    label ``<= k``). ``token_flow[k, t]`` is input token ``t``'s contribution at stratum ``k``.
    """

    n_layers: int
    n_heads: int
    names: list[str]
    kind: Int[Tensor, "component"]
    layer: Int[Tensor, "component"]
    head: Int[Tensor, "component"]
    n_total: Int[Tensor, "component"]
    n_edges: Int[Tensor, "stratum component"]
    weight: Float[Tensor, "stratum component"]
    flow: Float[Tensor, "stratum component"]
    token_flow: Float[Tensor, "stratum pos"]

    @property
    def n_components(self) -> int:
        return len(self.names)

    def first_stratum(self) -> Int[Tensor, "component"]:
        """The first stratum each component has an edge in (``n_strata`` if none)."""
        K = self.n_edges.shape[0]
        present = self.n_edges > 0
        first = torch.where(present.any(0), present.float().argmax(0), torch.full_like(self.kind, K))
        return first


def is_token_level(res: TraceResult) -> bool:
    """Whether ``res`` is a token-level trace (labels over the flat edge space), as views need."""
    return isinstance(res, StraceResult) and int(res.labels.numel()) == res.layout.size


def require_token_level(res: TraceResult, what: str) -> None:
    """Refuse component-granularity results (their strata are sets of heads/MLPs) with a clear message."""
    if not is_token_level(res):
        raise InputError(
            f"{what} needs a token-level trace (tl_strace.strace); this result has granularity "
            f"{res.config.get('granularity')!r}. Its curves plot with plot_curves(res); for its components "
            "use tl_strace.components.component_table(res)."
        )


def _component_index(res: TraceResult) -> Int[Tensor, "edge"]:
    """Component of every slot of the flat edge space (see the module docstring)."""
    lay = res.layout
    L, H, T = lay.n_layers, lay.n_heads, lay.n_pos
    heads = (torch.arange(L)[:, None] * H + torch.arange(H)[None, :])[:, :, None, None].expand(L, H, T, T)
    mlp = (L * H + torch.arange(L))[:, None].expand(L, T)
    skip = (L * H + L + torch.arange(L))[:, None].expand(L, T)
    return lay.join(heads, skip, mlp, skip)


_CACHE: dict[int, tuple[weakref.ref, ComponentStats]] = {}


def component_stats(res: TraceResult) -> ComponentStats:
    """Aggregate a result's trace to components and compute flows, for every stratum at once.

    Costs a few passes over the flat edge space (about a second for 10⁶ slots on a small CPU); the
    last few results' tables are cached (results are immutable), so a report computes them once.
    """
    require_token_level(res, "component_stats")
    hit = _CACHE.get(id(res))
    if hit is not None and hit[0]() is res:
        return hit[1]
    st = _component_stats(res)
    for key in [k for k, (ref, _) in _CACHE.items() if ref() is None]:
        del _CACHE[key]
    if len(_CACHE) >= 8:
        del _CACHE[next(iter(_CACHE))]
    _CACHE[id(res)] = (weakref.ref(res), st)
    return st


def _component_stats(res: TraceResult) -> ComponentStats:
    lay = res.layout
    L, H, T = lay.n_layers, lay.n_heads, lay.n_pos
    K = int(res.sizes.numel())
    C = L * H + 2 * L
    labels = res.labels.long()
    w = res.weights.double()
    comp = _component_index(res)
    valid = labels < K
    key = labels[valid] * C + comp[valid]
    new_n = torch.bincount(key, minlength=K * C).reshape(K, C)
    new_w = torch.bincount(key, weights=w[valid], minlength=K * C).reshape(K, C)
    n_edges = new_n.cumsum(0)
    weight = new_w.cumsum(0)

    # Flow, all strata at once. Attention weights are first summed into cumulative tables per stratum
    # (Σ_h kept w[h,t,s] → A[l,k,t,s] and Σ_s kept w[h,t,s] → Hd[l,k,h,t]), so the backward walk costs
    # O(L·K·T²) instead of O(L·K·H·T²).
    a_lab, ra_lab, m_lab, rm_lab = lay.split(labels)
    a_w, ra_w, m_w, rm_w = lay.split(w)
    ar = torch.arange
    li, hi, ti, si = (x.expand(L, H, T, T).flatten() for x in (
        ar(L)[:, None, None, None], ar(H)[None, :, None, None], ar(T)[None, None, :, None], ar(T)[None, None, None, :]))
    lab_f, w_f = a_lab.flatten(), a_w.flatten()
    keep = lab_f < K
    li, hi, ti, si, lab_f, w_f = li[keep], hi[keep], ti[keep], si[keep], lab_f[keep], w_f[keep]
    A = torch.zeros(L * K * T * T, dtype=torch.float64).index_add_(0, ((li * K + lab_f) * T + ti) * T + si, w_f)
    A = A.reshape(L, K, T, T).cumsum(1)
    Hd = torch.zeros(L * K * H * T, dtype=torch.float64).index_add_(0, ((li * K + lab_f) * H + hi) * T + ti, w_f)
    Hd = Hd.reshape(L, K, H, T).cumsum(1)
    ks = ar(K)
    flow = torch.zeros(K, C, dtype=torch.float64)
    mass = torch.zeros(K, T, dtype=torch.float64)
    mass[:, T - 1] = 1.0
    for l in range(L - 1, -1, -1):
        f_mlp = mass * m_w[l] * (m_lab[l][None, :] <= ks[:, None])
        if lay.parallel:  # one node per block: skip, heads and MLP all leave the block input (2l, t)
            f_ra = mass * ra_w[l] * (ra_lab[l][None, :] <= ks[:, None])
            flow[:, l * H:(l + 1) * H] = torch.einsum("kt,kht->kh", mass, Hd[l])
            flow[:, L * H + l] = f_mlp.sum(-1)
            flow[:, L * H + L + l] = f_ra.sum(-1)
            mass = torch.einsum("kt,kts->ks", mass, A[l]) + f_ra + f_mlp
            continue
        f_rm = mass * rm_w[l] * (rm_lab[l][None, :] <= ks[:, None])
        mid = f_mlp + f_rm  # [K, T] mass at resid_mid (both edges leave from it)
        f_ra = mid * ra_w[l] * (ra_lab[l][None, :] <= ks[:, None])
        flow[:, l * H:(l + 1) * H] = torch.einsum("kt,kht->kh", mid, Hd[l])
        flow[:, L * H + l] = f_mlp.sum(-1)
        flow[:, L * H + L + l] = (f_rm + f_ra).sum(-1)
        mass = torch.einsum("kt,kts->ks", mid, A[l]) + f_ra
    kind = torch.cat([torch.zeros(L * H), torch.ones(L), torch.full((L,), 2)]).long()
    layer = torch.cat([torch.arange(L).repeat_interleave(H), torch.arange(L), torch.arange(L)])
    head = torch.cat([torch.arange(H).repeat(L), torch.full((2 * L,), -1)])
    names = ([f"L{l}H{h}" for l in range(L) for h in range(H)] + [f"MLP{l}" for l in range(L)]
             + [f"skip L{l}" for l in range(L)])
    return ComponentStats(
        n_layers=L, n_heads=H, names=names, kind=kind, layer=layer, head=head,
        n_total=n_edges[-1].clone(), n_edges=n_edges, weight=weight.float(), flow=flow.float(),
        token_flow=mass.float(),
    )


def stratum_index(res: TraceResult, s: float | None) -> int:
    """The stratum closest to ``s`` on a log axis (``None``: :func:`default_stratum`)."""
    if s is None:
        return default_stratum(res)
    s = float(s)
    if not 0.0 < s <= 1.0:
        raise InputError(f"Size must lie in (0, 1]; got {s}.")
    sizes = res.sizes.double().clamp_min(1e-12)
    return int(torch.argmin((sizes.log10() - torch.tensor(s).double().log10()).abs()))


def default_stratum(res: TraceResult) -> int:
    """The stratum a view opens on: the first whose top token is the full model's (shared nucleus
    ≥ 1%), else the stratum closest to s = 1e-2."""
    hit = torch.nonzero(res.nucleus >= 1.0).flatten()
    if hit.numel():
        return int(hit[0])
    return stratum_index(res, 1e-2)


def token_contributions(res: TraceResult, s: float | None = None) -> Float[Tensor, "pos"]:
    """Each input token's contribution to the output at size ``s``: the flow reaching its
    embedding node through the kept edges (see the module docstring). Sums to 1 in the full graph.

    ``s`` picks the nearest stratum on a log axis; ``None`` the stratum views open on.
    """
    return component_stats(res).token_flow[stratum_index(res, s)]


def edge_shares(res: TraceResult, n_groups: int = 4) -> pd.DataFrame:
    """Composition of the trace per stratum (paper B's figure): the shares of attention, MLP and
    residual edges, and of ``n_groups`` equal groups of layers (earliest first).

    One row per stratum with columns ``size``, ``n_edges``, ``attn``, ``mlp``, ``residual`` and one
    ``layers a-b`` column per group; every share is a fraction of the stratum's edges.
    """
    if n_groups < 1:
        raise InputError(f"n_groups must be at least 1; got {n_groups}.")
    st = component_stats(res)
    n = st.n_edges.double()
    total = n.sum(1).clamp_min(1.0)
    out = {"size": res.sizes.double().numpy(), "n_edges": n.sum(1).long().numpy()}
    for k, name in enumerate(("attn", "mlp", "residual")):
        out[name] = (n[:, st.kind == k].sum(1) / total).numpy()
    L = st.n_layers
    group = torch.div(st.layer * n_groups, L, rounding_mode="floor")
    for g in range(n_groups):
        ls = [l for l in range(L) if l * n_groups // L == g]
        if ls:  # more groups than layers leaves some empty
            out[f"layers {ls[0]}-{ls[-1]}"] = (n[:, group == g].sum(1) / total).numpy()
    return pd.DataFrame(out)


def token_edges(res: TraceResult, *, max_edges: int = 2000, per_head: int = 12) -> dict[str, Tensor]:
    """The token-level edges a page embeds: the first ``max_edges`` the search took (all types),
    plus each head's first ``per_head`` edges, never the whole graph.

    Edges the search never took (beyond its largest partial stratum) rank after all taken ones,
    by weight. Returns flat edge ids sorted by that order, with their ranks (``-1``: not taken).
    """
    require_token_level(res, "token_edges")
    if max_edges < 0 or per_head < 0:
        raise InputError(f"max_edges and per_head must be non-negative; got {max_edges}, {per_head}.")
    lay = res.layout
    K = int(res.sizes.numel())
    valid = res.labels < K
    rank = res.rank.long()
    # A unique sort key per edge (so the selection never depends on how ties are broken): taken edges
    # by rank, then the rest by decreasing weight, then by id.
    key = torch.where(rank >= 0, rank, torch.zeros_like(rank)).double()
    untaken = torch.nonzero(valid & (rank < 0)).flatten()
    order = untaken[torch.argsort(-res.weights.double()[untaken], stable=True)]
    key[order] = float(lay.size) + torch.arange(order.numel(), dtype=torch.float64)
    key = key.masked_fill(~valid, float("inf"))
    chosen = []
    n_valid = int(valid.sum())
    if max_edges:
        chosen.append(torch.topk(key, min(max_edges, n_valid), largest=False, sorted=False).indices)
    if per_head:
        L, H, T = lay.n_layers, lay.n_heads, lay.n_pos
        a = key[: lay.n_attn].reshape(L * H, T * T)
        idx = torch.topk(a, min(per_head, T * T), dim=1, largest=False, sorted=False).indices
        flat = (torch.arange(L * H)[:, None] * (T * T) + idx).flatten()
        chosen.append(flat[torch.isfinite(key[flat])])
    ids = torch.unique(torch.cat(chosen)) if chosen else torch.zeros(0, dtype=torch.long)
    ids = ids[torch.argsort(key[ids], stable=True)]
    return {"ids": ids, "rank": rank[ids]}
