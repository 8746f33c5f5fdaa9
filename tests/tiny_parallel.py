"""Tiny random parallel attention/MLP models (GPT-NeoX/Pythia, GPT-J, Phi) and a hand-written forward.

Each model is built from its Hugging Face config, offline, with the word-level tokenizer of
:mod:`tests.tiny`. Its norm weights and biases and its linear biases are randomised (HF initialises
them to 1 and 0, which would hide a bias that goes to the wrong edge or a norm read from the wrong
stream), and its weights are large enough (``initializer_range=0.3``) that attention is far from
uniform.

:func:`parallel_reference` is the block ``x + attn(ln1 x) + mlp(ln2 x)`` written out by hand from the
weights of an untouched copy of the HF model (GPT-J and Phi share one norm: ``ln2 = ln1``), with edges
removed exactly as METHOD.md §4 says for parallel blocks: the post-softmax pattern, the MLP output,
and the block's one skip connection (``out[t] = keep·x[t] + attn[t] + mlp[t]``, the sublayers still
reading the block input). Only the rotary cos/sin tables come from the HF modules; norms, attention,
rotary application, MLPs and the residual structure are written here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from tests.tiny import VOCAB

_POS = 64

PARALLEL_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (transformers config class, architecture name for TransformerBridge, kwargs)
    "neox": ("GPTNeoXConfig", "EleutherAI/pythia-70m",
             dict(architectures=["GPTNeoXForCausalLM"], num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=_POS, use_parallel_residual=True, hidden_act="gelu",
                  rotary_pct=0.5, initializer_range=0.3)),
    "gptj": ("GPTJConfig", "EleutherAI/gpt-j-6b",
             dict(architectures=["GPTJForCausalLM"], n_layer=3, n_embd=32, n_head=4, n_positions=_POS, rotary_dim=4,
                  activation_function="gelu_new", initializer_range=0.3)),
    "phi": ("PhiConfig", "microsoft/phi-2",
            dict(architectures=["PhiForCausalLM"], num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=_POS, hidden_act="gelu_new",
                 partial_rotary_factor=0.5, initializer_range=0.3)),
}


def tiny_parallel(name: str, tokenizer_dir: str, *, seed: int = 0) -> tuple[Any, Any]:
    """``(bridge, reference)``: a TransformerBridge around a random tiny ``name`` model in eval mode,
    and an untouched deep copy of the HF model taken before the bridge wrapped it."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    arch = PARALLEL_CONFIGS[name][1]
    hf = _hf(name, seed)
    ref = copy.deepcopy(hf).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bridge = TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=tok)
    bridge.eval()
    return bridge, ref


def _ln(x: torch.Tensor, mod: Any) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def _lin(x: torch.Tensor, mod: Any) -> torch.Tensor:
    return x @ mod.weight.T + (mod.bias if mod.bias is not None else 0.0)


def _gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.gelu(x, approximate="tanh" if kind == "gelu_new" else "none")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, interleaved: bool) -> torch.Tensor:
    """Rotary embedding on the first ``n_rot`` dims of ``q`` [head, pos, d_head]; ``cos``/``sin`` [pos, n_rot]."""
    rot, rest = q[..., :n_rot], q[..., n_rot:]
    rot = rot * cos + (_rotate_every_two(rot) if interleaved else _rotate_half(rot)) * sin
    return torch.cat([rot, rest], dim=-1)


