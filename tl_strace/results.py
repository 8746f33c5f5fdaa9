"""The result of tracing one input: curves, density, the subgraphs themselves, and safe storage.

One type whatever the options (:class:`StraceResult`), with ``to_dataframe()`` like TransformerLens's
``PatchingResult``. Tensors are stored with safetensors and everything else as JSON in the same
file's metadata: loading a result someone sent you never runs code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_strace.density import (
    RECOVERY_LEVELS,
    auc_linear,
    auc_log,
    recovery_sizes,
    size_at_tolerance,
)
from tl_strace.errors import InputError, ResultsError
from tl_strace.graph import EDGE_TYPE_NAMES, EdgeLayout
from tl_strace.search import target_counts
from tl_strace.store import read_tensors, write_tensors

__all__ = ["FORMAT_VERSION", "StraceResult", "Subgraph"]

FORMAT_VERSION = 1
"""Version of the on-disk format written by :meth:`StraceResult.save`."""


@dataclass(frozen=True)
class Subgraph:
    """The edges of one stratum, as named, typed columns (one entry per edge, sorted by rank).

    ``type`` indexes ``("attn", "res_attn", "mlp", "res_mlp")``; ``head`` is -1 except for attention
    edges; ``target``/``source`` are token positions (equal for residual and MLP edges). ``weight``
    is the edge's local weight and ``rank`` the order in which the search added it.
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


