"""Views of a :class:`~tl_strace.results.DensityProfile`: the text coloured by density, and a
density-by-position matplotlib figure.

The view has two parts: circuitsvis's ``ColoredTokens`` (offline, tokens escaped), and our own
interactive text, where hovering (or focusing) a token shows its position's TV curve and the full
model's top tokens, and clicking it (or Enter) opens that position's trace below: its TV and
shared-nucleus curves and top tokens per size, and with ``circuits=True`` its interactive circuit
view (:func:`tl_strace.views.circuit_view`). Token text reaches the page through
:func:`~tl_strace.views._html.esc` (HTML) and :func:`~tl_strace.views._html.script_json` (data);
the script writes it with ``textContent`` only.

>>> profile_view(prof)          # Jupyter: the coloured text, hover and click   # doctest: +SKIP
>>> plot_profile(prof)          # a matplotlib figure                           # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from tl_strace.results import DensityProfile
from tl_strace.views._html import HTMLView, esc, render_id, round_sig, script_json
from tl_strace.views.circuit import circuit_view
from tl_strace.views.curves import curves_svg
from tl_strace.views.detail import CircuitsvisFigure, _as_html_text, figures_html

__all__ = ["interactive_html", "plot_profile", "profile_figure", "profile_view", "save_profile_html"]


def profile_figure(prof: DensityProfile) -> CircuitsvisFigure:
    """circuitsvis ``ColoredTokens`` of the text, token ``t`` coloured by the density of the
    prediction after it (paper B's area under TV over log10 s).

    The colour scale runs from the lowest to the highest density of the profile; tokens whose
    prediction was not traced get the lowest value (the table beside the figure lists the traced
    ones). Token text is entity-escaped (circuitsvis puts it into ``innerHTML``; see
    :func:`tl_strace.views.detail._as_html_text`) and the props reach the page through
    :func:`~tl_strace.views._html.script_json` (:func:`~tl_strace.views.detail.figures_html`).
    """
    dens = [float(d) for d in prof.density]
    lo, hi = min(dens), max(dens)
    values = [lo] * len(prof.str_tokens)
    for t, d in zip(prof.positions, dens):
        values[t] = d
    toks = list(prof.str_tokens)
    table: list[tuple[str, ...]] = [("position", "token", "next token", "predicted", "density")]
    for t, r, d in zip(prof.positions, prof.results, dens):
        table.append((str(t), repr(toks[t]), repr(toks[t + 1]) if t + 1 < len(toks) else "",
                      repr(r.full_top_strs[0]), f"{d:.4f}"))
    name = str(prof.model.get("name", ""))
    top = hi if hi > lo else lo + max(abs(lo), 1e-3) * 1e-2  # one position (or equal densities): a non-empty scale
    return CircuitsvisFigure(
        "ColoredTokens",
        {"tokens": _as_html_text(list(prof.str_tokens)), "values": [round_sig(v, 4) for v in values],
         "minValue": round_sig(lo, 4), "maxValue": round_sig(top, 4)},
        title=f"{name}: density of the prediction after each token ({len(prof.positions)} positions; "
              f"{lo:.3f} to {hi:.3f})",
        note="Each token is coloured by the density (area under TV over log10 s) of the model's prediction of "
             "the next token; hover a token for its value. Untraced tokens take the lowest colour.",
        table=tuple(table))


def _colour(x: float) -> str:
    """White (x = 0) to blue (x = 1), the colour of the lowest to the highest density."""
    x = min(1.0, max(0.0, x))
    r, g, b = (round(255 + (c - 255) * x) for c in (37, 99, 235))
    return f"rgb({r},{g},{b})"


def _detail_html(prof: DensityProfile, k: int, circuits: bool) -> str:
    """What clicking position ``k`` opens: its curves, its top tokens per size, its circuit view."""
    t, res = prof.positions[k], prof.results[k]
    toks = prof.str_tokens
    nxt = f" (next {toks[t + 1]!r})" if t + 1 < len(toks) else ""
    head = (f'<div class="tls-pt">Position {t}: the prediction after {esc(repr(toks[t]))}{esc(nxt)} · density '
            f"{res.density:.4f} · full model's top token {esc(repr(res.full_top_strs[0]))} "
            f"(p = {float(res.full_top_probs[0]):.3f})</div>")
    rows = "".join(f"<tr><td>{float(s):g}</td><td>{float(res.tv[i]):.4f}</td><td>{float(res.nucleus[i]):.0f}</td>"
                   f"<td>{esc(repr(res.top_strs[0][i][0]))}</td></tr>" for i, s in enumerate(res.sizes.tolist()))
    table = ('<table class="tls-prof-table"><thead><tr><th>s</th><th>TV</th><th>nucleus (%)</th>'
             f"<th>top token of the trace</th></tr></thead><tbody>{rows}</tbody></table>")
    # no static picture: the click's script inserts the view, so scripts run (and the PNG is most of its cost)
    circuit = circuit_view(res, curves=False, static=False).html if circuits else ""
    return f"{head}{curves_svg(res)}{table}{circuit}"


_PROFILE_CSS = """
.tls-profile { position: relative; font-family: system-ui, sans-serif; }
.tls-prof-text { line-height: 1.9; white-space: pre-wrap; font-size: 14px; }
.tls-prof-tok { cursor: pointer; border: 1px solid #e5e7eb; padding: 1px 0; }
.tls-prof-tok.tls-sel { outline: 2px solid #111827; }
.tls-prof-untraced { color: #6b7280; }
.tls-prof-tip { position: absolute; z-index: 5; background: #ffffff; border: 1px solid #9ca3af; padding: 6px;
                font-size: 12px; box-shadow: 0 2px 6px rgba(0,0,0,.15); pointer-events: none; }
.tls-prof-table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
.tls-prof-table td, .tls-prof-table th { border: 1px solid #e5e7eb; padding: 1px 6px; text-align: left; }
"""

_PROFILE_JS = """
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var root = document.getElementById(%(vid)s);
  if (!root || root.getAttribute("data-tls-ready")) return;
  var D = JSON.parse(root.querySelector("script.tls-prof-data").textContent);
  var tip = root.querySelector(".tls-prof-tip"), detail = root.querySelector(".tls-prof-detail");
  function line(s) { var d = document.createElement("div"); d.textContent = s; tip.appendChild(d); }
  function spark(p) {  // TV against log10 s, 160 x 48
    var W = 160, H = 48, lo = Math.log10(p.sizes[0]);
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "tls-prof-spark");
    var pts = p.sizes.map(function (s, i) {
      var x = lo < 0 ? (Math.log10(s) - lo) / -lo * (W - 4) + 2 : W / 2;
      return x.toFixed(1) + "," + (2 + (1 - p.tv[i]) * (H - 4)).toFixed(1);
    });
    var pl = document.createElementNS(NS, "polyline");
    pl.setAttribute("points", pts.join(" ")); pl.setAttribute("fill", "none");
    pl.setAttribute("stroke", "#2563eb"); pl.setAttribute("stroke-width", "1.5");
    svg.appendChild(pl);
    return svg;
  }
  function show(el) {
    var p = D.pos[+el.getAttribute("data-k")];
    tip.textContent = "";
    line("position " + p.t + ": after " + JSON.stringify(p.tok) + (p.next === null ? "" : " (next " + JSON.stringify(p.next) + ")"));
    line("density " + p.d.toFixed(4));
    line("full model: " + p.top.map(function (x) { return JSON.stringify(x[0]) + " " + x[1].toFixed(3); }).join(", "));
    line("TV against log s:");
    tip.appendChild(spark(p));
    tip.style.left = el.offsetLeft + "px";
    tip.style.top = (el.offsetTop + el.offsetHeight + 4) + "px";
    tip.hidden = false;
    root.setAttribute("data-tls-hover", String(p.t));
  }
  function hide() { tip.hidden = true; }
  function open(el) {
    var k = el.getAttribute("data-k");
    var tpl = root.querySelector('template[data-k="' + k + '"]');
    detail.textContent = "";
    detail.appendChild(document.importNode(tpl.content, true));
    var sel = root.querySelectorAll(".tls-prof-tok.tls-sel");
    for (var j = 0; j < sel.length; j++) sel[j].classList.remove("tls-sel");
    el.classList.add("tls-sel");
    root.setAttribute("data-tls-open", String(D.pos[+k].t));
  }
  var toks = root.querySelectorAll(".tls-prof-tok");
  for (var i = 0; i < toks.length; i++) {
    (function (el) {
      el.addEventListener("mouseover", function () { show(el); });
      el.addEventListener("focus", function () { show(el); });
      el.addEventListener("mouseout", hide);
      el.addEventListener("blur", hide);
      el.addEventListener("click", function () { open(el); });
      // Keys on a focused token are ours: Enter / Space open it, the arrow keys, Home and End move
      // to another token (its tooltip follows the focus). Cancelled and stopped here, so that a
      // notebook's shortcuts (JupyterLab: Enter edits the cell, arrows change cells) do not act too.
      el.addEventListener("keydown", function (e) {
        if (e.altKey || e.ctrlKey || e.metaKey) return;
        var k = +el.getAttribute("data-k"), to = null;
        if (e.key === "Enter" || e.key === " ") open(el);
        else if (e.key === "ArrowRight" || e.key === "ArrowDown") to = toks[Math.min(k + 1, toks.length - 1)];
        else if (e.key === "ArrowLeft" || e.key === "ArrowUp") to = toks[Math.max(k - 1, 0)];
        else if (e.key === "Home") to = toks[0];
        else if (e.key === "End") to = toks[toks.length - 1];
        else return;
        e.preventDefault();
        e.stopPropagation();
        if (to && to !== el) to.focus();
      });
    })(toks[i]);
  }
  root.setAttribute("data-tls-ready", "1");
})();
"""


def interactive_html(prof: DensityProfile, *, circuits: bool = False) -> str:
    """The text coloured by density, with hover (a position's TV curve and the full model's top
    tokens) and click (its trace below; with ``circuits``, its circuit view: about 0.1 MB a position
    on SmolLM2, so off by default in Jupyter). Self-contained: no circuitsvis, no network."""
    dens = [float(d) for d in prof.density]
    lo, hi = min(dens), max(dens)
    span = hi - lo if hi > lo else 1.0
    k_of = {t: k for k, t in enumerate(prof.positions)}
    toks = list(prof.str_tokens)
    spans = []
    for i, tok in enumerate(toks):
        if i in k_of:
            k = k_of[i]
            spans.append(f'<span class="tls-prof-tok" tabindex="0" data-k="{k}" '
                         f'style="background:{_colour((dens[k] - lo) / span)}">{esc(tok)}</span>')
        else:
            spans.append(f'<span class="tls-prof-untraced">{esc(tok)}</span>')
    data = {"pos": [{"t": t, "tok": toks[t], "next": toks[t + 1] if t + 1 < len(toks) else None,
                     "d": round_sig(d, 5), "sizes": [round_sig(x, 4) for x in r.sizes.tolist()],
                     "tv": [round_sig(x, 4) for x in r.tv.tolist()],
                     "top": [[s, round_sig(float(p), 4)] for s, p in zip(r.full_top_strs[:3], r.full_top_probs[:3].tolist())]}
                    for t, r, d in zip(prof.positions, prof.results, dens)]}
    payload = script_json(data)
    vid = render_id("tls-prof", payload, str(circuits))
    templates = "".join(f'<template data-k="{k}">{_detail_html(prof, k, circuits)}</template>'
                        for k in range(len(prof.positions)))
    return (f'<div class="tls-profile" id="{esc(vid)}"><style>{_PROFILE_CSS}</style>'
            f'<div class="tls-pt"><b>Density along the text</b> (white {lo:.3f} to blue {hi:.3f})</div>'
            '<div class="tls-note">Hover a token (or focus it: Tab, then the arrow keys) for its position\'s TV curve '
            'and the full model\'s top tokens; click it (or press Enter) to open its trace below.</div>'
            f'<div class="tls-prof-text">{"".join(spans)}</div>'
            '<div class="tls-prof-tip" hidden></div><div class="tls-prof-detail"></div>'
            f'<script type="application/json" class="tls-prof-data">{payload}</script>{templates}'
            f"<script>{_PROFILE_JS % {'vid': script_json(vid)}}</script></div>")


def profile_view(prof: DensityProfile, *, circuits: bool = False) -> HTMLView:
    """The profile as a self-contained view: circuitsvis's coloured text (:func:`profile_figure`,
    bundle inlined) and the interactive text (:func:`interactive_html`: hover, click, and with
    ``circuits`` each position's circuit view)."""
    fig = profile_figure(prof)
    return HTMLView(figures_html([fig]) + interactive_html(prof, circuits=circuits), title=fig.title,
                    text=repr(prof))


def save_profile_html(prof: DensityProfile, path: str | os.PathLike, *, circuits: bool = True) -> str:
    """Write :func:`profile_view` as a standalone page (offline; with each position's circuit view
    unless ``circuits=False``); returns the path."""
    view = profile_view(prof, circuits=circuits)
    title = f"{prof.model.get('name', '')}: density along a text of {len(prof.str_tokens)} tokens"
    body = f"<h1>{esc(title)}</h1>\n{view.html}"
    return HTMLView(body, title=view.title).save(path)


def plot_profile(prof: DensityProfile, *, ax: Any = None) -> Any:
    """Density against position (tokens on the x-axis), a matplotlib figure (no pyplot); draws into
    ``ax`` if given."""
    from tl_strace.views.plots import _new_figure, _plain

    if ax is None:
        _, axes = _new_figure(max(5.2, 0.28 * len(prof.positions) + 2.0), 3.2)
        ax = axes[0]
    fig = ax.figure
    x = list(prof.positions)
    ax.plot(x, prof.density.numpy(), "-o", ms=3, lw=1.6, color="#2563eb", zorder=3)
    if len(x) <= 60:  # beyond that the labels overlap: positions only
        ax.set_xticks(x)
        ax.set_xticklabels([_plain(repr(prof.str_tokens[t])) for t in x], rotation=90, fontsize=7)
    ax.set_xlabel("position (the prediction after this token)")
    ax.set_ylabel("density (area under TV over log10 s)")
    ax.set_title(f"{_plain(prof.model.get('name', ''))}: density along the text", fontsize=10)
    ax.grid(True, which="major", color="#e5e7eb", lw=0.6)
    return fig
