"""Component names (``L3H7``, ``MLP2``, ``L3H7@5``) and :class:`ComponentSpace`: the heads and MLPs (optionally per
position) a component-level trace ranks, with their edge relevance."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from jaxtyping import Float, Int

import torch
from torch import Tensor

from tl_strace.errors import InputError


ABLATIONS: tuple[str, ...] = ("zero", "mean")


MAX_DEFAULT_STRATA = 512


_NAME_RE = re.compile(r"^\s*(?:L(\d+)H(\d+)|MLP(\d+))(?:@(\d+))?\s*$")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def parse_component(name: str) -> tuple[int, int, int]:
    """``(layer, head, pos)`` of a component name; ``head = -1`` for an MLP, ``pos = -1`` for the
    whole component (all positions).

    >>> parse_component("L3H7"), parse_component("MLP5"), parse_component("L0H1@4")
    ((3, 7, -1), (5, -1, -1), (0, 1, 4))
    """
    m = _NAME_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise InputError(
            f"{name!r} is not a component name. Heads are named L<layer>H<head> (e.g. 'L3H7'), MLPs "
            "MLP<layer> (e.g. 'MLP5'); add '@<position>' for one token position (e.g. 'L3H7@4')."
        )
    if m.group(3) is not None:
        layer, head = int(m.group(3)), -1
    else:
        layer, head = int(m.group(1)), int(m.group(2))
    return layer, head, int(m.group(4)) if m.group(4) is not None else -1


def _name(layer: int, head: int, pos: int) -> str:
    base = f"MLP{layer}" if head < 0 else f"L{layer}H{head}"
    return base if pos < 0 else f"{base}@{pos}"


@dataclass(frozen=True)
class ComponentSpace:
    """The components of a model over an input of ``n_pos`` tokens, as tensors.

    A *grid* ``[row, layer, slot, p]`` holds one keep value per (block, slot, position): slots
    ``0..H-1`` are heads, slot ``H`` the MLP; ``p`` is ``n_pos`` per position, else 1 (broadcast).
    Components are the grid cells that can reach the output, in grid order.

    >>> sp = ComponentSpace(2, 3, 5)
    >>> sp.size, sp.names()[:5]
    (8, ['L0H0', 'L0H1', 'L0H2', 'MLP0', 'L1H0'])
    >>> ComponentSpace(2, 3, 5, per_position=True).size   # 4·5 in block 0, 4·1 in the last block
    24
    """

    n_layers: int
    n_heads: int
    n_pos: int
    per_position: bool = False

    def __post_init__(self) -> None:
        if min(self.n_layers, self.n_heads, self.n_pos) < 1:
            raise InputError(f"A component space needs at least one layer, head and position; got {self}.")

    @property
    def n_slots(self) -> int:
        return self.n_heads + 1

    @property
    def grid_pos(self) -> int:
        return self.n_pos if self.per_position else 1

    @cached_property
    def cells(self) -> Int[Tensor, "comp"]:
        """Flat grid index (``(l·slots + j)·p + t``) of each component."""
        L, S, P = self.n_layers, self.n_slots, self.grid_pos
        valid = torch.ones(L, S, P, dtype=torch.bool)
        if self.per_position:
            valid[L - 1, :, : P - 1] = False
        return torch.nonzero(valid.flatten()).flatten()

    @property
    def size(self) -> int:
        return int(self.cells.numel())

    def decode(self) -> tuple[Int[Tensor, "comp"], Int[Tensor, "comp"], Int[Tensor, "comp"]]:
        """(layer, head — -1 for an MLP —, position — -1 unless per position) of every component."""
        S, P = self.n_slots, self.grid_pos
        c = self.cells
        layer = torch.div(c, S * P, rounding_mode="floor")
        slot = torch.div(c, P, rounding_mode="floor") % S
        head = torch.where(slot == self.n_heads, torch.full_like(slot, -1), slot)
        pos = c % P if self.per_position else torch.full_like(c, -1)
        return layer, head, pos

    def names(self) -> list[str]:
        layer, head, pos = self.decode()
        return [_name(l, h, t) for l, h, t in zip(layer.tolist(), head.tolist(), pos.tolist())]

    def cells_of(self, name: str) -> list[int]:
        """Grid cells a name selects (a whole component selects every position in per-position grids).

        Raises :class:`InputError` for a malformed name or one outside this model/input.
        """
        layer, head, pos = parse_component(name)
        L, H, T = self.n_layers, self.n_heads, self.n_pos
        if not 0 <= layer < L or head >= H:
            raise InputError(
                f"Unknown component {name!r}: this model has {L} blocks (0..{L - 1}) of {H} heads (0..{H - 1}); "
                f"valid names are L0H0 … L{L - 1}H{H - 1} and MLP0 … MLP{L - 1}."
            )
        if pos >= T:
            raise InputError(f"Unknown component {name!r}: the input has {T} tokens (positions 0..{T - 1}).")
        slot = self.n_heads if head < 0 else head
        base = (layer * self.n_slots + slot) * self.grid_pos
        if pos < 0:
            return list(range(base, base + self.grid_pos))
        if not self.per_position:
            raise InputError(f"{name!r} names one position, but this component space is not split per "
                             "position; pass per_position=True.")
        return [base + pos]

    def index(self, names: Sequence[str]) -> list[int]:
        """Component indices of ``names`` (each must be exactly one component of this space)."""
        lookup = {int(c): i for i, c in enumerate(self.cells.tolist())}
        out = []
        for n in names:
            cells = self.cells_of(n)
            if len(cells) != 1 or cells[0] not in lookup:
                raise InputError(
                    f"{n!r} is not one component of this space"
                    + (" (name one position, e.g. 'L0H1@3')" if self.per_position and len(cells) > 1 else
                       " (in the last block only the last position reaches the output)")
                    + "."
                )
            out.append(lookup[cells[0]])
        return out

    def grid(self, keep: Float[Tensor, "row comp"]) -> Float[Tensor, "row layer slot p"]:
        """Keep values on the full grid; cells that are not components (they cannot reach the
        output) are kept. Differentiable in ``keep``."""
        R = keep.shape[0]
        L, S, P = self.n_layers, self.n_slots, self.grid_pos
        full = torch.ones(R, L * S * P, dtype=keep.dtype, device=keep.device)
        full = full.index_copy(1, self.cells.to(keep.device), keep)
        return full.reshape(R, L, S, P)
