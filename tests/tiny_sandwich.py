"""Tiny random sandwich / post-norm models (Gemma 2, Gemma 3, OLMo-2) and a hand-written forward.

Each model is built from its Hugging Face config, offline, with the word-level tokenizer of
:mod:`tests.tiny`. Its norm weights are randomised (Gemma initialises its ``1 + w`` weights to
``w = 0`` and OLMo-2 its weights to 1, which would hide a wrong offset convention), its weights are
large enough that attention is far from uniform, and Gemma 2's soft-caps are small enough to bend
the scores and logits (a cap of 50 or 30 would never act on a model this small).

:func:`sandwich_reference` is the architecture written out by hand from the weights of an
untouched copy of the HF model (``x + norm_post(attn(norm_pre x))``; OLMo-2 without the pre-norm),
with edges removed exactly as METHOD.md §4 says: the post-softmax pattern, the post-norm MLP output
(what is added to the stream) and the skip connections. Only the rotary cos/sin tables come from the
HF module; norms, attention, masks, soft-caps, MLPs and the residual structure are written here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from tests.tiny import VOCAB

_COMMON = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, initializer_range=0.3, pad_token_id=1)
_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

SANDWICH_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (transformers config class, architecture name for TransformerBridge, kwargs)
    "gemma2": ("Gemma2Config", "google/gemma-2-2b",
               dict(_COMMON, num_key_value_heads=1, head_dim=8, sliding_window=4, layer_types=_LAYER_TYPES,
                    query_pre_attn_scalar=8, attn_logit_softcapping=2.0, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "google/gemma-3-270m",
               dict(_COMMON, architectures=["Gemma3ForCausalLM"], num_key_value_heads=1, head_dim=8,
                    sliding_window=4, layer_types=_LAYER_TYPES, query_pre_attn_scalar=8)),
    "olmo2": ("Olmo2Config", "allenai/OLMo-2-0425-1B",
              dict(_COMMON, architectures=["Olmo2ForCausalLM"], num_key_value_heads=2)),
}

#: What :attr:`tl_strace.model.ModelSpec.norm_placement` must say for each.
PLACEMENT = {"gemma2": "sandwich", "gemma3": "sandwich", "olmo2": "post"}


def tiny_sandwich(name: str, tokenizer_dir: str, *, seed: int = 0) -> tuple[Any, Any]:
    """``(bridge, reference)``: a TransformerBridge around a random tiny ``name`` model in eval mode,
    and an untouched deep copy of the HF model taken before the bridge wrapped it."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    cls_name, arch, kwargs = SANDWICH_CONFIGS[name]
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname:  # Gemma: w of (1 + w), init 0; OLMo-2: w, init 1
                p.normal_(0.0 if name.startswith("gemma") else 1.0, 0.5)
    ref = copy.deepcopy(hf).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bridge = TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=tok)
    bridge.eval()
    return bridge, ref


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * (1.0 + w) if gemma else y * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def sandwich_reference(name: str, ref: Any, tokens: torch.Tensor, attn_keep: torch.Tensor, ra_keep: torch.Tensor,
                       mlp_keep: torch.Tensor, rm_keep: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the tiny ``name`` model with edges removed as METHOD.md §4 says.

    ``attn_keep`` is ``[layer, head, pos, pos]`` (multiplies the post-softmax pattern), the others
    ``[layer, pos]`` (the skip around attention, the post-norm MLP output, the skip around the MLP).
    """
    cfg, m = ref.config, ref.model
    gemma = name.startswith("gemma")
    T, d = tokens.numel(), cfg.hidden_size
    H, KV, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    dh = getattr(cfg, "head_dim", None) or d // H
    norm = lambda x, mod: _rms(x, mod.weight, eps, gemma)  # noqa: E731
    x = m.embed_tokens.weight[tokens] * (d ** 0.5 if gemma else 1.0)  # Gemma scales by sqrt(d_model)
    pos = torch.arange(T)[None]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for l, blk in enumerate(m.layers):
        a = blk.self_attn
        kind = cfg.layer_types[l] if hasattr(cfg, "layer_types") else "full_attention"
        if name == "gemma3":
            cos, sin = m.rotary_emb(x[None], pos, kind)
        else:
            cos, sin = m.rotary_emb(x[None], pos)
        cos, sin = cos[0], sin[0]  # [T, dh]
        h_in = norm(x, blk.input_layernorm) if gemma else x  # OLMo-2 has no pre-norm
        q, k, v = h_in @ a.q_proj.weight.T, h_in @ a.k_proj.weight.T, h_in @ a.v_proj.weight.T
        if name == "olmo2":  # QK-norm over the whole projection
            q, k = _rms(q, a.q_norm.weight, eps, False), _rms(k, a.k_norm.weight, eps, False)
        q, k, v = (t.reshape(T, n, dh).transpose(0, 1) for t, n in ((q, H), (k, KV), (v, KV)))
        if name == "gemma3":  # QK-norm per head
            q, k = _rms(q, a.q_norm.weight, eps, True), _rms(k, a.k_norm.weight, eps, True)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        scale = cfg.query_pre_attn_scalar ** -0.5 if gemma else dh ** -0.5
        scores = q @ k.transpose(-1, -2) * scale
        cap = getattr(cfg, "attn_logit_softcapping", None) if name == "gemma2" else None
        if cap:
            scores = torch.tanh(scores / cap) * cap
        allowed = j <= i
        if kind == "sliding_attention":
            allowed = allowed & (j > i - cfg.sliding_window)
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1) * attn_keep[l]
        z = (pattern @ v).transpose(0, 1).reshape(T, H * dh)
        att = norm(z @ a.o_proj.weight.T, blk.post_attention_layernorm)
        mid = ra_keep[l][:, None] * x + att
        h2 = norm(mid, blk.pre_feedforward_layernorm) if gemma else mid
        mp = blk.mlp
        act = F.gelu(h2 @ mp.gate_proj.weight.T, approximate="tanh") if gemma else F.silu(h2 @ mp.gate_proj.weight.T)
        mlp = norm((act * (h2 @ mp.up_proj.weight.T)) @ mp.down_proj.weight.T, blk.post_feedforward_layernorm)
        x = rm_keep[l][:, None] * mid + mlp_keep[l][:, None] * mlp
    logits = norm(x, m.norm)[-1] @ ref.lm_head.weight.T
    cap = getattr(cfg, "final_logit_softcapping", None) if name == "gemma2" else None
    return torch.tanh(logits / cap) * cap if cap else logits
