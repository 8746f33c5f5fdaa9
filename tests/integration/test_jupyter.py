"""The views as researchers use them: in a live JupyterLab, driven by headless Chromium (issue 15).

A JupyterLab server (127.0.0.1, a random free port, a token, a fresh root and fresh Jupyter
config/data/runtime/settings/workspace directories, no news, no update check, no extension
manager) and the system Chromium (``/usr/bin/chromium``, Debian's package; no browser download)
talk over the Chrome DevTools Protocol through ``websocket-client``, which ``jupyter_server``
already installs: a 100-line client instead of Selenium (needs a matching chromedriver, not
installable offline here) or playwright (downloads its own browser).

The flow, one notebook in one page:

1. write a notebook (``load_model`` / ``strace`` / ``res`` / ``res.plot()`` / a circuitsvis
   attention figure / ``res.detail_views`` twice: the same figure kinds shown three times), open it,
   run every cell through JupyterLab's own command, wait for the outputs;
2. check the rendered DOM and screenshots: the curves and the circuit grid are drawn, the slider
   moves by mouse drag and by arrow keys (the notebook's shortcut handling must not eat them), every
   circuitsvis figure drew something (the second of a kind is not blank), no JavaScript error;
3. save it, copy it as an untrusted notebook (a changed byte: no signature matches), open the copy:
   scripts do not run, the static pictures (curves, circuit grid) and the numbers as text show;
4. open a committed tutorial without running it: its static rendering shows.

What survives JupyterLab 4.6's sanitizer in an untrusted output (found with this test, step 3): an
``<img>`` with a ``data:image/png`` URI inside ``text/html`` (kept with its ``src``, so no separate
``image/png`` part of the display bundle is needed), the ``hidden`` attribute, plain tables and text;
``<script>``, ``<style>`` and ``<svg>`` go. Before the fix of issue 15, step 2's arrow keys failed:
JupyterLab's shortcuts cancelled them while the slider had the focus (the mouse worked).

Cost on CI (2 CPU cores, measured 2026-12-02): ``pip install jupyterlab==4.6.6`` adds 101 MB to the
virtual environment (83 MB of packages, 19 MB of ``share/jupyter``) in about 8 s from a local index;
this module runs in about 35 s (server start ~2 s, SmolLM2-135M load ~4 s once its cache exists).
With ``TL_STRACE_SHOTS`` set it also writes ``notebook-sizes.json``: the bytes each output adds to
the saved notebook.

Set ``TL_STRACE_SHOTS=/some/dir`` to keep the screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import OFFLINE_FLAGS, find_chromium

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = REPO / "tutorials" / "01_quickstart.ipynb"


CHROMIUM = find_chromium()
_MISSING = [what for what, ok in (
    ("jupyterlab (pip install -e '.[jupyter]')", importlib.util.find_spec("jupyterlab") is not None),
    ("websocket-client (a jupyter_server dependency)", importlib.util.find_spec("websocket") is not None),
    ("Chromium (Debian: apt-get install -y chromium)", CHROMIUM is not None),
) if not ok]
pytestmark = [
    pytest.mark.jupyter,
    pytest.mark.skipif(bool(_MISSING), reason="the live JupyterLab test needs " + ", ".join(_MISSING)),
]

WIDTH, HEIGHT = 1400, 1000
TEXT = "The cat sat on the"
SIZES = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.4]
CELLS = [
    "from tl_strace import load_model, strace\nfrom tl_strace.views import attention_patterns",
    'model = load_model("smollm2-135m")',
    f"res = strace(model, {TEXT!r}, sizes={SIZES!r})",
    "res",
    "res.plot()",
    "attention_patterns(res, res.clean_patterns(model), 0.1)",
    "res.detail_views(0.1, model=model)",
    "res.detail_views(0.4, model=model)",
    f"from tl_strace import density_profile\nprof = density_profile(model, {TEXT!r}, sizes={SIZES!r}, conditions=('only',))",
    "prof",
]
# circuitsvis figures drawn: the attention figure, three per detail_views, the profile's coloured text
N_CV = 1 + 3 + 3 + 1


# ------------------------------------------------------------------------------------------ a small CDP client
NB_JS = ("var NB = () => { const a = window.jupyterapp; if (!a) return null; "
         "return Array.from(a.shell.widgets('main')).find(w => w.content && w.sessionContext) || null; };\n")


class CDP:
    """A blocking Chrome DevTools Protocol session on one page target: commands by id, every event
    kept (JavaScript exceptions and console errors are what the tests read)."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        # One reply may wait long on a busy machine (the page's main thread renders megabytes of
        # outputs while the kernel and other tests take the cores): the per-message limit is only a
        # guard against a dead browser; each wait() has its own deadline for what it waits for.
        self.ws = websocket.create_connection(ws_url, timeout=300, suppress_origin=True)
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg_id = self._id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method} failed: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (promises awaited) and return its JSON value; ``NB()``
        in it is the notebook panel open in JupyterLab's main area."""
        r = self.call("Runtime.evaluate", expression=NB_JS + expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}\n{expression[:400]}")
        return r.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float, what: str) -> Any:
        """Poll ``expression`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}")
            time.sleep(0.25)

    def errors(self) -> list[str]:
        """JavaScript exceptions and console errors seen so far, as text."""
        out = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif ev.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                         for a in p.get("args", [])))
        return out

    def key(self, key: str, code: int) -> None:
        """Press and release ``key`` (a ``KeyboardEvent.key`` name; ``code``: its virtual key code)."""
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code,
                      nativeVirtualKeyCode=code)

    def drag(self, x0: float, y: float, x1: float) -> None:
        """Press the left button at (x0, y), move to (x1, y) in steps, release."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x0, y=y)
        self.call("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y, button="left", clickCount=1)
        for i in range(1, 9):
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x0 + (x1 - x0) * i / 8, y=y, button="left",
                      buttons=1)
        self.call("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y, button="left", clickCount=1)

    def shot(self, rect: dict[str, float], name: str, out: Path) -> Any:
        """A screenshot of ``rect`` (page CSS pixels, inside the viewport) as a PIL image, kept as ``name``."""
        from PIL import Image

        clip = {"x": rect["x"], "y": rect["y"], "width": max(1.0, rect["width"]), "height": max(1.0, rect["height"]),
                "scale": 1}
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png", clip=clip)["data"])
        (out / f"{name}.png").write_bytes(data)
        return Image.open(io.BytesIO(data)).convert("RGB")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


def _ink(img: Any) -> float:
    """Share of pixels that are not near-white (something is drawn)."""
    px = list(img.getdata())
    return sum(1 for r, g, b in px if min(r, g, b) < 200) / max(1, len(px))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (a local URL)
        return r.read()


# ------------------------------------------------------------------------------------------ server and browser
class Lab:
    """A running JupyterLab server and its directories."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "root"
        self.token = os.urandom(16).hex()
        self.port = _free_port()
        dirs = {name: tmp / name for name in ("config", "data", "runtime", "ipython", "settings", "workspaces")}
        for d in [self.root, *dirs.values()]:
            d.mkdir(parents=True)
        self.data = dirs["data"]
        # JupyterLab's own settings: no news or update notifications, every notebook cell in the DOM
        # (no windowing, so every output renders whether scrolled to or not).
        for plugin, settings in {
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
            "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        }.items():
            path = dirs["settings"] / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
        env.update(JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
                   JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), IPYTHONDIR=str(dirs["ipython"]),
                   JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]), JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
                   JUPYTER_PLATFORM_DIRS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO), MPLBACKEND="agg")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--port-retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--ServerApp.terminals_enabled=False", "--LabApp.news_url=", "--LabApp.expose_app_in_browser=True",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly", f"--LabApp.user_settings_dir={dirs['settings']}",
               f"--LabApp.workspaces_dir={dirs['workspaces']}", "--allow-root"]
        self.log = (tmp / "server.log").open("w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError):
                _get(f"{self.url}/api/status?token={self.token}")
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("JupyterLab did not start:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(0.3)

    def page(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


class Browser:
    """Headless Chromium with remote debugging on a random port, one page target."""

    def __init__(self, tmp: Path) -> None:
        profile = tmp / "chromium-profile"
        cmd = [str(CHROMIUM), *OFFLINE_FLAGS, f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               "--proxy-server=http://127.0.0.1:9",  # loopback (the server) bypasses it
               "--force-device-scale-factor=1", f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-port=0",
               "--remote-allow-origins=*", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(_get(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t.get("type") == "page")
        self.cdp = CDP(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime"):
            self.cdp.call(f"{domain}.enable")
        self.cdp.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                      mobile=False)
        self.cdp.call("Emulation.setFocusEmulationEnabled", enabled=True)  # a focused window: focus and keys work

    def open(self, url: str) -> None:
        """Load ``url`` and wait until JupyterLab shows a notebook with its cells."""
        self.cdp.events.clear()
        self.cdp.call("Page.navigate", url=url)
        self.cdp.wait("!!(window.jupyterapp && window.jupyterapp.shell && document.querySelector("
                      "'.jp-NotebookPanel .jp-Cell'))", 90, "JupyterLab to show the notebook")

    def stop(self) -> None:
        self.cdp.close()
        with contextlib.suppress(Exception):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    keep = os.environ.get("TL_STRACE_SHOTS")
    out = Path(keep) if keep else tmp_path_factory.mktemp("shots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    server = Lab(tmp_path_factory.mktemp("jupyterlab"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
    b = Browser(tmp_path_factory.mktemp("chromium"))
    try:
        yield b
    finally:
        b.stop()


# ------------------------------------------------------------------------------------------ page helpers
def _rect(cdp: CDP, selector: str, index: int = 0) -> dict[str, float]:
    """Scroll the ``index``-th element matching ``selector`` into view; its bounding box."""
    r = cdp.js(f"""(() => {{
      const e = document.querySelectorAll({json.dumps(selector)})[{index}];
      if (!e) return null;
      e.scrollIntoView({{block: "center"}});
      // two frames: the scroll is painted before the caller takes a screenshot of the box
      return new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => {{
        const b = e.getBoundingClientRect();
        done({{x: b.left, y: b.top, width: b.width, height: b.height}});
      }})));
    }})()""")
    assert r is not None, f"no element {selector!r} (#{index})"
    return r


def _shot_when(cdp: CDP, selector: str, index: int, name: str, shots: Path, drawn: Callable[[Any], bool]) -> Any:
    """A screenshot of the ``index``-th ``selector``, taken again (for up to 60 s) until ``drawn``
    holds: on a busy machine the browser may paint a scrolled-to output a moment after the scroll.
    Returns the last screenshot; the caller asserts on it (a picture never drawn still fails)."""
    deadline = time.monotonic() + 60
    while True:
        img = cdp.shot(_rect(cdp, selector, index), name, shots)
        if drawn(img) or time.monotonic() > deadline:
            return img
        time.sleep(0.5)


def _blue(img: Any) -> int:
    return sum(1 for r, g, b in img.getdata() if b > 180 and r < 150)


def _dark_tinted(img: Any) -> tuple[int, int]:
    """Pixels of the curves and axes (dark), and of the grid's head cells and the phase shading (tinted)."""
    px = list(img.getdata())
    return sum(1 for r, g, b in px if max(r, g, b) < 90), sum(1 for r, g, b in px if b - r > 30)


