"""density_profile(): every position's value is strace() on the prefix ending there (issue 18), from one
clean forward; positions checked before any work; storage; views; the command."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tl_strace as ts
from tl_strace.errors import InputError, ResultsError
from tl_strace.model import clean_run, describe_model
from tl_strace.results import DensityProfile
from tl_strace.store import CHECKSUM_KEY, content_checksum

TOKS = torch.tensor([0, 5, 17, 3, 42, 8, 9, 23, 61, 4, 11])
POSITIONS = [1, 4, 7, 10]  # 10 is the last token: no next token, so no target

# The clean run of a prefix sliced from the run of the whole text differs from a forward on the
# prefix by float32 rounding only (measured: at most 1.2e-7 on any activation of the tiny models,
# 0 at full length): a longer sequence may take another matmul/softmax reduction order. The graph's
# weights may move by such ulps (strata must still be identical); the curves must not move at all:
# they are measured against the full graph's row of the masked evaluation on the prefix itself
# (tl_strace.engine.evaluate), the very computation strace runs.
MEASURED = ("tv_all", "kl_all", "nucleus_all", "entropy_all", "ce_all", "target_rank_all", "top_ids",
            "top_probs", "full_top_ids", "full_top_probs")

# The suite runs tl_strace under beartype (pyproject: --jaxtyping-packages), which refuses ill-typed
# values by their annotations before tl_strace's own checks run. Users run without it, so the entry
# points are called unwrapped where a test passes such values; everything they call stays checked.
density_profile = inspect.unwrap(ts.density_profile)
trace_generation = inspect.unwrap(ts.trace_generation)


def _assert_same_trace(a: ts.StraceResult, b: ts.StraceResult) -> None:
    """``a`` (a profile's position) is ``b`` (strace on the prefix): identical strata, close curves."""
    assert torch.equal(a.tokens, b.tokens) and a.str_tokens == b.str_tokens and a.target == b.target
    assert a.n_edges == b.n_edges and a.conditions == b.conditions and a.config == b.config
    assert torch.equal(a.sizes, b.sizes) and torch.equal(a.counts, b.counts)
    assert torch.equal(a.labels, b.labels), "strata differ"
    assert torch.equal(a.rank, b.rank), "search orders differ"
    assert torch.equal(a.reaches_input_all, b.reaches_input_all)
    for name in MEASURED:  # bit for bit (NaN CE / rank where there is no target)
        assert torch.equal(getattr(a, name).nan_to_num(-1.0), getattr(b, name).nan_to_num(-1.0)), name
    for name in ("full_entropy", "full_ce", "full_target_rank"):
        x, y = getattr(a, name), getattr(b, name)
        assert x == y or (x != x and y != y), name
    assert torch.equal(a.density, b.density) if isinstance(a.density, torch.Tensor) else a.density == b.density


@pytest.fixture(scope="module")
def gpt2_profile(gpt2_model):
    return ts.density_profile(gpt2_model, TOKS, POSITIONS)


def test_each_position_equals_strace_on_its_prefix(tiny_model):
    prof = ts.density_profile(tiny_model, TOKS, POSITIONS)
    assert prof.positions == tuple(POSITIONS) and len(prof.results) == len(POSITIONS)
    for t in POSITIONS:
        target = int(TOKS[t + 1]) if t + 1 < len(TOKS) else None
        _assert_same_trace(prof.at(t), ts.strace(tiny_model, TOKS[: t + 1], target=target))
    assert prof.at(10).target is None and prof.at(7).target == int(TOKS[8])


def test_a_forward_per_prefix_is_bit_identical(llama_model):
    prof = ts.density_profile(llama_model, TOKS, [2, 9], shared_forward=False, conditions=("only", "random"))
    assert prof.config["shared_forward"] is False
    for t in (2, 9):
        a, b = prof.at(t), ts.strace(llama_model, TOKS[: t + 1], target=int(TOKS[t + 1]), conditions=("only", "random"))
        assert torch.equal(a.rank, b.rank) and torch.equal(a.tv_all, b.tv_all) and torch.equal(a.top_probs, b.top_probs)


def test_options_reach_every_position(gpt2_model):
    opts = dict(sizes=[1e-3, 1e-2, 0.1, 0.5], weights="ifr", conditions=("only", "inverse"),
                attention="never-ablated", top_k=3)
    prof = ts.density_profile(gpt2_model, TOKS, [3, 8], next_token_targets=False, **opts)
    for t in (3, 8):
        res = prof.at(t)
        assert res.target is None and res.config["weights"] == "ifr" and res.attention == "never-ablated"
        _assert_same_trace(res, ts.strace(gpt2_model, TOKS[: t + 1], **opts))
    thr = ts.density_profile(gpt2_model, TOKS, [5], method="threshold", taus=[0.5, 0.1, 0.0])
    _assert_same_trace(thr.at(5), ts.strace(gpt2_model, TOKS[:6], method="threshold", taus=[0.5, 0.1, 0.0],
                                            target=int(TOKS[6])))


@pytest.mark.parametrize("kind", ["sandwich", "parallel"])
def test_sliced_runs_of_other_block_kinds(kind, tiny_tokenizer_dir):
    """The post-attention norm's frozen gains (sandwich blocks) and the one node per block (parallel
    blocks) are sliced correctly too."""
    if kind == "sandwich":
        from tests.tiny_sandwich import tiny_sandwich as build

        model = build("gemma2", tiny_tokenizer_dir)[0]
    else:
        from tests.tiny_parallel import tiny_parallel as build

        model = build("neox", tiny_tokenizer_dir)[0]
    prof = ts.density_profile(model, TOKS, [2, 9], conditions=("only",))
    for t in (2, 9):
        _assert_same_trace(prof.at(t), ts.strace(model, TOKS[: t + 1], target=int(TOKS[t + 1]), conditions=("only",)))


def test_clean_run_prefix_is_the_prefix_forward(llama_model):
    spec = describe_model(llama_model)
    full = clean_run(llama_model, spec, TOKS, every_position=True)
    assert full.all_logits.shape == (len(TOKS), spec.d_vocab) and torch.equal(full.all_logits[-1], full.logits)
    for n in (1, 5, len(TOKS)):
        a, b = full.prefix(n), clean_run(llama_model, spec, TOKS[:n])
        for name in ("resid_pre", "attn_out", "mlp_out", "resid_post", "pattern", "v", "z", "final_scale",
                     "final_out", "logits"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.shape == y.shape, name
            # float32 rounding of a longer forward (see above); 1e-5 relative is 100x what was measured
            assert float((x - y).abs().max()) <= 1e-5 * max(1.0, float(y.abs().max())), name
    with pytest.raises(ValueError, match="every_position"):
        clean_run(llama_model, spec, TOKS).prefix(3)
    with pytest.raises(ValueError, match="prefix of 12"):
        full.prefix(len(TOKS) + 1)


def test_default_positions_are_every_prediction_with_context(gpt2_model):
    prof = ts.density_profile(gpt2_model, TOKS[:4], sizes=[0.01, 0.1], conditions=("only",))
    assert prof.positions == (1, 2, 3)
    df = prof.to_dataframe()
    assert df["position"].tolist() == [1, 2, 3] and df["token"].tolist() == prof.str_tokens[1:]
    assert df["next_token"].tolist()[:2] == prof.str_tokens[2:] and pd.isna(df["next_token"].tolist()[2])
    assert df["density"].tolist() == pytest.approx(prof.density.tolist())
    assert {"tv@0.01", "tv@0.1", "entropy", "predicted", "ce"} <= set(df.columns) and "tv@0.001" not in df.columns


@pytest.mark.parametrize("positions, match", [
    ([1, 11], r"Position 11 is outside the text's 11 tokens"),
    ([-1], r"Position -1 is outside"),
    ([2, 2], r"Position 2 is given twice"),
    ([1.0], r"positions must be ints.*float"),
    ([True], r"positions must be ints.*bool"),
    ([np.bool_(True)], r"positions must be ints.*bool"),
    ("3", r"positions must be an int or a list of ints"),
    ([], r"positions is empty"),
    (torch.tensor([1.5]), r"integer positions"),
])
def test_bad_positions_are_refused_before_any_work(gpt2_model, monkeypatch, positions, match):
    def no_forward(*a, **k):  # pragma: no cover - reached only on a regression
        raise AssertionError("a forward pass ran before the positions were checked")

    monkeypatch.setattr("tl_strace.profile.clean_run", no_forward)
    with pytest.raises(InputError, match=match) as e:
        density_profile(gpt2_model, TOKS, positions)
    assert "\n" not in str(e.value)


def test_positions_accept_an_int_a_tensor_and_any_order(gpt2_model):
    a = ts.density_profile(gpt2_model, TOKS, 4, sizes=[0.1], conditions=("only",))
    b = ts.density_profile(gpt2_model, TOKS, torch.tensor([6, 4]), sizes=[0.1], conditions=("only",))
    c = ts.density_profile(gpt2_model, TOKS, np.array([6, 4]), sizes=[0.1], conditions=("only",))
    assert a.positions == (4,) and b.positions == (4, 6) and c.positions == (4, 6)
    assert all(type(t) is int for t in c.positions)
    props = json.loads(re.search(r"ColoredTokens, (\{.*?\})\);", a._repr_html_()).group(1))
    assert props["maxValue"] > props["minValue"] == pytest.approx(a.density.item(), rel=1e-3)  # one position
    assert torch.equal(a.at(4).labels, b.at(4).labels)
    with pytest.raises(InputError, match="Position 5 was not traced"):
        b.at(5)
    with pytest.raises(InputError, match="at least two"):
        ts.density_profile(gpt2_model, TOKS[:1])


def test_save_load_roundtrip(gpt2_profile, tmp_path):
    path = tmp_path / "prof.safetensors"
    gpt2_profile.save(path)
    back = DensityProfile.load(path)
    assert back.positions == gpt2_profile.positions and back.str_tokens == gpt2_profile.str_tokens
    assert back.config == gpt2_profile.config and back.model == gpt2_profile.model
    assert torch.equal(back.tokens, gpt2_profile.tokens)
    for a, b in zip(back.results, gpt2_profile.results):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.tv_all, b.tv_all) and a.target == b.target
        assert a.top_strs == b.top_strs
    assert back.to_dataframe().equals(gpt2_profile.to_dataframe())


def _rewrite(path: Path, edit) -> None:
    """Apply ``edit(meta, tensors)`` to a saved profile and write it back with a valid checksum
    (an edit a checksum alone cannot catch)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["tl_strace_profile"])
        raw = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    raw["tl_strace_profile"] = json.dumps(meta)
    raw[CHECKSUM_KEY] = content_checksum(tensors, meta)
    save_file(tensors, str(path), metadata=raw)


def test_damaged_and_edited_files_are_refused(gpt2_profile, tmp_path):
    path = tmp_path / "prof.safetensors"
    gpt2_profile.save(path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a bit flip in the last tensor's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ResultsError, match="modified or damaged") as e:
        DensityProfile.load(bad)
    assert "\n" not in str(e.value)

    edits = {
        "positions": (lambda m, t: m.__setitem__("positions", [1, 4, 7, 9]), r"results\[9\]\.tokens"),
        "order": (lambda m, t: m.__setitem__("positions", [4, 1, 7, 10]), r"positions: must be strictly increasing"),
        "tokens": (lambda m, t: t.__setitem__("tokens", t["tokens"].flip(0).contiguous()), r"tokens"),
        "labels": (lambda m, t: t.__setitem__("1/labels", torch.zeros_like(t["1/labels"])), r"labels"),
        "extra": (lambda m, t: t.__setitem__("9/labels", t["1/labels"].clone()), r"9/labels: is not a tensor of a profile"),
        "missing": (lambda m, t: m.pop("positions"), r"positions: is missing"),
        "kind": (lambda m, t: m.__setitem__("kind", "other"), r"kind: is 'other'"),
    }
    for name, (edit, match) in edits.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(path.read_bytes())
        _rewrite(p, edit)
        with pytest.raises(ResultsError, match=match) as e:
            DensityProfile.load(p)
        assert "\n" not in str(e.value), name

    single = tmp_path / "single.safetensors"
    gpt2_profile.results[0].save(single)  # a StraceResult file is not a profile
    with pytest.raises(ResultsError, match="not a tl_strace profile file"):
        DensityProfile.load(single)


def test_repr_and_views(gpt2_profile, tmp_path):
    text = repr(gpt2_profile)
    assert text.startswith("DensityProfile(") and "positions=4" in text
    html = gpt2_profile._repr_html_()
    assert html.count("CircuitsVis.render(") == 1 and "CircuitsVis.ColoredTokens" in html
    props = json.loads(re.search(r"ColoredTokens, (\{.*?\})\);", html).group(1))
    assert len(props["tokens"]) == len(TOKS)
    for t, d in zip(gpt2_profile.positions, gpt2_profile.density.tolist()):
        assert props["values"][t] == pytest.approx(d, rel=1e-3)  # 4 significant digits
    assert props["minValue"] == pytest.approx(float(gpt2_profile.density.min()), rel=1e-3)
    out = gpt2_profile.save_html(tmp_path / "p.html")
    page = Path(out).read_text()
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page.split("<script>")[0]
    fig = gpt2_profile.plot()
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == list(gpt2_profile.positions)
    assert list(line.get_ydata()) == pytest.approx(gpt2_profile.density.tolist())
    assert fig._repr_png_()[:4] == b"\x89PNG"


def test_interactive_text_has_a_span_and_a_trace_per_position(gpt2_profile):
    html = ts.views.interactive_html(gpt2_profile)
    spans = re.findall(r'<span class="tls-prof-tok" tabindex="0" data-k="(\d+)" style="background:rgb\((\d+),', html)
    assert [int(k) for k, _ in spans] == list(range(len(POSITIONS)))
    assert html.count('<span class="tls-prof-untraced">') == len(TOKS) - len(POSITIONS)
    # colour: white for the lowest density, blue (37, ...) for the highest
    reds = [int(r) for _, r in spans]
    d = gpt2_profile.density.tolist()
    assert reds[d.index(min(d))] == 255 and reds[d.index(max(d))] == 37
    data = json.loads(re.search(r'<script type="application/json" class="tls-prof-data">(.*?)</script>', html).group(1))
    assert [p["t"] for p in data["pos"]] == POSITIONS and data["pos"][-1]["next"] is None
    assert [p["d"] for p in data["pos"]] == pytest.approx(d, rel=1e-4)
    assert data["pos"][0]["tv"] == pytest.approx(gpt2_profile.results[0].tv.tolist(), abs=1e-4)
    assert html.count("<template data-k=") == len(POSITIONS) and "data-tls-circuit" not in html
    with_circuits = ts.views.interactive_html(gpt2_profile, circuits=True)
    assert with_circuits.count("data-tls-circuit=") == len(POSITIONS)
    assert "<img" not in with_circuits  # inserted by a script, so no static picture (circuit_view(static=False))


def test_token_text_is_escaped_in_the_view(gpt2_profile):
    hostile = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "a&b"] + gpt2_profile.str_tokens[3:]
    prof = dataclasses.replace(gpt2_profile, str_tokens=hostile)
    html = ts.views.profile_view(prof, circuits=True).html
    # the only images are the circuit views' own static pictures (data-URI PNGs)
    assert not re.search(r'<img(?! class="tls-static-img)', html) and "</script><script>alert" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;</span>" in html  # the interactive text shows it as text
    props = json.loads(re.search(r"ColoredTokens, (\{.*?\})\);", html).group(1))
    assert props["tokens"][:3] == ["&lt;img src=x onerror=alert(1)&gt;",
                                   "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;", "a&amp;b"]


def test_trace_generation_traces_each_generated_token(gpt2_model):
    prompt = TOKS[:4]
    prof = ts.trace_generation(gpt2_model, prompt, 5, sizes=[1e-2, 0.1], conditions=("only",), stop_at_eos=False)
    gen = prof.config["generation"]
    assert gen["prompt_tokens"] == 4 and gen["new_tokens"] == 5 and gen["decoding"] == "greedy"
    assert torch.equal(prof.tokens[:4], prompt) and len(prof.tokens) == 9
    assert prof.positions == (3, 4, 5, 6, 7)  # the predictions of tokens 4..8, the generated ones
    with torch.no_grad():  # greedy: each generated token is the model's argmax after its prefix
        for t in prof.positions:
            assert int(gpt2_model(prof.tokens[None, : t + 1])[0, -1].argmax()) == int(prof.tokens[t + 1])
    for t, r in zip(prof.positions, prof.results):
        assert r.target == int(prof.tokens[t + 1]) and r.full_top_ids[0] == r.target and r.full_target_rank == 1.0
    _assert_same_trace(prof.at(6), ts.strace(gpt2_model, prof.tokens[:7], sizes=[1e-2, 0.1], conditions=("only",),
                                             target=int(prof.tokens[7])))
    assert "generate" in prof.timings
    prof.validate()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=70), "at most 60 new tokens fit"),
    (dict(max_new_tokens=2, positions=[1]), "chooses positions itself"),
    (dict(max_new_tokens=2, sizes=[2.0]), "size"),
])
def test_trace_generation_refuses_bad_settings_before_generating(gpt2_model, monkeypatch, kwargs, match):
    def no_generation(*a, **k):  # pragma: no cover - reached only on a regression
        raise AssertionError("generation ran before the settings were checked")

    monkeypatch.setattr("tl_strace.profile.greedy_generate", no_generation)
    with pytest.raises(InputError, match=match):
        trace_generation(gpt2_model, TOKS[:4], **kwargs)


def _generated(model, prompt, n, sampling):
    from tl_strace.model import model_guard
    from tl_strace.profile import greedy_generate

    with model_guard(model):
        return greedy_generate(model, describe_model(model), prompt, n, stop_at_eos=False, sampling=sampling)


def test_sampling_is_seeded_and_restricted_as_asked(gpt2_model):
    prompt = TOKS[:4]
    greedy = _generated(gpt2_model, prompt, 6, None)
    # top_k=1 and a vanishing top_p leave only the argmax: greedy decoding, exactly
    assert torch.equal(_generated(gpt2_model, prompt, 6, ts.Sampling(top_k=1, seed=3)), greedy)
    assert torch.equal(_generated(gpt2_model, prompt, 6, ts.Sampling(top_p=1e-9, seed=3)), greedy)
    hot = ts.Sampling(temperature=50.0, seed=1)  # nearly uniform over the tiny vocabulary
    a, b = _generated(gpt2_model, prompt, 6, hot), _generated(gpt2_model, prompt, 6, hot)
    assert torch.equal(a, b) and not torch.equal(a, greedy)  # the seed fixes the draw; it is not the argmax
    assert not torch.equal(a, _generated(gpt2_model, prompt, 6, dataclasses.replace(hot, seed=2)))
    seq = _generated(gpt2_model, prompt, 8, ts.Sampling(temperature=50.0, top_k=3, seed=0))
    with torch.no_grad():  # every drawn token is among its position's three most likely
        for t in range(3, len(seq) - 1):
            top3 = torch.topk(gpt2_model(seq[None, : t + 1])[0, -1], 3).indices.tolist()
            assert int(seq[t + 1]) in top3


def test_trace_generation_records_its_sampling(gpt2_model):
    s = ts.Sampling(temperature=2.0, top_p=0.9, seed=4)
    prof = ts.trace_generation(gpt2_model, TOKS[:4], 3, sizes=[1e-2, 0.1], conditions=("only",), stop_at_eos=False,
                               sampling=s)
    gen = prof.config["generation"]
    assert gen["decoding"] == "sampling" and gen["sampling"] == dataclasses.asdict(s)
    assert torch.equal(prof.tokens, _generated(gpt2_model, TOKS[:4], 3, s))
    for t, r in zip(prof.positions, prof.results):  # the sampled token is each position's target
        assert r.target == int(prof.tokens[t + 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature must be a positive number"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k must be a positive int"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(seed=-1), "seed must be a non-negative int"),
])
def test_bad_sampling_settings_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        inspect.unwrap(ts.Sampling)(**kwargs)


def test_trace_generation_refuses_a_sampling_that_is_not_one(gpt2_model):
    with pytest.raises(InputError, match="sampling must be a tl_strace.profile.Sampling"):
        trace_generation(gpt2_model, TOKS[:4], 2, sampling={"temperature": 0.5})
