"""A standalone report page for one result: summary, curves, circuit, per-size table, composition
plots and the circuitsvis detail views — one HTML file with no network access.

``StraceResult.save_html(path)`` and ``tl-strace trace --html PATH`` write it.

The page is deterministic for a given result (and matplotlib version): ids are numbered in page order, the
inline SVG has a fixed hash salt and no date. Besides the collector of :func:`tl_strace.views._html.page`,
a few lines record where the main panels were drawn (``data-tls-layout`` on ``<body>``) once the
page has loaded, which lets a headless browser check the rendering without guessing coordinates.
"""

from __future__ import annotations

import math
import os
from typing import Any

from tl_strace.results import TraceResult
from tl_strace.views._data import is_token_level
from torch import Tensor

from tl_strace.views._html import esc, page, stable_ids, title_text
from tl_strace.views.circuit import circuit_view

__all__ = ["report_html", "save_report", "strata_table_html"]

LAYOUT_RECORDER = """<script>
(function () {
  function record() {
    var out = {}, sel = {curves: ".tls-curves", grid: "svg.tls-grid", tokens: "svg.tls-tg", head: "svg.tls-head",
                         shares: ".tls-shares svg"};
    Object.keys(sel).forEach(function (k) {
      var e = document.querySelector(sel[k]);
      if (!e) return;
      var r = e.getBoundingClientRect();
      out[k] = [Math.round(r.left + window.scrollX), Math.round(r.top + window.scrollY), Math.round(r.width),
                Math.round(r.height)];
    });
    var cv = document.querySelectorAll(".tls-cv > div[id]"), n = 0;
    for (var i = 0; i < cv.length; i++) if (cv[i].children.length) n++;
    out.circuitsvis = [n, cv.length];
    document.body.setAttribute("data-tls-layout", JSON.stringify(out));
  }
  window.addEventListener("load", function () { record(); setTimeout(record, 500); });
})();
</script>"""


def _fmt(x: float, spec: str = ".4f") -> str:
    return "–" if not math.isfinite(x) else format(x, spec)


def strata_table_html(res: TraceResult) -> str:
    """The per-size table (every condition's TV, the trace's nucleus, entropy and top token), escaped."""
    conds = list(res.conditions)
    head = ("<tr><th>s</th><th>edges</th>" + "".join(f"<th>TV {esc(c)}</th>" for c in conds)
            + "<th>nucleus %</th><th>entropy</th><th>top token (trace)</th><th>p</th><th>reaches input</th></tr>")
    rows = []
    for k in range(len(res.sizes)):
        tvs = "".join(f"<td>{_fmt(float(res.tv_all[c, k]))}</td>" for c in range(len(conds)))
        rows.append(
            f"<tr><td>{float(res.sizes[k]):g}</td><td>{int(res.counts[k]):,}</td>{tvs}"
            f"<td>{_fmt(float(res.nucleus_all[0, k]), '.0f')}</td><td>{_fmt(float(res.entropy_all[0, k]), '.3f')}</td>"
            f"<td><code>{esc(repr(res.top_strs[0][k][0]))}</code></td>"
            f"<td>{_fmt(float(res.top_probs[0, k, 0]), '.3f')}</td>"
            f"<td>{'yes' if bool(res.reaches_input_all[0, k]) else 'no'}</td></tr>")
    style = ("<style>.tls-table{border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums}"
             ".tls-table td,.tls-table th{padding:2px 8px;border-bottom:1px solid #e5e7eb;text-align:right}"
             ".tls-table th{background:#f9fafb}</style>")
    return f'{style}<table class="tls-table">{head}{"".join(rows)}</table>'


def report_html(res: TraceResult, *, patterns: Tensor | None = None, s: float | None = None, details: bool = True,
                plots: bool = True, max_edges: int = 2000, per_head: int = 12) -> str:
    """The whole report page as a string.

    Args:
        res: the result.
        patterns: the clean attention patterns ``[layer, head, pos, pos]`` of ``res``'s input
            (``res.clean_patterns(model)``); adds the attention patterns restricted to the trace.
            Views never run the model: ``res.save_html(path, model=model)`` computes them.
        s: the size the circuit view and the attention patterns open on (default: the first stratum
            recovering the top token).
        details: include the circuitsvis detail views (their 1.3 MB bundle, once).
        plots: include the composition figure (matplotlib, inline SVG).
        max_edges, per_head: token-level edges embedded in the circuit view.
    """
    with stable_ids():  # one document: ids numbered, so equal results give byte-identical pages
        return _report_html(res, patterns=patterns, s=s, details=details, plots=plots, max_edges=max_edges,
                            per_head=per_head)


def _report_html(res: TraceResult, *, patterns: Tensor | None, s: float | None, details: bool, plots: bool,
                 max_edges: int, per_head: int) -> str:
    name = str(res.model.get("name", ""))
    tail = title_text(list(res.str_tokens))[-60:]  # the text's end, without special tokens; esc()'d below
    title = f"tl_strace · {name} · …{tail}"
    nav = ['<a href="#tls-circuit">circuit</a>', '<a href="#tls-table">per-size table</a>']
    body = [f"<h1>s-Trace of {esc(name)}: …{esc(tail)} → {esc(repr(res.full_top_strs[0]))}</h1>"]
    sections = [f'<h2 id="tls-circuit">Curves and circuit</h2>'
                f'{circuit_view(res, s=s, max_edges=max_edges, per_head=per_head).html}',
                f'<h2 id="tls-table">Per-size results</h2>{strata_table_html(res)}']
    if plots and is_token_level(res):
        from tl_strace.views.plots import figure_svg, plot_shares

        nav.append('<a href="#tls-shares">composition</a>')
        sections.append('<h2 id="tls-shares">Composition of the trace</h2><div class="tls-shares">'
                        f"{figure_svg(plot_shares(res))}</div>")
    if details:
        from tl_strace.views.detail import detail_views

        nav.append('<a href="#tls-details">circuitsvis details</a>')
        note = "" if patterns is not None else (
            '<p class="tls-note">Attention patterns need the model: '
            "<code>res.save_html(path, model=model)</code>.</p>")
        sections.append(f'<h2 id="tls-details">Details (circuitsvis)</h2>{note}'
                        f"{detail_views(res, s, patterns=patterns).html}")
    body.append('<p class="tls-note">' + " · ".join(nav) + "</p>")
    body += sections
    cfg = ", ".join(f"{esc(k)}={esc(v)}" for k, v in res.config.items())
    body.append(f'<p class="tls-note">config: {cfg}</p>')
    return page(title, "\n".join(body) + LAYOUT_RECORDER)


def save_report(res: TraceResult, path: str | os.PathLike, **kwargs: Any) -> str:
    """Write :func:`report_html` to ``path`` (atomically); returns the path. Keywords as :func:`report_html`."""
    from tl_strace.fsutil import atomic_write, check_output_path

    path = os.fspath(path)
    if os.path.dirname(path) and not os.path.lexists(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    check_output_path(path, what="HTML report")  # before the page is built: a directory, a device node
    atomic_write(path, report_html(res, **kwargs), what="HTML report")
    return path
