""":class:`StraceResult`: the result of a token-level trace (:func:`tl_strace.strace`), and its subgraphs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from jaxtyping import Float, Int
from typing import ClassVar

import torch
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout
from tl_strace.results.result import TraceResult
from tl_strace.results.subgraph import Subgraph
from tl_strace.search import target_counts


@dataclass(frozen=True, kw_only=True)
class StraceResult(TraceResult):
    """A token-level trace (:func:`tl_strace.strace`): strata are sets of edges of the graph of
    METHOD.md §1. ``labels``/``rank``/``weights`` describe the trace over the flat edge space (see
    :class:`tl_strace.graph.EdgeLayout`) and back :meth:`subgraph`; ``n_edges`` is ``|E|``."""

    GRANULARITY: ClassVar[str] = "token"
    UNIT: ClassVar[str] = "edges"
    _TRACE: ClassVar[tuple[str, str, str, str]] = ("n_edges", "labels", "rank", "weights")

    n_edges: int
    #: per edge slot: the first stratum containing the edge (NOT_IN_ANY for non-edges)
    labels: Int[Tensor, "edge"]
    #: per edge slot: its position in the search order, -1 if the search never took it
    rank: Int[Tensor, "edge"]
    #: per edge slot: the edge weight the search ranked by (the weight rule's, e.g. L1)
    weights: Float[Tensor, "edge"]

    @property
    def layout(self) -> EdgeLayout:
        return EdgeLayout(int(self.model["n_layers"]), int(self.model["n_heads"]), len(self.str_tokens),
                          parallel=self.model.get("block_kind") == "parallel")

    # ---------------------------------------------------------------- subgraphs
    def _stratum(self, s: float) -> int | None:
        for k, v in enumerate(self.sizes.tolist()):
            if math.isclose(v, s, rel_tol=1e-9, abs_tol=0.0):
                return k
        return None

    def subgraph(self, s: float) -> Subgraph:
        """The edges kept at size ``s``: a computed stratum, or (s-Trace only) any s up to the
        largest partial stratum, as the first ``floor(s·|E|)`` edges the search took."""
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
