"""Tiny random legacy ``HookedTransformer`` models (TransformerLens <= 3.9), built offline.

Each one is converted from *the same* random Hugging Face model that :func:`tests.tiny.tiny_bridge`
wraps (same config, same seed), with TransformerLens's own weight conversion
(``transformer_lens.pretrained.weight_conversions``) into a hand-built ``HookedTransformerConfig``,
so a hooked model and its bridge twin compute the same function and can be compared number for
number. ``processing=True`` applies TransformerLens's default weight processing (fold_ln,
center_writing_weights, center_unembed, fold_value_biases), as ``HookedTransformer.from_pretrained``
does; ``ungroup=True`` sets ``ungroup_grouped_query_attention`` (``hook_v`` then has one head per
query head).

Nothing here imports TransformerLens at module level, so the module can be imported under 4.x.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from tests.tiny import REFUSED_CONFIGS, TINY_CONFIGS, VOCAB

#: Processing flags of ``HookedTransformer.from_pretrained`` (TransformerLens's defaults).
DEFAULT_PROCESSING: dict[str, bool] = dict(
    fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
)
#: No processing, as ``HookedTransformer.from_pretrained_no_processing``.
NO_PROCESSING: dict[str, bool] = dict(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)


def _tl_major() -> int:
    try:
        return int(importlib.metadata.version("transformer-lens").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return -1


#: Whether the installed TransformerLens still has ``HookedTransformer`` (3.x; 4.0 removed it).
HAS_HOOKED: bool = 0 <= _tl_major() < 4
HOOKED_SKIP_REASON = "needs transformer-lens<=3.9 (HookedTransformer; TransformerLens 4.0 removed it)"


def tiny_hf(name: str, *, seed: int = 0) -> Any:
    """The random Hugging Face model behind ``tests.tiny.tiny_bridge(name, ..., seed=seed)``.

    Mirrors ``tiny_bridge`` step for step (config, seed, the Qwen2 bias initialisation); the
    legacy tests check that the two backends then agree, which also keeps this mirror honest.
    """
    import transformers

    cls_name, _arch, kwargs = {**TINY_CONFIGS, **REFUSED_CONFIGS}[name]
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if cls_name == "Qwen2Config":
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:
                    p.normal_(0, 0.5)
    return hf


def hooked_config(hf_cfg: Any, **overrides: Any) -> Any:
    """A ``HookedTransformerConfig`` written by hand from a GPT-2, Llama or Qwen2 HF config,
    following TransformerLens 3.9's own ``convert_hf_model_config`` branches for these."""
    from transformer_lens import HookedTransformerConfig

    kind = type(hf_cfg).__name__
    if kind == "GPT2Config":
        d = dict(
            d_model=hf_cfg.n_embd, d_head=hf_cfg.n_embd // hf_cfg.n_head, n_heads=hf_cfg.n_head,
            d_mlp=4 * hf_cfg.n_embd, n_layers=hf_cfg.n_layer, n_ctx=hf_cfg.n_positions,
            eps=hf_cfg.layer_norm_epsilon, d_vocab=hf_cfg.vocab_size, act_fn=hf_cfg.activation_function,
            normalization_type="LN", positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )
    elif kind in ("LlamaConfig", "Qwen2Config"):
        d_head = hf_cfg.hidden_size // hf_cfg.num_attention_heads
        rope = getattr(hf_cfg, "rope_theta", None) or (getattr(hf_cfg, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0)
        d = dict(
            d_model=hf_cfg.hidden_size, d_head=d_head, n_heads=hf_cfg.num_attention_heads,
            n_key_value_heads=hf_cfg.num_key_value_heads, d_mlp=hf_cfg.intermediate_size,
            n_layers=hf_cfg.num_hidden_layers, n_ctx=hf_cfg.max_position_embeddings, eps=hf_cfg.rms_norm_eps,
            d_vocab=hf_cfg.vocab_size, act_fn=hf_cfg.hidden_act, normalization_type="RMS", final_rms=True,
            gated_mlp=True, positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=float(rope),
            rotary_adjacent_pairs=False,
            original_architecture="LlamaForCausalLM" if kind == "LlamaConfig" else "Qwen2ForCausalLM",
        )
    else:
        raise ValueError(f"no hand-built HookedTransformerConfig for {kind}")
    d.update(dtype=torch.float32, device="cpu")
    d.update(overrides)
    return HookedTransformerConfig(**d)


def hooked_from_hf(hf: Any, tokenizer: Any, *, processing: bool = False, **cfg_overrides: Any) -> Any:
    """Convert a GPT-2 / Llama / Qwen2 HF model into an eval-mode ``HookedTransformer``."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import (
        convert_gpt2_weights,
        convert_llama_weights,
        convert_qwen2_weights,
    )

    cfg = hooked_config(hf.config, **cfg_overrides)
    convert = {"GPT2LMHeadModel": convert_gpt2_weights, "LlamaForCausalLM": convert_llama_weights,
               "Qwen2ForCausalLM": convert_qwen2_weights}[cfg.original_architecture]
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert(hf, cfg), **(DEFAULT_PROCESSING if processing else NO_PROCESSING))
    return model.eval()


def tiny_hooked(name: str, tokenizer_dir: str, *, seed: int = 0, processing: bool = False,
                ungroup: bool = False, keep_hf: bool = False) -> Any:
    """A HookedTransformer twin of ``tests.tiny.tiny_bridge(name, tokenizer_dir, seed=seed)``.

    ``keep_hf`` stores the source HF model as ``model.original_model`` (a plain attribute, not a
    submodule), as the bridge exposes it, so tests written against a bridge's ``original_model``
    (hand-written reference forwards) run unchanged on the hooked twin.
    """
    from transformers import AutoTokenizer

    hf = tiny_hf(name, seed=seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    overrides: dict[str, Any] = {"ungroup_grouped_query_attention": True} if ungroup else {}
    model = hooked_from_hf(hf, tok, processing=processing, **overrides)
    if keep_hf:
        object.__setattr__(model, "original_model", hf)  # bypass nn.Module: not a submodule
    return model


#: Hooked variants the shared fixtures add under TransformerLens 3.x: id -> tiny_hooked kwargs.
HOOKED_VARIANTS: dict[str, dict[str, Any]] = {
    "hooked-gpt2": dict(name="gpt2"),
    "hooked-gpt2-processed": dict(name="gpt2", processing=True),
    "hooked-llama_gqa": dict(name="llama_gqa"),
    "hooked-llama_gqa-processed": dict(name="llama_gqa", processing=True),
    "hooked-llama_gqa-ungrouped": dict(name="llama_gqa", ungroup=True),
    "hooked-qwen2_bias": dict(name="qwen2_bias"),
    "hooked-qwen2_bias-processed": dict(name="qwen2_bias", processing=True),
}
