""":class:`ComponentResult`: the result of a component-level trace (:func:`tl_strace.components.component_strace`)."""

from __future__ import annotations

from dataclasses import dataclass
from jaxtyping import Float, Int
from typing import Any, ClassVar

from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.results.result import TraceResult


@dataclass(frozen=True, kw_only=True)
class ComponentResult(TraceResult):
    """A component-level trace (:func:`tl_strace.components.component_strace`): strata are sets of
    heads and MLPs (optionally per position), named in ``config["components"]``; ``n_components``
    is how many there are. ``labels``/``rank``/``scores`` are per component, in that order; a
    component's subgraph keeps every residual edge. Tables: ``tl_strace.components.component_table(result)``."""

    GRANULARITY: ClassVar[str] = "component"
    UNIT: ClassVar[str] = "components"
    _TRACE: ClassVar[tuple[str, str, str, str]] = ("n_components", "labels", "rank", "scores")

    n_components: int
    #: per component: the first stratum containing it
    labels: Int[Tensor, "component"]
    #: per component: its position in the scorer's order, -1 if a stopped greedy search never took it
    rank: Int[Tensor, "component"]
    #: per component: the scorer's score (NaN where a stopped greedy search never scored it)
    scores: Float[Tensor, "component"]

    @classmethod
    def _migrate(cls, meta: dict[str, Any], tensors: dict[str, Tensor], version: int) -> None:
        """Formats 1–2 had one result type for both granularities: a component result's count and
        scores were stored as ``n_edges`` / ``weights``."""
        if version < 3:
            if "n_edges" in meta:
                meta["n_components"] = meta.pop("n_edges")
            if "weights" in tensors:
                tensors["scores"] = tensors.pop("weights")

    @property
    def components(self) -> list[str]:
        """The component names (``L3H7``, ``MLP2``, ``L3H7@5``), in the order of ``labels``."""
        return list(self.config["components"])

    def subgraph(self, s: float) -> Any:
        raise InputError(
            "subgraph() returns token-level edges; this result is component-level (its strata are sets of "
            "heads and MLPs). Use tl_strace.components.component_table(result) and keep the rows with "
            "first_size <= s."
        )
