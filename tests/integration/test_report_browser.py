"""The saved report renders in a real browser with the network disabled (issue 4's acceptance).

Headless Chromium opens the page twice: ``--dump-dom`` reads what the page's scripts left in the DOM
(the error collector, the circuit's ready flag, where each panel was drawn, the circuitsvis figures
that rendered), then ``--screenshot`` takes a picture whose pixels are checked inside those panels.
The network is off three ways: the page's Content-Security-Policy forbids every fetch, host
resolution maps every name to NOTFOUND, and a dead proxy catches anything else.

Set ``TL_STRACE_SHOTS=/some/dir`` to keep the screenshots and a JSON record of page sizes.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.browser import OFFLINE_FLAGS, find_chromium
from tl_strace.results import StraceResult


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install -y chromium); the browser acceptance test needs it",
)

XSS = "</script><img src=x onerror=alert(1)>"
XSS2 = "<img src=y onerror=\"document.body.setAttribute('data-pwned','1')\">"


def _foreign_imgs(html_text: str) -> list[str]:
    """Every ``<img`` that is not the circuit view's own static picture (``tls-static-img``, a data-URI PNG)."""
    return re.findall(r'<img(?! class="tls-static-img[^"]*" alt="[^"<>]*" src="data:image/png;base64,)', html_text,
                      flags=re.I)
WIDTH = 1300
REGIONS = ("curves", "grid", "tokens", "head")


