"""Ranks of a ``torchrun`` corpus run: who writes what, and every rank stopping together on an error."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tl_strace.errors import ResultsError, StraceError


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> "_Dist":
        """Rank and world size from torchrun's environment; start a gloo group when needed."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
            owns = True
        return cls(rank=dist.get_rank(), world=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()

    def agree(self, msg: str | None) -> str | None:
        """Every rank's error message (or None) → the first one, on every rank (rank-prefixed).

        Each step where one rank alone may fail (its shard is locked by another process, its disk
        is full, the ranks were started with different options) ends with this call instead of a
        barrier, so that every rank raises the same one-line error and exits, instead of the others
        waiting at the next barrier for a rank that has gone (a gloo traceback, or a hang)."""
        if self.world <= 1:
            return msg
        import torch.distributed as dist

        box: list[str | None] = [None] * self.world
        dist.all_gather_object(box, msg)
        for r, m in enumerate(box):
            if m is not None:
                return m if m.startswith("rank ") else f"rank {r} of {self.world}: {m}"
        return None

    def broadcast_error(self, msg: str | None) -> str | None:
        """Share rank 0's error message (or None) with every rank, so all fail together."""
        if self.world <= 1:
            return msg
        import torch.distributed as dist

        box = [msg]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _message(e: BaseException) -> str:
    """One line for an error: our messages as they are, an OSError as ``path: reason``."""
    if isinstance(e, OSError) and not isinstance(e, StraceError):
        return f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    return str(e)


def _sync(dist: "_Dist", exc: BaseException | None) -> None:
    """End a step that one rank alone may fail: all ranks agree (:meth:`_Dist.agree`); a rank that
    failed raises its own error, the others a ResultsError with its message, so every rank exits
    with the same one line instead of waiting for a rank that has gone."""
    msg = dist.agree(_message(exc) if exc is not None else None)
    if exc is not None:
        raise exc
    if msg is not None:
        raise ResultsError(msg)
