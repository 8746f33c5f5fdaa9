"""The on-disk format of a mean cache: its version, metadata key and the schema check run on load.

A file is checked field by field before any :class:`~tl_strace.mean.MeanCache` is built from it, so
a damaged or edited file is refused with the field that is wrong, never half-used.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.mean._shapes import _fmt, _per_layer_shape
from tl_strace.model import HOOKS
from tl_strace.store import SchemaViolation

FORMAT_VERSION = 2
"""Version of the on-disk format written by :meth:`MeanCache.save`. Format 2 files always carry a
checksum (:data:`tl_strace.store.CHECKSUMMED_FORMAT`); format 1 (the 0.1.0 release) files may not."""

_READABLE_VERSIONS = (1, FORMAT_VERSION)

_META_KEY = "tl_strace_means"
"""The safetensors metadata key under which a mean cache keeps its JSON (other files lack it)."""

_Bad = SchemaViolation  # one schema violation of a mean cache file: the field and what is wrong


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(ch in "0123456789abcdef" for ch in x)


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _check_cache_file(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Raise :class:`_Bad` at the first field of a mean cache file that is ill-typed or inconsistent."""
    known = {"model", "hooks", "n_sequences", "n_tokens", "fingerprint", "prepend_bos", "extra", "model_fingerprint"}
    for k in ("model", "hooks", "n_sequences", "n_tokens", "fingerprint"):
        if k not in meta:
            raise _Bad(k, "is missing")
    if set(meta) - known:
        raise _Bad(", ".join(sorted(set(meta) - known)), "is not a field of a mean cache")
    model = meta["model"]
    ints = ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise _Bad("model", f"must name the model and its shapes {list(ints)}")
    for k in ints:
        if not _is_pos_int(model.get(k)):
            raise _Bad(f"model.{k}", f"must be a positive integer, got {model.get(k)!r}")
    hooks = meta["hooks"]
    if not isinstance(hooks, dict) or not hooks:
        raise _Bad("hooks", "must map at least one role to its hook name")
    for role, hook in hooks.items():
        if role not in HOOKS or hook != HOOKS[role]:
            raise _Bad("hooks", f"maps {role!r} to {hook!r}; the known roles are {dict(HOOKS)}")
        try:
            _per_layer_shape(role, model)
        except InputError as e:
            raise _Bad("hooks", f"role {role!r} has no means") from e
    for k in ("n_sequences", "n_tokens"):
        if not _is_pos_int(meta[k]):
            raise _Bad(k, f"must be a positive integer, got {meta[k]!r}")
    if not _is_sha256(meta["fingerprint"]):
        raise _Bad("fingerprint", f"must be a SHA-256 hex digest, got {meta['fingerprint']!r}")
    if meta.get("model_fingerprint") is not None and not _is_sha256(meta["model_fingerprint"]):
        raise _Bad("model_fingerprint", f"must be a SHA-256 hex digest or null, got {meta['model_fingerprint']!r}")
    if meta.get("prepend_bos") not in (None, True, False):
        raise _Bad("prepend_bos", f"must be true, false or null, got {meta['prepend_bos']!r}")
    if not isinstance(meta.get("extra") or {}, dict):
        raise _Bad("extra", "must be a dict")
    want = {f"mean.{r}" for r in hooks} | {f"pos_mean.{r}" for r in hooks} | {"pos_counts"}
    if want - set(tensors):
        raise _Bad(", ".join(sorted(want - set(tensors))), "is missing from the tensors")
    if set(tensors) - want:
        raise _Bad(", ".join(sorted(set(tensors) - want)), "is not a tensor of this cache's roles")
    counts = tensors["pos_counts"]
    if counts.dtype not in (torch.int64, torch.int32) or counts.ndim != 1 or counts.numel() < 1:
        raise _Bad("pos_counts", f"must be a 1-D integer tensor, got {_fmt(counts)}")
    c = counts.long()
    # sequences reaching position t: at least one, never more at a later position, all of them at 0
    if (bool((c < 1).any()) or bool((c[1:] > c[:-1]).any()) or int(c[0]) != meta["n_sequences"]
            or int(c.sum()) != meta["n_tokens"]):
        raise _Bad("pos_counts", f"must count the {meta['n_sequences']} sequences reaching each position (≥ 1, "
                                 f"non-increasing, summing to n_tokens = {meta['n_tokens']})")
    P = int(c.numel())
    for role in hooks:
        shape = (model["n_layers"], *_per_layer_shape(role, model))
        for name, want_shape in ((f"mean.{role}", shape), (f"pos_mean.{role}", (shape[0], P, *shape[1:]))):
            t = tensors[name]
            if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                raise _Bad(name, f"must be a float tensor, got {_fmt(t)}")
            if tuple(t.shape) != want_shape:
                raise _Bad(name, f"has shape {_fmt(t)}, but model {model['name']!r} over {P} covered positions "
                                 f"needs [{','.join(map(str, want_shape))}]")
            if not bool(torch.isfinite(t).all()):
                raise _Bad(name, "must hold finite means")


def _is_mean_cache_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written as a mean cache (damaged or not): only such a
    file may be replaced by a recomputed cache; anything else is the user's data."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return _META_KEY in (f.metadata() or {})
    except Exception:  # not safetensors at all
        return False