def _run_all(cdp: CDP) -> None:
    """Run every cell with JupyterLab's own command and wait for the kernel to finish them all."""
    cdp.wait("(() => { const w = NB(); return !!(w && w.sessionContext && "
             "w.sessionContext.session && w.sessionContext.session.kernel && "
             "w.sessionContext.session.kernel.connectionStatus === 'connected'); })()", 90, "the kernel to start")
    cdp.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    cdp.wait(f"""(() => {{
      const w = NB();
      const cells = w.content.widgets.filter(c => c.model.type === 'code');
      return cells.length === {len(CELLS)} && cells.every(c => c.model.executionCount !== null) &&
             w.sessionContext.session.kernel.status === 'idle';
    }})()""", 240, "every cell to run")
    failed = cdp.js("""Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')).map(e => e.textContent.slice(0, 2000))""")
    assert not [f for f in failed if "Error" in f or "Traceback" in f], "a cell failed:\n" + "\n".join(failed)


def _save(cdp: CDP) -> None:
    cdp.js("window.jupyterapp.commands.execute('docmanager:save')")
    cdp.wait("!NB().context.model.dirty", 180, "the notebook to be saved")


def _write_notebook(path: Path, cells: list[str]) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, str(path))  # not signed: JupyterLab opens it untrusted, running it makes it trusted


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def executed(lab: Lab, browser: Browser, shots: Path) -> dict[str, Any]:
    """The notebook, opened in JupyterLab and run; the page stays open for the tests below."""
    _write_notebook(lab.root / "live.ipynb", CELLS)
    browser.open(lab.page("live.ipynb"))
    t0 = time.monotonic()
    _run_all(browser.cdp)
    return {"run_s": time.monotonic() - t0}


