"""Views: escaping, determinism (snapshot), bounded size, flow arithmetic, figures, detail views, CLI.

Most tests use :func:`synthetic_result`, a result built from fixed integers without any model, so the
HTML snapshot is the same on every machine. The detail-view tests use the tiny GPT-2 fixture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout, EdgeType, Graph
from tl_strace.results import StraceResult
from tl_strace.search import strace_strata
from tl_strace.views import (
    HTMLView,
    circuit_view,
    component_stats,
    detail_views,
    edge_shares,
    plot_curves,
    plot_shares,
    report_html,
    save_plots,
    token_contributions,
)
from tl_strace.views._data import token_edges
from tl_strace.views._html import content_id, esc, round_sig, script_json, stable_ids
from tl_strace.views.circuit import circuit_data
from tl_strace.views.detail import attention_patterns, colored_tokens, figures_html, restricted_patterns, topk_tokens

SNAPSHOTS = Path(__file__).parent / "snapshots"
XSS = "</script><img src=x onerror=alert(1)>"


def _foreign_imgs(html: str) -> list[str]:
    """Every ``<img`` that is not the view's own static picture (a data-URI PNG)."""
    return re.findall(r'<img(?! class="tls-static-img[^"]*" alt="[^"<>]*" src="data:image/png;base64,[A-Za-z0-9+/=]+")',
                      html, flags=re.I)
SYNTH_TOKENS = ["<bos>", " The", " cat", XSS, " sat & ran", "\u2028on", " the"]


def synthetic_result(L: int = 2, H: int = 2, tokens: list[str] | None = None, *,
                     sizes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8),
                     conditions: tuple[str, ...] = ("only", "random", "inverse")) -> StraceResult:
    """A complete StraceResult from fixed integers: local weights normalised per node, real s-Trace
    strata over them, and curves from simple formulas. No model, same bytes on every machine."""
    toks = list(tokens or SYNTH_TOKENS)
    T = len(toks)
    lay = EdgeLayout(L, H, T)
    valid = lay.ancestors()
    ids = torch.arange(lay.size)
    raw = ((ids * 7919) % 13 + 1).double().masked_fill(~valid, 0.0)
    _, tgt = lay.node_ids(ids)
    tot = torch.zeros(lay.n_nodes, dtype=torch.float64).index_add_(0, tgt, raw)
    w = torch.where(valid, raw / tot[tgt].clamp_min(1e-30), torch.zeros_like(raw)).float()
    strata = strace_strata(Graph(lay, w, valid), sizes)
    K, C = strata.n_strata, len(conditions)
    kk = torch.arange(K, dtype=torch.float32) / (K - 1)
    tv = torch.stack([1.0 - kk, 0.95 - 0.25 * kk, 0.1 + 0.8 * kk][:C])
    tv[:, -1] = torch.tensor([0.0, 0.0, 1.0][:C])
    nucleus = torch.stack([torch.round(100 * kk), torch.zeros(K), torch.zeros(K)][:C])
    top_k = 3
    top_strs = [[[toks[(k + c + j) % T] for j in range(top_k)] for k in range(K)] for c in range(C)]
    return StraceResult(
        model={"name": "synthetic", "n_layers": L, "n_heads": H, "n_kv_heads": H, "d_model": 8},
        config={"method": "strace", "weights": "l1", "ablation": "zero", "seed": 0, "sizes": list(sizes),
                "taus": None, "prepend_bos": None, "top_k": top_k, "version": "test"},
        str_tokens=toks, tokens=torch.arange(T), target=None, n_edges=int(valid.sum()), conditions=conditions,
        sizes=strata.sizes.float(), counts=strata.counts, params=strata.params.float(),
        tv_all=tv, kl_all=tv * 2, nucleus_all=nucleus, entropy_all=torch.full((C, K), 2.0),
        ce_all=torch.full((C, K), float("nan")), target_rank_all=torch.full((C, K), float("nan")),
        reaches_input_all=torch.ones(C, K, dtype=torch.bool),
        top_ids=torch.arange(C * K * top_k).reshape(C, K, top_k) % T,
        top_probs=torch.full((C, K, top_k), 0.25), top_strs=top_strs,
        full_top_ids=torch.arange(top_k), full_top_probs=torch.tensor([0.5, 0.25, 0.125]),
        full_top_strs=toks[:top_k], full_entropy=1.5, full_ce=float("nan"), full_target_rank=float("nan"),
        labels=strata.labels, rank=strata.rank, weights=w,
    )


