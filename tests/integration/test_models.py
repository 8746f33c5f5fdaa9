"""Integration tests of :mod:`tl_strace.io.models`: offline model loading.

The SmolLM2 tests (marked ``real``) build the bundled model into the *default* cache
(``$TL_STRACE_CACHE`` or ``~/.cache/tl_strace``) so that one conversion (~25 s) is shared by every
test of a CI run and by later runs on the same machine. The other tests are small and fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tl_strace.errors import ModelLoadError, StraceError
from tl_strace.io import bundled, models
from tl_strace.io.models import bundled_model_dir, load_model

PROMPT = "The capital of France is"


def _set_offline(mp: pytest.MonkeyPatch) -> None:
    """Make the process look offline to tl_strace (it reads these variables at call time)."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2() -> Iterator[Any]:
    """The bundled SmolLM2 bridge, loaded offline from the default cache (built if missing)."""
    with pytest.MonkeyPatch.context() as mp:
        _set_offline(mp)
        model = load_model("smollm2-135m", device="cpu")
    yield model


def _greedy_next_token(model: Any, text: str) -> str:
    """Decode the arg-max next token after ``text``."""
    tokens = model.to_tokens(text)
    with torch.no_grad():
        logits = model(tokens)
    return model.tokenizer.decode(int(logits[0, -1].argmax()))


def _no_network(*args: object, **kwargs: object) -> bool:
    raise AssertionError("an offline load must not probe the network")


def _forbid_hub_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any network connection fail the test: "fails fast" / "loads offline" are asserted as
    "never tries the network" (no retry loop, no timeout to wait out), not as a wall time."""
    import socket

    def _refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tl_strace tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)


@pytest.mark.real
def test_bundled_smollm2_loads_offline_and_predicts_paris(smollm2: Any) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(smollm2, TransformerBridge)
    assert not smollm2.training
    param = next(smollm2.original_model.parameters())
    assert param.dtype == torch.float32 and param.device.type == "cpu"
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model, smollm2.cfg.n_heads) == (30, 576, 9)
    assert _greedy_next_token(smollm2, PROMPT) == " Paris"
    cache = bundled_model_dir("smollm2-135m")
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert (cache / "tl_strace_cache.json").is_file()


@pytest.mark.real
def test_second_load_reads_the_cache(smollm2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cache present, no conversion runs and loading takes seconds."""
    _set_offline(monkeypatch)

    def _no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(bundled, "_convert", _no_conversion)
    model = load_model("SmolLM2-135M-Instruct", device="cpu")  # alias, any case (no conversion: see above)
    assert not model.training
    assert _greedy_next_token(model, PROMPT) == " Paris"


def test_unknown_hub_name_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_offline(monkeypatch)
    name = "tl-strace-test/definitely-not-a-real-model"
    # "fails fast" means no request is attempted (no retry loop); a request would raise here.
    monkeypatch.setattr(models, "_hub_reachable", _no_network)
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    message = str(info.value)
    assert name in message
    assert "HF_HUB_OFFLINE" in message
    assert "save_pretrained" in message and "smollm2-135m" in message


def test_unknown_hub_name_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the offline variables, an unreachable hub is detected before any request."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    _forbid_hub_downloads(monkeypatch)
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model("tl-strace-test/another-missing-model")


def test_missing_local_path_and_bad_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(str(tmp_path))


def test_bad_backend_and_hooked_on_tl4() -> None:
    with pytest.raises(ModelLoadError, match="backend"):
        load_model("smollm2-135m", backend="jax")
    try:
        import transformer_lens

        transformer_lens.HookedTransformer  # noqa: B018 - raises ImportError on TL >= 4
    except ImportError:
        with pytest.raises(ModelLoadError, match=r"transformer-lens<=3\.9"):
            load_model("smollm2-135m", backend="hooked")


def _tiny_tokenizer(directory: Path) -> Any:
    """Train a small word-level tokenizer offline (no files from the hub) and save it."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    text = [
        "the capital of france is paris",
        "the quick brown fox jumps over the lazy dog",
        "a tiny random model for tests",
    ]
    core = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(
        text, trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def test_local_directory_with_tiny_random_gpt2_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    _set_offline(monkeypatch)
    model_dir = tmp_path / "tiny-gpt2"
    tokenizer = _tiny_tokenizer(model_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf_model = GPT2LMHeadModel(config)
    hf_model.save_pretrained(str(model_dir))

    _forbid_hub_downloads(monkeypatch)
    bridge = load_model(str(model_dir), device="cpu", dtype=torch.float64)
    assert isinstance(bridge, TransformerBridge)
    assert not bridge.training
    assert next(bridge.original_model.parameters()).dtype == torch.float64
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 32

    tokens = bridge.to_tokens("the capital of france is", prepend_bos=False)
    with torch.no_grad():
        logits = bridge(tokens)
        expected = hf_model.double().eval()(tokens).logits
    assert logits.shape == (1, tokens.shape[1], len(tokenizer))
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def test_errors_share_base_class() -> None:
    assert issubclass(ModelLoadError, StraceError)
