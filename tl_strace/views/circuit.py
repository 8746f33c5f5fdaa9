"""The interactive circuit view: our own self-contained HTML + SVG + JavaScript (no CDN, no network).

What it shows, for the stratum picked with a size slider:

* a **component grid**: layers (output on top) × the layer's heads, its MLP and its skip connections;
  a cell is filled once the component has an edge in the trace, coloured by kind and shaded by its
  summed edge weight (or its flow, or its edge count); a black border marks components that enter
  at this size; hovering shows names and numbers; clicking a head or MLP expands it;
* a **token-level trace**: the residual stream as a token × graph-layer plane, with the trace's
  edges (attention edges across positions, MLP and skip edges up the stream) appearing as s grows,
  and each input token's contribution (flow) as a purple dot;
* the **expanded component**: a head's (target token, source token) edges, or an MLP's edges per
  position.

It stays small and responsive whatever the graph size: components are aggregated per stratum in
Python, and only a bounded set of token-level edges is embedded (the first ``max_edges`` the search
took, plus each head's first ``per_head``), never every edge. A SmolLM2-135M trace of a 49-token
passage (324,432 edges) gives a page of roughly 0.2 MB.

>>> view = circuit_view(res)            # doctest: +SKIP
>>> view                                # in Jupyter: the interactive view  # doctest: +SKIP
>>> view.save("circuit.html")           # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tl_strace.ablation import attention_label
from tl_strace.results import TraceResult
from tl_strace.views._assets import circuit_css, circuit_js
from tl_strace.views._data import component_stats, is_token_level, stratum_index, token_edges
from tl_strace.views._html import HTMLView, esc, render_id, round_sig, script_json
from tl_strace.views.curves import curves_svg
from tl_strace.views.static import static_img_html

__all__ = ["circuit_data", "circuit_view", "summary_html", "summary_text"]

DATA_VERSION = 1


def _r(values: Any, digits: int = 3) -> list[float | None]:
    return [round_sig(v, digits) for v in torch.as_tensor(values).double().flatten().tolist()]


def circuit_data(res: TraceResult, *, s: float | None = None, max_edges: int = 2000,
                 per_head: int = 12) -> dict[str, Any]:
    """The JSON the circuit view embeds: model shape, tokens, curves, per-stratum component tables
    (from the first stratum each component is in), token contributions, MLP edges per position,
    and a bounded set of token-level edges (see :func:`tl_strace.views._data.token_edges`).

    Deterministic: equal results give equal dictionaries (numbers rounded to 3-4 significant digits).
    """
    st = component_stats(res)
    K = int(res.sizes.numel())
    lay = res.layout
    L, H, T = lay.n_layers, lay.n_heads, lay.n_pos
    first = st.first_stratum().tolist()
    cn, cw, cfl = [], [], []
    for c in range(st.n_components):
        f = first[c]
        cn.append([int(x) for x in st.n_edges[f:, c].tolist()])
        cw.append(_r(st.weight[f:, c], 2))
        cfl.append(_r(st.flow[f:, c], 2))
    k0 = stratum_index(res, s)
    heads_w = st.weight[k0, : L * H]
    sel = int(torch.argmax(heads_w)) if float(heads_w.max()) > 0 else -1
    emb = token_edges(res, max_edges=max_edges, per_head=per_head)
    ids = emb["ids"]
    n_global = min(max_edges, int((res.labels < K).sum()))
    _, _, m_lab, _ = lay.split(res.labels.long())
    _, _, m_w, _ = lay.split(res.weights)
    m_lab = m_lab.flatten()
    mk = torch.where(m_lab < K, m_lab, torch.full_like(m_lab, -1))
    only = res.conditions.index("only")
    # Parallel blocks (one node per block, every edge from graph layer 2l to 2l+2): flagged only
    # there, so a sequential result's data (and page) stay as they were.
    extra = {"P": 1} if lay.parallel else {}
    return extra | {
        "v": DATA_VERSION,
        "model": str(res.model.get("name", "")),
        "L": L, "H": H, "T": T, "E": int(res.n_edges),
        "method": str(res.config.get("method", "")),
        "tokens": list(res.str_tokens),
        "sizes": _r(res.sizes, 4),
        "counts": [int(c) for c in res.counts.tolist()],
        "k0": k0,
        "sel": sel,
        "conds": list(res.conditions),
        "tv": [_r(row, 4) for row in res.tv_all],
        "nuc": _r(res.nucleus_all[only], 4),
        "top": [[res.top_strs[only][k][0], round_sig(float(res.top_probs[only, k, 0]), 3)] for k in range(K)],
        "full": [res.full_top_strs[0], round_sig(float(res.full_top_probs[0]), 3)],
        "names": st.names,
        "cf": first,
        "ct": [int(x) for x in st.n_total.tolist()],
        "cn": cn, "cw": cw, "cfl": cfl,
        "tf": [_r(row, 2) for row in st.token_flow],
        "mk": [int(x) for x in mk.tolist()],
        "mw": _r(m_w.flatten(), 2),
        "ng": n_global,
        "perHead": per_head,
        "ed": {
            "id": [int(x) for x in ids.tolist()],
            "k": [int(x) for x in res.labels[ids].tolist()],
            "w": _r(res.weights[ids], 2),
            "r": [int(x) for x in emb["rank"].tolist()],
        },
    }


def _fmt_s(s: float) -> str:
    return "n/a" if not math.isfinite(s) else f"{s:g}"


def summary_text(res: TraceResult) -> str:
    """The key numbers as plain text (a view's ``text/plain`` form): model, size, density, the full
    model's top token, and the smallest s whose shared nucleus reaches each recovery level."""
    rec = res.recovery_sizes()
    levels = ", ".join(f"{lvl}%: {_fmt_s(v)}" for lvl, v in rec.items())
    return (f"tl_strace view of {res.model.get('name', '')!s}: {len(res.str_tokens)} tokens, {res.n_total:,} "
            f"{res.UNIT}, {res.config.get('method', '')} ({res.config.get('weights', '')} weights); density "
            f"{res.density:.3f}; full model -> {res.full_top_strs[0]!r} (p {float(res.full_top_probs[0]):.3f}); "
            f"smallest s reaching a shared nucleus of {levels}{_mode_text(res)}")


def _mode_text(res: TraceResult) -> str:
    """The attention-mode label a result that is not a faithful measurement always carries."""
    return "" if res.attention == "faithful" else f"; {attention_label(res.attention)}: not a faithful measurement"


def summary_html(res: TraceResult) -> str:
    """One escaped header line (model, sizes, density, full top token, recovery) and the input text."""
    rec = res.recovery_sizes()
    p = float(res.full_top_probs[0])
    mode = "" if res.attention == "faithful" else \
        f" · <b class=\"tls-mode\">{esc(attention_label(res.attention))}</b>: not a faithful measurement"
    head = (f"<div class=\"tls-hd\"><b>{esc(res.model.get('name', ''))}</b> · {len(res.str_tokens)} tokens · "
            f"{res.n_total:,} {res.UNIT} · {esc(res.config.get('method', ''))} ({esc(res.config.get('weights', ''))} "
            f"weights) · <b>density {res.density:.3f}</b> (area under TV over log<sub>10</sub> s) · "
            f"full model → <b>{esc(repr(res.full_top_strs[0]))}</b> (p {p:.3f}, entropy {res.full_entropy:.2f} "
            f"nats) · top token recovered at s = {_fmt_s(rec.get(1, float('nan')))}"
            f"{mode}</div>")
    toks = "".join(f"<span>{esc(t)}</span>" for t in res.str_tokens[:-1])
    toks += f"<span class=\"tls-last\" title=\"the last token: the view traces the prediction after it\">" \
            f"{esc(res.str_tokens[-1])}</span>"
    return head + f"<div class=\"tls-text\">{toks}</div>"


def circuit_view(res: TraceResult, *, s: float | None = None, max_edges: int = 2000, per_head: int = 12,
                 curves: bool = True, static: bool = True) -> HTMLView:
    """The result as one self-contained, interactive HTML fragment (summary, curves, circuit).

    Args:
        res: a traced result.
        s: the size the slider opens on (nearest stratum on a log axis); default: the first
            stratum that recovers the full model's top token, else s ≈ 1e-2.
        max_edges: how many of the first edges the search took to embed at token level.
        per_head: how many more edges to embed per head (its first by rank), so any head expands.
        curves: include the TV and shared-nucleus curves above the circuit.
        static: include the static picture shown where scripts do not run (a PNG of the curves and
            the grid, ~70 kB and most of the view's build time); ``False`` for a view inserted by a
            script, which therefore always runs (the profile view's click).

    Returns:
        An :class:`~tl_strace.views._html.HTMLView`; Jupyter displays it, ``.save(path)`` writes a page.
    """
    if not is_token_level(res):  # no script: the curves are the static picture itself
        body = summary_html(res) + (static_img_html(res, grid=False).replace(
            'class="tls-static-img"', 'class="tls-static-img tls-curves"') if curves else "")
        note = ('<p class="tls-note">This result is component-level (granularity '
                f"{esc(res.config.get('granularity'))}): the circuit view draws token-level traces. See "
                "<code>tl_strace.components.component_table(res)</code>.</p>")
        vid = render_id("tls", body)
        return HTMLView(f'<div class="tls-view tls-static" id="{vid}"><style>{circuit_css()}</style>{body}{note}</div>',
                        title=f"tl_strace: {res.model.get('name', '')}", text=summary_text(res))
    data = script_json(circuit_data(res, s=s, max_edges=max_edges, per_head=per_head))
    vid = render_id("tls", data)
    K = int(res.sizes.numel())
    parts = [f'<div class="tls-view" id="{vid}" data-tls-circuit="{DATA_VERSION}">', f"<style>{circuit_css()}</style>",
             summary_html(res)]
    if static:
        # What shows where scripts do not run (an untrusted notebook, a preview, print): a PNG of
        # the curves and the component grid; the script hides it and shows the live view below.
        parts += [static_img_html(res, stratum_index(res, s)),
                  '<div class="tls-note tls-static-note">A static picture: where scripts run (a trusted notebook, '
                  'the saved page), the curves and the circuit are interactive.</div>']
    parts.append('<div class="tls-live" hidden>')
    if curves:
        parts.append(curves_svg(res))
    parts.append(
        '<div class="tls-ctl"><label>size s <input type="range" class="tls-slider" min="0" '
        f'max="{K - 1}" step="1" value="0" aria-label="stratum"></label><span class="tls-sl"></span>'
        '<label>shade by <select class="tls-metric"><option value="w">summed edge weight</option>'
        '<option value="f">flow</option><option value="n">edge count</option></select></label></div>'
        '<div class="tls-panels">'
        '<div><div class="tls-pt">Components in the trace</div><svg class="tls-grid" '
        'xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg></div>'
        '<div><div class="tls-pt">Token-level trace (residual stream: position × layer)</div>'
        '<svg class="tls-tg" xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
        '<div class="tls-note tls-tgnote">The circuit needs JavaScript.</div></div></div>'
        '<div><div class="tls-pt tls-selt"></div><svg class="tls-head" xmlns="http://www.w3.org/2000/svg" '
        'width="10" height="10"></svg><div class="tls-note tls-headnote"></div></div>'
        '<div class="tls-tip"></div></div>'
    )
    parts.append(f'<script type="application/json" class="tls-data">{data}</script>')
    parts.append(f"<script>{circuit_js()}</script></div>")
    return HTMLView("".join(parts), title=f"tl_strace: {res.model.get('name', '')}", text=summary_text(res))