def parallel_reference(name: str, ref: Any, tokens: torch.Tensor, attn_keep: torch.Tensor, res_keep: torch.Tensor,
                       mlp_keep: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the tiny ``name`` model with edges removed as METHOD.md §4 says.

    ``attn_keep`` is ``[layer, head, pos, pos]`` (multiplies the post-softmax pattern), ``res_keep``
    and ``mlp_keep`` ``[layer, pos]`` (the block's one skip connection, the MLP output).
    """
    cfg = ref.config
    T = tokens.numel()
    H = cfg.num_attention_heads
    dh = cfg.hidden_size // H
    pos = torch.arange(T)[None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if name == "neox":
        m = ref.gpt_neox
        x = m.embed_in.weight[tokens]
        layers, final, unembed = m.layers, m.final_layer_norm, ref.lm_head
        cos, sin = (c[0] for c in m.rotary_emb(x[None], pos))
    elif name == "gptj":
        m = ref.transformer
        x = m.wte.weight[tokens]
        layers, final, unembed = m.h, m.ln_f, ref.lm_head
        sin, cos = (c[0].repeat_interleave(2, -1) for c in m.rotary_emb(x[None], pos))
    else:
        m = ref.model
        x = m.embed_tokens.weight[tokens]
        layers, final, unembed = m.layers, m.final_layernorm, ref.lm_head
        cos, sin = (c[0] for c in m.rotary_emb(x[None], pos))
    n_rot = cos.shape[-1]
    for l, blk in enumerate(layers):
        if name == "neox":
            a = blk.attention
            h1, h2 = _ln(x, blk.input_layernorm), _ln(x, blk.post_attention_layernorm)
            qkv = _lin(h1, a.query_key_value).reshape(T, H, 3 * dh).transpose(0, 1)
            q, k, v = qkv.chunk(3, dim=-1)
            o_proj, act = a.dense, cfg.hidden_act
            mlp_in, mlp_out = blk.mlp.dense_h_to_4h, blk.mlp.dense_4h_to_h
        else:
            a = blk.attn if name == "gptj" else blk.self_attn
            h1 = h2 = _ln(x, blk.ln_1 if name == "gptj" else blk.input_layernorm)  # one norm for both sublayers
            q, k, v = (_lin(h1, p).reshape(T, H, dh).transpose(0, 1) for p in (a.q_proj, a.k_proj, a.v_proj))
            o_proj = a.out_proj if name == "gptj" else a.dense
            act = cfg.activation_function if name == "gptj" else cfg.hidden_act
            mlp_in, mlp_out = (blk.mlp.fc_in, blk.mlp.fc_out) if name == "gptj" else (blk.mlp.fc1, blk.mlp.fc2)
        q, k = (_rope(t, cos, sin, n_rot, interleaved=name == "gptj") for t in (q, k))
        scores = q @ k.transpose(-1, -2) * dh ** -0.5
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1) * attn_keep[l]
        z = (pattern @ v).transpose(0, 1).reshape(T, H * dh)
        att = _lin(z, o_proj)
        mlp = _lin(_gelu(_lin(h2, mlp_in), act), mlp_out)
        x = res_keep[l][:, None] * x + att + mlp_keep[l][:, None] * mlp
    return _lin(_ln(x, final)[-1], unembed)


def hooked_parallel(name: str, tokenizer_dir: str, *, seed: int = 0) -> tuple[Any, Any]:
    """``(hooked, reference)``: a legacy ``HookedTransformer`` (TransformerLens <= 3.9) converted from
    the same random HF model as :func:`tiny_parallel` (same config, seed and randomised biases), with
    TransformerLens's own weight conversion and a config written as its ``convert_hf_model_config``
    writes it for that architecture; no weight processing (``fold_ln`` etc.)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions as wc
    from transformers import AutoTokenizer

    hf = _hf(name, seed)
    ref = copy.deepcopy(hf).eval()
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    common = dict(d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, n_layers=c.num_hidden_layers,
                  d_vocab=c.vocab_size, use_attn_scale=True, parallel_attn_mlp=True,
                  positional_embedding_type="rotary", normalization_type="LN", dtype=torch.float32, device="cpu")
    if name == "neox":
        cfg = dict(common, d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps,
                   act_fn=c.hidden_act, rotary_adjacent_pairs=False, original_architecture="GPTNeoXForCausalLM",
                   rotary_dim=round(c.rope_parameters["partial_rotary_factor"] * d_head))
        convert = wc.convert_neox_weights
    elif name == "gptj":
        cfg = dict(common, d_mlp=4 * c.n_embd, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
                   act_fn=c.activation_function, rotary_dim=c.rotary_dim, rotary_adjacent_pairs=True,
                   original_architecture="GPTJForCausalLM")
        convert = wc.convert_gptj_weights
    else:
        cfg = dict(common, d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps,
                   act_fn=c.hidden_act, rotary_base=c.rope_parameters["rope_theta"], original_architecture="PhiForCausalLM",
                   rotary_dim=round(c.rope_parameters["partial_rotary_factor"] * d_head))
        convert = wc.convert_phi_weights
    hcfg = HookedTransformerConfig(**cfg)
    model = HookedTransformer(hcfg, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), move_to_device=False)
    model.load_and_process_state_dict(convert(hf, hcfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval(), ref


def _hf(name: str, seed: int) -> Any:
    """The random HF model of :func:`tiny_parallel` (same config, seed and randomised biases)."""
    import transformers

    cls_name, _arch, kwargs = PARALLEL_CONFIGS[name]
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.ndim == 1:  # norm weights around 1, every bias around 0
                is_w = ("norm" in pname or "ln" in pname) and pname.endswith("weight")
                p.normal_(1.0 if is_w else 0.0, 0.3)
    return hf
