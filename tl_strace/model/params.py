"""The parameters the graph reads: attention output weights, the final norm, post-sublayer norms linearised
at the clean run (:class:`PostNorm`), attention without chosen heads."""

from __future__ import annotations

from dataclasses import dataclass
from jaxtyping import Float
from typing import Any

import torch
from torch import Tensor

from tl_strace.model.spec import ModelSpec, _POST_NORMS, _hooked_final_norm
from tl_strace.model.tokens import _model_device, model_dtype


# ---------------------------------------------------------------------------------------------
# Weights the graph needs
# ---------------------------------------------------------------------------------------------
def attention_output(model: Any, spec: ModelSpec, layer: int) -> tuple[Float[Tensor, "head d_head d_model"], Float[Tensor, "d_model"]]:
    """``W_O`` split per query head and the output bias ``b_O`` (zeros when the model has none)."""
    attn = model.blocks[layer].attn
    W_O = attn.W_O
    if W_O.ndim == 2:  # [head*d_head, d_model]
        W_O = W_O.reshape(spec.n_heads, spec.d_head, spec.d_model)
    try:
        b_O = attn.b_O
    except Exception:  # the bridge raises when a bias-free projection is asked for its bias
        b_O = None
    if b_O is None:
        b_O = torch.zeros(spec.d_model, dtype=W_O.dtype, device=W_O.device)
    return W_O, b_O


def final_norm_params(model: Any, spec: ModelSpec) -> tuple[Tensor | None, Tensor | None, bool]:
    """The final norm's elementwise weight, bias and whether it centres (LayerNorm) or not (RMSNorm).

    The linearised final norm (METHOD.md §1) is ``u ↦ centre(u) / scale · w``, with ``scale`` frozen at
    the clean run; the bias is a constant of the output node. :func:`clean_run` checks the result
    against the model's own ``ln_final`` output and refuses the model if they differ.
    """
    ln = model.ln_final
    if spec.backend == "bridge":
        inner = getattr(ln, "original_component", ln)
        w = getattr(inner, "weight", None)
        b = getattr(inner, "bias", None)
        centre = spec.normalization.upper().startswith("LN")
        if not centre:  # RMSNorm: read what the module multiplies by (Gemma's is 1 + weight)
            w, b = rms_affine(inner, spec.d_model, model_dtype(model), _model_device(model))
    else:
        w, b, centre = _hooked_final_norm(ln, spec)
    return w, b, centre


#: Magnitude of the probe vectors :func:`rms_affine` feeds a norm: the RMS of ``±c·1`` is
#: ``sqrt(c² + eps)``, which is ``c`` to a relative ``eps / 2c²`` (≈ 1e-10 for eps = 1e-6); 64² also
#: stays far inside the float16 range.
_PROBE = 64.0


def rms_affine(module: Any, d_model: int, dtype: torch.dtype, device: torch.device
               ) -> tuple[Float[Tensor, "d_model"], Float[Tensor, "d_model"]]:
    """The effective elementwise weight and bias of an RMSNorm module, whatever its convention.

    RMSNorm is ``u ↦ u / rms(u) · w + b``, with ``w`` stored as ``weight`` (Llama, OLMo-2) or as
    ``weight - 1`` (Gemma's ``1 + weight``). Rather than trusting a convention, the module is fed
    ``+c·1`` and ``−c·1`` (both of RMS ``c``): ``w = (out₊ − out₋) / 2`` and ``b = (out₊ + out₋) / 2``.
    The identities of :func:`tl_strace.graph.check_decomposition` then verify the result at every
    position of the clean run.
    """
    x = torch.full((2, 1, d_model), _PROBE, dtype=dtype, device=device)
    x[1] = -_PROBE
    with torch.no_grad():
        out = module(x).reshape(2, d_model).float()
    return (out[0] - out[1]) / 2, (out[0] + out[1]) / 2


@dataclass(frozen=True)
class PostNorm:
    """A post-sublayer norm of every block, linearised at the clean run (METHOD.md §1).

    The block adds ``norm_post(a)`` to the stream, where ``a`` is the sublayer's own output; with
    the norm's scale frozen per position it is ``a[l, t] · w[l] · gain[l, t] + b[l]``, exactly, at the
    clean run. Every edge vector of that sublayer is multiplied by ``w · gain`` (:meth:`linear`);
    ``b`` is a constant of the node, like ``b_O``.
    """

    inp: Float[Tensor, "layer pos d_model"]
    """What the norm read at the clean run: the sublayer's output before the norm."""
    w: Float[Tensor, "layer d_model"]
    """The effective elementwise weight (Gemma's ``1 + weight``), see :func:`rms_affine`."""
    b: Float[Tensor, "layer d_model"]
    gain: Float[Tensor, "layer pos"]
    """``1 / scale`` per position, read from the norm's own input and output at the clean run."""

    def linear(self, u: Float[Tensor, "layer pos *rest d_model"]) -> Float[Tensor, "layer pos *rest d_model"]:
        """The norm's linear part at the clean run: ``u[l, t, ...] · w[l] · gain[l, t]``."""
        extra = (1,) * (u.ndim - 3)
        L, T = self.gain.shape
        return u * self.gain.reshape(L, T, *extra, 1) * self.w.reshape(L, 1, *extra, -1)


def _hf_module(mod: Any) -> Any:
    """The Hugging Face module a bridge component wraps (called without the bridge's hook points)."""
    inner = getattr(mod, "original_component", None)
    return mod if inner is None else inner


def _post_norm(model: Any, spec: ModelSpec, kind: str, inp: Float[Tensor, "layer pos d_model"],
               out: Float[Tensor, "layer pos d_model"]) -> PostNorm:
    """Linearise the post-``kind`` norm of every block from what it read (``inp``) and wrote (``out``).

    ``w``/``b`` come from the module (:func:`rms_affine`); the frozen ``gain`` at position ``t`` is
    the least-squares ratio ``<out − b, inp·w> / <inp·w, inp·w>``, which is exactly ``1 / rms`` for
    an RMSNorm, whatever its eps or the hook conventions (0 where the norm read a zero vector).
    """
    dtype, device = model_dtype(model), _model_device(model)
    ws, bs = [], []
    for l in range(spec.n_layers):
        mod = getattr(model.blocks[l], _POST_NORMS[kind])
        w, b = rms_affine(_hf_module(mod), spec.d_model, dtype, device)
        ws.append(w.to(inp.device))
        bs.append(b.to(inp.device))
    w, b = torch.stack(ws), torch.stack(bs)
    u = inp * w[:, None, :]
    num = ((out - b[:, None, :]) * u).sum(-1)
    den = (u * u).sum(-1)
    gain = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return PostNorm(inp=inp, w=w, b=b, gain=gain)


def attention_without_heads(model: Any, spec: ModelSpec, layer: int,
                            b_O: Float[Tensor, "d_model"]) -> Float[Tensor, "d_model"]:
    """What ``blocks.{layer}.hook_attn_out`` holds when every head is removed (pattern or ``z``
    zeroed): ``b_O``, passed through the block's post-attention norm where it has one (0 for a
    bias-free attention under an RMSNorm). The reference of the masking self-checks."""
    if spec.norm_placement == "pre":
        return b_O
    mod = getattr(model.blocks[layer], _POST_NORMS["attn"])
    fn = _hf_module(mod)
    with torch.no_grad():
        out = fn(b_O[None, None].to(device=_model_device(model), dtype=model_dtype(model)))
    return out.reshape(-1).float().to(b_O.device)
