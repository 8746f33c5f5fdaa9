"""The architecture matrix of issue 13: which TransformerLens-bridged architectures tl_strace traces exactly.

For every architecture in TransformerLens's adapter registry
(``transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES``) that is a
decoder-only attention-based causal LM, a TINY random model is built offline from its Hugging Face
config (2 layers, d_model 32, 4 heads, 2 KV heads where the config has GQA, intermediate size 64,
the 97-word vocabulary of ``tests/tiny.py``, 4 experts with 2 active for MoE), booted with
``TransformerBridge.boot_transformers`` and classified with the library's own checks:

* ``tl_strace.check_model(model, tokens)`` (edges sum to every node, the full graph reproduces the
  logits to 1e-4 relative, attention masking acts), then
* one ``tl_strace.strace(model, tokens, conditions=("only",), sizes=[0.1, 1.0])`` whose
  ``full_graph_tv`` (the full graph's masked row against the clean forward; the curves' TV at
  s = 1 is 0 by construction) must be <= 1e-5;

both pass: **exact**; tl_strace raises ``UnsupportedModelError`` / ``DecompositionError``:
**refused** (the reason is the first line of its message); the model cannot be built or booted
offline: **cannot build** (the reason is the upstream error, short). Everything else in the
registry (encoder-decoder, encoder-only, audio, vision / multimodal, state-space and hybrid,
diffusion LMs) is listed in a second table as "not a decoder-only attention LM".

Run ``python scripts/architecture_matrix.py`` (offline, a few minutes on 2 cores): it writes
``docs/architectures.md`` and ``docs/architectures.json``; ``tests/unit/test_architecture_matrix.py``
re-runs :func:`classify` for every row and checks the status. Deterministic: every model is built
from ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.tiny import VOCAB, save_tiny_tokenizer  # noqa: E402

DOCS_MD = ROOT / "docs" / "architectures.md"
DOCS_JSON = ROOT / "docs" / "architectures.json"
TOKENS = [0, 5, 17, 3, 42, 8, 9, 23, 61, 4]
# TV is a probability mass; a masked fp32 forward of another batch shape / thread count moves each
# of the 97 probabilities by ~1e-7, so the full graph's TV against the clean forward
# (full_graph_tv) reaches ~2e-6 (measured with 2 threads): 1e-5.
TV_TOL = 1e-5

# ------------------------------------------------------------------------------------------------
# Registry entries that are not decoder-only attention-based causal LMs (second table).
# ------------------------------------------------------------------------------------------------
_ENC_DEC = "encoder-decoder"
_ENC = "encoder-only"
_AUDIO = "audio model"
_VISION = "vision / multimodal model"
_SSM = "state-space / recurrent layers, no attention"
_HYBRID = "hybrid: state-space or linear-attention layers between attention layers"
_DIFFUSION = "diffusion LM (bidirectional denoiser, not causal)"
NOT_DECODER: dict[str, str] = {
    **{a: _ENC_DEC for a in (
        "BartForConditionalGeneration", "BlenderbotForConditionalGeneration", "LEDForConditionalGeneration",
        "LongT5ForConditionalGeneration", "M2M100ForConditionalGeneration", "MarianMTModel",
        "MBartForConditionalGeneration", "PegasusForConditionalGeneration", "SwitchTransformersForConditionalGeneration",
        "T5ForConditionalGeneration", "MT5ForConditionalGeneration", "T5WithLMHeadModel",
        "T5GemmaForConditionalGeneration", "T5Gemma2ForConditionalGeneration")},
    **{a: _ENC for a in ("BertForMaskedLM", "BertLMHeadModel", "RobertaForMaskedLM")},
    **{a: _AUDIO for a in (
        "ASTForAudioClassification", "HubertForCTC", "HubertModel", "Wav2Vec2ForCTC", "Wav2Vec2ForPreTraining",
        "Wav2Vec2Model", "AudioFlamingo3ForConditionalGeneration", "MusicFlamingoForConditionalGeneration",
        "GlmAsrForConditionalGeneration", "Qwen2AudioForConditionalGeneration")},
    **{a: _VISION for a in (
        "ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
        "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
        "Idefics3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration", "Glm4vForConditionalGeneration", "Florence2ForConditionalGeneration",
        "Emu3ForConditionalGeneration", "Gemma3ForConditionalGeneration", "Gemma3nForConditionalGeneration",
        "Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration",
        "Llama4ForConditionalGeneration", "Mistral3ForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration", "MuseGlimmerForConditionalGeneration")},
    **{a: _SSM for a in (
        "MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM", "RwkvForCausalLM", "RWKV7ForCausalLM",
        "HyenaDNAForCausalLM", "RecurrentGemmaForCausalLM")},
    **{a: _HYBRID for a in (
        "BambaForCausalLM", "JambaForCausalLM", "Zamba2ForCausalLM", "FalconH1ForCausalLM", "NemotronHForCausalLM",
        "GraniteMoeHybridForCausalLM", "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Qwen3NextForCausalLM",
        "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "OlmoHybridForCausalLM")},
    **{a: _DIFFUSION for a in ("BD3LM", "DreamModel", "GiddForDiffusionLM", "LLaDAModelLM", "LLaDA2MoeModelLM")},
}

#: Registry names that are another spelling of a transformers class: built with that class, booted
#: with ``config.architectures = [registry name]`` so TransformerLens picks the listed adapter.
ALIASES: dict[str, str] = {
    "Gemma1ForCausalLM": "GemmaForCausalLM",
    "NeoXForCausalLM": "GPTNeoXForCausalLM",
    "NeoForCausalLM": "GPTNeoForCausalLM",
    "MPTForCausalLM": "MptForCausalLM",
    "JetMoEForCausalLM": "JetMoeForCausalLM",
    "PhiMoEForCausalLM": "PhimoeForCausalLM",
}

_REMOTE = "remote-code checkpoint: transformers 5.24 has no {cls} class; its config and modelling code need a download"
_NATIVE = "TransformerLens-native / checkpoint-format model with no Hugging Face class to build from a config"
#: Decoder-only LMs of the registry that cannot be built offline from a transformers config.
NO_HF_CLASS: dict[str, str] = {
    **{a: _REMOTE.format(cls=a) for a in (
        "BaiChuanForCausalLM", "BaichuanForCausalLM", "ExaoneForCausalLM", "InternLM2ForCausalLM",
        "OpenELMForCausalLM", "OuroForCausalLM", "QwenForCausalLM", "RavenForCausalLM", "GPT2LMHeadCustomModel")},
    **{a: _NATIVE for a in ("NanoGPTForCausalLM", "TransformerLensNative", "TransformerLensPretrain",
                            "MinGPTForCausalLM", "NeelSoluOldForCausalLM")},
    "BloomModel": "BloomModel is the headless BLOOM trunk (no LM head to trace); BloomForCausalLM is the LM row",
}

# ------------------------------------------------------------------------------------------------
# Tiny configs.
# ------------------------------------------------------------------------------------------------
D, H, KV, DH, FF, POS, L = 32, 4, 2, 8, 64, 64, 2
#: Overrides applied to a config field only when the architecture's default config has it.
_OVERRIDES: dict[str, Any] = {
    # depth / width / heads
    "num_hidden_layers": L, "n_layer": L, "n_layers": L, "num_layers": L,
    "hidden_size": D, "n_embd": D, "d_model": D, "word_embed_proj_dim": D,
    "num_attention_heads": H, "n_head": H, "n_heads": H, "num_heads": H,
    "num_key_value_heads": KV, "head_dim": DH,
    "intermediate_size": FF, "ffn_dim": FF, "n_inner": FF, "ffn_hidden_size": FF,
    # positions
    "max_position_embeddings": POS, "n_positions": POS, "n_ctx": POS, "max_seq_len": POS,
    "rotary_dim": 4, "rotary_emb_base": 10000,
    # MoE
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "moe_topk": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "decoder_sparse_step": 1,
    # DeepSeek MLA
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    # init and special tokens (pad must not be a real token of the tiny tokenizer's BOS)
    "initializer_range": 0.3, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 0,
    "use_cache": False, "tie_word_embeddings": False,
}


def _tiny_config(cfg_cls: Any, arch: str) -> Any:
    base = cfg_cls().to_dict()
    kw: dict[str, Any] = {"vocab_size": VOCAB, "architectures": [arch]}
    for k, v in _OVERRIDES.items():
        if k in base:
            kw[k] = v
    if base.get("sliding_window") is not None:
        kw["sliding_window"] = 4
    lt = base.get("layer_types")
    if isinstance(lt, list) and lt:
        kinds = list(dict.fromkeys(lt))
        kw["layer_types"] = (["sliding_attention", "full_attention"] if {"sliding_attention", "full_attention"}
                             <= set(kinds) else [kinds[0]] * L)
    if "mlp_only_layers" in base:
        kw["mlp_only_layers"] = []
    if "query_pre_attn_scalar" in base:
        kw["query_pre_attn_scalar"] = DH
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if base.get(cap) is not None:  # small enough to bend a tiny model's scores and logits
            kw[cap] = 2.0
    if "expansion_ratio" in base:  # MPT
        kw["expansion_ratio"] = FF // D
    if "qk_rope_head_dim" in base:  # multi-head latent attention: head_dim is the rotary part
        kw["head_dim"] = kw["qk_rope_head_dim"]
        if "num_key_value_heads" in kw:  # latent attention expands K/V to every query head
            kw["num_key_value_heads"] = H
        if "qk_head_dim" in base:
            kw["qk_head_dim"] = kw["qk_rope_head_dim"] + kw["qk_nope_head_dim"]
    if "index_head_dim" in base:  # GLM-MoE-DSA's sparse indexer
        kw.update(index_head_dim=8, index_n_heads=2, index_topk=4)
    if isinstance(base.get("indexer_types"), list):
        kw["indexer_types"] = [base["indexer_types"][0]] * L
    if "attention_types" in base:  # GPT-Neo: one global and one local layer
        kw.update(attention_types=[[["global", "local"], 1]], window_size=4)
        kw.pop("attention_layers", None)
    return cfg_cls(**kw)


_TOKDIR: str | None = None


def _tokenizer() -> Any:
    global _TOKDIR
    from transformers import AutoTokenizer

    if _TOKDIR is None:
        _TOKDIR = tempfile.mkdtemp(prefix="tl_strace_tok_")
        save_tiny_tokenizer(_TOKDIR)
    return AutoTokenizer.from_pretrained(_TOKDIR)


def build(arch: str, *, seed: int = 0) -> tuple[Any, str]:
    """``(bridge, config class name)``: a random tiny ``arch`` model in eval mode behind a TransformerBridge.

    Norm weights are drawn around 1 and every other 1-d parameter (biases, sinks) around 0, with
    ``initializer_range=0.3``, so that a bias sent to the wrong edge or a nearly uniform pattern
    cannot hide an error.
    """
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    hf_cls = getattr(transformers, ALIASES.get(arch, arch))
    cfg = _tiny_config(hf_cls.config_class, arch)
    torch.manual_seed(seed)
    hf = hf_cls(cfg).eval()
    with torch.no_grad():
        try:
            hf(torch.tensor([TOKENS]))
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"the transformers model itself fails on the tiny config: {_short(e)}") from e
        for pname, p in hf.named_parameters():
            if p.ndim == 1:
                is_w = ("norm" in pname or "ln" in pname) and pname.endswith("weight")
                p.normal_(1.0 if is_w else 0.0, 0.3)
    bridge = TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=_tokenizer())
    bridge.eval()
    return bridge, type(cfg).__name__


def _block_kind(bridge: Any) -> str:
    from tl_strace.model import spec as tm

    try:
        kind = tm._block_kind(bridge, "bridge", arch_name(bridge))
    except Exception:  # noqa: BLE001
        kind = "?"
    try:
        placement = tm._norm_placement(bridge, "bridge")
    except Exception:  # noqa: BLE001
        placement = "?"
    if kind == "parallel":
        return "parallel" if placement == "pre" else f"parallel + {placement}-norm"
    return {"pre": "sequential pre-norm", "sandwich": "sandwich", "post": "post-norm"}.get(placement, "?")


def arch_name(bridge: Any) -> str:
    return str(getattr(bridge.cfg, "model_name", "") or type(bridge).__name__)


def _short(e: BaseException, n: int = 200) -> str:
    line = (str(e).strip().splitlines() or [""])[0]
    msg = f"{type(e).__name__}: {line}"
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def classify(arch: str) -> dict[str, Any]:
    """Classify one registry architecture: ``{"architecture", "config_class", "block_kind", "status", "reason"}``.

    ``status`` is ``"exact"``, ``"refused"``, ``"cannot build"`` or ``"not a decoder-only attention LM"``.
    """
    import tl_strace
    from tl_strace.errors import StraceError

    row: dict[str, Any] = {"architecture": arch, "config_class": "", "block_kind": "", "status": "", "reason": ""}
    if arch in NOT_DECODER:
        row.update(status="not a decoder-only attention LM", reason=NOT_DECODER[arch])
        return row
    if arch in NO_HF_CLASS:
        row.update(status="cannot build", reason=NO_HF_CLASS[arch])
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge, row["config_class"] = build(arch)
    except Exception as e:  # noqa: BLE001
        import transformers

        cls = getattr(transformers, ALIASES.get(arch, arch), None)
        row["config_class"] = cls.config_class.__name__ if cls is not None else ""
        row.update(status="cannot build", reason=_short(e))
        return row
    row["block_kind"] = _block_kind(bridge)
    tokens = torch.tensor(TOKENS)
    try:
        with torch.no_grad():
            bridge(tokens[None])
    except Exception as e:  # noqa: BLE001
        row.update(status="cannot build", reason="upstream error in the TransformerBridge forward: " + _short(e))
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errs = tl_strace.check_model(bridge, tokens)
            res = tl_strace.strace(bridge, tokens, conditions=("only",), sizes=[0.1, 1.0])
        tv = float(res.full_graph_tv)
    except StraceError as e:  # UnsupportedModelError, DecompositionError, InputError
        row.update(status="refused", reason=_short(e))
        return row
    except KeyError as e:
        if "Hook name" not in str(e):
            row.update(status="cannot build", reason="unexpected error inside tl_strace: " + _short(e))
            return row
        hook = str(e).split("'")[1] if "'" in str(e) else str(e)
        row.update(status="cannot build", reason=f"a hook TransformerLens does not expose on this bridge: {hook} "
                   "(tl_strace lets the bridge's KeyError through)")
        return row
    except Exception as e:  # noqa: BLE001  (not one of tl_strace's named refusals: a bug to report)
        row.update(status="cannot build", reason="unexpected error inside tl_strace: " + _short(e))
        return row
    worst = max(errs.values())
    if tv > TV_TOL:
        row.update(status="refused", reason=f"full_graph_tv is {tv:.1e} > {TV_TOL:g}")
    else:
        row.update(status="exact", reason=f"max check error {worst:.1e} ({max(errs, key=errs.get)}); TV(s=1) {tv:.0e}")
    row["max_error"] = worst
    row["tv_s1"] = tv
    return row


def registry() -> list[str]:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return list(SUPPORTED_ARCHITECTURES)


def generated_versions(text: str) -> dict[str, str]:
    """The TransformerLens and transformers versions a generated table says it was built under."""
    import re

    tl = re.search(r"TransformerLens (\S+)'s adapter registry", text)
    hf = re.search(r"from its Hugging Face config \(transformers (\S+),", text)
    return {"transformer-lens": tl.group(1) if tl else "?", "transformers": hf.group(1) if hf else "?"}


def _md(rows: list[dict[str, Any]], seconds: float, versions: dict[str, str] | None = None) -> str:
    """The table as Markdown. ``versions``: the TransformerLens and transformers versions to name
    (default: those installed, the ones a regeneration runs under)."""
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    main = [r for r in rows if r["status"] != "not a decoder-only attention LM"]
    other = [r for r in rows if r["status"] == "not a decoder-only attention LM"]
    order = {"exact": 0, "refused": 1, "cannot build": 2}
    main.sort(key=lambda r: (order[r["status"]], r["architecture"].lower()))
    other.sort(key=lambda r: (r["reason"], r["architecture"].lower()))
    counts = {k: sum(r["status"] == k for r in main) for k in order}
    from importlib.metadata import version as installed

    def version(name: str) -> str:
        return versions[name] if versions else installed(name)

    out = [
        "# Architecture matrix",
        "",
        "Generated by `python scripts/architecture_matrix.py` (do not edit by hand); checked by",
        "`tests/unit/test_architecture_matrix.py`. Every decoder-only attention-based causal LM in",
        f"TransformerLens {version('transformer-lens')}'s adapter registry ({len(rows)} names) is built as a tiny random model",
        f"from its Hugging Face config (transformers {version('transformers')}, offline, seed 0: {L} layers, d_model {D},",
        f"{H} heads, {KV} KV heads where the config has GQA, intermediate {FF}, vocabulary {VOCAB}, 4 experts / 2 active),",
        "booted with `TransformerBridge.boot_transformers`, and classified with `tl_strace.check_model` (edges sum to",
        "every node, the full graph reproduces the logits to 1e-4 relative, attention masking acts) and one",
        "`tl_strace.strace(..., conditions=(\"only\",), sizes=[0.1, 1.0])` with `full_graph_tv` (TV(s=1) below: the full graph against the clean forward) <= 1e-5.",
        "**exact**: both pass. **refused**: tl_strace raises (reason = first line of its message); a refused model is",
        "never traced approximately. **cannot build**: the tiny model cannot be built or booted offline.",
        "",
        f"Summary: {counts['exact']} exact, {counts['refused']} refused, {counts['cannot build']} cannot build, "
        f"{len(other)} not decoder-only attention LMs (second table).",
        "",
        "| architecture | HF config class | block kind | status | reason / max errors |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {esc(r['architecture'])} | {esc(r['config_class'] or '—')} | {esc(r['block_kind'] or '—')} | "
            f"{r['status']} | {esc(r['reason'])} |" for r in main]
    out += ["", "## Not decoder-only attention LMs (not traced)", "",
            "| architecture | reason |", "|---|---|"]
    out += [f"| {esc(r['architecture'])} | not a decoder-only attention LM: {esc(r['reason'])} |" for r in other]
    return "\n".join(out) + "\n"


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    rows = []
    for arch in registry():
        t = time.perf_counter()
        rows.append(classify(arch))
        r = rows[-1]
        print(f"{time.perf_counter() - t:6.1f}s {arch:45s} {r['status']:14s} {r['block_kind']:20s} {r['reason'][:110]}",
              flush=True)
    seconds = time.perf_counter() - t0
    DOCS_MD.parent.mkdir(exist_ok=True)
    DOCS_MD.write_text(_md(rows, seconds))
    keep = ("architecture", "config_class", "block_kind", "status", "reason")
    DOCS_JSON.write_text(json.dumps([{k: r[k] for k in keep} for r in rows], indent=1) + "\n")
    print(f"wrote {DOCS_MD.relative_to(ROOT)} and {DOCS_JSON.relative_to(ROOT)} in {seconds:.0f}s")


if __name__ == "__main__":
    main()