def test_curves_and_circuit_drawn(executed, browser: Browser, shots: Path):
    cdp = browser.cdp
    dom = cdp.js("""(() => {
      const v = document.querySelector('.tls-view[data-tls-circuit]');
      if (!v) return null;
      const vis = e => !!e && !e.closest('[hidden]') && e.getBoundingClientRect().width > 0;
      return {ready: v.getAttribute('data-tls-ready'), error: v.getAttribute('data-tls-error'),
              curves: vis(v.querySelector('svg.tls-curves, .tls-live svg')),
              gridCells: v.querySelectorAll('svg.tls-grid rect').length,
              staticShown: vis(v.querySelector('.tls-static-img'))};
    })()""")
    assert dom is not None, "the result's view is not in the page"
    assert dom["ready"] == "1" and dom["error"] is None, dom
    assert dom["curves"] and dom["gridCells"] > 30, dom
    assert not dom["staticShown"], "the static picture should give way to the live view where scripts run"
    grid = _shot_when(cdp, ".tls-view svg.tls-grid", 0, "live-grid", shots, lambda i: _blue(i) > 50)
    assert _blue(grid) > 50, f"the circuit grid looks blank ({_blue(grid)} blue pixels)"
    curves = _shot_when(cdp, ".tls-view .tls-live svg", 0, "live-curves", shots, lambda i: _ink(i) > 0.02)
    assert _ink(curves) > 0.02
    # res.plot(): a PNG in the output, not "<Figure size ...>" text
    img = _rect(cdp, '.jp-OutputArea-output[data-mime-type="image/png"] img')
    assert img["width"] > 200 and img["height"] > 100, img
    assert _ink(cdp.shot(img, "live-plot", shots)) > 0.02
    assert "<Figure size" not in cdp.js("document.querySelector('.jp-Notebook').textContent")


