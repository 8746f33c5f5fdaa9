"""The legacy ``backend="hooked"``: a ``transformer_lens.HookedTransformer`` (TransformerLens <= 3.9),
with a clear error on versions that removed it, and the offline Llama builder for bundled SmolLM2."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch

from tl_strace.errors import ModelLoadError
from tl_strace.io._bridge import _finalize


def _hooked_classes(label: str) -> tuple[Any, Any]:
    """Return ``(HookedTransformer, HookedTransformerConfig)`` or explain the version problem.

    TransformerLens 4.x turns ``transformer_lens.HookedTransformer`` into an ``ImportError``
    raised from module ``__getattr__`` (so ``hasattr`` raises instead of returning False).
    """
    try:
        import transformer_lens

        ht_cls = transformer_lens.HookedTransformer
        cfg_cls = transformer_lens.HookedTransformerConfig
    except (ImportError, AttributeError) as exc:
        try:
            version = importlib.metadata.version("transformer-lens")
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        raise ModelLoadError(
            f"backend='hooked' for {label!r} needs transformer_lens.HookedTransformer, which "
            f"TransformerLens 4.0 removed (installed: {version}). Install transformer-lens<=3.9 "
            "(e.g. pip install 'transformer-lens==3.9.*') or use backend='bridge'."
        ) from exc
    return ht_cls, cfg_cls


def _build_hooked_llama(
    model_dir: Path, *, device: str | torch.device | None, dtype: torch.dtype
) -> Any:
    """Build a legacy HookedTransformer from a Llama ``save_pretrained`` directory, offline.

    Tested by CI's TransformerLens 3.9 run (tests/legacy, tests/real with the ``hooked`` fixture
    parameter): greedy " Paris", the same clean run, strata and TV values as the bridge backend.

    ``HookedTransformer.from_pretrained`` refuses local directories, so the config is built by
    hand (mirroring TL's own ``LlamaForCausalLM`` branch of ``convert_hf_model_config``) and the
    weights go through
    ``transformer_lens.pretrained.weight_conversions.convert_llama_weights`` and
    ``load_and_process_state_dict``. No LayerNorm folding or weight centring is applied, so
    numerics match the bridge backend (raw HuggingFace weights), like
    ``HookedTransformer.from_pretrained_no_processing``.
    """
    ht_cls, cfg_cls = _hooked_classes(str(model_dir))
    try:
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise ModelLoadError(
            f"backend='hooked' needs transformer_lens.pretrained.weight_conversions "
            f"(TransformerLens 3.x): {exc}"
        ) from exc

    hf_model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    hf_cfg = hf_model.config
    d_head = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    rope_theta = getattr(hf_cfg, "rope_theta", None)
    if rope_theta is None:  # transformers >= 5 keeps it in rope_parameters
        rope_theta = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    n_kv = hf_cfg.num_key_value_heads
    cfg = cfg_cls(
        d_model=hf_cfg.hidden_size,
        d_head=d_head,
        n_heads=hf_cfg.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != hf_cfg.num_attention_heads else None,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        # TL allocates an n_ctx x n_ctx mask per layer: cap it (8192 costs ~2 GB for 30 layers).
        n_ctx=min(int(hf_cfg.max_position_embeddings), 2048),
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=float(rope_theta),
        rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM",
        device=str(torch.device(device)) if device is not None else None,
        dtype=dtype,
    )
    model = ht_cls(cfg, tokenizer=tokenizer, move_to_device=False)
    state_dict = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return _finalize(model, device=device, dtype=dtype)
