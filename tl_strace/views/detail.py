"""circuitsvis detail views of a trace, rendered offline with the circuitsvis bundle inlined once per page.

* :func:`attention_patterns` — the attention patterns of the heads a subgraph uses, restricted to the
  kept edges (every attention weight the subgraph removes is drawn as 0). Needs the clean patterns,
  which a caller computes (``res.clean_patterns(model)``, one forward pass): views never run the model.
* :func:`colored_tokens` — each input token's contribution to the output (its share of the *flow*,
  see :mod:`tl_strace.views._data`), one colouring per size; needs the result only.
* :func:`topk_tokens` — the full model's and the subgraph's top tokens, per size and condition.
* :func:`detail_views` — all of them on one page, with the 1.3 MB bundle included once.

circuitsvis's own ``RenderedHTML`` reads the bundle from disk on every call, inlines it into every
figure, probes google.com on every display, and places props in a ``<script>`` unescaped. Here the
bundle is read once per process, included once per page, and props are script-safe JSON.

In a notebook each display carries the bundle (1.3 MB: a saved notebook grows by about that much
per circuitsvis display, whether it holds one figure or the three of :func:`detail_views`). One copy
per notebook (a later display reusing a bundle an earlier output loaded) is not done on purpose:
a saved output would then render only if that earlier output is still in the notebook and drawn
first, which re-running or clearing a cell, or JupyterLab's lazy rendering of off-screen cells,
break. Beside each figure, a plain table of its key numbers (:func:`static_table`) is what an
untrusted notebook or a preview shows; the figure's script hides it once circuitsvis has drawn.

>>> figs = res.detail_views(1e-2, model=model)      # or detail_views(res, 1e-2, patterns=res.clean_patterns(model))  # doctest: +SKIP
>>> figs                                            # in Jupyter: three circuitsvis figures  # doctest: +SKIP
>>> figs.save("details.html")                       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.results import TraceResult
from tl_strace.views._data import component_stats, is_token_level, stratum_index
from tl_strace.views._html import HTMLView, esc, n_of, render_id, round_sig, script_json

__all__ = [
    "CircuitsvisFigure",
    "attention_patterns",
    "circuitsvis_bundle",
    "colored_tokens",
    "detail_views",
    "figures_html",
    "restricted_patterns",
    "static_table",
    "topk_tokens",
]


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (``dist/cdn/iife.js``), read once, made safe to inline.

    The bundle holds the literal ``"<script></script>"`` inside a JS string; ``</script`` becomes
    ``<\\/script`` (the same string in JS), so the page's own ``<script>`` is not closed early; ``<!--``
    (absent from 1.43's bundle) would become ``<\\!--`` for the same reason.
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise InputError(f"The circuitsvis bundle is missing at {path}; reinstall circuitsvis (pip install "
                         "--force-reinstall circuitsvis).")
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script").replace("<!--", "<\\!--")


@dataclass(frozen=True)
class CircuitsvisFigure:
    """One circuitsvis component with its props, a title and a note. Displays itself in Jupyter
    (bundle included); several render together with :func:`figures_html` (bundle included once).

    A figure with ``component=""`` has nothing to draw (e.g. no attention edges at the chosen size):
    it renders as its title and note only, with no circuitsvis call, since circuitsvis components
    throw in the browser on empty data (``AttentionHeads`` with no heads: ``reading 'map'``).

    ``table`` is the figure's key numbers as plain text (a header row, then data rows): rendered as
    an HTML ``<table>`` beside the figure, it is what a reader sees where scripts do not run (an
    untrusted notebook, a preview: JupyterLab's sanitizer keeps tables and text); the figure's
    script hides it once circuitsvis has drawn.
    """

    component: str
    props: dict[str, Any]
    title: str
    note: str = ""
    table: tuple[tuple[str, ...], ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to draw: the figure is its title and note."""
        return not self.component

    def _repr_html_(self) -> str:
        return figures_html([self])

    def __repr__(self) -> str:  # the props run to tens of kB: Jupyter's text/plain shows this line instead
        what = f"circuitsvis {self.component}" if self.component else "empty figure"
        return f"<CircuitsvisFigure ({what}): {self.title}>"

    def save(self, path: str | os.PathLike) -> str:
        """Write a standalone page holding this figure."""
        return HTMLView(figures_html([self]), title=self.title).save(path)


def figures_html(figures: list[CircuitsvisFigure], *, bundle: bool = True) -> str:
    """HTML for several circuitsvis figures with the bundle inlined at most once.

    Element ids are unique per render (:func:`~tl_strace.views._html.render_id`: a content hash and a
    fresh suffix, numbered instead inside :func:`~tl_strace.views._html.stable_ids`). With
    ``bundle=False`` the caller promises the page already loads the bundle before these scripts.
    Empty figures (:attr:`CircuitsvisFigure.empty`) render as their title and note, with no script;
    the bundle is left out when every figure is empty.
    """
    parts = []
    if bundle and not all(fig.empty for fig in figures):
        parts.append(f"<script>{circuitsvis_bundle()}</script>")
    for i, fig in enumerate(figures):
        if fig.empty:
            parts.append(f'<div class="tls-cv tls-cv-empty"><div class="tls-pt"><b>{esc(fig.title)}</b></div>'
                         f'<div class="tls-note">{esc(fig.note)}</div></div>')
            continue
        props = script_json(fig.props)
        fid = render_id("tls-cv", fig.component, props, str(i))  # fresh per render: a figure shown twice works
        hide = f'document.getElementById("{fid}-static").hidden = true;' if fig.table else ""
        parts.append(f'<div class="tls-cv"><div class="tls-pt"><b>{esc(fig.title)}</b></div>'
                     f'<div class="tls-note">{esc(fig.note)}</div>{static_table(fig.table, f"{fid}-static")}'
                     f'<div id="{fid}"></div>'
                     f'<script>CircuitsVis.render("{fid}", CircuitsVis.{fig.component}, {props});{hide}</script></div>')
    return "\n".join(parts)


def static_table(rows: tuple[tuple[str, ...], ...], table_id: str) -> str:
    """``rows`` (a header row, then data rows; plain text, escaped here) as a small HTML table with
    class ``tls-cv-static``: the static summary of a circuitsvis figure. Empty ``rows``: ``""``."""
    if not rows:
        return ""
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return (f'<table class="tls-cv-static" id="{esc(table_id)}" style="border-collapse:collapse;font-size:12px;'
            f'margin:4px 0"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def restricted_patterns(res: TraceResult, pattern: Float[Tensor, "layer head pos pos_src"],
                        s: float | None = None) -> Float[Tensor, "layer head pos pos_src"]:
    """``pattern`` with every attention edge outside the stratum nearest ``s`` set to 0, as the
    masked forward pass of METHOD.md §4 does (no renormalisation)."""
    lay = res.layout
    if tuple(pattern.shape) != (lay.n_layers, lay.n_heads, lay.n_pos, lay.n_pos):
        raise InputError(f"Patterns shaped {tuple(pattern.shape)} do not fit this result "
                         f"({lay.n_layers} layers, {lay.n_heads} heads, {lay.n_pos} tokens).")
    k = stratum_index(res, s)
    a_lab = lay.split(res.labels.long())[0]
    return pattern * (a_lab <= k).to(pattern.dtype)


def attention_patterns(res: TraceResult, patterns: Float[Tensor, "layer head pos pos_src"], s: float | None = None, *,
                       max_heads: int = 12) -> CircuitsvisFigure:
    """circuitsvis attention patterns (its ``AttentionHeads`` component) of the heads the subgraph at size ``s`` relies on most
    (largest summed kept edge weight), each restricted to its kept edges.

    Args:
        res: the result.
        patterns: the clean attention patterns ``[layer, head, pos, pos]`` of ``res``'s input, from
            ``res.clean_patterns(model)`` (views never run the model; results do not store them).
        s: the size (nearest stratum on a log axis); default: the stratum the circuit view opens on.
        max_heads: how many heads to show at most.
    """
    if max_heads < 1:
        raise InputError(f"max_heads must be at least 1; got {max_heads}.")
    pattern = patterns
    k = stratum_index(res, s)
    st = component_stats(res)
    L, H = st.n_layers, st.n_heads
    w = st.weight[k, : L * H]
    order = [int(c) for c in torch.argsort(w, descending=True, stable=True).tolist() if float(w[c]) > 0][:max_heads]
    kept = restricted_patterns(res, pattern.float(), float(res.sizes[k]))
    heads = sorted(order)
    if not heads:  # circuitsvis's AttentionHeads throws on an empty list: draw the sentence instead
        size = float(res.sizes[k])
        with_attn = [float(res.sizes[j]) for j in range(int(res.sizes.numel()))
                     if bool((st.weight[j, : L * H] > 0).any())]
        hint = f" (the smallest with attention edges is s = {with_attn[0]:g})" if with_attn else ""
        return CircuitsvisFigure("", {}, title=f"Attention patterns restricted to the trace at s = {size:g}",
                                 note=f"No attention edges at s = {size:g}; choose a larger s{hint}.")
    att = torch.stack([kept[c // H, c % H] for c in heads]) if heads else torch.zeros(0, st.token_flow.shape[1],
                                                                                        st.token_flow.shape[1])
    names = [f"L{c // H}H{c % H} ({n_of(st.n_edges[k, c])})" for c in heads]
    values = [[[round_sig(v, 3) for v in row] for row in head] for head in att.tolist()]
    size = float(res.sizes[k])
    toks = list(res.str_tokens)
    table: list[tuple[str, ...]] = [("head", "kept edges", "strongest kept attention (target ← source)", "weight")]
    for c, a in zip(heads, att):  # each head's strongest kept attention weight
        t, src = divmod(int(torch.argmax(a)), a.shape[1])
        table.append((f"L{c // H}H{c % H}", f"{int(st.n_edges[k, c]):,}",
                      f"{toks[t]!r} ({t}) ← {toks[src]!r} ({src})", f"{float(a[t, src]):.3f}"))
    return CircuitsvisFigure(
        "AttentionHeads",
        {"attention": values, "tokens": list(res.str_tokens), "attentionHeadNames": names, "maxValue": 1.0,
         "minValue": -1.0, "maskUpperTri": True},
        title=f"Attention patterns restricted to the trace at s = {size:g}",
        note=f"The {len(heads)} heads with the largest summed kept edge weight at s = {size:g} (of "
             f"{int((st.n_edges[k, : L * H] > 0).sum())} heads in the trace); removed edges are drawn as 0.",
        table=tuple(table),
    )


def _as_html_text(tokens: list[str]) -> list[str]:
    """Tokens escaped for circuitsvis components that put token text into ``innerHTML``.

    ``ColoredTokens``, ``ColoredTokensMulti`` and ``TopkTokens`` (circuitsvis 1.43) render each token
    with React's ``dangerouslySetInnerHTML`` after replacing whitespace by ``&nbsp;``, so a token
    ``<img src=x onerror=...>`` would become a live element. Entity-escaping makes the cells show the
    token's exact text (their hover tooltips then show the escaped form).
    """
    return [html.escape(t, quote=False) for t in tokens]


def _size_labels(res: TraceResult) -> list[str]:
    return [f"s = {float(s):g} ({n_of(n)})" for s, n in zip(res.sizes, res.counts)]


def _flow_shares(flow: Float[Tensor, "*stratum pos"]) -> Float[Tensor, "*stratum pos"]:
    """Token flow as shares of what reaches the input (rows sum to 1; all-zero rows stay 0)."""
    total = flow.sum(-1, keepdim=True)
    return torch.where(total > 0, flow / total.clamp_min(1e-300), torch.zeros_like(flow))


def colored_tokens(res: TraceResult, s: float | None = None) -> CircuitsvisFigure:
    """circuitsvis ``colored_tokens``: each input token's share of the output's flow that reaches the
    input through the kept edges (see :mod:`tl_strace.views._data`).

    Within a small stratum the flow reaching the input is tiny in absolute terms (every dropped
    in-edge loses mass, layer after layer), so each size is shown as shares summing to 1; in the full
    graph the shares are the flow itself. With ``s=None``, one colouring per size, largest first
    (``colored_tokens_multi``); with ``s``, the nearest stratum only.
    """
    st = component_stats(res)
    toks = _as_html_text(list(res.str_tokens))
    shares = _flow_shares(st.token_flow.double())
    note = ("Share of the flow reaching the input (the output's unit of edge weight pushed back through the "
            "kept edges) that lands on each token's embedding. Shares sum to 1 per size.")
    if s is None:  # largest size first: the full graph's attribution is what the view opens on
        vals = [[round_sig(v, 3) for v in row] for row in shares.flip(0).T.tolist()]
        return CircuitsvisFigure(
            "ColoredTokensMulti", {"tokens": toks, "values": vals, "labels": _size_labels(res)[::-1]},
            title="Contribution of each input token to the output, per size",
            note=note + " Hover or click a size to colour by it.",
            table=_share_table(res, shares[-1], "share (full graph)"))
    k = stratum_index(res, s)
    return CircuitsvisFigure(
        "ColoredTokens", {"tokens": toks, "values": [round_sig(v, 3) for v in shares[k].tolist()], "minValue": 0.0},
        title=f"Contribution of each input token to the output at s = {float(res.sizes[k]):g}", note=note,
        table=_share_table(res, shares[k], f"share at s = {float(res.sizes[k]):g}"))


def _share_table(res: TraceResult, shares: Float[Tensor, " pos"], what: str, n: int = 8) -> tuple[tuple[str, ...], ...]:
    """The ``n`` tokens with the largest share, largest first: (token, position, share)."""
    order = torch.argsort(shares, descending=True, stable=True).tolist()[:n]
    toks = list(res.str_tokens)
    return (("token", "position", what),
            *((repr(toks[p]), str(p), f"{float(shares[p]):.3f}") for p in order if float(shares[p]) > 0))


def topk_tokens(res: TraceResult) -> CircuitsvisFigure:
    """circuitsvis ``topk_tokens``: the full model's top tokens beside each subgraph's, per size
    (the "Size" selector) and condition (the "Sample" selector)."""
    K = int(res.sizes.numel())
    # Strata with no edge left out (the view opens on its first size: not on an empty subgraph).
    ks = [k for k in range(K) if int(res.counts[k]) > 0] or list(range(K))
    conds = list(res.conditions)
    vocab: list[str] = []
    index: dict[str, int] = {}

    def idx(t: str) -> int:
        if t not in index:
            index[t] = len(vocab)
            vocab.append(t)
        return index[t]

    full_i = [idx(t) for t in res.full_top_strs]
    full_p = [round_sig(float(p), 3) for p in res.full_top_probs]
    vals, idxs, bvals, bidxs = [], [], [], []
    for c in range(len(conds)):
        v_c, i_c = [], []
        for k in ks:
            sub_i = [idx(t) for t in res.top_strs[c][k]]
            sub_p = [round_sig(float(p), 3) for p in res.top_probs[c, k]]
            n = min(len(sub_i), len(full_i))
            # rows: rank; columns: full model, subgraph
            v_c.append([[full_p[r], sub_p[r]] for r in range(n)])
            i_c.append([[full_i[r], sub_i[r]] for r in range(n)])
        vals.append(v_c)
        idxs.append(i_c)
        bvals.append([[] for _ in ks])
        bidxs.append([[] for _ in ks])
    tokens = [_as_html_text(vocab) for _ in conds]
    return CircuitsvisFigure(
        "TopkTokens",
        {"tokens": tokens, "topkVals": vals, "topkIdxs": idxs, "bottomkVals": bvals, "bottomkIdxs": bidxs,
         "firstDimensionName": "Size", "thirdDimensionName": "Model (0 = full, 1 = subgraph)",
         "sampleLabels": conds, "firstDimensionLabels": [_size_labels(res)[k] for k in ks]},
        title="Top tokens: full model (column 0) and subgraph (column 1) per size",
        table=(("size", f"top token ({conds[0]})", "p"),
               ("full model", repr(res.full_top_strs[0]), f"{float(res.full_top_probs[0]):.3f}"),
               *((_size_labels(res)[k], repr(res.top_strs[0][k][0]), f"{float(res.top_probs[0, k, 0]):.3f}")
                 for k in ks)),
        note="Sample: the condition (only = the trace alone; random; inverse = the model without the trace). "
             "Values are next-token probabilities."
             + (f" Sizes with no edge ({K - len(ks)}) are left out." if len(ks) < K else ""))


def detail_views(res: TraceResult, s: float | None = None, *,
                 patterns: Float[Tensor, "layer head pos pos_src"] | None = None, max_heads: int = 12) -> HTMLView:
    """All detail views on one fragment, the circuitsvis bundle included once: attention patterns
    (only when ``patterns`` is given: ``res.clean_patterns(model)``, or call
    ``res.detail_views(s, model=model)``), token contributions, and top tokens."""
    figs = []
    if is_token_level(res):  # component-level results have no token-level edges to restrict or flow through
        if patterns is not None:
            figs.append(attention_patterns(res, patterns, s, max_heads=max_heads))
        figs.append(colored_tokens(res))
    figs.append(topk_tokens(res))
    return HTMLView(figures_html(figs), title=f"tl_strace details: {res.model.get('name', '')}",
                    text="tl_strace detail views (circuitsvis): " + "; ".join(f.title for f in figs))
