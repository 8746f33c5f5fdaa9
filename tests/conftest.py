"""Shared fixtures: tiny random TransformerLens models (no hub access) and the real SmolLM2.

Every model fixture is session-scoped and read-only: tests must leave it as they found it (no
hooks, eval mode), which is itself one of the properties under test.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import TINY_CONFIGS, tiny_bridge  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny import save_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(str(d))
    return str(d)


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request: pytest.FixtureRequest, tiny_tokenizer_dir: str):
    """Each tiny decomposable architecture in turn (GPT-2, Llama with GQA, Qwen2 with QKV bias)."""
    return tiny_bridge(request.param, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def gpt2_model(tiny_tokenizer_dir: str):
    return tiny_bridge("gpt2", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def llama_model(tiny_tokenizer_dir: str):
    return tiny_bridge("llama_gqa", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, offline (tests marked `real`)."""
    import tl_strace as ts

    return ts.load_model("smollm2-135m")


@pytest.fixture()
def tokens() -> torch.Tensor:
    return torch.tensor([0, 5, 17, 3, 42, 8, 9, 23, 61, 4])
