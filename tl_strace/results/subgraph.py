""":class:`Subgraph`: the edges of one stratum as named, typed columns."""

from __future__ import annotations

from dataclasses import dataclass
from jaxtyping import Float, Int

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tl_strace.graph import EDGE_TYPE_NAMES


@dataclass(frozen=True)
class Subgraph:
    """The edges of one stratum, as named, typed columns (one entry per edge, sorted by rank).

    ``type`` indexes ``("attn", "res_attn", "mlp", "res_mlp")`` (in parallel blocks ``res_attn`` is the
    block's one skip edge and no edge is ``res_mlp``); ``head`` is -1 except for attention edges;
    ``target``/``source`` are token positions (equal for residual and MLP edges). ``weight`` is the
    edge's local weight and ``rank`` the order in which the search added it.
    """

    size: float
    n_edges_total: int
    n_layers: int
    n_heads: int
    str_tokens: list[str]
    edge_id: Int[Tensor, "edge"]
    type: Int[Tensor, "edge"]
    layer: Int[Tensor, "edge"]
    head: Int[Tensor, "edge"]
    target: Int[Tensor, "edge"]
    source: Int[Tensor, "edge"]
    weight: Float[Tensor, "edge"]
    rank: Int[Tensor, "edge"]

    def __len__(self) -> int:
        return int(self.edge_id.numel())

    def names(self) -> list[str]:
        """Readable edge names: ``L3H7 5←2`` (head 7 of block 3 moves token 2 into 5), ``MLP3 5``,
        ``L3 skip→attn 5``, ``L3 skip→mlp 5``."""
        out = []
        for k, l, h, t, s in zip(self.type.tolist(), self.layer.tolist(), self.head.tolist(),
                                 self.target.tolist(), self.source.tolist()):
            out.append(
                f"L{l}H{h} {t}←{s}" if k == 0 else f"L{l} skip→attn {t}" if k == 1 else f"MLP{l} {t}" if k == 2
                else f"L{l} skip→mlp {t}"
            )
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per edge: name, type, layer, head, target/source positions and tokens, weight, rank."""
        toks = self.str_tokens
        tgt, src = self.target.tolist(), self.source.tolist()
        return pd.DataFrame({
            "name": self.names(),
            "type": [EDGE_TYPE_NAMES[k] for k in self.type.tolist()],
            "layer": self.layer.numpy(),
            "head": self.head.numpy(),
            "target": tgt,
            "source": src,
            "target_token": [toks[t] for t in tgt],
            "source_token": [toks[s] for s in src],
            "weight": self.weight.numpy(),
            "rank": self.rank.numpy(),
        })

    def components(self) -> pd.DataFrame:
        """Which heads and MLPs this subgraph uses: edges and summed weight per component
        (``L3H7`` / ``MLP3``), sorted by layer. Residual edges are not components.

        Grouped over tensors (no per-edge Python objects: a subgraph can hold millions of edges)."""
        keep = (self.type == 0) | (self.type == 2)
        layer, head, kind, weight = self.layer[keep], self.head[keep], self.type[keep], self.weight[keep]
        mlp = 1 << 20  # head slot of an MLP: after every head of its layer
        key = layer.long() * (mlp + 1) + torch.where(kind == 0, head.long(), torch.full_like(head.long(), mlp))
        uniq, inv, n = torch.unique(key, return_inverse=True, return_counts=True)
        wsum = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, weight.double())
        # ties (same layer and edge count) in the order the subgraph's edges first reach each component
        first = torch.full((uniq.numel(),), len(self), dtype=torch.long).scatter_reduce_(
            0, inv, torch.nonzero(keep).flatten(), reduce="amin")
        lay, slot = (uniq // (mlp + 1)).tolist(), (uniq % (mlp + 1)).tolist()
        df = pd.DataFrame({
            "component": [f"MLP{l}" if h == mlp else f"L{l}H{h}" for l, h in zip(lay, slot)],
            "layer": np.asarray(lay, dtype=np.int64),
            "n_edges": n.numpy().astype(np.int64),
            "weight": wsum.numpy(),
            "_first": first.numpy(),
        })
        df = df.sort_values(["layer", "n_edges", "_first"], ascending=[True, False, True])
        return df.drop(columns="_first").reset_index(drop=True)

    def component_shares(self) -> pd.DataFrame:
        """:meth:`components` plus each component's edge count in the full graph (``n_edges_total``)
        and the share of them this subgraph keeps (``share``).

        A head of block l < L-1 has T(T+1)/2 attention edges and an MLP T edges; in the last block
        only position T-1 reaches the output (T and 1 edges). See also
        :func:`tl_strace.components.project_trace` for every stratum at once.
        """
        df = self.components()
        T, L = len(self.str_tokens), self.n_layers
        last = (df["layer"] == L - 1).to_numpy(dtype=bool)
        is_mlp = df["component"].astype(str).str.startswith("MLP").to_numpy(dtype=bool)
        total = np.where(is_mlp, np.where(last, 1, T), np.where(last, T, T * (T + 1) // 2)).astype(np.int64)
        return df.assign(n_edges_total=total, share=df["n_edges"].to_numpy(dtype=np.float64) / np.maximum(total, 1))
