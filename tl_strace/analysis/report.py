"""The corpus report: every analysis of one or more runs as Markdown and HTML, with figures inline."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tl_strace.ablation import attention_label
from tl_strace.analysis._base import RunLike, _labels, as_runs, group_runs
from tl_strace.analysis.findings import phases_table
from tl_strace.analysis.plots import (
    plot_attention_ablation,
    plot_cross_model,
    plot_density_along_text,
    plot_density_distribution,
    plot_density_vs_context,
    plot_edge_shares,
    plot_entropy_density,
    plot_interpolated_curves,
    plot_lorenz,
    plot_tv_curves,
    plot_unigram,
)
from tl_strace.analysis.tables import (
    _common_sizes,
    attention_ablation_comparison,
    component_frequency,
    cross_model_density,
    density_along_text,
    density_distribution,
    density_vs_context,
    density_vs_frequency,
    edge_shares,
    entropy_density,
    lorenz_curves,
    unigram_frequency,
)
from tl_strace.errors import InputError
from tl_strace.fsutil import atomic_write, check_output_path


REPORT_SIZES = (1e-4, 1e-3, 1e-2, 0.1, 0.4, 1.0)


def _rows_at(df: pd.DataFrame, sizes: Sequence[float] = REPORT_SIZES) -> pd.DataFrame:
    """Rows of a per-size table nearest (in log s) to each of ``sizes``, without repeats."""
    ls = np.log10(df["size"].to_numpy(dtype=float))
    idx = sorted({int(np.argmin(np.abs(ls - math.log10(s)))) for s in sizes})
    return df.iloc[idx].reset_index(drop=True)


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–" if math.isnan(v) else str(v)
        return f"{v:.4g}"
    return str(v)


_MD_ENTITIES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))


_MD_PUNCT = re.compile(r"([\\`*_\[\]|~#])")


_MD_BLOCK_START = re.compile(r"^(\s*(?:\d+)?)([-+=.)])")


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown inline text: copied text (model names, directories, tokens,
    passage text, reasons) can neither format, link, break a table nor inject HTML.

    ``&``, ``<`` and ``>`` become entities (so no raw HTML or autolink survives); Markdown's active
    punctuation (backslash, backtick, ``*``, ``_``, ``[``, ``]``, ``|``, ``~``, ``#``) is
    backslash-escaped; line breaks become spaces, and a leading list/heading marker (``-``, ``+``,
    ``=``, ``1.``) is escaped so a paragraph stays a paragraph.

    >>> markdown_text("<script>alert(1)</script> | *x* [a](b)")
    '&lt;script&gt;alert(1)&lt;/script&gt; \\\\| \\\\*x\\\\* \\\\[a\\\\](b)'
    """
    s = " ".join(str(text).splitlines())
    for ch, ent in _MD_ENTITIES:
        s = s.replace(ch, ent)
    s = _MD_PUNCT.sub(r"\\\1", s)
    return _MD_BLOCK_START.sub(lambda m: m.group(1) + "\\" + m.group(2), s, count=1)


