"""Paper A's stratifications: threshold strata (edges with weight > τ, then the part connected to
the output node) and nucleus strata (at each reached node, the shortest weight-sorted prefix of its
in-edges whose cumulative weight reaches τ)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout, Graph
from tl_strace.search._rows import _in_edge_rows, _row_nodes
from tl_strace.search._strata import Strata, _strata_from_masks

DEFAULT_THRESHOLD_TAUS: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 1e-3, 5e-4, 2e-4, 1e-4)
DEFAULT_NUCLEUS_TAUS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)


def _by_target_layer(layout: EdgeLayout) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Source and target node of every edge slot, and the slots grouped by target graph layer."""
    ids = torch.arange(layout.size)
    src, tgt = layout.node_ids(ids)
    tgt_layer = torch.div(tgt, layout.n_pos, rounding_mode="floor")
    groups = [torch.nonzero(tgt_layer == g).flatten() for g in range(2 * layout.n_layers + 1)]
    return src, tgt, groups


def _connected(layout: EdgeLayout, keep: Bool[Tensor, "edge"], src: Tensor, tgt: Tensor,
               groups: list[Tensor]) -> Bool[Tensor, "edge"]:
    """Kept edges whose target is reachable from the output node through kept edges."""
    reach = torch.zeros(layout.n_nodes, dtype=torch.bool)
    reach[layout.output_node] = True
    out = torch.zeros_like(keep)
    for g in range(2 * layout.n_layers, 0, -1):
        idx = groups[g]
        sel = idx[keep[idx] & reach[tgt[idx]]]
        out[sel] = True
        reach[src[sel]] = True
    return out


def _check_taus(taus: Sequence[float], name: str) -> list[float]:
    vals = [float(t) for t in taus]
    if not vals or any(not (0.0 <= t <= 1.0) for t in vals) or len(set(vals)) != len(vals):
        raise InputError(f"{name} values must be distinct numbers in [0, 1]; got {list(taus)}.")
    return vals


def threshold_strata(graph: Graph, taus: Sequence[float] | None = None) -> Strata:
    """Paper A's threshold strata: edges with weight > τ, connected to the output; one per τ."""
    taus = sorted(_check_taus(taus or DEFAULT_THRESHOLD_TAUS, "Threshold"), reverse=True)
    src, tgt, groups = _by_target_layer(graph.layout)
    masks = [_connected(graph.layout, graph.valid & (graph.weights > t), src, tgt, groups) for t in taus]
    return _strata_from_masks("threshold", graph, masks, taus)


def nucleus_strata(graph: Graph, taus: Sequence[float] | None = None) -> Strata:
    """Paper A's nucleus strata: at each reached node the shortest weight-sorted prefix of its
    in-edges whose cumulative weight reaches τ (at least one); one stratum per τ."""
    taus = sorted(_check_taus(taus or DEFAULT_NUCLEUS_TAUS, "Nucleus"))
    layout = graph.layout
    L, T = layout.n_layers, layout.n_pos
    sorted_rows = []  # per row kind (BlockRows order): cumulative weight, edge, source, valid count
    for rows in _in_edge_rows(layout, graph.weights):
        W, V = rows.weight, rows.valid
        key = torch.where(V, -W, torch.full_like(W, math.inf))
        _, order = torch.sort(key, dim=-1, stable=True)
        Ws = torch.gather(torch.where(V, W, torch.zeros_like(W)), -1, order)
        sorted_rows.append((Ws.cumsum(-1), torch.gather(rows.edge, -1, order), torch.gather(rows.source, -1, order),
                            V.sum(-1)))
    masks = []
    for tau in taus:
        reach = torch.zeros(layout.n_nodes, dtype=torch.bool)
        reach[layout.output_node] = True
        keep = torch.zeros(layout.size, dtype=torch.bool)
        for l in range(L - 1, -1, -1):
            for kind, g in _row_nodes(layout, l):
                cum, ids, srcs, cnt = (x[l] for x in sorted_rows[kind])
                n_keep = torch.clamp((cum < tau - 1e-12).sum(-1) + 1, max=cnt)  # [T]
                row_on = reach[g * T + torch.arange(T)]
                sel = (torch.arange(cum.shape[-1])[None, :] < n_keep[:, None]) & row_on[:, None]
                keep[ids[sel]] = True
                reach[srcs[sel]] = True
        masks.append(keep)
    return _strata_from_masks("nucleus", graph, masks, taus)