@pytest.fixture(scope="module")
def synth() -> StraceResult:
    return synthetic_result()


# ------------------------------------------------------------------------------------------ escaping
def test_script_json_cannot_break_out_of_script():
    text = script_json({"t": XSS, "amp": "a&b", "ls": "x\u2028y\u2029z", "nan": float("nan"), "inf": [float("inf")]})
    for bad in ("<", ">", "&", "\u2028", "\u2029", "NaN", "Infinity"):
        assert bad not in text
    back = json.loads(text)
    assert back == {"t": XSS, "amp": "a&b", "ls": "x\u2028y\u2029z", "nan": None, "inf": [None]}


def test_esc_and_helpers():
    assert esc(XSS) == "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert esc('"q"') == "&quot;q&quot;"
    assert round_sig(0.000123456) == 0.000123 and round_sig(float("inf")) is None and round_sig(0.0) == 0.0
    assert content_id("tls", "a") == content_id("tls", "a") != content_id("tls", "b")


def _outside_data(html: str) -> str:
    """The markup with the JSON data block removed (the data is checked separately)."""
    return re.sub(r'<script type="application/json" class="tls-data">.*?</script>', "", html, flags=re.S)


def test_circuit_view_escapes_every_token(synth):
    html = circuit_view(synth).html
    assert _foreign_imgs(html) == [] and XSS not in html
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html  # the input text, escaped
    # Every <script> we open is closed exactly once: nothing in the data closed one early.
    assert html.count("<script") == html.count("</script>") == 2
    data = re.search(r'class="tls-data">(.*?)</script>', html, flags=re.S).group(1)
    assert json.loads(data)["tokens"] == SYNTH_TOKENS
    assert "\u2028" not in data and "\u2029" not in data  # JS line terminators (fine in HTML text)
    # Our script writes text with textContent only.
    from tl_strace.views._assets import circuit_js
    assert "innerHTML" not in circuit_js() and "insertAdjacentHTML" not in circuit_js()


def test_report_and_details_escape_tokens(synth):
    html = report_html(synth, details=True, plots=False)
    assert _foreign_imgs(html) == [] and XSS not in html
    # circuitsvis puts token text into innerHTML: its props carry entity-escaped tokens.
    props = colored_tokens(synth).props
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in props["tokens"]
    assert all("<" not in t for t in topk_tokens(synth).props["tokens"][0])


def test_report_has_no_network_reference(synth):
    html = report_html(synth, details=True, plots=True)
    assert html.count("var CircuitsVis") == 1  # the 1.3 MB bundle once per page
    assert not re.search(r'<(script|link|img|iframe)[^>]*\s(src|href)\s*=(?!"data:image/png;base64,)', html, flags=re.I)
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", _outside_data(html).split("var CircuitsVis")[0])
    assert "unpkg.com" not in html and "cdn." not in html.lower().split("var circuitsvis")[0]
    assert "default-src 'none'" in html  # the page itself forbids any fetch


