"""Views as a notebook shows them: unique ids per display, figures that display themselves,
a static rendering that needs no JavaScript, and short plain-text reprs (issue 15)."""

from __future__ import annotations

import re

import pytest

from tests.unit.test_views import synthetic_result
from tl_strace.views import circuit_view, detail_views
from tl_strace.views._html import stable_ids
from tl_strace.views.detail import colored_tokens, figures_html, topk_tokens


@pytest.fixture(scope="module")
def synth():
    return synthetic_result()


def _div_ids(html: str) -> list[str]:
    return re.findall(r'<div[^>]* id="([^"]+)"', html)


def _render_targets(html: str) -> list[str]:
    return re.findall(r'CircuitsVis\.render\("([^"]+)"', html)


def test_same_circuitsvis_figure_twice_gets_two_ids(synth):
    fig = colored_tokens(synth)
    a, b = fig._repr_html_(), fig._repr_html_()
    (ida,), (idb,) = _render_targets(a), _render_targets(b)
    assert ida != idb
    assert ida in _div_ids(a) and idb in _div_ids(b)  # each script renders into its own div
    assert idb not in a and ida not in b


def test_detail_views_twice_share_no_id(synth):
    a, b = detail_views(synth).html, detail_views(synth).html
    ids_a, ids_b = set(_div_ids(a)), set(_div_ids(b))
    assert len(ids_a) == len(_render_targets(a)) == 2 and not ids_a & ids_b
    assert set(_render_targets(a)) == ids_a and set(_render_targets(b)) == ids_b
    # the same figure twice on one page: distinct ids too
    page = figures_html([topk_tokens(synth), topk_tokens(synth)])
    assert len(set(_render_targets(page))) == 2


def test_circuit_view_twice_gets_two_ids(synth):
    id_of = lambda h: re.search(r'class="tls-view[^"]*" id="([^"]+)"', h).group(1)  # noqa: E731
    assert id_of(circuit_view(synth).html) != id_of(circuit_view(synth).html)
    assert id_of(synth._repr_html_()) != id_of(synth._repr_html_())


def test_stable_ids_number_in_page_order(synth):
    with stable_ids():
        a = figures_html([topk_tokens(synth), topk_tokens(synth)])
    with stable_ids():
        b = figures_html([topk_tokens(synth), topk_tokens(synth)])
    assert a == b
    ids = _render_targets(a)
    assert [i.rsplit("-", 1)[1] for i in ids] == ["1", "2"]


# ------------------------------------------------------------------------------------------ figures display themselves
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_has_png_repr_with_any_backend(synth):
    fig = synth.plot()
    png = fig._repr_png_()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert synth.plot_shares()._repr_png_()[:8] == PNG_MAGIC
    assert fig._repr_png_() == png  # deterministic bytes
    ipython = pytest.importorskip("IPython.core.formatters")
    data, _ = ipython.DisplayFormatter().format(fig)  # what Jupyter stores, no inline backend registered
    assert data["image/png"][:8] == PNG_MAGIC
    assert "image/svg+xml" not in data  # one image per output, not two copies


def test_plot_shows_once_under_the_inline_backend(synth):
    """With matplotlib's inline backend's PNG printer registered for ``Figure`` (what
    ``%matplotlib inline`` does), the output still holds one PNG, and pyplot holds no figure of
    ours that the backend would show again at the end of the cell."""
    formatters = pytest.importorskip("IPython.core.formatters")
    from matplotlib import pyplot as plt
    from matplotlib.figure import Figure

    fmt = formatters.DisplayFormatter()
    calls = []
    fmt.formatters["image/png"].for_type(Figure, lambda f: calls.append(f) or f._repr_png_())
    before = plt.get_fignums()
    fig = synth.plot()
    data, _ = fmt.format(fig)
    assert calls == [fig] and data["image/png"][:8] == PNG_MAGIC
    assert plt.get_fignums() == before


# ------------------------------------------------------------------------------------------ static rendering
import base64  # noqa: E402
from html.parser import HTMLParser  # noqa: E402