class _Doc:
    """A report built once and written as HTML (self-contained) and/or Markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", (df, caption)))

    def figure(self, fig: Any, name: str, caption: str = "") -> None:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=96)
        self.blocks.append(("fig", (buf.getvalue(), name, caption)))

    def html(self) -> str:
        import base64
        import html

        e = html.escape
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:90%}"
               "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}"
               "td:first-child{text-align:left}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
               "img{max-width:100%}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, x in self.blocks:
            if kind == "h":
                out.append(f"<h2>{e(x)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(x)}</p>")
            elif kind == "table":
                df, cap = x
                body = df.to_html(index=False, escape=True, formatters={c: _fmt for c in df.columns}, border=0)
                out.append((f"<p><em>{e(cap)}</em></p>" if cap else "") + body)
            else:
                png, _, cap = x
                out.append(f"<figure><img alt='{e(cap)}' src='data:image/png;base64,"
                           f"{base64.b64encode(png).decode('ascii')}'><figcaption>{e(cap)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def markdown(self, assets: Path) -> str:
        # Every text is escaped (markdown_text): run names carry the model name, and tables copy
        # directories, data sources and skip reasons, which may quote passage text.
        def cell(v: Any) -> str:
            if isinstance(v, (bool, int, float, np.number)):
                return _fmt(v)  # digits, '.', '-', 'e', 'inf', '–': nothing Markdown acts on inside a cell
            return markdown_text(_fmt(v))

        md = markdown_text
        out = [f"# {md(self.title)}", ""]
        for kind, x in self.blocks:
            if kind == "h":
                out += [f"## {md(x)}", ""]
            elif kind == "p":
                out += [md(x), ""]
            elif kind == "table":
                df, cap = x
                if cap:
                    out += [f"*{md(cap)}*", ""]
                out.append("| " + " | ".join(cell(c) for c in df.columns) + " |")
                out.append("|" + "---|" * len(df.columns))
                out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
                out.append("")
            else:
                png, name, cap = x
                assets.mkdir(parents=True, exist_ok=True)
                # atomically, like every file tl_strace writes: a full disk leaves no truncated figure
                atomic_write(assets / f"{name}.png", png, what="report figure")
                from urllib.parse import quote

                src = quote(f"{assets.name}/{name}.png")  # the directory is the user's --out: spaces, ')'...
                out += [f"![{md(cap)}]({src})", "", f"*{md(cap)}*", ""]
        return "\n".join(out)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "run"


def build_report(runs: Sequence[RunLike], *, title: str = "tl_strace corpus report") -> _Doc:
    """Every analysis that applies to ``runs``, as a document (see :func:`write_report`)."""
    rs = as_runs(runs)
    if not rs:
        raise InputError("A report needs at least one run directory.")
    rs = [r for r in rs if len(r.table)] or rs
    doc = _Doc(title)
    labels = _labels(rs)
    doc.h("Runs")
    doc.table(pd.DataFrame([{
        "run": lab, "directory": str(r.path), "passages": len(r.table), "skipped": len(r.skipped),
        "data": r.config.get("data", {}).get("source"), "context words": r.context_words,
        "granularity": r.config.get("granularity"), "ablation": r.config.get("ablation"),
        "attention": r.attention, "tl_strace": r.versions.get("tl_strace"),
    } for r, lab in zip(rs, labels)]))
    traced = [r for r in rs if len(r.table)]
    if not traced:
        doc.p("No passage has been traced yet.")
        return doc
    groups = group_runs(traced)

    doc.h("Density")
    doc.p("Density is the area under the TV-to-the-full-model curve over log10 s (paper B; higher = denser, "
          "range 0–5 with the default sizes); 'mean_linear' is the area over linear s (paper A). "
          "'median_top_token_size' is the median smallest s whose subgraph has the full model's top token.")
    doc.table(density_distribution(traced))
    doc.figure(plot_density_distribution(traced), "density-hist", "Per-passage density")
    doc.figure(plot_tv_curves(traced), "tv-curves",
               "TV to the full model against s (mean and inter-quartile band); dashed: s = 1e-2 "
               "(construction / refinement), dotted: s = 1e-3 (minimal core)")

    # The overlay a reader of paper B compares first: one line per model, within one attention mode
    # (each model's longest context, as finding 4 pairs them); without several models, every run.
    overlays = {mode: of_mode for mode, of_mode in groups["cross_model"].items() if len(of_mode) > 1}
    for mode, of_mode in overlays.items():
        label = attention_label(mode)
        doc.figure(plot_interpolated_curves(of_mode), f"tv-grid-{_slug(mode)}",
                   "TV against s on paper B's grid (np.logspace(-5, 0, 150), each passage interpolated in log10 s), "
                   f"mean and IQR, one line per model ({'attention ablated faithfully' if not label else label}; "
                   "each model's longest context): the overlay")
    if not overlays:
        doc.figure(plot_interpolated_curves(traced), "tv-grid", "TV against s on paper B's grid (np.logspace(-5, 0, "
                   "150), each passage interpolated in log10 s), mean and IQR per run: the overlay")
    tokens = [r for r in traced if r.config.get("granularity", "token") == "token"]
    per_model: dict[str, list[Any]] = {}
    for r in tokens:
        per_model.setdefault(r.model_name, []).append(r)
    if len(per_model) > 1 or any(len(v) > 1 for v in per_model.values()):
        for name, of_model in per_model.items():
            doc.figure(plot_interpolated_curves(of_model), f"tv-grid-{_slug(name)}",
                       f"{name}: TV against s on paper B's grid, mean and IQR, each of its runs")
    if tokens:
        doc.h("Finding 1: the two phases")
        doc.table(phases_table(tokens), "Median s at which the top token and the 40 % / 80 % shared nucleus return; "
                  "mean TV at 1e-3 / 1e-2 / 0.1; mean attention and first-half-of-blocks shares of the trace")

    doc.h("Finding 2: density and the model's uncertainty")
    doc.table(entropy_density(traced), "Spearman rho between full-model entropy and density (t-approximation p)")
    for r, lab in zip(traced, _labels(traced)):
        doc.figure(plot_entropy_density(r), f"entropy-{_slug(lab)}", f"{lab}: entropy against density")

    for r, lab in zip(traced, _labels(traced)):
        if r.config.get("granularity") == "component" or "share_attn" not in r.table:
            continue
        doc.h(f"Finding 1: what the trace is made of — {lab}")
        doc.table(_rows_at(edge_shares(r)), "Mean share of the trace's edges by type and by layer group "
                  "(share_layers_0 = first quarter of the blocks)")
        doc.figure(plot_edge_shares(r), f"shares-{_slug(lab)}", "Edge-type and layer-group shares against s")

    for r, lab in zip(traced, _labels(traced)):
        if "components" not in r.table or not any(r.table["components"].map(bool)):
            continue
        doc.h(f"Components in the traces — {lab}")
        lz = lorenz_curves(r)
        freq = component_frequency(r)
        top = freq.groupby("size").head(8)[["size", "component", "frequency", "mean_edges"]]
        doc.table(lz.groupby("size")["gini"].first().reset_index(), "Gini coefficient of component use per size")
        doc.table(top, "Most frequent components per size (fraction of passages whose trace uses them)")
        doc.figure(plot_lorenz(r), f"lorenz-{_slug(lab)}", "Lorenz curves of component use")

    for r, lab in zip(traced, _labels(traced)):
        if not r.unigram or _common_sizes(r) is None:
            continue
        doc.h(f"Finding 3: sparse strata and unigram frequency — {lab}")
        uf = _rows_at(unigram_frequency(r))
        doc.table(uf, "log10 corpus frequency of the trace's top token vs the full model's; frac_more_frequent: "
                  "passages whose stratum predicts a more frequent token than the full model (sign-test p)")
        doc.figure(plot_unigram(r), f"unigram-{_slug(lab)}", "Frequency of the predicted token against s")
        dv = density_vs_frequency(r)
        doc.table(dv, f"Paper A: density by frequency bin of the predicted token (Spearman rho "
                  f"{dv.attrs['rho']:.3f}, p = {dv.attrs['p']:.2g}, n = {dv.attrs['n']})")

    for r, lab in zip(traced, _labels(traced)):
        if r.profile is None or not len(r.profile):
            continue
        doc.h(f"Density along the text (every position) — {lab}")
        da = density_along_text(r)
        a = da.attrs
        doc.table(da, f"Every position of {a['passages']} passages ({a['n']} predictions), by the tokens of context "
                  f"each sees: Spearman rho(context tokens, density) = {a['rho']:.3f} (p = {a['p']:.2g}); "
                  f"rho(full-model entropy, density) = {a['rho_entropy']:.3f} (p = {a['p_entropy']:.2g}); mean "
                  f"change of density from one position to the next: {a['step']:.3f}")
        doc.figure(plot_density_along_text(r), f"along-{_slug(lab)}", "Density against context length, every position")

    for g in groups["context_groups"]:
        doc.h("Paper A: density and context length")
        dc = density_vs_context(g)
        doc.table(dc, f"Same passages (same next word) cut to different lengths; Spearman rho(length, density) = "
                  f"{dc.attrs['rho']:.3f} (p = {dc.attrs['p']:.2g}, n = {dc.attrs['n']})")
        doc.figure(plot_density_vs_context(g), f"context-{_slug(g[0].name)}", "Density per context length")

    for mode, group in groups["cross_model"].items():
        doc.h(f"Finding 4: density across models — {attention_label(mode) or 'faithful'}")
        m = cross_model_density(group)
        doc.table(m.reset_index(names="run"), "Spearman rho between models' per-passage densities, over the "
                  "passages both traced (paper B: mean 0.515, range 0.263–0.711, over 45 pairs of 7–14B models)")
        doc.table(m.attrs["n"].reset_index(names="run"), "Passages per pair (n)")
        doc.table(m.attrs["p"].reset_index(names="run"), "p-values (t approximation)")
        doc.figure(plot_cross_model(m), f"cross-model-{_slug(mode)}", f"Density correlation across models "
                   f"(attention {mode})")

    for f, k in groups["attention_pairs"]:
        doc.h("Attention edges never ablated: the reference pipeline's mode beside the faithful run")
        cmp = attention_ablation_comparison(f, k)
        doc.table(cmp, f"Same passages; Spearman rho between the two runs' densities {cmp.attrs['rho']:.3f} "
                  f"(n = {cmp.attrs['n']})")
        doc.figure(plot_attention_ablation(f, k), f"attention-{_slug(f.name)}", "TV against s, with and without "
                   "attention ablation")

    skipped = pd.concat([r.skipped.assign(run=lab) for r, lab in zip(rs, labels)], ignore_index=True)
    doc.h("Skipped passages")
    if len(skipped):
        doc.table(skipped[["run", "id", "line", "reason"]].head(100),
                  f"{len(skipped)} passage(s) or line(s) skipped (first 100)")
    else:
        doc.p("None.")
    return doc


def write_report(runs: Sequence[RunLike], out: str | os.PathLike | None = None, *,
                 formats: Sequence[str] = ("html", "md"), title: str = "tl_strace corpus report") -> list[Path]:
    """Write a report of ``runs``: ``<out>.html`` (self-contained: plots inlined as PNG, text
    escaped, no network) and/or ``<out>.md`` (plots in ``<out>_assets/``). ``out`` defaults to
    ``<first run>/report``. Returns the paths written.

    Every file is written atomically (:func:`tl_strace.fsutil.atomic_write`): a full disk leaves no
    truncated file under the final name and raises an :class:`~tl_strace.fsutil.OutputPathError`
    naming the file. A target that is a directory or a special file (device node, FIFO) is refused
    before the report is built."""
    if isinstance(formats, str):
        raise InputError(f"formats must be a list of formats, e.g. [{formats!r}]; got the string {formats!r}.")
    formats = list(formats)
    bad = [f for f in formats if f not in ("html", "md")]
    if bad or not formats:
        raise InputError(f"formats must be among ['html', 'md']; got {list(formats)}.")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise InputError(f"out must be a path (str or os.PathLike) or None; got {out!r} ({type(out).__name__}).")
    if out is not None and os.fspath(out) == "":
        raise InputError("out is empty; give the report's path without suffix (e.g. 'runs/report'), or None for "
                         "<first run>/report.")
    rs = as_runs(runs)
    base = Path(out) if out is not None else rs[0].path / "report"
    if base.suffix in (".html", ".md"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    targets = {fmt: base.with_suffix(f".{fmt}") for fmt in ("html", "md") if fmt in formats}
    for p in targets.values():  # before the report is built: a directory, a device node, a FIFO
        check_output_path(p, what="report file")
    doc = build_report(rs, title=title)
    written = []
    if "html" in targets:
        written.append(atomic_write(targets["html"], doc.html(), what="report file"))
    if "md" in targets:
        text = doc.markdown(base.parent / f"{base.name}_assets")
        written.append(atomic_write(targets["md"], text, what="report file"))
    return written
