"""Component-level s-Trace (heads and MLPs): exactness against a hand-written forward, the three
scorers, the greedy reference, results, projection of token-level traces, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tl_strace as ts
from tl_strace.components import (
    ComponentSpace,
    component_strace,
    component_table,
    evaluate_components,
    parse_component,
    project_trace,
)
from tl_strace.errors import InputError, ResultsError
from tl_strace.mean import compute_means
from tl_strace.memory import estimate_memory
from tl_strace.metrics import kl_divergence, total_variation
from tl_strace.model import _attached_hooks, describe_model
from tests.tiny import tiny_bridge

TOKENS = torch.tensor([0, 5, 17, 3, 42, 8, 9, 23, 61, 4])


# --------------------------------------------------------------------------------------------
# A GPT-2 with peaked outputs and non-zero biases (a fresh random GPT-2 is near-uniform and has
# zero biases, which would make "attention output = b_O" vacuous). Owned by this module only.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peaked_gpt2(tiny_tokenizer_dir):
    model = tiny_bridge("gpt2", tiny_tokenizer_dir, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.original_model.named_parameters():
            if p.ndim == 2:
                p.mul_(8.0)
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def gpt2_reference(hf, tokens, head_keep, mlp_keep, z_abl=None, mlp_abl=None, *, return_z=False):
    """Last-position logits of GPT-2 written out by hand, with head outputs z_h and MLP outputs
    replaced by ``abl + keep·(x − abl)`` (``abl`` = 0 when None). ``head_keep`` is [L, H] or
    [L, T, H]; ``mlp_keep`` [L] or [L, T]; ``z_abl`` [L, T|1, H, dh]; ``mlp_abl`` [L, T|1, d]."""
    tr = hf.transformer
    T = tokens.numel()
    x = tr.wte(tokens) + tr.wpe(torch.arange(T))
    zs = []
    for l, blk in enumerate(tr.h):
        H = blk.attn.num_heads
        d = x.shape[-1]
        q, k, v = blk.attn.c_attn(blk.ln_1(x)).split(d, dim=-1)
        q, k, v = (u.reshape(T, H, d // H).transpose(0, 1) for u in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // H)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(0, 1)  # [T, H, dh]
        zs.append(z)
        hk = head_keep[l] if head_keep[l].ndim == 2 else head_keep[l][None, :]  # [T|1, H]
        za = torch.zeros_like(z) if z_abl is None else z_abl[l]
        z = za + hk[..., None] * (z - za)
        x = x + blk.attn.c_proj(z.reshape(T, d))
        m = blk.mlp(blk.ln_2(x))
        mk = mlp_keep[l] if mlp_keep[l].ndim == 1 else mlp_keep[l].reshape(1)
        ma = torch.zeros_like(m) if mlp_abl is None else mlp_abl[l]
        x = x + ma + mk[:, None] * (m - ma)
    logits = hf.lm_head(tr.ln_f(x))[-1]
    return (logits, torch.stack(zs)) if return_z else logits


def _logp(x):
    return torch.log_softmax(x.detach().float(), -1)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def test_names_parse_back_and_index_the_space():
    for per_pos in (False, True):
        sp = ComponentSpace(3, 4, 6, per_position=per_pos)
        names = sp.names()
        assert len(names) == len(set(names)) == sp.size
        assert sp.index(names) == list(range(sp.size))
        layer, head, pos = sp.decode()
        for n, l, h, t in zip(names, layer.tolist(), head.tolist(), pos.tolist()):
            assert parse_component(n) == (l, h, t)
    assert ComponentSpace(3, 4, 6).size == 15
    assert ComponentSpace(3, 4, 6, per_position=True).size == 2 * 5 * 6 + 5  # last block: last position only
    assert parse_component("L12H3") == (12, 3, -1) and parse_component("MLP0@7") == (0, -1, 7)


@pytest.mark.parametrize("bad, words", [
    ("L3H0", "3 blocks"), ("L0H4", "heads (0..3)"), ("MLP9", "valid names"), ("foo", "not a component name"),
    ("L0 H1", "not a component name"), ("L0H1@99", "positions 0..5"), ("mlp1", "not a component name"),
])
def test_unknown_component_names_are_refused_clearly(bad, words):
    sp = ComponentSpace(3, 4, 6, per_position=True)
    with pytest.raises(InputError) as e:
        sp.index([bad])
    assert words in str(e.value)


def test_position_names_need_a_per_position_space_and_reachable_cells():
    with pytest.raises(InputError, match="per_position=True"):
        ComponentSpace(2, 2, 4).index(["L0H1@2"])
    with pytest.raises(InputError, match="last block"):
        ComponentSpace(2, 2, 4, per_position=True).index(["MLP1@0"])


def test_evaluate_components_refuses_unknown_names(gpt2_model):
    with pytest.raises(InputError, match="Unknown component 'L7H0'"):
        evaluate_components(gpt2_model, TOKENS, [["L0H1", "L7H0"]])
    with pytest.raises(InputError, match="list of component-name lists"):
        evaluate_components(gpt2_model, TOKENS, ["L0H1"])
    assert _attached_hooks(gpt2_model) == []


# --------------------------------------------------------------------------------------------
# Acceptance 1: exactness
# --------------------------------------------------------------------------------------------
def test_keeping_every_component_reproduces_the_logits(tiny_model):
    want = _logp(tiny_model(TOKENS[None])[0, -1])
    means = compute_means(tiny_model, [TOKENS[:4], TOKENS])
    spec_names = ComponentSpace(tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, len(TOKENS)).names()
    for kw in ({}, {"ablation": "mean", "means": means}, {"ablation": "mean", "means": means,
                                                          "mean_positions": "per_position"}):
        got = evaluate_components(tiny_model, TOKENS, [spec_names], **kw)[0]
        assert (got - want).abs().max() < 1e-5
    res = component_strace(tiny_model, TOKENS, scorer="l1")
    assert float(res.full_graph_tv) < 1e-5 and int(res.counts[-1]) == res.n_components
    assert _attached_hooks(tiny_model) == []


def test_the_full_row_is_the_model_bit_for_bit_under_mean_ablation(llama_model):
    """Keeping every component is an exact identity under both ablations (x·1 + mean·0), so the
    row that keeps everything (the curves' reference) does not depend on the ablation; the old
    abl + 1·(x − abl) rounded it by 4.8e-7 in a log-prob on this model."""
    from tl_strace.components.ablate import Ablation, component_logprobs
    from tl_strace.model import model_guard

    spec = describe_model(llama_model)
    means = compute_means(llama_model, ["w3 w4 w5 w6", "w7 w8 w9 w10 w11"])
    space = ComponentSpace(spec.n_layers, spec.n_heads, len(TOKENS))
    rows = []
    with model_guard(llama_model):
        for abl in (Ablation("zero"), Ablation.build(spec, len(TOKENS), "mean", means, "agnostic", model=llama_model)):
            rows.append(next(component_logprobs(llama_model, spec, TOKENS, space, torch.ones(1, space.size), abl,
                                                chunk=1))[0])
    assert torch.equal(rows[0], rows[1])


def test_ablating_every_component_equals_the_hand_written_forward(peaked_gpt2):
    hf = peaked_gpt2.original_model
    L, H = peaked_gpt2.cfg.n_layers, peaked_gpt2.cfg.n_heads
    got = evaluate_components(peaked_gpt2, TOKENS, [[]])[0]
    with torch.no_grad():
        want = _logp(gpt2_reference(hf, TOKENS, torch.zeros(L, H), torch.zeros(L)))
    assert (got - want).abs().max() < 1e-4
    # ... which is the model with every attention output = b_O and every MLP output = 0:
    tr = hf.transformer
    b_O = torch.stack([blk.attn.c_proj.bias for blk in tr.h])
    with torch.no_grad():
        x = tr.wte(TOKENS) + tr.wpe(torch.arange(len(TOKENS))) + b_O.sum(0)
        direct = _logp(hf.lm_head(tr.ln_f(x))[-1])
    assert (got - direct).abs().max() < 1e-4
    assert b_O.abs().max() > 0.05  # the test is not vacuous
    ref_full = _logp(hf(TOKENS[None]).logits[0, -1])
    assert (got - ref_full).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_random_component_masks_match_the_hand_written_forward(peaked_gpt2, seed):
    hf = peaked_gpt2.original_model
    L, H, T = peaked_gpt2.cfg.n_layers, peaked_gpt2.cfg.n_heads, len(TOKENS)
    g = torch.Generator().manual_seed(seed)
    hk = torch.randint(0, 2, (L, H), generator=g).float()
    mk = torch.randint(0, 2, (L,), generator=g).float()
    names = [f"L{l}H{h}" for l in range(L) for h in range(H) if hk[l, h]] + [f"MLP{l}" for l in range(L) if mk[l]]
    # per position: random keep per (component, position)
    hk_p = torch.randint(0, 2, (L, T, H), generator=g).float()
    mk_p = torch.randint(0, 2, (L, T), generator=g).float()
    names_p = [f"L{l}H{h}@{t}" for l in range(L) for t in range(T) for h in range(H) if hk_p[l, t, h]]
    names_p += [f"MLP{l}@{t}" for l in range(L) for t in range(T) if mk_p[l, t]]
    means = compute_means(peaked_gpt2, [TOKENS[:3], TOKENS[2:], TOKENS])
    got = evaluate_components(peaked_gpt2, TOKENS, [names, names_p])
    got_mean = evaluate_components(peaked_gpt2, TOKENS, [names, names_p], ablation="mean", means=means,
                                   batch_size=1)
    za, ma = means.values("z", T)[:, :, :, :], means.values("mlp_out", T)
    with torch.no_grad():
        want = [_logp(gpt2_reference(hf, TOKENS, hk, mk)), _logp(gpt2_reference(hf, TOKENS, hk_p, mk_p))]
        want_mean = [_logp(gpt2_reference(hf, TOKENS, hk, mk, za, ma)),
                     _logp(gpt2_reference(hf, TOKENS, hk_p, mk_p, za, ma))]
    for i in range(2):
        assert (got[i] - want[i]).abs().max() < 1e-4
        assert (got_mean[i] - want_mean[i]).abs().max() < 1e-4


def test_mean_ablation_with_the_input_as_reference_and_per_position_means_is_the_identity(tiny_model):
    means = compute_means(tiny_model, TOKENS)  # the reference corpus is the input itself
    want = _logp(tiny_model(TOKENS[None])[0, -1])
    got = evaluate_components(tiny_model, TOKENS, [[], ["L0H1", "MLP1"]], ablation="mean", means=means,
                              mean_positions="per_position")
    assert (got - want[None]).abs().max() < 1e-5
    res = component_strace(tiny_model, TOKENS, scorer="greedy", ablation="mean", means=means,
                           mean_positions="per_position", greedy_steps=2)
    assert float(res.tv.max()) < 1e-5 and res.config["tv_empty"] < 1e-5
    assert res.config["mean_positions"] == "per_position"
    # ... whereas the position-agnostic mean of the same corpus does change the output.
    agn = evaluate_components(tiny_model, TOKENS, [[]], ablation="mean", means=means)
    assert (agn[0] - want).abs().max() > 1e-6


def test_batched_rows_equal_one_row_at_a_time(llama_model):
    sp = ComponentSpace(llama_model.cfg.n_layers, llama_model.cfg.n_heads, len(TOKENS))
    names = sp.names()
    sets = [names[:k] for k in range(0, sp.size + 1, 3)]
    a = evaluate_components(llama_model, TOKENS, sets, batch_size=len(sets))
    b = evaluate_components(llama_model, TOKENS, sets, batch_size=1)
    est = estimate_memory(describe_model(llama_model), len(TOKENS), 1, edge_space=False)
    c = evaluate_components(llama_model, TOKENS, sets, memory_budget=est.fixed + 2 * est.per_row)  # 2 rows a forward
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------
def test_l1_scores_are_local_l1_weights(gpt2_model):
    """The l1 score of a head of block 0 is the mean over positions of ‖z_h W_O[h]‖₁ over the
    attention node's L1 mass, computed here without the library's einsum."""
    res = component_strace(gpt2_model, TOKENS, scorer="l1")
    store = {}
    hooks = [("blocks.0.attn.hook_z", lambda z, hook: store.__setitem__("z", z[0].detach())),
             ("blocks.0.hook_resid_pre", lambda x, hook: store.__setitem__("x", x[0].detach())),
             ("blocks.0.hook_mlp_out", lambda x, hook: store.__setitem__("m", x[0].detach())),
             ("blocks.0.hook_resid_mid", lambda x, hook: None)]
    with gpt2_model.hooks(fwd_hooks=hooks), torch.no_grad():
        gpt2_model(TOKENS[None])
    W_O = gpt2_model.blocks[0].attn.W_O.detach()
    H = gpt2_model.cfg.n_heads
    contrib = torch.stack([store["z"][:, h] @ W_O[h] for h in range(H)], 1)  # [T, H, d]
    a = contrib.abs().sum(-1)
    w = a / (store["x"].abs().sum(-1) + a.sum(-1))[:, None]
    mid = store["x"] + contrib.sum(1) + gpt2_model.blocks[0].attn.b_O.detach()
    wm = store["m"].abs().sum(-1) / (mid.abs().sum(-1) + store["m"].abs().sum(-1))
    torch.testing.assert_close(res.scores[:H], w.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.scores[H], wm.mean(0), atol=1e-5, rtol=1e-4)
    assert torch.equal(res.rank[torch.argsort(-res.scores, stable=True)], torch.arange(res.n_components))


def test_attribution_scores_are_the_gradient_of_kl_in_the_keep_mask(peaked_gpt2):
    """−∂KL/∂m_c at m = 0.5, checked by central finite differences through real masked forwards."""
    res = component_strace(peaked_gpt2, TOKENS, scorer="attribution", attribution_point=0.5)
    C = res.n_components
    full = _logp(peaked_gpt2(TOKENS[None])[0, -1])
    from tl_strace.components import Ablation, component_logprobs
    from tl_strace.model import describe_model

    spec = describe_model(peaked_gpt2)
    sp = ComponentSpace(spec.n_layers, spec.n_heads, len(TOKENS))
    eps = 1e-2
    rows = torch.full((2 * C, C), 0.5)
    for c in range(C):
        rows[2 * c, c] += eps
        rows[2 * c + 1, c] -= eps
    with torch.no_grad():
        lp = torch.cat(list(component_logprobs(peaked_gpt2, spec, TOKENS, sp, rows, Ablation("zero"), chunk=64)))
    kl = kl_divergence(full, lp).double()
    fd = -(kl[0::2] - kl[1::2]) / (2 * eps)
    torch.testing.assert_close(res.scores.double(), fd, atol=2e-3, rtol=2e-2)


def test_greedy_steps_are_exact_best_extensions(peaked_gpt2):
    """Each greedy step's choice is the argmin of TV over every one-component extension of the
    previous set (real masked forwards); the first choice is therefore the best single component."""
    res = component_strace(peaked_gpt2, TOKENS, scorer="greedy", greedy_steps=3)
    names = res.config["components"]
    order = [names[i] for i in torch.argsort(res.rank.masked_fill(res.rank < 0, 10**6))[:3].tolist()]
    full = _logp(peaked_gpt2(TOKENS[None])[0, -1])
    chosen: list[str] = []
    for step in range(3):
        cands = [n for n in names if n not in chosen]
        tv = total_variation(full, evaluate_components(peaked_gpt2, TOKENS, [chosen + [n] for n in cands]))
        assert order[step] == cands[int(torch.argmin(tv))]
        assert abs(float(res.tv[step]) - float(tv.min())) < 1e-5
        chosen.append(order[step])
    # Strata beyond greedy_steps are not evaluated (except the full model), and unranked = NaN score.
    assert res.counts.tolist() == [1, 2, 3, res.n_components]
    assert int((res.rank >= 0).sum()) == 3 and torch.isnan(res.scores[res.rank < 0]).all()


def _curves(model, tokens, **kw):
    return {sc: component_strace(model, tokens, scorer=sc, **kw) for sc in ("greedy", "l1", "attribution")}


def _prefix(res, k):
    return set(torch.nonzero((res.rank >= 0) & (res.rank < k)).flatten().tolist())


def test_greedy_is_the_reference_for_the_cheap_scorers_on_tiny_models(tiny_model, record_property):
    """Acceptance 2 on the suite's tiny models. What greedy guarantees, asserted: at size 1 it is
    never worse than l1 or attribution, nor at any size k where the scorer kept the same k-1
    components as greedy. Greedy is myopic, so elsewhere a scorer's prefix can beat it (it does on
    these random models, by up to a few 1e-3 TV): the gap per size is recorded, not asserted."""
    res = _curves(tiny_model, TOKENS)
    g = res["greedy"]
    for sc in ("l1", "attribution"):
        gap = res[sc].tv - g.tv
        record_property(f"{tiny_model.cfg.model_name}-{sc}-minus-greedy-tv", [round(float(x), 5) for x in gap])
        record_property(f"{tiny_model.cfg.model_name}-{sc}-mean-gap", round(float(gap.mean()), 5))
        assert float(gap[0]) >= -1e-6
        for k in range(1, g.n_components):
            if _prefix(res[sc], k) == _prefix(g, k):
                assert float(gap[k]) >= -1e-6, (sc, k, gap)


@pytest.fixture(scope="module")
def peaked_small(tiny_tokenizer_dir):
    """A 2-block Qwen2 (10 components) with peaked outputs: small enough to search exhaustively."""
    model = tiny_bridge("qwen2_bias", tiny_tokenizer_dir, seed=2)
    with torch.no_grad():
        for p in model.original_model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return model


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_every_search_against_the_exhaustive_optimum(peaked_small, ablation, record_property):
    """The best subset of each size, by brute force over all 2^C subsets, is at or below greedy,
    l1 and attribution at every size; greedy's first pick is that optimum. How far each is from
    it is recorded (mean TV gap over sizes)."""
    kw = {} if ablation == "zero" else {"ablation": "mean",
                                        "means": compute_means(peaked_small, [TOKENS[:7], TOKENS[2:], TOKENS])}
    res = _curves(peaked_small, TOKENS, **kw)
    names = res["l1"].config["components"]
    C = len(names)
    subsets = [[n for i, n in enumerate(names) if mask >> i & 1] for mask in range(1, 2 ** C)]
    full = _logp(peaked_small(TOKENS[None])[0, -1])
    tv = total_variation(full, evaluate_components(peaked_small, TOKENS, subsets, **kw))
    size = torch.tensor([len(s) for s in subsets])
    best = torch.stack([tv[size == k].min() for k in range(1, C + 1)])
    assert abs(float(res["greedy"].tv[0]) - float(best[0])) < 1e-6
    for sc, r in res.items():
        gap = r.tv - best
        assert float(gap.min()) >= -1e-6, (sc, gap)
        record_property(f"{ablation}-{sc}-minus-optimum-mean-tv", round(float(gap.mean()), 5))
        record_property(f"{ablation}-{sc}-minus-optimum-tv", [round(float(x), 4) for x in gap])


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def test_component_results_have_their_own_type_over_the_shared_base(llama_model, tmp_path):
    res = component_strace(llama_model, TOKENS, scorer="attribution", conditions=("only", "random", "inverse"),
                           target=7)
    C = res.n_components
    assert res.config["granularity"] == "component" and res.config["scorer"] == "attribution"
    assert res.config["ablation"] == "zero" and len(res.config["components"]) == C
    assert res.counts.tolist() == list(range(1, C + 1)) and float(res.sizes[-1]) == 1.0
    # nested by construction: stratum k is the first counts[k] components of the ranking
    for k, n in enumerate(res.counts.tolist()):
        assert set(torch.nonzero(res.labels <= k).flatten().tolist()) == set(torch.nonzero(res.rank < n).flatten().tolist())
    assert float(res.curve("tv", "inverse")[-1]) == pytest.approx(res.config["tv_empty"], abs=1e-6)
    df = res.to_dataframe()
    assert len(df) == 3 * C and set(df["condition"]) == {"only", "random", "inverse"}
    assert np.isfinite(res.density) and math.isfinite(res.summary()["density"])
    assert res.recovery_sizes()[1] <= 1.0
    assert isinstance(res, ts.ComponentResult) and isinstance(res, ts.TraceResult)
    assert not isinstance(res, ts.StraceResult) and not hasattr(res, "n_edges") and not hasattr(res, "weights")
    assert res.components == res.config["components"] and res.n_total == C and f"n_{res.UNIT}" in df
    path = tmp_path / "comp.safetensors"
    res.save(path)
    for load in (ts.TraceResult.load, ts.ComponentResult.load):
        back = load(path)
        assert type(back) is ts.ComponentResult and back.config == res.config
        assert torch.equal(back.rank, res.rank) and torch.equal(back.scores, res.scores) and back.density == res.density
    with pytest.raises(ts.ResultsError, match="ComponentResult.load or TraceResult.load"):
        ts.StraceResult.load(path)  # the token-level type refuses a component file, saying what to use
    with pytest.raises(InputError, match="component_table"):
        res.subgraph(0.5)
    tab = component_table(res)
    assert tab["rank"].tolist() == list(range(C)) and set(tab["name"]) == set(res.config["components"])
    assert (tab["first_size"].diff().dropna() >= 0).all()


def test_per_position_component_trace(gpt2_model):
    toks = TOKENS[:5]
    res = component_strace(gpt2_model, toks, scorer="l1", per_position=True, sizes=[0.1, 0.5])
    assert res.n_components == 2 * 5 * 5 + 5 and res.config["per_position"]
    assert res.counts.tolist() == [math.floor(0.1 * res.n_components), math.floor(0.5 * res.n_components), res.n_components]
    assert all("@" in n for n in res.config["components"])


def test_project_trace_counts_component_edges(gpt2_model):
    tr = ts.strace(gpt2_model, TOKENS, conditions=("only",), sizes=[0.05, 0.2, 0.6])
    df = project_trace(tr)
    L, H, T = 3, 4, len(TOKENS)
    assert len(df) == 4 * L * (H + 1)
    full = df[df["stratum"] == 3]
    assert (full["share"] == 1.0).all()
    assert full["n_edges_total"].sum() == (L - 1) * (H * T * (T + 1) // 2 + T) + H * T + 1
    for k, s in enumerate([0.05, 0.2, 0.6]):
        part = df[df["stratum"] == k]
        sub = tr.subgraph(s)
        comp = sub.component_shares().set_index("component")
        used = part[part["used"]].set_index("component")
        assert set(used.index) == set(comp.index)
        assert (used["n_edges"] == comp.loc[used.index, "n_edges"]).all()
        assert np.allclose(used["share"], comp.loc[used.index, "share"])
        n_res = int(sum(1 for t in sub.type.tolist() if t in (1, 3)))
        assert part["n_edges"].sum() + n_res == len(sub)
    with pytest.raises(InputError):
        project_trace(component_strace(gpt2_model, TOKENS))


# --------------------------------------------------------------------------------------------
# Acceptance 3: clear errors, model left clean
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"scorer": "magic"}, "Unknown scorer"),
    ({"ablation": "resample"}, "Unknown ablation"),
    ({"ablation": "mean"}, "compute_means"),
    ({"scorer": "attribution", "attribution_point": 1.0}, "strictly between 0 and 1"),
    ({"scorer": "l1", "greedy_steps": 3}, "greedy_steps"),
    ({"scorer": "l1", "attribution_point": 0.3}, "attribution_point applies to scorer='attribution' only"),
    ({"scorer": "greedy", "attribution_point": 0.5}, "attribution_point applies"),
    ({"conditions": ["only", "bogus"]}, "Conditions"),
    ({"sizes": [0.5, 0.1]}, "strictly increasing"),
    ({"mean_positions": "both", "ablation": "mean"}, "mean_positions"),
])
def test_bad_options_are_refused_before_any_forward(gpt2_model, kwargs, words):
    with pytest.raises(InputError) as e:
        component_strace(gpt2_model, TOKENS, **kwargs)
    assert words in str(e.value)
    assert _attached_hooks(gpt2_model) == []


def test_mean_cache_from_another_model_is_refused(gpt2_model, llama_model, tmp_path):
    means = compute_means(llama_model, [TOKENS])
    with pytest.raises(InputError, match="another model"):
        component_strace(gpt2_model, TOKENS, ablation="mean", means=means)
    path = tmp_path / "m.safetensors"
    means.save(path)
    with pytest.raises(InputError, match="another model"):
        evaluate_components(gpt2_model, TOKENS, [[]], ablation="mean", means=path)
    with pytest.raises(ResultsError, match="No mean cache"):
        component_strace(llama_model, TOKENS, ablation="mean", means=tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="Per-position means cover"):
        component_strace(llama_model, TOKENS, ablation="mean", means=compute_means(llama_model, [TOKENS[:4]]),
                         mean_positions="per_position")
    with pytest.raises(InputError, match="ablation='zero'"):
        component_strace(llama_model, TOKENS, means=means)
    for m in (gpt2_model, llama_model):
        assert _attached_hooks(m) == []


def test_model_state_is_restored_after_every_scorer(llama_model):
    before = llama_model(TOKENS[None])
    grad = torch.is_grad_enabled()
    for sc in ("l1", "attribution", "greedy"):
        component_strace(llama_model, TOKENS, scorer=sc, greedy_steps=1 if sc == "greedy" else None)
        assert _attached_hooks(llama_model) == [] and torch.is_grad_enabled() == grad
        assert all(p.grad is None for p in llama_model.parameters())
    torch.testing.assert_close(llama_model(TOKENS[None]), before)


def test_hooks_off_the_computation_path_are_refused(llama_model, monkeypatch):
    """If editing hook_z / hook_mlp_out did not change the computation (a backend whose hook points
    are not on the path), every ablation would silently be a no-op: refused before any result."""
    import weakref

    from tl_strace.components import ablate as components  # where the check and its cache live

    monkeypatch.setattr(components, "_VERIFIED", weakref.WeakKeyDictionary())
    monkeypatch.setattr(components._MixHook, "__call__", lambda self, x, hook: x)
    with pytest.raises(ts.UnsupportedModelError, match="not on its computation path"):
        component_strace(llama_model, TOKENS)
    assert _attached_hooks(llama_model) == []


def test_component_files_of_format_2_load_as_component_results(llama_model, tmp_path):
    """Before result types per granularity (format 2), a component result was a StraceResult whose
    n_edges / weights held the component count and scores: such files still load, renamed."""
    from tl_strace.store import read_tensors, write_tensors

    res = component_strace(llama_model, TOKENS, scorer="l1")
    new = tmp_path / "new.st"
    res.save(new)
    meta, tensors = read_tensors(new, "tl_strace", what="test", missing="missing")
    meta["format_version"] = 2
    meta["n_edges"] = meta.pop("n_components")
    tensors["weights"] = tensors.pop("scores")
    old = tmp_path / "old.st"
    write_tensors(old, tensors, "tl_strace", meta)
    back = ts.TraceResult.load(old)
    assert type(back) is ts.ComponentResult and back.n_components == res.n_components
    assert torch.equal(back.scores, res.scores) and torch.equal(back.labels, res.labels)
    meta["format_version"] = 3  # a current file must use the current names
    write_tensors(old, tensors, "tl_strace", meta)
    with pytest.raises(ts.ResultsError, match="n_components|scores"):
        ts.TraceResult.load(old)


def test_component_results_go_through_every_view(gpt2_model, tmp_path):
    """A real ComponentResult (not a token result relabelled) through the display methods: the
    views take any TraceResult; the token-only ones refuse it with a one-line InputError."""
    res = component_strace(gpt2_model, TOKENS, conditions=("only", "random"))
    html = res._repr_html_()
    assert "tls-static-img" in html and "component-level" in html
    assert res.plot() is not None
    page = res.save_html(tmp_path / "r.html")
    assert "density" in (tmp_path / "r.html").read_text(encoding="utf-8") and page.endswith("r.html")
    with pytest.raises(InputError, match="token-level trace"):
        res.plot_shares()
