"""Hook shapes and the model identity a mean cache records, shared by the cache type, its file
checks and :func:`~tl_strace.mean.compute_means`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.model import ModelSpec


def _per_layer_shape(role: str, spec: ModelSpec | dict[str, Any]) -> tuple[int, ...]:
    """Shape of one position of ``role``'s hook in one block (batch and position axes removed);
    ``spec`` may also be a cache's stored model identity (a dict)."""
    get = spec.get if isinstance(spec, dict) else lambda k: getattr(spec, k)
    shapes = {
        "z": (get("n_heads"), get("d_head")),
        "v": (get("n_kv_heads"), get("d_head")),
        "mlp_out": (get("d_model"),),
        "attn_out": (get("d_model"),),
        "resid_pre": (get("d_model"),),
        "resid_post": (get("d_model"),),
    }
    if role not in shapes:
        raise InputError(f"Means can be computed for the hook roles {sorted(shapes)}; got {role!r}.")
    return shapes[role]


def _model_identity(spec: ModelSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in ("name", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")}


def _fmt(t: Tensor) -> str:
    kind = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
            torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}.get(t.dtype, str(t.dtype))
    return f"{kind}[{','.join(map(str, t.shape))}]"
