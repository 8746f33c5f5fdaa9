"""Each target node's in-edges as rows of tensors, in the one column order every search shares.

A node's in-edges are listed *residual edge first, then attention edges head-major and
source-minor* (then, in a parallel block node, the MLP edge). :func:`reference_strace_order` pushes
a node's in-edges onto its heap in this order, so the column of an edge among its node's valid
in-edges, :func:`_canonical`, is its rank in the heap's insertion counter among that node's edges.
Nucleus strata read the same rows to sort each node's in-edges by weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_strace.graph import EdgeLayout, EdgeType


@dataclass(frozen=True)
class InEdgeRows:
    """The in-edges of one kind of target node: row ``[l, t]`` lists the in-edges of that kind's node
    in block ``l`` at position ``t``, one column per edge slot, in canonical order."""

    weight: Float[Tensor, "layer pos column"]
    edge: Int[Tensor, "layer pos column"]  # edge id in the flat edge space
    source: Int[Tensor, "layer pos column"]  # source node id
    valid: Bool[Tensor, "layer pos column"]  # False where attention would look ahead (source after target)


class BlockRows(NamedTuple):
    """The in-edge rows of a block's two kinds of target node (indexed 0 and 1 by :func:`_row_nodes`).

    ``attn``: the nodes the attention sublayer writes, ``resid_mid`` (graph layer ``2l+1``) —
    ``[L, T, 1+H·T]``: the skip edge, then the attention edges. In parallel blocks these are the
    block nodes ``(2l+2, t)``, ``[L, T, 1+H·T+1]``, with the MLP edge last.
    ``mlp``: the nodes the MLP writes, ``resid_post`` (``2l+2``) — ``[L, T, 2]``: the skip edge, then
    the MLP edge; empty (``[L, T, 0]``) in parallel blocks, which have no such node.
    """

    attn: InEdgeRows
    mlp: InEdgeRows


def _in_edge_rows(layout: EdgeLayout, weights: Tensor) -> BlockRows:
    """The in-edge rows of every target node, weights in float64 (see :class:`BlockRows`)."""
    L, H, T = layout.n_layers, layout.n_heads, layout.n_pos
    w_a, w_ra, w_m, w_rm = layout.split(weights.double())
    lidx = torch.arange(L)[:, None]
    tidx = torch.arange(T)[None, :]
    ids_ra = layout.offset(EdgeType.RES_ATTN) + lidx * T + tidx  # [L, T]
    # each destination node (l, t) lists its attention in-edges head-major: column h·T + s
    by_node = "layer head dst src -> layer dst (head src)"
    ids_a = rearrange(torch.arange(layout.n_attn).reshape(L, H, T, T), by_node)
    W_att = torch.cat([w_ra[..., None], rearrange(w_a, by_node)], dim=-1)
    I_att = torch.cat([ids_ra[..., None], ids_a], dim=-1)
    s_src = torch.arange(T).repeat(H)  # source position per attention column
    S_att = torch.cat([(2 * lidx * T + tidx)[..., None], (2 * lidx * T)[..., None] + s_src[None, None, :].expand(L, T, H * T)], dim=-1)
    V_att = torch.cat([torch.ones(L, T, 1, dtype=torch.bool),
                       (s_src[None, :] <= torch.arange(T)[:, None]).expand(L, T, H * T)], dim=-1)
    W_mlp = torch.stack([w_rm, w_m], dim=-1)
    I_mlp = torch.stack([layout.offset(EdgeType.RES_MLP) + lidx * T + tidx, layout.offset(EdgeType.MLP) + lidx * T + tidx], dim=-1).expand(L, T, 2)
    S_mlp = ((2 * lidx + 1) * T + tidx)[..., None].expand(L, T, 2)
    V_mlp = torch.ones(L, T, 2, dtype=torch.bool)
    if layout.parallel:  # the MLP edge (source (2l, t)) joins the block node's row; no MLP nodes
        W_att = torch.cat([W_att, w_m[..., None]], dim=-1)
        I_att = torch.cat([I_att, I_mlp[..., 1:]], dim=-1)
        S_att = torch.cat([S_att, S_att[..., :1]], dim=-1)
        V_att = torch.cat([V_att, torch.ones(L, T, 1, dtype=torch.bool)], dim=-1)
        W_mlp, I_mlp, S_mlp, V_mlp = W_mlp[..., :0], I_mlp[..., :0], S_mlp[..., :0], V_mlp[..., :0]
    return BlockRows(attn=InEdgeRows(W_att, I_att, S_att, V_att), mlp=InEdgeRows(W_mlp, I_mlp, S_mlp, V_mlp))


def _row_nodes(layout: EdgeLayout, l: int) -> tuple[tuple[int, int], ...]:
    """``(row kind, graph layer)`` of block ``l``'s target nodes, top first: kind 0 the rows
    :attr:`BlockRows.attn`, kind 1 :attr:`BlockRows.mlp`. Parallel blocks have only the block node."""
    return ((0, 2 * l + 2),) if layout.parallel else ((1, 2 * l + 2), (0, 2 * l + 1))


def _canonical(layout: EdgeLayout, ids: Tensor) -> Tensor:
    """Each edge's column among its target node's *valid* in-edges in :func:`_in_edge_rows`: the
    residual edge 0, attention edges ``1 + h·(t+1) + s`` (the ``t+1`` valid sources of each head
    before head ``h``), the MLP edge 1 (in a parallel block node, after the attention edges:
    ``1 + H·(t+1)``). The plain heap numbers a node's in-edges in exactly this order when it
    pushes them (:mod:`tl_strace.search.strace` explains why the fast search needs that)."""
    d = layout.decode(ids)
    kind = d["type"]
    attn = 1 + d["head"] * (d["target"] + 1) + d["source"]
    mlp_col = 1 + layout.n_heads * (d["target"] + 1) if layout.parallel else torch.ones_like(ids)
    return torch.where(kind == EdgeType.ATTN, attn, torch.where(kind == EdgeType.MLP, mlp_col, torch.zeros_like(ids)))
