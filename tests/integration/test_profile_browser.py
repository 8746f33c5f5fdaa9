"""A density profile's page renders in headless Chromium with the network disabled, and hovering and
clicking its tokens work (issue 18, acceptance 3).

``--dump-dom`` reads what the page's scripts left: the error collector empty, circuitsvis's
``ColoredTokens`` drawn (one coloured span per token, the static table hidden by the figure's
script once it drew), every hover's tooltip, every click's opened circuit view (drawn: ready), and
hostile token text still text.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

import tl_strace as ts
from tests.browser import OFFLINE_FLAGS, find_chromium

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install -y chromium); the browser test needs it",
)

XSS = "<img src=y onerror=\"document.body.setAttribute('data-pwned','1')\">"

EXERCISE = """<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var root = document.querySelector(".tls-profile");
    var toks = root.querySelectorAll(".tls-prof-tok"), tips = [], opened = [];
    for (var i = 0; i < toks.length; i++) {
      toks[i].dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
      var tip = root.querySelector(".tls-prof-tip");
      tips.push((tip.hidden ? "hidden:" : "") + tip.textContent + "|" + tip.querySelectorAll("polyline").length);
      toks[i].dispatchEvent(new MouseEvent("click", {bubbles: true}));
      var v = root.querySelector(".tls-prof-detail .tls-view");
      opened.push(root.getAttribute("data-tls-open") + ":" + (v ? v.getAttribute("data-tls-ready") : "none") + ":"
                  + root.querySelectorAll(".tls-prof-detail svg.tls-curves").length);
    }
    document.body.setAttribute("data-tips", JSON.stringify(tips));
    document.body.setAttribute("data-opened", JSON.stringify(opened));
  }, 50);
});
</script>"""


def test_profile_page_renders_offline(gpt2_model, tmp_path: Path) -> None:
    prof = ts.density_profile(gpt2_model, torch.tensor([0, 5, 17, 3, 42, 8]), sizes=[0.01, 0.1], conditions=("only",))
    prof = dataclasses.replace(prof, str_tokens=[prof.str_tokens[0], XSS, *prof.str_tokens[2:]])
    page = Path(prof.save_html(tmp_path / "profile.html"))
    page.write_text(page.read_text(encoding="utf-8").replace("</body>", EXERCISE + "</body>"), encoding="utf-8")
    cmd = [str(CHROMIUM), *OFFLINE_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
           "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    assert "data-tls-loaded" in dom, "the page did not finish loading"
    errors = re.search(r'<pre id="tls-errors"[^>]*>(.*?)</pre>', dom, flags=re.S).group(1)
    assert errors.strip() == "", f"errors collected by the page: {html.unescape(errors)}"
    assert re.search(r'<table class="tls-cv-static"[^>]*hidden', dom), "the figure's script did not run"
    figure = re.search(r'<div class="colored-tokens">(.*?)</div>', dom, flags=re.S).group(1)
    assert figure.count('<span style="display: inline-block') == len(prof.str_tokens)  # one coloured cell per token
    assert "&lt;img&nbsp;src=y" in figure  # the hostile token is shown as its text
    # the only images are the opened circuit view's own static picture (a data-URI PNG)
    assert not re.search(r'<img(?! class="tls-static-img)', dom, flags=re.I)
    assert 'data-pwned="1"' not in dom  # the handler never ran
    tips = json.loads(html.unescape(re.search(r'data-tips="([^"]*)"', dom).group(1)))
    assert len(tips) == len(prof.positions)
    for t, tip in zip(prof.positions, tips):  # shown, naming the position, its token as text, with a curve
        assert tip.startswith(f"position {t}: after {json.dumps(prof.str_tokens[t])}") and tip.endswith("|1"), tip
    opened = json.loads(html.unescape(re.search(r'data-opened="([^"]*)"', dom).group(1)))
    assert opened == [f"{t}:1:1" for t in prof.positions]  # each click opened that position's circuit, drawn
