"""density_profile() on the real SmolLM2-135M-Instruct (offline; marked ``real``): the profile's value
at a position is strace() on the prefix ending there (issue 18, acceptance 1)."""

from __future__ import annotations

import pytest
import torch

import tl_strace as ts

pytestmark = pytest.mark.real

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."
SIZES = [1e-4, 1e-3, 1e-2, 1e-1, 0.4]  # a short grid keeps the test under a minute at one thread


@pytest.mark.parametrize("shared_forward", [True, False])
def test_profile_equals_strace_on_each_prefix_smollm2(smollm2, shared_forward):
    tokens = smollm2.to_tokens(TEXT)[0]
    T = int(tokens.numel())
    positions = [1, 8, T - 1]  # the shortest prefix, a middle one, and the last token (no target)
    prof = ts.density_profile(smollm2, TEXT, positions, sizes=SIZES, conditions=("only",),
                              shared_forward=shared_forward)
    assert torch.equal(prof.tokens, tokens.cpu()) and prof.positions == tuple(positions)
    for t in positions:
        a = prof.at(t)
        b = ts.strace(smollm2, tokens[: t + 1], sizes=SIZES, conditions=("only",),
                      target=int(tokens[t + 1]) if t + 1 < T else None)
        assert torch.equal(a.labels, b.labels), f"strata differ at {t}"
        assert torch.equal(a.counts, b.counts) and a.target == b.target
        assert torch.equal(a.full_top_ids, b.full_top_ids)
        # Bit for bit in both modes: the shared forward's slice may move the graph's weights by
        # float32 ulps (edges tied to ~1e-8 may swap places inside a stratum, so ranks are not
        # compared), but the strata are the same and the curves are measured on the prefix itself,
        # against the full graph's row of the same masked forwards (tl_strace.engine.evaluate).
        # Before that reference, the shared mode's TVs moved by up to 3.5e-6 here.
        for name in ("tv_all", "kl_all", "entropy_all", "top_probs", "full_top_probs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (t, name)
        if not shared_forward:  # a forward per prefix: the very computation strace runs
            assert torch.equal(a.rank, b.rank), t