class NotebookSanitizer(HTMLParser):
    """What an untrusted notebook output shows, as JupyterLab's sanitizer (sanitize-html with the
    options of ``@jupyterlab/apputils`` ``sanitizer.ts``) treats it: ``<script>`` and ``<style>`` are
    dropped with their content; ``<svg>`` and its elements are not allowed tags (dropped, their
    text kept); ``<img>`` stays with its ``src`` (embedded data allowed), ``alt``, ``class``,
    ``hidden``, ``style``. ``out`` is the text a reader sees (outside ``hidden`` elements)."""

    DROP_CONTENT = {"script", "style"}
    VOID = {"img", "input", "br", "hr", "meta", "link", "source", "wbr", "col", "area", "track"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self._skip = 0
        self._stack: list[bool] = []  # per open element: hidden (itself or an ancestor)

    def _hidden(self) -> bool:
        return bool(self._stack) and self._stack[-1]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.DROP_CONTENT:
            self._skip += 1
            return
        hidden = self._hidden() or "hidden" in attrs
        if tag == "img" and not self._skip and not hidden:
            self.imgs.append({k: v or "" for k, v in attrs.items()})
            self.out.append("[img]")
        if tag not in self.VOID:
            self._stack.append(hidden)

    def handle_startendtag(self, tag, attrs):  # <line .../>: no content
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID and tag not in self.DROP_CONTENT:
            self._stack.pop()

    def handle_endtag(self, tag):
        if tag in self.DROP_CONTENT:
            self._skip -= 1
        elif tag not in self.VOID and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if not self._skip and not self._hidden():
            self.out.append(data)


def _sanitized(html: str) -> NotebookSanitizer:
    san = NotebookSanitizer()
    san.feed(html)
    san.close()
    return san


def _png_of(img: dict[str, str]) -> bytes:
    src = img["src"]
    assert src.startswith("data:image/png;base64,")
    return base64.b64decode(src.split(",", 1)[1], validate=True)


def test_circuit_view_carries_a_static_png_first(synth):
    html = synth._repr_html_()
    san = _sanitized(html)
    assert len(san.imgs) == 1 and san.imgs[0]["class"] == "tls-static-img"
    png = _png_of(san.imgs[0])
    assert png[:8] == PNG_MAGIC and 20_000 < len(png) < 150_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 700 <= width <= 1000 and 200 <= height <= 320  # a sensible default size: readable, not huge
    # the picture comes before the live (scripted) part, which is hidden until the script shows it
    assert html.index("tls-static-img") < html.index('<div class="tls-live" hidden>') < html.index("tls-curves")
    text = "".join(san.out)
    assert f"density {synth.density:.3f}" in text and "full model" in text  # the key numbers as text
    # the scripted part (inline SVG, whose text the sanitizer would keep as a run-on line) stays hidden
    assert "total variation to the full model" not in text and "needs JavaScript" not in text
    assert "total variation to the full model" in html
    assert "alt" in san.imgs[0] and "TV" in san.imgs[0]["alt"]


def test_static_png_shows_the_default_stratum(synth):
    from tl_strace.views._data import default_stratum
    from tl_strace.views.static import static_png

    k = default_stratum(synth)
    assert static_png(synth) == static_png(synth, k)
    assert static_png(synth, 0) != static_png(synth, k)


def test_component_result_view_is_a_png_too(synth):
    import dataclasses

    import torch

    comp = dataclasses.replace(synth, config={**synth.config, "granularity": "component"},
                               labels=torch.zeros(5, dtype=torch.long), rank=torch.arange(5), weights=torch.ones(5))
    san = _sanitized(circuit_view(comp).html)
    assert len(san.imgs) == 1 and _png_of(san.imgs[0])[:8] == PNG_MAGIC
    assert f"density {comp.density:.3f}" in "".join(san.out)


def test_report_page_keeps_the_static_png(synth):
    from tl_strace.views import report_html

    san = _sanitized(report_html(synth, details=False, plots=False))
    assert any(_png_of(i)[:8] == PNG_MAGIC for i in san.imgs)


def test_script_swaps_static_for_live():
    from tl_strace.views._assets import circuit_js

    js = circuit_js()
    assert ".tls-live" in js and ".tls-static-img" in js and "innerHTML" not in js


def test_slider_keys_are_handled_by_the_view():
    """Inside JupyterLab / Notebook 7 the notebook's arrow-key shortcuts would take the slider's keys
    (the live check is tests/integration/test_jupyter.py): the script handles them itself and stops them."""
    from tl_strace.views._assets import circuit_js

    js = circuit_js()
    handler = js[js.index('slider.addEventListener("keydown"'):]
    handler = handler[:handler.index("});")]
    for key in ("ArrowRight", "ArrowLeft", "ArrowUp", "ArrowDown"):
        assert key in js
    assert '"Home"' in handler and '"End"' in handler
    assert "stopPropagation()" in handler and "preventDefault()" in handler


def test_circuitsvis_figures_carry_a_static_summary(synth):
    """Where scripts do not run, each circuitsvis figure still shows its key numbers as a table
    (token text escaped); the figure's script hides the table once circuitsvis has drawn."""
    from tl_strace.views.detail import attention_patterns

    L, H, T = synth.layout.n_layers, synth.layout.n_heads, synth.layout.n_pos
    import torch

    patterns = torch.full((L, H, T, T), 1.0 / T)
    figs = [attention_patterns(synth, patterns, float(synth.sizes[-1])), colored_tokens(synth),
            colored_tokens(synth, 0.1), topk_tokens(synth)]
    for fig in figs:
        assert not fig.empty and len(fig.table) > 1
        html = fig._repr_html_()
        tables = re.findall(r'<table class="tls-cv-static" id="([^"]+)"', html)
        (fid,) = _render_targets(html)
        assert tables == [f"{fid}-static"]
        assert f'document.getElementById("{fid}-static").hidden = true;' in html
        text = "".join(_sanitized(html).out)
        for cell in fig.table[1]:
            assert cell in text
        assert "<img src=x" not in html.split("<script>")[1 if html.startswith("<script>") else 0]
    top = topk_tokens(synth).table
    assert top[1] == ("full model", repr(synth.full_top_strs[0]), f"{float(synth.full_top_probs[0]):.3f}")
    # the injected token of the synthetic result stays text in the summary
    shares = "".join(_sanitized(colored_tokens(synth)._repr_html_()).out)
    assert "</script><img src=x onerror=alert(1)>" in shares
    assert "&lt;/script&gt;&lt;img" in colored_tokens(synth)._repr_html_()


def test_text_reprs_are_short_and_carry_the_key_numbers(synth):
    view = circuit_view(synth)
    text = repr(view)
    assert len(text) < 600 and f"density {synth.density:.3f}" in text and repr(synth.full_top_strs[0]) in text
    assert "50%" in text or "1%" in text  # recovery sizes
    fig = colored_tokens(synth)
    assert len(repr(fig)) < 300 and "ColoredTokens" in repr(fig)
    assert len(repr(detail_views(synth))) < 400


# ------------------------------------------------------------------------------------------ quiet by default
def test_load_model_shows_no_progress_bar_and_restores_it(monkeypatch, tmp_path):
    import warnings

    from transformers.utils import logging as hf_logging

    import tl_strace.io.models as models

    seen = []

    def fake_load(path, **kwargs):  # what transformers does during a load: a tqdm.auto bar, a warning
        seen.append(hf_logging.is_progress_bar_enabled())
        warnings.warn("IProgress not found. Please update jupyter and ipywidgets.", UserWarning)
        return "model"

    monkeypatch.setattr(models, "_load_local_dir", fake_load)
    hf_logging.enable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert models.load_model(str(tmp_path)) == "model"
    assert seen == [False] and not [w for w in caught if "IProgress" in str(w.message)]
    assert hf_logging.is_progress_bar_enabled()  # restored
    hf_logging.disable_progress_bar()
    try:
        models.load_model(str(tmp_path))
        assert not hf_logging.is_progress_bar_enabled()  # a user's choice is kept too
    finally:
        hf_logging.enable_progress_bar()


def test_cli_help_imports_no_torch():
    """``tl-strace --help`` answers at once: the console script imports neither torch nor
    TransformerLens (measured: 4.6 s before, 0.2 s after, on a 2-core machine)."""
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['/usr/bin/tl-strace', '--help']\n"
            "from tl_strace.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformer_lens', 'transformers', 'pandas', 'matplotlib') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "trace" in out.stdout and "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_cli_trace_says_where_it_wrote(tmp_path, capsys):
    from tests.unit.test_corpus import save_tiny_model
    from tl_strace.cli import main

    model_dir = save_tiny_model(tmp_path / "m")
    html, saved = tmp_path / "r.html", tmp_path / "r.safetensors"
    assert main(["trace", "--model", model_dir, "w2 w3 w4", "--conditions", "only", "--sizes", "0.1", "1.0",
                 "--html", str(html), "--save", str(saved)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"HTML report written to {html}" and out[-2] == f"result saved to {saved}"
    assert html.exists() and saved.exists()


# ------------------------------------------------------------------------------------------ text
def test_titles_drop_special_tokens_and_escape(synth):
    import dataclasses

    from tl_strace.views import report_html

    toks = ["<|im_start|>"] + list(synth.str_tokens[1:])
    res = dataclasses.replace(synth, str_tokens=toks)
    page = report_html(res, details=False, plots=False)
    title = re.search(r"<title>(.*?)</title>", page, flags=re.S).group(1)
    assert "im_start" not in title and "<|" not in title
    h1 = re.search(r"<h1>(.*?)</h1>", page, flags=re.S).group(1)
    assert "<|" not in h1 and "<script" not in h1


def test_one_edge_is_singular(synth):
    import dataclasses

    import torch

    from tl_strace.views._html import n_of
    from tl_strace.views.curves import curves_svg

    assert (n_of(1), n_of(2), n_of(0)) == ("1 edge", "2 edges", "0 edges")
    counts = synth.counts.clone()
    counts[0] = 1
    res = dataclasses.replace(synth, counts=counts)
    labels = topk_tokens(res).props["firstDimensionLabels"]
    assert labels[0].endswith("(1 edge)") and "(1 edges)" not in curves_svg(res)
    assert "(1 edges)" not in circuit_view(res).html
    from tl_strace.views._assets import circuit_js
    assert 'function edges(n)' in circuit_js() and '" edges"];' not in circuit_js()
    del torch


def test_top_tokens_do_not_open_on_an_empty_stratum(synth):
    import dataclasses

    counts = synth.counts.clone()
    counts[0] = 0
    res = dataclasses.replace(synth, counts=counts)
    props = topk_tokens(res).props
    assert not props["firstDimensionLabels"][0].endswith("(0 edges)")
    assert len(props["firstDimensionLabels"]) == len(res.sizes) - 1 == len(props["topkVals"][0])
    assert "left out" in topk_tokens(res).note
