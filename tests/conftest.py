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

from tests.legacy.hooked_models import (  # noqa: E402
    HAS_HOOKED,
    HOOKED_SKIP_REASON,
    HOOKED_VARIANTS,
    tiny_hooked,
)
from tests.tiny import TINY_CONFIGS, tiny_bridge  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Legacy HookedTransformer (TransformerLens <= 3.9; issue 8). Under TransformerLens 4.x nothing
# below adds a test or changes a test id: the hooked parameters exist only where HookedTransformer
# does. Tests in tests/legacy/ carry the `hooked` marker and are skipped with a reason under 4.x.
# ---------------------------------------------------------------------------------------------
_HOOKED = pytest.mark.hooked
_TINY_PARAMS = sorted(TINY_CONFIGS) + ([pytest.param(v, marks=_HOOKED) for v in HOOKED_VARIANTS] if HAS_HOOKED else [])
# Shared model fixtures get a "bridge"/"hooked" parameter only under 3.x (ids unchanged under 4.x).
_BACKEND_PARAMS = ["bridge", pytest.param("hooked", marks=_HOOKED)] if HAS_HOOKED else None

#: Shared tests that exercise something only a TransformerBridge has, skipped on hooked parameters.
_BRIDGE_ONLY: dict[str, str] = {
    "test_nan_logits_are_reported": "edits the HF weights behind a bridge (original_model); a converted "
    "HookedTransformer holds its own copy",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("hooked") is None:
            continue
        if not HAS_HOOKED:
            item.add_marker(pytest.mark.skip(reason=HOOKED_SKIP_REASON))
        elif item.originalname in _BRIDGE_ONLY:
            item.add_marker(pytest.mark.skip(reason=f"bridge only: {_BRIDGE_ONLY[item.originalname]}"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny import save_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(str(d))
    return str(d)


@pytest.fixture(scope="session", params=_TINY_PARAMS)
def tiny_model(request: pytest.FixtureRequest, tiny_tokenizer_dir: str):
    """Each tiny decomposable architecture in turn (GPT-2, Llama with GQA, Qwen2 with QKV bias); under
    TransformerLens 3.x also their HookedTransformer twins, raw and with processed weights."""
    if request.param in HOOKED_VARIANTS:
        return tiny_hooked(tokenizer_dir=tiny_tokenizer_dir, **HOOKED_VARIANTS[request.param])
    return tiny_bridge(request.param, tiny_tokenizer_dir)


@pytest.fixture(scope="session", params=_BACKEND_PARAMS)
def gpt2_model(request: pytest.FixtureRequest, tiny_tokenizer_dir: str):
    if getattr(request, "param", "bridge") == "hooked":
        return tiny_hooked("gpt2", tiny_tokenizer_dir, keep_hf=True)
    return tiny_bridge("gpt2", tiny_tokenizer_dir)


@pytest.fixture(scope="session", params=_BACKEND_PARAMS)
def llama_model(request: pytest.FixtureRequest, tiny_tokenizer_dir: str):
    if getattr(request, "param", "bridge") == "hooked":
        return tiny_hooked("llama_gqa", tiny_tokenizer_dir, keep_hf=True)
    return tiny_bridge("llama_gqa", tiny_tokenizer_dir)


@pytest.fixture(scope="session", params=_BACKEND_PARAMS)
def smollm2(request: pytest.FixtureRequest):
    """The real SmolLM2-135M-Instruct, offline (tests marked `real`); under TransformerLens 3.x also
    as a HookedTransformer (``load_model(..., backend="hooked")``, no weight processing)."""
    return request.getfixturevalue(f"smollm2_{getattr(request, 'param', 'bridge')}")


@pytest.fixture(scope="session")
def smollm2_bridge():
    """SmolLM2 as a TransformerBridge (one copy per session, shared by `smollm2` and tests/legacy)."""
    import tl_strace as ts

    return ts.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hooked():
    """SmolLM2 as a legacy HookedTransformer without weight processing (TransformerLens 3.x only)."""
    import tl_strace as ts

    if not HAS_HOOKED:
        pytest.skip(HOOKED_SKIP_REASON)
    return ts.load_model("smollm2-135m", backend="hooked")


@pytest.fixture()
def tokens() -> torch.Tensor:
    return torch.tensor([0, 5, 17, 3, 42, 8, 9, 23, 61, 4])


@pytest.fixture()
def one_thread():
    """Run a test with one torch thread, restoring the caller's setting after (used by the corpus
    tests, which compare in-process runs with runs in subprocesses)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