def _slider_state(cdp: CDP) -> dict[str, Any]:
    return cdp.js("""(() => { const v = document.querySelector('.tls-view[data-tls-circuit]');
      const s = v.querySelector('.tls-slider');
      return {value: +s.value, max: +s.max, label: v.querySelector('.tls-sl').textContent,
              focused: document.activeElement === s}; })()""")


def test_slider_by_mouse_and_keyboard(executed, browser: Browser):
    cdp = browser.cdp
    r = _rect(cdp, ".tls-view .tls-slider")
    y = r["y"] + r["height"] / 2
    cdp.js("(() => { const s = document.querySelector('.tls-view .tls-slider'); s.value = '0'; "
           "s.dispatchEvent(new Event('input')); })()")
    before = _slider_state(cdp)
    cdp.drag(r["x"] + 4, y, r["x"] + r["width"] * 0.55)
    after = _slider_state(cdp)
    assert after["value"] > before["value"] and after["label"] != before["label"], (before, after)
    assert after["focused"], "clicking the slider should give it the focus"
    # Arrow keys, while the slider has the focus: JupyterLab's notebook shortcuts must not take them.
    for key, code, step in (("ArrowRight", 39, 1), ("ArrowLeft", 37, -1), ("ArrowUp", 38, 1),
                            ("ArrowDown", 40, -1)):
        was = _slider_state(cdp)
        cdp.key(key, code)
        now = _slider_state(cdp)
        assert now["value"] == was["value"] + step, (key, was, now)
        assert now["label"] != was["label"] and now["focused"], (key, was, now)
    cdp.key("End", 35)
    assert _slider_state(cdp)["value"] == after["max"]
    cdp.key("Home", 36)
    home = _slider_state(cdp)
    assert home["value"] == 0 and home["label"] == before["label"]
    # the keys moved the slider, not the notebook's active cell
    assert cdp.js("NB().content.activeCell.model.sharedModel.source") == "res"


