"""strace() end to end on tiny models: the result's curves, density, subgraphs and storage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tl_strace as ts
from tl_strace.cli import format_trace, main
from tl_strace.errors import InputError, ResultsError
from tl_strace.search import target_counts

TOKS = torch.tensor([0, 5, 17, 3, 42, 8, 9, 23])


@pytest.fixture(scope="module")
def res(gpt2_model):
    return ts.strace(gpt2_model, TOKS, target=11)


def test_result_shapes_and_invariants(res):
    K = len(ts.DEFAULT_SIZES)
    assert res.conditions == ("only", "random", "inverse")
    assert res.tv_all.shape == (3, K) and res.top_ids.shape == (3, K, 5)
    assert res.counts.tolist() == target_counts(ts.DEFAULT_SIZES, res.n_edges)
    assert float(res.full_graph_tv) <= 1e-6 and float(res.nucleus[-1]) == 99.0
    assert float(res.curve("tv", "random")[-1]) <= 1e-6  # the random subgraph at s = 1 is the full graph
    assert bool(((res.tv_all >= 0) & (res.tv_all <= 1)).all())
    assert math.isfinite(res.density) and 0 <= res.density <= 5
    assert res.full_top_strs[0] == res.top_strs[0][-1][0]
    assert not math.isnan(res.full_ce) and bool(torch.isfinite(res.ce_all).all())
    # reaching an input node: never for the empty strata, always for the full graph, monotone
    reach = res.reaches_input_all[0]
    assert int(res.counts[0]) == 0 and not bool(reach[0]) and bool(reach[-1])
    assert bool((reach[1:] >= reach[:-1]).all())
    first = int(reach.float().argmax())

    def leaves_input(k: int) -> bool:
        df = res.subgraph(float(res.sizes[k])).to_dataframe()
        return bool(((df.layer == 0) & df.type.isin(["attn", "res_attn"])).any())

    assert leaves_input(first) and not leaves_input(first - 1)


def test_density_matches_its_definition(res):
    x = np.log10(np.clip(res.sizes.numpy().astype(np.float64), 1e-8, 1))
    y = res.tv.numpy().astype(np.float64)
    assert res.density == pytest.approx(float(np.trapezoid(y, x)), rel=1e-9)
    rec = res.recovery_sizes()
    assert rec[1] <= rec[90] and rec[90] <= 1.0


def test_dataframe_has_one_row_per_condition_and_size(res):
    df = res.to_dataframe()
    assert len(df) == 3 * len(ts.DEFAULT_SIZES)
    assert set(df.condition) == {"only", "random", "inverse"}
    only = df[df.condition == "only"]
    np.testing.assert_allclose(only.tv.to_numpy(), res.tv.numpy(), rtol=1e-6)


def test_subgraph_is_named_typed_and_matches_the_stratum(res):
    k = ts.DEFAULT_SIZES.index(0.1)
    sub = res.subgraph(0.1)
    assert len(sub) == int(res.counts[k])
    df = sub.to_dataframe()
    assert list(df.columns[:5]) == ["name", "type", "layer", "head", "target"]
    assert set(df.type) <= {"attn", "res_attn", "mlp", "res_mlp"}
    assert (df["rank"].diff().dropna() > 0).all()
    # any s below the largest partial stratum is a prefix of the trace
    assert len(res.subgraph(0.05)) == target_counts([0.05], res.n_edges)[0]
    with pytest.raises(InputError, match="No stratum"):
        res.subgraph(0.9)
    with pytest.raises(InputError):
        res.subgraph(0.0)


def test_save_and_load_roundtrip_without_loss(res, tmp_path):
    path = tmp_path / "r.safetensors"
    res.save(path)
    back = ts.StraceResult.load(path)
    for f in res.__dataclass_fields__:
        a, b = getattr(res, f), getattr(back, f)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True), f
        elif isinstance(a, float) and math.isnan(a):
            assert math.isnan(b)
        else:
            assert a == b, f
    assert back.density == res.density


def test_loading_garbage_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ResultsError, match="not a tl_strace result"):
        ts.StraceResult.load(bad)
    with pytest.raises(ResultsError, match="No result file"):
        ts.StraceResult.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("method", ["threshold", "nucleus"])
def test_paper_a_methods_run_end_to_end(gpt2_model, method):
    r = ts.strace(gpt2_model, TOKS, method=method, conditions=["only"])
    assert r.config["method"] == method
    assert torch.all(r.sizes[1:] >= r.sizes[:-1]) and float(r.sizes[-1]) == 1.0
    assert float(r.full_graph_tv) <= 1e-6


def test_ifr_weights_are_local_and_run(llama_model):
    r = ts.strace(llama_model, TOKS, weights="ifr", conditions=["only"])
    lay = r.layout
    _, tgt = lay.node_ids(torch.arange(lay.size))
    valid = r.labels < 10**6
    tot = torch.zeros(lay.n_nodes, dtype=torch.float64).index_add_(0, tgt[valid], r.weights[valid].double())
    reached = torch.unique(tgt[valid])
    torch.testing.assert_close(tot[reached], torch.ones_like(tot[reached]), atol=1e-5, rtol=0)


def test_l1_weights_are_local(res):
    lay = res.layout
    _, tgt = lay.node_ids(torch.arange(lay.size))
    tot = torch.zeros(lay.n_nodes, dtype=torch.float64).index_add_(0, tgt, res.weights.double())
    reached = torch.unique(tgt[res.labels < 10**6])
    torch.testing.assert_close(tot[reached], torch.ones_like(tot[reached]), atol=1e-5, rtol=0)


def test_attention_never_ablated_differs_from_faithful(gpt2_model, res, tmp_path):
    """The reference pipeline's mode is named, recorded, labelled, and the same computation as the
    older ``ablate_attention=False``; faithful stays the default."""
    r = ts.strace(gpt2_model, TOKS, conditions=["only"], attention="never-ablated")
    assert r.config["ablate_attention"] is False and r.config["attention"] == "never-ablated"
    assert r.attention == "never-ablated" and r.summary()["attention"] == "never-ablated"
    assert res.attention == "faithful" and res.config["attention"] == "faithful"
    assert not torch.allclose(r.tv, res.tv)
    old = ts.strace(gpt2_model, TOKS, conditions=["only"], ablate_attention=False)
    assert torch.equal(old.tv_all, r.tv_all) and old.config["attention"] == "never-ablated"
    r.save(tmp_path / "r.safetensors")
    assert ts.StraceResult.load(tmp_path / "r.safetensors").attention == "never-ablated"
    from tl_strace.cli import format_trace
    assert "attention never ablated (reference pipeline); not a faithful measurement" in format_trace(r)
    assert "reference pipeline" not in format_trace(res)


def test_batch_size_does_not_change_numbers(gpt2_model, res):
    r = ts.strace(gpt2_model, TOKS, target=11, batch_size=5)
    torch.testing.assert_close(r.tv_all, res.tv_all, atol=1e-5, rtol=0)


def test_text_input_and_target_text(gpt2_model):
    r = ts.strace(gpt2_model, "w5 w6 w7 w8", target=" w9", sizes=[0.1, 0.5], conditions=["only"])
    assert r.str_tokens[0] == "<bos>" and len(r.sizes) == 3
    assert r.target == 9


def test_cli_text_report(res):
    text = format_trace(res)
    assert "density" in text and "TV random" in text and "top tokens of the trace" in text


def test_cli_reports_errors_as_one_line(capsys):
    assert main(["trace", "--model", "/nonexistent/dir/for/sure", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-strace: error:") and "no such directory" in err


def test_strata_of_equal_count_share_one_masked_row(gpt2_model, monkeypatch):
    """Stratum k is labels <= k with counts[k] edges, so on a short input the tiny sizes repeat a
    count and the subgraph: one row is evaluated for them and its metrics copied. The copies must
    equal what evaluating every row gives (checked against masked_logprobs of all K rows)."""
    from tl_strace import engine
    from tl_strace.ablation import MaskRow, masked_logprobs
    from tl_strace.metrics import total_variation
    from tl_strace.model import describe_model, model_guard

    evaluated = []
    orig = engine.masked_forwards

    def counting(model, spec, tokens, masks, **kw):
        evaluated.append(masks.n_rows)
        yield from orig(model, spec, tokens, masks, **kw)

    monkeypatch.setattr("tl_strace.engine.masked_forwards", counting)
    tokens = torch.tensor([0, 5, 17])
    res = ts.strace(gpt2_model, tokens, conditions=("only", "random", "inverse"))
    K = len(res.sizes)
    c = res.counts.tolist()
    dup = [k for k in range(1, K) if c[k] == c[k - 1]]
    assert dup, c  # the test needs repeated counts (3 tokens, paper B's 27 sizes)
    assert evaluated == [3 * (K - len(dup))]  # one row per distinct stratum and condition
    for k in dup:
        assert torch.equal(res.tv_all[:, k], res.tv_all[:, k - 1]) and torch.equal(res.top_ids[:, k], res.top_ids[:, k - 1])
    spec = describe_model(gpt2_model)
    with model_guard(gpt2_model):
        logp = torch.cat(list(masked_logprobs(gpt2_model, spec, tokens, res.layout, [res.labels],
                                              [MaskRow(0, k) for k in range(K)], chunk=K)))
    clean = torch.log_softmax(gpt2_model(tokens[None])[0, -1].float(), -1)
    # TV is a probability mass (<= 1); float32 rounding of another batch composition is ~1e-7
    torch.testing.assert_close(res.tv_all[0], total_variation(clean, logp).float(), atol=1e-5, rtol=0)


def test_curves_are_measured_against_the_full_graph_row_of_the_same_forwards(gpt2_model):
    """The reference of every row's TV/KL is the full graph's row (every mask an exact identity),
    evaluated first whichever chunk holds it; the other chunks' numbers are the ones a plain
    in-order pass gives, reassembled in row order. Fails if the reference were the separately
    shaped clean forward (the full stratum's TV would be rounding, not 0) or if the chunks were
    put back out of order."""
    from tl_strace.ablation import MaskRow, TokenMasks
    from tl_strace.engine import evaluate, masked_forwards
    from tl_strace.metrics import row_metrics
    from tl_strace.model import describe_model, model_guard

    tokens = torch.tensor([0, 5, 17, 3, 42, 8, 9, 23])
    res = ts.strace(gpt2_model, tokens, sizes=[1e-3, 1e-2, 0.1, 0.3, 0.6], conditions=("only", "random"))
    full = len(res.sizes) - 1
    assert float(res.tv_all[0, full]) == 0.0 and float(res.kl_all[0, full]) == 0.0
    spec = describe_model(gpt2_model)
    K = len(res.sizes)
    rows = [MaskRow(table=0, k=k) for k in range(K)] + [MaskRow(table=0, k=k, inverse=True) for k in range(K)]
    clean = torch.log_softmax(gpt2_model(tokens[None])[0, -1].float(), -1)
    scale = float(gpt2_model(tokens[None])[0, -1].abs().max())
    # the full graph's row (stratum K-1, not inverse) first, in the middle or last of its chunk
    for order, chunk in [(rows, 3), (rows, 4), (rows[::-1], 5), (rows, 1), (rows[::-1], 2 * K)]:
        masks = TokenMasks(spec, res.layout, [res.labels], order, device=tokens.device)
        full_row = order.index(MaskRow(table=0, k=K - 1))
        with model_guard(gpt2_model):
            m, ref = evaluate(gpt2_model, spec, tokens, masks, clean=clean, logit_scale=scale, full_row=full_row,
                              chunk=chunk, target=3, top_k=4, shape=(2, K))
            plain = torch.cat(list(masked_forwards(gpt2_model, spec, tokens, masks, chunk=chunk)))
        assert torch.equal(ref, plain[full_row])
        want = row_metrics(plain[full_row], plain, 3, 4)
        for name, v in want.items():
            assert torch.equal(m[name], v.reshape(2, K, *v.shape[1:])), (full_row, chunk, name)
        assert torch.equal(m["tv"].flatten()[full_row], torch.tensor(0.0))