# ------------------------------------------------------------------------------------------ determinism
def _stable(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with element ids numbered (as on a standalone page), not random."""
    with stable_ids():
        return fn(*args, **kwargs)


def test_circuit_view_snapshot(synth):
    """The HTML of a fixed result is byte-identical to the stored snapshot (ids derive from content).

    After an intended change of the view, regenerate with TL_STRACE_UPDATE_SNAPSHOTS=1.
    """
    with stable_ids():
        html = circuit_view(synth).html
    # the static PNG's bytes depend on matplotlib and FreeType: checked in test_views_jupyter.py
    html = re.sub(r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,PNG"', html)
    path = SNAPSHOTS / "circuit_view.html"
    if os.environ.get("TL_STRACE_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html, encoding="utf-8")
    want = path.read_text(encoding="utf-8")
    assert html == want, ("circuit_view HTML differs from tests/unit/snapshots/circuit_view.html; if the change "
                          "is intended, rerun with TL_STRACE_UPDATE_SNAPSHOTS=1")


def test_render_is_deterministic_and_ids_follow_content(synth, tmp_path):
    a, b = _stable(circuit_view, synth).html, _stable(circuit_view, synthetic_result()).html
    assert a == b
    other = _stable(circuit_view, synthetic_result(tokens=SYNTH_TOKENS[:-1] + [" a"])).html
    id_of = lambda h: re.search(r'class="tls-view" id="([^"]+)"', h).group(1)  # noqa: E731
    assert id_of(a) != id_of(other)
    synth.save(tmp_path / "r.safetensors")
    assert _stable(circuit_view, StraceResult.load(tmp_path / "r.safetensors")).html == a
    r1, r2 = report_html(synth, plots=True, details=True), report_html(synthetic_result(), plots=True, details=True)
    assert r1 == r2


# ------------------------------------------------------------------------------------------ data
def _reference_flow(res: StraceResult, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow by a plain per-edge walk over nodes in reverse topological order (the definition)."""
    lay = res.layout
    ids = torch.nonzero(res.labels <= k).flatten()
    src, tgt = lay.node_ids(ids)
    comp = {}
    d = lay.decode(ids)
    L, H, T = lay.n_layers, lay.n_heads, lay.n_pos
    mass = torch.zeros(lay.n_nodes, dtype=torch.float64)
    mass[lay.output_node] = 1.0
    flow = torch.zeros(L * H + 2 * L, dtype=torch.float64)
    order = torch.argsort(tgt, descending=True, stable=True)  # targets in later graph layers first
    for j in order.tolist():
        e = int(ids[j])
        m = float(mass[tgt[j]]) * float(res.weights[e])
        mass[src[j]] += m
        kind, l, h = int(d["type"][j]), int(d["layer"][j]), int(d["head"][j])
        c = l * H + h if kind == EdgeType.ATTN else (L * H + l if kind == EdgeType.MLP else L * H + L + l)
        flow[c] += m
        comp[c] = True
    return flow, mass[:T]


@pytest.mark.parametrize("k", [0, 2, 6])
def test_flow_matches_per_edge_reference(synth, k):
    st = component_stats(synth)
    flow, tokens = _reference_flow(synth, k)
    torch.testing.assert_close(st.flow[k].double(), flow, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st.token_flow[k].double(), tokens, atol=1e-6, rtol=1e-5)


def test_flow_sums_to_one_and_grows_with_s(synth):
    st = component_stats(synth)
    L = st.n_layers
    assert abs(float(st.token_flow[-1].sum()) - 1.0) < 1e-5
    assert abs(float(st.flow[-1].sum()) - 2 * L) < 1e-4  # each block's attention and MLP nodes pass on 1
    assert (st.token_flow[1:] >= st.token_flow[:-1] - 1e-7).all()
    assert (st.flow[1:] >= st.flow[:-1] - 1e-7).all()
    torch.testing.assert_close(token_contributions(synth, 1.0), st.token_flow[-1])


def test_component_stats_agree_with_subgraph_components(synth):
    st = component_stats(synth)
    k = 3
    sub = synth.subgraph(float(synth.sizes[k])).components().set_index("component")
    for name, row in sub.iterrows():
        c = st.names.index(name)
        assert int(st.n_edges[k, c]) == int(row["n_edges"])
        assert abs(float(st.weight[k, c]) - float(row["weight"])) < 1e-5
    assert int(st.n_edges[k].sum()) == int(synth.counts[k])
    assert (st.n_total == st.n_edges[-1]).all()


def test_edge_shares_sum_to_one(synth):
    df = edge_shares(synth)
    assert len(df) == len(synth.sizes)
    torch.testing.assert_close(torch.tensor((df["attn"] + df["mlp"] + df["residual"]).to_numpy()),
                               torch.ones(len(df), dtype=torch.float64))
    groups = [c for c in df.columns if c.startswith("layers ")]
    assert len(groups) == 2  # 2 layers: at most 2 non-empty groups
    torch.testing.assert_close(torch.tensor(df[groups].sum(axis=1).to_numpy()), torch.ones(len(df), dtype=torch.float64))
    with pytest.raises(InputError, match="n_groups"):
        edge_shares(synth, n_groups=0)


def test_token_edges_are_bounded_and_first_by_rank(synth):
    emb = token_edges(synth, max_edges=10, per_head=2)
    lay = synth.layout
    assert emb["ids"].numel() <= 10 + 2 * lay.n_layers * lay.n_heads
    first10 = torch.argsort(torch.where(synth.rank >= 0, synth.rank, 10**9))[:10]
    assert set(first10.tolist()) <= set(emb["ids"].tolist())
    d = lay.decode(emb["ids"])
    heads = set(zip(d["layer"][d["type"] == 0].tolist(), d["head"][d["type"] == 0].tolist()))
    assert len(heads) == lay.n_layers * lay.n_heads  # every head can be expanded


def test_page_embeds_a_bounded_number_of_edges():
    """A trace of 100k+ edges: the view holds components and a capped edge list, never every edge."""
    res = synthetic_result(L=6, H=8, tokens=[f" t{i}" for i in range(64)], sizes=(1e-3, 1e-2, 0.05))
    assert res.n_edges > 80_000
    data = circuit_data(res, max_edges=500, per_head=4)
    assert len(data["ed"]["id"]) <= 500 + 4 * 6 * 8
    html = circuit_view(res, max_edges=500, per_head=4)
    assert len(html) < 150_000, len(html)


def test_default_stratum_and_size_choice(synth):
    data = circuit_data(synth)
    assert data["k0"] == 1  # the first stratum whose shared nucleus reaches 1%
    assert circuit_data(synth, s=0.4)["k0"] == 3
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        circuit_data(synth, s=2.0)


def test_component_granularity_result_gets_curves_and_a_note(synth):
    comp = dataclasses.replace(synth, config={**synth.config, "granularity": "component"},
                               labels=torch.zeros(5, dtype=torch.long), rank=torch.arange(5),
                               weights=torch.ones(5))
    html = circuit_view(comp).html
    assert "component-level" in html and "tls-curves" in html and "data-tls-circuit" not in html
    with pytest.raises(InputError, match="token-level"):
        component_stats(comp)
    assert "tls-curves" in report_html(comp, details=True, plots=True)


# ------------------------------------------------------------------------------------------ result methods
def test_result_methods_delegate(synth, tmp_path):
    assert _stable(synth._repr_html_) == _stable(circuit_view, synth).html
    path = synth.save_html(tmp_path / "sub" / "report.html", details=False)
    text = Path(path).read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "data-tls-circuit" in text and "tls-shares" in text
    fig = synth.plot()
    assert fig.axes and fig.axes[0].get_xscale() == "log"
    assert len(synth.plot_shares().axes) == 2
    view = circuit_view(synth)
    assert isinstance(view, HTMLView) and str(view) == view.html
    saved = Path(view.save(tmp_path / "v.html")).read_text(encoding="utf-8")
    assert saved.startswith("<!DOCTYPE html>") and view.html in saved


# ------------------------------------------------------------------------------------------ figures
def test_plots_save_png_and_svg_and_leave_matplotlib_alone(synth, tmp_path):
    import matplotlib

    backend, rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    paths = save_plots(synth, tmp_path / "figs" / "synth")
    assert sorted(Path(p).suffix for p in paths) == [".png", ".png", ".svg", ".svg"]
    for p in paths:
        assert Path(p).stat().st_size > 1000
    assert Path(paths[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = save_plots(synth, tmp_path / "figs2" / "synth", formats=("svg",))
    assert Path(again[0]).read_bytes() == Path(tmp_path / "figs" / "synth_curves.svg").read_bytes()
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc
    ax = plot_curves(synth).axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"trace (only)", "random", "inverse"}
    assert len([p for p in ax.patches]) >= 2  # the two shaded phases
    assert len(plot_shares(synth).axes) == 2
    with pytest.raises(InputError, match="metric"):
        plot_curves(synth, "bogus")
    with pytest.raises(InputError, match="formats"):
        save_plots(synth, tmp_path / "x", formats=("gif",))


# ------------------------------------------------------------------------------------------ circuitsvis details
def test_figures_html_inlines_bundle_once_and_closes_scripts(synth):
    figs = [colored_tokens(synth), colored_tokens(synth, s=0.1), topk_tokens(synth)]
    html = figures_html(figs)
    assert html.count("var CircuitsVis") == 1
    assert html.count("</script>") == 1 + len(figs)  # the bundle's own "</script" literal is neutralised
    assert "<!--" not in html  # would switch the HTML parser into escaped script data
    assert _stable(figures_html, figs) == _stable(figures_html, figs)  # numbered ids: deterministic
    assert figures_html(figs, bundle=False).count("var CircuitsVis") == 0


def test_colored_tokens_show_shares_per_size(synth):
    multi = colored_tokens(synth).props
    assert multi["labels"][0].startswith("s = 1 ")  # largest size first
    for j in range(len(multi["labels"])):
        col = [row[j] for row in multi["values"]]
        assert sum(col) == pytest.approx(1.0, abs=1e-2) or sum(col) == 0
    one = colored_tokens(synth, s=1.0).props
    torch.testing.assert_close(torch.tensor(one["values"], dtype=torch.float64), component_stats(synth).token_flow[-1].double(),
                               atol=2e-3, rtol=1e-2)


def test_topk_tokens_props(synth):
    p = topk_tokens(synth).props
    K, C = len(synth.sizes), len(synth.conditions)
    assert len(p["topkVals"]) == C and len(p["topkVals"][0]) == K
    assert p["firstDimensionLabels"][0].startswith("s = 0.05")
    k = 2
    row = p["topkIdxs"][0][k]
    assert [p["tokens"][0][i[1]] for i in row] == [esc(t).replace("&quot;", '"').replace("&#x27;", "'")
                                                  for t in synth.top_strs[0][k]]


@pytest.fixture(scope="module")
def tiny_res(gpt2_model):
    import tl_strace as ts

    return ts.strace(gpt2_model, torch.tensor([0, 5, 17, 3, 42, 8, 9, 23]), sizes=[0.02, 0.1, 0.3])


def test_attention_patterns_are_restricted_to_kept_edges(gpt2_model, tiny_res):
    pattern = tiny_res.clean_patterns(gpt2_model)
    k = 1
    kept = restricted_patterns(tiny_res, pattern, float(tiny_res.sizes[k]))
    a_lab = tiny_res.layout.split(tiny_res.labels)[0]
    assert (kept[a_lab > k] == 0).all()
    torch.testing.assert_close(kept[a_lab <= k], pattern[a_lab <= k])
    fig = attention_patterns(tiny_res, pattern, float(tiny_res.sizes[k]), max_heads=3)
    assert fig.component == "AttentionHeads"
    assert 1 <= len(fig.props["attention"]) <= 3
    assert len(fig.props["attention"][0]) == len(tiny_res.str_tokens)
    html = _stable(tiny_res.detail_views, model=gpt2_model).html
    assert html.count("var CircuitsVis") == 1 and "AttentionHeads" in html
    assert html == _stable(detail_views, tiny_res, patterns=pattern).html  # the method only computes the patterns


def test_attention_patterns_refuse_another_model(gpt2_model, tiny_res):
    other = dataclasses.replace(tiny_res, model={**tiny_res.model, "n_heads": 7})
    with pytest.raises(InputError, match="traced with"):
        other.clean_patterns(gpt2_model)
    with pytest.raises(InputError, match="max_heads"):
        attention_patterns(tiny_res, tiny_res.clean_patterns(gpt2_model), max_heads=0)


def test_cli_trace_writes_html(gpt2_model, tmp_path, monkeypatch, capsys):
    import tl_strace as ts
    from tl_strace.cli import main

    monkeypatch.setattr(ts, "load_model", lambda name: gpt2_model)
    out = tmp_path / "r.html"
    assert main(["trace", "w5 w17 w3 w42 w8", "--model", "tiny", "--sizes", "0.1", "0.3", "--html", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "data-tls-circuit" in text and "AttentionHeads" in text and text.count("var CircuitsVis") == 1
    assert "density" in capsys.readouterr().out


def test_never_ablated_results_are_labelled_in_every_view(synth):
    """A result of the reference pipeline's mode (attention never ablated) is never shown unlabelled:
    the text repr, the HTML header and the plot title say so; a faithful result carries no label."""
    label = "attention never ablated (reference pipeline)"
    kept = dataclasses.replace(synth, config={**synth.config, "ablate_attention": False, "attention": "never-ablated"})
    from tl_strace.views.circuit import summary_text

    assert label in summary_text(kept) and label in kept._repr_html_()
    assert label in kept.plot().axes[0].get_title()
    assert label not in summary_text(synth) and label not in synth._repr_html_()
    assert label not in synth.plot().axes[0].get_title()
