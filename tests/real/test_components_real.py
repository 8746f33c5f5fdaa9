"""Component-level s-Trace on the real SmolLM2-135M (offline): exactness, both ablations, the three
scorers and storage. Kept short: one 8-token prompt, a handful of strata."""

from __future__ import annotations

import pytest
import torch

import tl_strace as ts
from tl_strace.components import ComponentSpace, component_strace, component_table, evaluate_components
from tl_strace.mean import compute_means
from tl_strace.metrics import total_variation
from tl_strace.model import _attached_hooks

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"
REFERENCE = ["The weather was mild for the time of year.", "A small bakery on the corner sells bread.",
             "The students listened while the professor explained the theory."]
SIZES = [1 / 300, 2 / 300, 5 / 300, 20 / 300, 100 / 300]


@pytest.fixture(scope="module")
def means(smollm2):
    return compute_means(smollm2, REFERENCE)


def test_smollm2_component_space_and_exactness(smollm2, means):
    with torch.no_grad():
        full = torch.log_softmax(smollm2(smollm2.to_tokens(PROMPT))[0, -1].float(), -1)
    names = ComponentSpace(30, 9, 6).names()
    assert len(names) == 300 and names[9] == "MLP0" and names[-1] == "MLP29"
    lp = evaluate_components(smollm2, PROMPT, [names, []])
    assert (lp[0] - full).abs().max() < 1e-4
    assert float(total_variation(full, lp[1:])[0]) > 0.5  # ablating every head and MLP breaks the model
    mean_all = evaluate_components(smollm2, PROMPT, [[]], ablation="mean", means=compute_means(smollm2, PROMPT),
                                   mean_positions="per_position")
    assert (mean_all[0] - full).abs().max() < 1e-4
    assert _attached_hooks(smollm2) == []


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_smollm2_cheap_scorers_and_greedy_first_step(smollm2, means, ablation, tmp_path):
    kw = {"ablation": ablation, "means": means if ablation == "mean" else None, "sizes": SIZES}
    res = {sc: component_strace(smollm2, PROMPT, scorer=sc, **kw) for sc in ("l1", "attribution")}
    if ablation == "zero":  # one greedy step = one forward of 300 rows; once is enough here
        res["greedy"] = component_strace(smollm2, PROMPT, scorer="greedy", greedy_steps=1, **kw)
    for sc, r in res.items():
        assert r.config["granularity"] == "component" and r.config["ablation"] == ablation
        assert r.n_components == 300 and float(r.full_graph_tv) < 1e-4
        assert r.full_top_strs[0] == " Paris"
    if "greedy" in res:  # greedy's first pick is the best single component: never worse at k = 1
        assert float(res["greedy"].tv[0]) <= min(float(res["l1"].tv[0]), float(res["attribution"].tv[0])) + 1e-6
        assert res["greedy"].counts.tolist() == [1, 300]
    r = res["l1"]
    r.save(tmp_path / "r.safetensors")
    back = ts.ComponentResult.load(tmp_path / "r.safetensors")
    assert back.density == r.density and back.config["components"] == r.config["components"]
    assert len(component_table(back)) == 300