def _chromium(page: Path, tmp: Path, *args: str, height: int = 1000) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [
        str(CHROMIUM), *OFFLINE_FLAGS, f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>", "--enable-logging=stderr", "--v=0", "--force-device-scale-factor=1",
        f"--window-size={WIDTH},{height}", "--virtual-time-budget=20000", *args, page.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _console_errors(stderr: str) -> list[str]:
    """Console lines that report a JavaScript error, a CSP refusal or a failed load. tfjs inside the
    circuitsvis bundle logs WebGL notices (software fallback, GPU stalls): those are not errors."""
    bad = []
    for line in stderr.splitlines():
        if "CONSOLE" not in line or "WebGL" in line or "GL Driver" in line:
            continue
        if re.search(r"Uncaught|Error|Refused|ERR_|Failed to load", line):
            bad.append(line)
    return bad


def _render(page: Path, tmp: Path) -> dict[str, Any]:
    """Open ``page`` twice (DOM, then screenshot) and return what was found."""
    dom_run = _chromium(page, tmp, "--dump-dom")
    dom = dom_run.stdout
    assert "data-tls-loaded" in dom, f"the page did not finish loading:\n{dom_run.stderr[-3000:]}"
    layout = json.loads(html.unescape(re.search(r'data-tls-layout="([^"]*)"', dom).group(1)))
    bottom = max(y + h for x, y, w, h in (layout[k] for k in REGIONS))
    shot = tmp / f"{page.stem}.png"
    shot_run = _chromium(page, tmp, f"--screenshot={shot}", height=bottom + 40)
    assert shot.exists(), shot_run.stderr[-3000:]
    return {"dom": dom, "layout": layout, "shot": shot,
            "console": _console_errors(dom_run.stderr) + _console_errors(shot_run.stderr)}


def _check_page(found: dict[str, Any], n_figures: int) -> None:
    from PIL import Image

    dom, layout = found["dom"], found["layout"]
    errors = re.search(r'<pre id="tls-errors"[^>]*>(.*?)</pre>', dom, flags=re.S).group(1)
    assert errors.strip() == "", f"errors collected by the page: {html.unescape(errors)}"
    assert found["console"] == [], "JavaScript errors in the console:\n" + "\n".join(found["console"])
    assert 'data-tls-ready="1"' in dom and 'data-tls-error="' not in dom
    assert layout["circuitsvis"] == [n_figures, n_figures], layout
    # Injected token text stayed text: no element was created from it, no handler ran.
    assert _foreign_imgs(dom) == []
    assert 'data-pwned="1"' not in dom
    img = Image.open(found["shot"]).convert("RGB")
    for name in REGIONS:
        x, y, w, h = layout[name]
        assert w > 50 and h > 50, (name, layout[name])
        px = list(img.crop((x, y, x + w, y + h)).getdata())
        ink = sum(1 for r, g, b in px if min(r, g, b) < 200) / len(px)
        assert ink > 0.01, f"the {name} panel looks blank ({ink:.2%} of its pixels drawn)"
        if name == "grid":
            blue = sum(1 for r, g, b in px if b > 180 and r < 150)
            orange = sum(1 for r, g, b in px if r > 200 and 60 < g < 190 and b < 120)
            assert blue > 50 and orange > 20, f"grid colours missing (blue {blue}, orange {orange})"


EXERCISE = """<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var root = document.querySelector(".tls-view[data-tls-circuit]");
    var slider = root.querySelector(".tls-slider"), n = +slider.max + 1, tips = [];
    var cells = root.querySelectorAll("svg.tls-grid rect[data-c]");
    function hover(el) {
      el.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: 20, clientY: 20}));
      tips.push(root.querySelector(".tls-tip").textContent);
    }
    for (var k = 0; k < n; k++) {
      slider.value = String(k);
      slider.dispatchEvent(new Event("input"));
      cells[(k * 7) % cells.length].dispatchEvent(new MouseEvent("click", {bubbles: true}));
      root.querySelectorAll("[data-tip]").forEach(hover);
    }
    var sel = root.querySelector(".tls-metric");
    ["f", "n", "w"].forEach(function (v) { sel.value = v; sel.dispatchEvent(new Event("change")); });
    document.body.setAttribute("data-tls-exercised", String(n));
    document.body.setAttribute("data-tls-tips", String(tips.filter(function (t) { return t.length > 0; }).length));
    document.body.setAttribute("data-tls-label", root.querySelector(".tls-sl").textContent);
  }, 50);
});
</script>"""


def test_circuit_view_survives_every_interaction(gpt2_model, tmp_path):
    """Move the slider over every stratum, click cells, hover every hoverable element, switch the
    shading: no error, and every hover shows a tooltip with the token text (not markup)."""
    import tl_strace as ts

    res = ts.strace(gpt2_model, torch.tensor([0, 5, 17, 3, 42, 8]), sizes=[0.05, 0.2])
    toks = list(res.str_tokens)
    toks[2] = XSS2
    res = dataclasses.replace(res, str_tokens=toks)
    page = Path(res.save_html(tmp_path / "exercise.html", details=False, plots=False))
    page.write_text(page.read_text(encoding="utf-8").replace("</body>", EXERCISE + "</body>"), encoding="utf-8")
    run = _chromium(page, tmp_path, "--dump-dom")
    dom = run.stdout
    errors = re.search(r'<pre id="tls-errors"[^>]*>(.*?)</pre>', dom, flags=re.S).group(1)
    assert errors.strip() == "" and _console_errors(run.stderr) == [], html.unescape(errors) + run.stderr[-2000:]
    assert re.search(r'data-tls-exercised="(\d+)"', dom).group(1) == str(len(res.sizes))
    assert int(re.search(r'data-tls-tips="(\d+)"', dom).group(1)) > 20
    label = html.unescape(re.search(r'data-tls-label="([^"]*)"', dom).group(1))
    assert label.startswith("s = 1 ·") and f"{res.n_edges:,} edges" in label
    assert _foreign_imgs(dom) == [] and 'data-pwned="1"' not in dom


def _keep(found: dict[str, Any], record: dict[str, Any]) -> None:
    out = os.environ.get("TL_STRACE_SHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(found["shot"], Path(out) / found["shot"].name)
        with open(Path(out) / f"{found['shot'].stem}.json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)


def test_report_renders_offline_without_errors(gpt2_model, tmp_path):
    import tl_strace as ts

    res = ts.strace(gpt2_model, torch.tensor([0, 5, 17, 3, 42, 8, 9, 23, 61, 4]), sizes=[0.02, 0.1, 0.3])
    toks = list(res.str_tokens)
    toks[3], toks[6] = XSS, XSS2
    top = [[list(r) for r in c] for c in res.top_strs]
    top[0][0][0] = XSS2
    res = dataclasses.replace(res, str_tokens=toks, top_strs=top,
                              full_top_strs=[XSS] + list(res.full_top_strs[1:]))
    page = Path(res.save_html(tmp_path / "report.html", model=gpt2_model))
    text = page.read_text(encoding="utf-8")
    assert _foreign_imgs(text.split("var CircuitsVis")[0]) == [] and XSS not in text
    found = _render(page, tmp_path)
    _check_page(found, n_figures=3)
    _keep(found, {"page_bytes": len(text.encode())})


@pytest.mark.real
def test_smollm2_report_size_and_rendering(smollm2, tmp_path):
    """A 49-token passage: 324,432 token-level edges. The circuit view holds what it needs, not
    every edge; the sizes are recorded (TL_STRACE_SHOTS) and bounded here."""
    import tl_strace as ts

    text = ("However little known the feelings or views of such a man may be on his first entering a "
            "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
            "considered the rightful property of some one or other of their")
    res: StraceResult = ts.strace(smollm2, text)
    assert res.n_edges > 300_000
    view = len(res._repr_html_().encode())
    page = Path(res.save_html(tmp_path / "smollm2_report.html", model=smollm2))
    no_details = Path(res.save_html(tmp_path / "smollm2_nodetails.html", details=False))
    sizes = {"n_edges": res.n_edges, "n_tokens": len(res.str_tokens), "circuit_view_bytes": view,
             "report_bytes": page.stat().st_size, "report_without_details_bytes": no_details.stat().st_size}
    assert view < 400_000, sizes  # components + a capped edge list, never 324k edges
    assert sizes["report_bytes"] < sizes["report_without_details_bytes"] + 1_600_000, sizes  # bundle once
    found = _render(page, tmp_path)
    _check_page(found, n_figures=3)
    _keep(found, sizes)
    print(sizes)
