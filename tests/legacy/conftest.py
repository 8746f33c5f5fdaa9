"""Fixtures of the legacy-backend tests. Every test module here needs TransformerLens 3.x
(``HookedTransformer``) and says so with ``pytestmark = pytest.mark.hooked``; tests/conftest.py
skips such tests, with the reason, under TransformerLens 4.x."""

from __future__ import annotations

import copy

import pytest

from tests.legacy.hooked_models import DEFAULT_PROCESSING


@pytest.fixture(scope="session")
def smollm2_hooked_processed(smollm2_hooked):
    """SmolLM2 as a HookedTransformer with TransformerLens's default weight processing, as
    ``HookedTransformer.from_pretrained`` gives it: RMSNorm weights folded into the next linear maps
    (``ln_final.w`` into ``W_U``), so every norm is an ``RMSNormPre`` without parameters."""
    model = copy.deepcopy(smollm2_hooked)
    model.load_and_process_state_dict(model.state_dict(), **DEFAULT_PROCESSING)
    return model.eval()
