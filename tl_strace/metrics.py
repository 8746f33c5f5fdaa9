"""How far a subgraph's next-token distribution is from the full model's (METHOD.md §5).

Pure tensor functions on float32 log-probabilities at the last position: ``full`` is one
distribution ``[vocab]``, ``sub`` a batch ``[row, vocab]``.

>>> full = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), -1)
>>> total_variation(full, full[None]).tolist()
[0.0]
>>> shared_nucleus(full, full[None]).tolist()
[99.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "NUCLEUS_LEVELS",
    "clean_summary",
    "entropy",
    "kl_divergence",
    "row_metrics",
    "shared_nucleus",
    "target_stats",
    "top_tokens",
    "total_variation",
]

NUCLEUS_LEVELS: tuple[int, ...] = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
"""Nucleus masses (percent) at which the full and subgraph top-p token lists are compared."""


def total_variation(full: Float[Tensor, "vocab"], sub: Float[Tensor, "row vocab"]) -> Float[Tensor, "row"]:
    """``½ Σ_v |p_full(v) − p_sub(v)|``, in [0, 1]."""
    return 0.5 * (full.exp()[None, :] - sub.exp()).abs().sum(-1)


def kl_divergence(full: Float[Tensor, "vocab"], sub: Float[Tensor, "row vocab"]) -> Float[Tensor, "row"]:
    """``KL(p_full ‖ p_sub)`` in nats."""
    p = full.exp()[None, :]
    return (p * (full[None, :] - sub)).sum(-1).clamp(min=0.0)


def entropy(logp: Float[Tensor, "row vocab"]) -> Float[Tensor, "row"]:
    """Shannon entropy in nats."""
    return -(logp.exp() * logp).sum(-1)


def _nucleus_lengths(sorted_p: Float[Tensor, "row vocab"], levels: Tensor) -> Int[Tensor, "row level"]:
    """Length of the shortest prefix whose mass reaches each level (at least 1)."""
    cum = sorted_p.cumsum(-1)  # non-decreasing: a running sum of non-negative numbers
    # Entries below each level = its left insertion point; no [row, level, vocab] temporary.
    n = torch.searchsorted(cum, levels[None, :].expand(cum.shape[0], -1).contiguous(), side="left") + 1
    return n.clamp(max=sorted_p.shape[-1])


def shared_nucleus(full: Float[Tensor, "vocab"], sub: Float[Tensor, "row vocab"],
                   levels: Sequence[int] = NUCLEUS_LEVELS) -> Float[Tensor, "row"]:
    """The largest level p (percent) at which the top-p token lists of full and subgraph are
    identical, order included; 0 when they differ at every level.

    A top-p list is the shortest prefix of tokens sorted by probability whose mass reaches p.
    p = 1% is in effect "the same top token": the head of the distribution.
    """
    lv = torch.tensor([lvl / 100.0 for lvl in levels], dtype=sub.dtype, device=sub.device)
    pf, idx_f = torch.sort(full.exp(), descending=True, stable=True)
    ps, idx_s = torch.sort(sub.exp(), dim=-1, descending=True, stable=True)
    len_f = _nucleus_lengths(pf[None], lv)  # [1, level]
    len_s = _nucleus_lengths(ps, lv)  # [row, level]
    differ = idx_s != idx_f[None, :]
    V = differ.shape[-1]
    first_diff = torch.where(differ.any(-1), differ.to(torch.uint8).argmax(-1),
                             torch.full((differ.shape[0],), V, device=sub.device))
    same = (len_s == len_f) & (first_diff[:, None] >= len_s)
    lvl = torch.tensor(list(levels), dtype=sub.dtype, device=sub.device)
    return torch.where(same, lvl[None, :], torch.zeros_like(lvl)[None, :]).amax(-1)


def target_stats(logp: Float[Tensor, "row vocab"], target: int) -> tuple[Float[Tensor, "row"], Int[Tensor, "row"]]:
    """Cross-entropy (nats) of the true next token and its rank (1 = most probable)."""
    lp = logp[:, target]
    return -lp, (logp > lp[:, None]).sum(-1) + 1


def top_tokens(logp: Float[Tensor, "row vocab"], k: int) -> tuple[Int[Tensor, "row k"], Float[Tensor, "row k"]]:
    """The ``k`` most probable tokens and their probabilities."""
    vals, ids = torch.topk(logp, k=min(k, logp.shape[-1]), dim=-1)
    return ids, vals.exp()


ROW_METRICS: tuple[str, ...] = ("tv", "kl", "nucleus", "entropy", "ce", "rank", "ids", "probs")
"""Keys of :func:`row_metrics`."""


def row_metrics(full: Float[Tensor, "vocab"], logp: Float[Tensor, "row vocab"], target: int | None,
                top_k: int) -> dict[str, Tensor]:
    """Every per-row number a result keeps, for one chunk of evaluated rows: ``tv``, ``kl``,
    ``nucleus``, ``entropy``, ``ce`` and ``rank`` (NaN without a target), and the ``top_k`` token
    ``ids``/``probs``. Callers evaluate rows chunk by chunk and keep only these, so memory does not
    grow with the number of rows times the vocabulary."""
    out = {"tv": total_variation(full, logp), "kl": kl_divergence(full, logp),
           "nucleus": shared_nucleus(full, logp), "entropy": entropy(logp)}
    if target is not None:
        ce, rank = target_stats(logp, target)
        out["ce"], out["rank"] = ce, rank.float()
    else:
        out["ce"] = out["rank"] = torch.full((logp.shape[0],), float("nan"), device=logp.device)
    out["ids"], out["probs"] = top_tokens(logp, top_k)
    return out


def clean_summary(full: Float[Tensor, "vocab"], target: int | None, top_k: int) -> dict[str, Any]:
    """The full model's own numbers a result keeps beside its curves: ``full_top_ids`` /
    ``full_top_probs`` (its ``top_k`` tokens), ``full_entropy``, and ``full_ce`` /
    ``full_target_rank`` of ``target`` (NaN without one). Every granularity stores these the same way."""
    full = full.cpu()[None]
    ids, probs = top_tokens(full, top_k)
    if target is not None:
        ce, rank = target_stats(full, target)
        full_ce, full_rank = float(ce[0]), float(rank[0])
    else:
        full_ce = full_rank = float("nan")
    return {"full_top_ids": ids[0], "full_top_probs": probs[0], "full_entropy": float(entropy(full)[0]),
            "full_ce": full_ce, "full_target_rank": full_rank}
