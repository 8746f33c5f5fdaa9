"""Views never break on what they copy or on empty data (issue 12, "Views").

* The Markdown corpus report escapes every text it copies (model names, directories, passage ids,
  skip reasons, titles): no raw HTML, no links, no emphasis, no broken table.
* The attention-pattern figure at a stratum without attention edges is a sentence, not a
  circuitsvis ``AttentionHeads`` call with an empty list (which throws ``reading 'map'`` in the browser).
"""

from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import tl_strace as ts
from tl_strace.analysis import build_report
from tl_strace.analysis.report import markdown_text
from tl_strace.analysis.report import _Doc
from tl_strace.corpus import load_run, run_corpus
from tl_strace.io.datasets import Passage, write_passages
from tl_strace.views.detail import attention_patterns, detail_views, figures_html
from tl_strace.views._data import component_stats

EVIL = "<script>alert(1)</script> | *x* [a](b) `c` _u_ ~~s~~ # h & <img src=x onerror=alert(2)>"
TOKS = torch.tensor([0, 5, 17, 3, 42, 8])


def _assert_inert(md: str) -> None:
    """Nothing of EVIL acts as Markdown or HTML."""
    assert "<script" not in md and "<img" not in md and "</script>" not in md
    assert "[a](b)" not in md and "*x*" not in md and "`c`" not in md and "~~s~~" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md


@pytest.mark.parametrize("text, expected", [
    ("<b>", "&lt;b&gt;"),
    ("a | b", "a \\| b"),
    ("*x* _y_", "\\*x\\* \\_y\\_"),
    ("[a](b)", "\\[a\\](b)"),
    ("`code`", "\\`code\\`"),
    ("a\\b", "a\\\\b"),
    ("- item", "\\- item"),
    ("1. one", "1\\. one"),
    ("# h", "\\# h"),
    ("two\nlines", "two lines"),
    ("&amp;", "&amp;amp;"),
    ("plain text 0.5", "plain text 0.5"),
])
def test_markdown_text(text, expected):
    assert markdown_text(text) == expected


def test_markdown_document_escapes_title_headings_paragraphs_tables_and_captions(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    doc = _Doc(f"report of {EVIL}")
    doc.h(f"Runs — {EVIL}")
    doc.p(f"- {EVIL}")
    doc.table(pd.DataFrame([{"run": EVIL, "n": 3, "x": -0.5}]), caption=EVIL)
    fig, _ = plt.subplots()
    doc.figure(fig, "fig", EVIL)
    plt.close(fig)
    md = doc.markdown(tmp_path / "my assets (1)")
    _assert_inert(md)
    lines = md.splitlines()
    assert lines[0].startswith("# report of &lt;script&gt;")
    table = [ln for ln in lines if ln.startswith("| ")]
    # a '|' copied into a cell is escaped: every row has the header's number of cell separators
    seps = [len(re.findall(r"(?<!\\)\|", ln)) for ln in table]
    assert len(table) == 2 and len(set(seps)) == 1, table
    assert "| 3 | -0.5 |" in table[1]
    assert any(ln.startswith("\\- ") for ln in lines)  # the paragraph is not a list item
    assert "(my%20assets%20%281%29/fig.png)" in md and (tmp_path / "my assets (1)" / "fig.png").is_file()


def test_corpus_report_markdown_escapes_the_model_name_and_copied_text(gpt2_model, tmp_path: Path):
    """End to end: a run whose model name, passage ids and skip reasons carry EVIL."""
    data = tmp_path / "data.jsonl"
    long = " ".join(f"w{2 + i % 90}" for i in range(80))  # longer than the tiny model's context: skipped
    write_passages([Passage(id="p0", text="w3 w4 w5 w6", next_word="w7"),
                    Passage(id=f"too long {EVIL}", text=long, next_word="w7")], data)
    out = tmp_path / "run"
    run_corpus(gpt2_model, data, out, sizes=[0.1, 0.5], record_sizes=[0.1], progress=False)
    run = load_run(out)
    model = {**run.config.get("model", {}), "model_name": EVIL}
    run = dataclasses.replace(run, config={**run.config, "model": model})
    assert EVIL in run.name
    md = build_report([run]).markdown(tmp_path / "assets")
    _assert_inert(md)
    assert "too long &lt;script&gt;" in md  # the skipped passage's id, escaped


class _Balanced(HTMLParser):
    """Checks that every opened non-void element is closed, in order."""

    VOID = {"br", "img", "meta", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ok = True

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.ok = False


def _zero_attention_stratum(res) -> float:
    st = component_stats(res)
    L, H = st.n_layers, st.n_heads
    for k in range(int(res.sizes.numel())):
        if not bool((st.weight[k, : L * H] > 0).any()):
            return float(res.sizes[k])
    raise AssertionError("every stratum has attention edges; pick smaller sizes")


def test_attention_figure_without_attention_edges_is_a_sentence(gpt2_model):
    res = ts.strace(gpt2_model, TOKS, sizes=[1e-3, 1e-2, 0.5], conditions=["only"])
    s = _zero_attention_stratum(res)
    L, H, T = res.layout.n_layers, res.layout.n_heads, res.layout.n_pos
    fig = attention_patterns(res, torch.rand(L, H, T, T), s)
    html = fig._repr_html_()
    assert f"No attention edges at s = {s:g}; choose a larger s" in html
    assert fig.empty
    assert "CircuitsVis.render" not in html and "AttentionHeads" not in html and '"attention":[]' not in html
    parser = _Balanced()
    parser.feed(html)
    parser.close()
    assert parser.ok and parser.stack == []
    # on the detail page the other figures still render (and the bundle is there for them)
    page = res.detail_views(s, model=gpt2_model).html
    assert "No attention edges at s =" in page and "CircuitsVis.AttentionHeads" not in page
    assert "CircuitsVis.ColoredTokensMulti" in page and "CircuitsVis.TopkTokens" in page
    # a stratum with attention edges is still drawn
    drawn = attention_patterns(res, torch.rand(L, H, T, T), 1.0)
    assert not drawn.empty and "CircuitsVis.AttentionHeads" in figures_html([drawn], bundle=False)