def _profile_state(cdp: CDP) -> dict[str, Any]:
    return cdp.js("""(() => { const root = document.querySelector('.tls-profile');
      const tip = root.querySelector('.tls-prof-tip'), a = document.activeElement;
      return {hover: root.getAttribute('data-tls-hover'), open: root.getAttribute('data-tls-open'),
              tipShown: !tip.hidden, tip: tip.textContent, spark: tip.querySelectorAll('polyline').length,
              detailRows: root.querySelectorAll('.tls-prof-detail tr').length,
              focusedK: a && a.classList.contains('tls-prof-tok') ? +a.getAttribute('data-k') : null,
              mode: NB().content.mode, cell: NB().content.activeCell.model.sharedModel.source}; })()""")


def test_profile_hover_click_and_keys(executed, browser: Browser, shots: Path):
    """The density profile as a notebook shows it: real mouse hover and click on a token, then the
    keyboard (arrows move between tokens, Enter opens one) without JupyterLab's shortcuts acting."""
    cdp = browser.cdp
    cdp.wait("!!document.querySelector('.tls-profile[data-tls-ready=\"1\"]')", 60, "the profile view's script")
    ts_ = cdp.js("JSON.parse(document.querySelector('.tls-profile script.tls-prof-data').textContent)"
                 ".pos.map(p => p.t)")
    assert len(ts_) >= 4 and cdp.js("document.querySelectorAll('.tls-profile .tls-prof-tok').length") == len(ts_)
    r = _rect(cdp, ".tls-profile .tls-prof-tok", 1)
    x, y = r["x"] + r["width"] / 2, r["y"] + r["height"] / 2
    cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    st = _profile_state(cdp)
    assert st["tipShown"] and st["hover"] == str(ts_[1]) and st["spark"] == 1, st
    assert st["tip"].startswith(f"position {ts_[1]}: after "), st
    cdp.shot(_rect(cdp, ".tls-profile"), "live-profile-hover", shots)  # scrolls: find the token again
    r = _rect(cdp, ".tls-profile .tls-prof-tok", 1)
    x, y = r["x"] + r["width"] / 2, r["y"] + r["height"] / 2
    cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    for kind in ("mousePressed", "mouseReleased"):
        cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    st = _profile_state(cdp)
    assert st["open"] == str(ts_[1]) and st["detailRows"] > len(SIZES) and st["focusedK"] == 1, st
    cell = st["cell"]
    cdp.key("ArrowRight", 39)
    st = _profile_state(cdp)
    assert st["focusedK"] == 2 and st["hover"] == str(ts_[2]) and st["tipShown"], st
    cdp.key("Enter", 13)
    st = _profile_state(cdp)
    assert st["open"] == str(ts_[2]), st
    # JupyterLab did not take the keys: still in command mode (Enter would edit the cell), same cell
    assert st["mode"] == "command" and st["cell"] == cell, st
    cdp.key("End", 35)
    assert _profile_state(cdp)["focusedK"] == len(ts_) - 1
    cdp.key("ArrowLeft", 37)
    assert _profile_state(cdp)["focusedK"] == len(ts_) - 2
    cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=5, y=5)
    cdp.js("document.activeElement.blur()")
    assert not _profile_state(cdp)["tipShown"]


def test_circuitsvis_figures_not_blank(executed, browser: Browser, shots: Path):
    cdp = browser.cdp
    targets = cdp.js("""Array.from(document.querySelectorAll('.tls-cv > div[id]')).map(e => {
        const b = e.getBoundingClientRect(); return [e.id, e.childElementCount, b.width, b.height]; })""")
    assert len(targets) == N_CV, targets
    assert len({t[0] for t in targets}) == N_CV, "two figures share an element id"
    for i, (fid, children, w, h) in enumerate(targets):
        assert children > 0 and w > 50 and h > 20, f"circuitsvis figure {i} ({fid}) is blank: {targets[i]}"
        img = _shot_when(cdp, ".tls-cv > div[id]", i, f"live-cv-{i}", shots, lambda im: _ink(im) > 0.005)
        assert _ink(img) > 0.005, f"circuitsvis figure {i} ({fid}) looks blank in the screenshot"


