"""Tiny random models for unit tests, built offline from Hugging Face configs.

A word-level tokenizer ("w2 w3 ...") is written to disk once (TransformerLens re-loads tokenizers
from their directory to add BOS handling, so an in-memory one is not enough).
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 97

TINY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (transformers config class, architecture name TL maps to an adapter, kwargs)
    "gpt2": ("GPT2Config", "gpt2", dict(n_layer=3, n_embd=32, n_head=4, n_positions=64)),
    "llama_gqa": ("LlamaConfig", "meta-llama/Llama-3.2-1B",
                  dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, max_position_embeddings=64)),
    "qwen2_bias": ("Qwen2Config", "Qwen/Qwen2-0.5B",
                   dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, max_position_embeddings=64)),
}

#: Once refused; parallel blocks now have their own exact graph (issue 13, tests/unit/
#: test_parallel_blocks.py). The name stays for the tests that build it.
REFUSED_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "neox_parallel": ("GPTNeoXConfig", "EleutherAI/pythia-70m",
                      dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64)),
}


def save_tiny_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", unk_token="<unk>",
                                   pad_token="<bos>")
    fast.save_pretrained(path)


def tiny_bridge(name: str, tokenizer_dir: str, *, seed: int = 0):
    """A TransformerBridge around a randomly initialised tiny model, in eval mode."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    cls_name, arch, kwargs = {**TINY_CONFIGS, **REFUSED_CONFIGS}[name]
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if cls_name == "Qwen2Config":  # give the QKV biases real values (they init to 0)
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:
                    p.normal_(0, 0.5)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bridge = TransformerBridge.boot_transformers(arch, hf_model=hf, tokenizer=tok)
    bridge.eval()
    return bridge