@dataclass(frozen=True)
class StraceResult:
    """Everything one s-Trace (or threshold/nucleus) run measured on one input.

    Curves are ``[condition, stratum]`` tensors; ``conditions`` names the rows (``"only"``, then any
    of ``"random"``, ``"inverse"``). ``sizes`` is the x-axis (target σ for s-Trace, realised
    size for threshold/nucleus); ``counts`` the edges in each stratum; the last stratum is the full
    graph. ``labels``/``rank``/``weights`` describe the trace over the flat edge space (see
    :class:`tl_strace.graph.EdgeLayout`) and back :meth:`subgraph`.

    The convenience properties (``tv``, ``nucleus``, ``density``, ...) read the ``"only"`` row.
    """

    model: dict[str, Any]
    config: dict[str, Any]
    str_tokens: list[str]
    tokens: Int[Tensor, "pos"]
    target: int | None
    n_edges: int
    conditions: tuple[str, ...]
    sizes: Float[Tensor, "stratum"]
    counts: Int[Tensor, "stratum"]
    params: Float[Tensor, "stratum"]
    tv_all: Float[Tensor, "condition stratum"]
    kl_all: Float[Tensor, "condition stratum"]
    nucleus_all: Float[Tensor, "condition stratum"]
    entropy_all: Float[Tensor, "condition stratum"]
    ce_all: Float[Tensor, "condition stratum"]
    target_rank_all: Float[Tensor, "condition stratum"]
    reaches_input_all: Bool[Tensor, "condition stratum"]
    top_ids: Int[Tensor, "condition stratum k"]
    top_probs: Float[Tensor, "condition stratum k"]
    top_strs: list[list[list[str]]]
    full_top_ids: Int[Tensor, "k"]
    full_top_probs: Float[Tensor, "k"]
    full_top_strs: list[str]
    full_entropy: float
    full_ce: float
    full_target_rank: float
    labels: Int[Tensor, "edge"]
    rank: Int[Tensor, "edge"]
    weights: Float[Tensor, "edge"]
    timings: dict[str, float] = field(default_factory=dict)

    # ---------------------------------------------------------------- curves of the trace itself
    def _row(self, name: str) -> int:
        if name not in self.conditions:
            raise InputError(f"This result has no {name!r} condition; it has {list(self.conditions)}. "
                             f"Trace again with conditions including {name!r}.")
        return self.conditions.index(name)

    def curve(self, metric: str = "tv", condition: str = "only") -> Tensor:
        """One metric's curve over the strata for one condition.

        ``metric`` is one of tv, kl, nucleus, entropy, ce, target_rank, reaches_input.
        """
        attr = f"{metric}_all"
        if not hasattr(self, attr):
            raise InputError(f"Unknown metric {metric!r}; choose one of tv, kl, nucleus, entropy, ce, "
                             "target_rank, reaches_input.")
        return getattr(self, attr)[self._row(condition)]

    @property
    def tv(self) -> Float[Tensor, "stratum"]:
        """Total variation to the full model's distribution per stratum (the trace itself)."""
        return self.curve("tv")

    @property
    def nucleus(self) -> Float[Tensor, "stratum"]:
        """Shared nucleus (percent) per stratum."""
        return self.curve("nucleus")

    @property
    def kl(self) -> Float[Tensor, "stratum"]:
        return self.curve("kl")

    @property
    def layout(self) -> EdgeLayout:
        return EdgeLayout(int(self.model["n_layers"]), int(self.model["n_heads"]), len(self.str_tokens))

    # ---------------------------------------------------------------- density
    @property
    def density(self) -> float:
        """Paper B's density: area under TV over log10 s (higher = denser)."""
        return auc_log(self.sizes.numpy(), self.tv.numpy())

    @property
    def density_linear(self) -> float:
        """Paper A's density: area under TV over linear s."""
        return auc_linear(self.sizes.numpy(), self.tv.numpy())

    def recovery_sizes(self, levels: tuple[int, ...] = RECOVERY_LEVELS) -> dict[int, float]:
        """Smallest s whose shared nucleus reaches each level (percent)."""
        return recovery_sizes(self.sizes.numpy(), self.nucleus.numpy(), levels)

    def size_at_tv(self, eps: float) -> float:
        """Smallest s with TV ≤ ``eps``."""
        return size_at_tolerance(self.sizes.numpy(), self.tv.numpy(), eps)

    # ---------------------------------------------------------------- tables
    def to_dataframe(self) -> pd.DataFrame:
        """One row per (condition, stratum) with every metric and the subgraph's top token."""
        rows = []
        for c, cond in enumerate(self.conditions):
            for k in range(len(self.sizes)):
                rows.append({
                    "condition": cond,
                    "size": float(self.sizes[k]),
                    "param": float(self.params[k]),
                    "n_edges": int(self.counts[k]),
                    "tv": float(self.tv_all[c, k]),
                    "kl": float(self.kl_all[c, k]),
                    "nucleus": float(self.nucleus_all[c, k]),
                    "entropy": float(self.entropy_all[c, k]),
                    "ce": float(self.ce_all[c, k]),
                    "target_rank": float(self.target_rank_all[c, k]),
                    "reaches_input": bool(self.reaches_input_all[c, k]),
                    "top_token": self.top_strs[c][k][0],
                    "top_prob": float(self.top_probs[c, k, 0]),
                })
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """The input's scalar results: density, recovery sizes, full-model entropy and top token."""
        rec = self.recovery_sizes()
        return {
            "density": self.density,
            "density_linear": self.density_linear,
            **{f"recovery_{k}": v for k, v in rec.items()},
            "full_entropy": self.full_entropy,
            "full_top_token": self.full_top_strs[0],
            "full_ce": self.full_ce,
            "n_tokens": len(self.str_tokens),
            "n_edges": self.n_edges,
        }

    # ---------------------------------------------------------------- subgraphs
    def _stratum(self, s: float) -> int | None:
        for k, v in enumerate(self.sizes.tolist()):
            if math.isclose(v, s, rel_tol=1e-9, abs_tol=0.0):
                return k
        return None

    def subgraph(self, s: float) -> Subgraph:
        """The edges kept at size ``s``: a computed stratum, or (s-Trace only) any s up to the
        largest partial stratum, as the first ``floor(s·|E|)`` edges the search took."""
        if self.config.get("granularity", "token") == "component":
            raise InputError(
                "subgraph() returns token-level edges; this result is component-level (its strata are sets of "
                "heads and MLPs). Use tl_strace.components.component_table(result) and keep the rows with "
                "first_size <= s."
            )
        if not (0.0 < float(s) <= 1.0):
            raise InputError(f"Size must lie in (0, 1]; got {s}.")
        k = self._stratum(float(s))
        if k is not None:
            mask = self.labels <= k
            size = float(self.sizes[k])
        elif self.config.get("method") == "strace" and float(s) <= float(self.sizes[-2] if len(self.sizes) > 1 else 0):
            n = target_counts([float(s)], self.n_edges)[0]
            mask = (self.rank >= 0) & (self.rank < n)
            size = float(s)
        else:
            raise InputError(f"No stratum at s = {s}; this result has sizes {[float(x) for x in self.sizes]}.")
        ids = torch.nonzero(mask).flatten()
        ids = ids[torch.argsort(self.rank[ids], stable=True)]
        d = self.layout.decode(ids)
        return Subgraph(
            size=size, n_edges_total=self.n_edges, n_layers=int(self.model["n_layers"]),
            n_heads=int(self.model["n_heads"]), str_tokens=list(self.str_tokens), edge_id=ids,
            type=d["type"], layer=d["layer"], head=d["head"], target=d["target"], source=d["source"],
            weight=self.weights[ids], rank=self.rank[ids],
        )

    # ---------------------------------------------------------------- storage
    _TENSORS = ("tokens", "sizes", "counts", "params", "tv_all", "kl_all", "nucleus_all", "entropy_all", "ce_all",
                "target_rank_all", "reaches_input_all", "top_ids", "top_probs", "full_top_ids", "full_top_probs",
                "labels", "rank", "weights")

    def save(self, path: str | os.PathLike) -> None:
        """Write to one ``.safetensors`` file: tensors as tensors, the rest as JSON metadata.

        Written to a temporary file and renamed, so a crash never leaves a half-written result.
        """
        tensors = {n: getattr(self, n).contiguous().cpu() for n in self._TENSORS}
        tensors["labels"] = tensors["labels"].clamp(max=torch.iinfo(torch.int32).max).to(torch.int32)
        tensors["rank"] = tensors["rank"].to(torch.int32)
        tensors["reaches_input_all"] = tensors["reaches_input_all"].to(torch.uint8)
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._TENSORS}
        meta["conditions"] = list(self.conditions)
        meta["format_version"] = FORMAT_VERSION
        write_tensors(path, tensors, "tl_strace", meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StraceResult":
        """Read a result written by :meth:`save` (no code is executed: safetensors + JSON)."""
        path = os.fspath(path)
        meta, tensors = read_tensors(path, "tl_strace", what="tl_strace result file",
                                     missing=f"No result file at {path!r}.")
        if meta.pop("format_version", None) != FORMAT_VERSION:
            raise ResultsError(f"{path!r} was written by an incompatible tl_strace version.")
        tensors["labels"] = tensors["labels"].long()
        tensors["rank"] = tensors["rank"].long()
        tensors["reaches_input_all"] = tensors["reaches_input_all"].bool()
        meta["conditions"] = tuple(meta["conditions"])
        return cls(**meta, **tensors)

    def __repr__(self) -> str:
        return (f"StraceResult(model={self.model.get('name')!r}, tokens={len(self.str_tokens)}, "
                f"edges={self.n_edges}, method={self.config.get('method')!r}, strata={len(self.sizes)}, "
                f"density={self.density:.4f}, full_top={self.full_top_strs[0]!r})")

    # ---------------------------------------------------------------- views (tl_strace.views reads results;
    # imported lazily so results never depends on views at import time)
    def _repr_html_(self) -> str:
        """Jupyter display: summary, TV and shared-nucleus curves (with baselines) and the
        interactive circuit view; self-contained, no network (see :func:`tl_strace.views.circuit_view`)."""
        from tl_strace.views import circuit_view

        return circuit_view(self).html

    def save_html(self, path: str | os.PathLike, *, model: Any = None, **kwargs: Any) -> str:
        """Write a standalone HTML report (curves, circuit, table, composition, circuitsvis details);
        with ``model``, also the attention patterns restricted to the trace. Keywords as
        :func:`tl_strace.views.report_html`. Returns the path."""
        from tl_strace.views import save_report

        return save_report(self, path, model=model, **kwargs)

    def plot(self, metric: str = "tv", *, ax: Any = None) -> Any:
        """A matplotlib figure of ``metric`` against log s with the baselines and paper B's phases shaded."""
        from tl_strace.views import plot_curves

        return plot_curves(self, metric, ax=ax)

    def plot_shares(self) -> Any:
        """A matplotlib figure of the shares of attention/MLP/residual edges and of 4 layer groups vs s."""
        from tl_strace.views import plot_shares

        return plot_shares(self)