def test_no_javascript_errors(executed, browser: Browser):
    assert browser.cdp.errors() == []


def _static_check(cdp: CDP, shots: Path, name: str, n_views: int | None = None) -> None:
    """An untrusted notebook: no script ran, the static picture of each view shows and is drawn,
    and the key numbers are there as text."""
    # wait for the pictures themselves (outputs render one by one: an early check would see none)
    cdp.wait(f"(() => {{ const i = Array.from(document.querySelectorAll('img.tls-static-img')); "
             f"return i.length >= {n_views or 1} && i.every(e => e.complete); }})()", 180,
             "the outputs' static pictures to render")
    found = cdp.js("""(() => {
      const vis = e => !e.closest('[hidden]') && e.getBoundingClientRect().width > 0;
      return {views: document.querySelectorAll('.tls-view').length,
              ready: document.querySelectorAll('[data-tls-ready]').length,
              imgs: Array.from(document.querySelectorAll('img.tls-static-img')).map((e, k) =>
                    [k, e.naturalWidth, e.naturalHeight, vis(e)]).filter(x => x[3]).map(x => x.slice(0, 3)),
              text: Array.from(document.querySelectorAll('.tls-hd')).map(e => e.textContent),
              untrusted: !NB().context.model.cells.get(0).trusted};
    })()""")
    assert found["untrusted"], "JupyterLab opened the notebook as trusted"
    assert found["ready"] == 0, f"scripts ran in the untrusted notebook: {found}"
    assert found["imgs"] and all(w > 300 and h > 100 for _, w, h in found["imgs"]), found
    if n_views is not None:
        assert len(found["imgs"]) >= n_views, found
    assert found["text"] and all("density" in t and "tokens" in t for t in found["text"]), found
    def drawn(img: Any) -> bool:
        dark, tinted = _dark_tinted(img)
        return img.width > 300 and _ink(img) > 0.02 and dark > 500 and tinted > 500

    for i, _, _ in found["imgs"]:
        img = _shot_when(cdp, "img.tls-static-img", i, f"{name}-static-{i}", shots, drawn)
        dark, tinted = _dark_tinted(img)
        assert drawn(img), (f"static picture {i}: blank, or curves or grid missing ({img.width} px wide, "
                            f"ink {_ink(img):.3f}, {dark} dark, {tinted} tinted)")


def test_saved_notebook_reopened_untrusted(executed, lab: Lab, browser: Browser, shots: Path):
    import nbformat

    _save(browser.cdp)
    nb = nbformat.read(str(lab.root / "live.ipynb"), as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert any("text/html" in o.get("data", {}) for o in outputs)
    if os.environ.get("TL_STRACE_SHOTS"):  # what each output costs in the saved notebook
        sizes = [[c.source, len(json.dumps(c.get("outputs", [])).encode())] for c in nb.cells]
        (shots / "notebook-sizes.json").write_text(json.dumps(sizes, indent=1))
    nb.metadata["tls_copy"] = "untrusted"  # a changed byte: the saved signature no longer matches
    nbformat.write(nb, str(lab.root / "untrusted.ipynb"))
    browser.open(lab.page("untrusted.ipynb"))
    _static_check(browser.cdp, shots, "untrusted", n_views=1)
    # the circuitsvis figures' static summaries: their key numbers as plain text
    summaries = browser.cdp.js("Array.from(document.querySelectorAll('.tls-cv-static')).filter(e => "
                               "!e.closest('[hidden]')).map(e => e.textContent)")
    assert len(summaries) == N_CV and all(len(s) > 20 for s in summaries), summaries


def test_committed_tutorial_opened_not_run(lab: Lab, browser: Browser, shots: Path):
    shutil.copy(TUTORIAL, lab.root / TUTORIAL.name)
    browser.open(lab.page(TUTORIAL.name))
    _static_check(browser.cdp, shots, "tutorial")
