"""HTML building blocks shared by every view: escaping, script-safe JSON, content ids, the view object.

Everything user- or tokenizer-provided reaches a page through exactly two doors:

* :func:`esc` for text placed in HTML (element content and attribute values);
* :func:`script_json` for data placed inside ``<script>`` (JSON with ``<``, ``>``, ``&``, U+2028 and
  U+2029 escaped, so a token ``</script>`` cannot end the script and the result is valid JS too).

>>> esc('</script><img src=x onerror=alert(1)>')
'&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;'
>>> script_json({"tok": "</script>"})
'{"tok":"\\\\u003c/script\\\\u003e"}'
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import html
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["HTMLView", "content_id", "esc", "n_of", "page", "render_id", "round_sig", "script_json", "stable_ids",
           "title_text"]


def esc(text: object) -> str:
    """``text`` escaped for HTML element content and quoted attribute values."""
    return html.escape(str(text), quote=True)


_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by ``None`` anywhere in a JSON-able structure (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def script_json(obj: Any) -> str:
    """Compact JSON that is safe inside ``<script>`` and ``<script type="application/json">``.

    NaN and infinities become ``null``. Keys keep their order, so equal inputs give equal text.
    """
    text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, rep in _SCRIPT_ESCAPES.items():
        text = text.replace(ch, rep)
    return text


def n_of(n: "int | Any", unit: str = "edge") -> str:
    """``n`` (an int or a 0-d tensor) with thousands separators and ``unit`` plural unless ``n`` is 1.

    >>> n_of(1), n_of(0), n_of(12345), n_of(1, "component")
    ('1 edge', '0 edges', '12,345 edges', '1 component')
    """
    n = int(n)
    return f"{n:,} {unit}" if n == 1 else f"{n:,} {unit}s"


_SPECIAL_TOKEN = re.compile(r"^\s*(<\|[^<>|]*\|>|<(s|/s|bos|eos|pad|unk|start_of_turn|end_of_turn|endoftext)>)\s*$",
                            re.IGNORECASE)


def title_text(tokens: list[str]) -> str:
    """The tokens joined for a title, without tokenizer special tokens (``<|im_start|>``, ``<bos>``,
    ``<s>``, ...), which say nothing about the text. Not escaped: :func:`esc` it for HTML.

    >>> title_text(["<|im_start|>", "It", " is"])
    'It is'
    """
    return "".join(t for t in tokens if not _SPECIAL_TOKEN.match(t))


def round_sig(x: float, digits: int = 3) -> float | None:
    """``x`` rounded to ``digits`` significant digits (``None`` for NaN/inf): small, stable JSON.

    >>> round_sig(0.000123456), round_sig(12345.0), round_sig(float("nan"))
    (0.000123, 12300.0, None)
    """
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0.0:
        return 0.0
    return float(f"{x:.{digits}g}")


def content_id(prefix: str, *parts: str) -> str:
    """A deterministic element id derived from the content it labels (no random UUIDs).

    >>> content_id("tls", "abc")
    'tls-dc1114cd0749'
    """
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return f"{prefix}-{h.hexdigest()[:12]}"


# Within one stable_ids() block, render_id numbers its ids 1, 2, 3, ... (a whole page: deterministic);
# outside one, each id ends in a fresh random suffix (a notebook: outputs of many renders share one document).
_STABLE_IDS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("tls_stable_ids", default=None)


def render_id(prefix: str, *parts: str) -> str:
    """An element id unique to this render: the content hash of :func:`content_id` plus a suffix.

    In a notebook every display shares one document, so the same figure shown twice must not
    give two elements one id (the second would stay blank): outside :func:`stable_ids` the suffix
    is random (uuid4, 8 hex digits; also unique across kernel restarts, whose saved outputs stay
    in the page); inside it, a counter from 1, so a standalone page is byte-identical for equal
    content.
    """
    base = content_id(prefix, *parts)
    scope = _STABLE_IDS.get()
    if scope is None:
        return f"{base}-{uuid.uuid4().hex[:8]}"
    scope[0] += 1
    return f"{base}-{scope[0]}"


@contextlib.contextmanager
def stable_ids() -> Iterator[None]:
    """Number :func:`render_id`'s ids 1, 2, ... inside the block (one document, rendered once)."""
    token = _STABLE_IDS.set([0])
    try:
        yield
    finally:
        _STABLE_IDS.reset(token)


@dataclass(frozen=True)
class HTMLView:
    """Self-contained HTML that Jupyter displays (``_repr_html_``) and that can be saved to a file.

    ``str(view)`` is the same HTML (unlike circuitsvis, never a CDN variant); ``fragment`` says
    whether it is a piece to embed (True) or a whole page (False).
    """

    html: str
    title: str = ""
    fragment: bool = True
    text: str = ""
    """The key numbers as plain text: what ``repr`` (Jupyter's ``text/plain``) shows instead of the HTML."""

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text or f"<HTMLView {self.title!r}: {len(self):,} bytes of HTML>"

    def __html__(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __len__(self) -> int:
        """Size in bytes of the UTF-8 HTML."""
        return len(self.html.encode("utf-8"))

    def save(self, path: str | os.PathLike) -> str:
        """Write a standalone page to ``path`` (a fragment is wrapped in a minimal page); returns the path."""
        text = self.html if not self.fragment else page(self.title or "tl_strace", self.html)
        from tl_strace.fsutil import atomic_write

        path = os.fspath(path)
        atomic_write(path, text, what="HTML file")  # refuses directories and device nodes; no temporary left
        return path


# ---------------------------------------------------------------- the standalone page around fragments
# The page carries a tiny error collector, installed before any other script: every uncaught error
# or failed resource load is appended to ``<pre id="tls-errors">`` (hidden while empty), so a saved
# report shows its own failures and a headless browser's ``--dump-dom`` can read them.

ERROR_COLLECTOR = """<script>
(function () {
  function note(msg) {
    var box = document.getElementById("tls-errors");
    if (!box) { (window.__tlsErrors = window.__tlsErrors || []).push(msg); return; }
    box.style.display = "block";
    box.appendChild(document.createTextNode(msg + "\\n"));
  }
  window.addEventListener("error", function (e) {
    if (e && e.target && e.target !== window && (e.target.src || e.target.href)) {
      note("resource failed: " + (e.target.src || e.target.href));
    } else {
      note("error: " + (e && e.message ? e.message : String(e)));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) { note("unhandled rejection: " + String(e.reason)); });
  document.addEventListener("DOMContentLoaded", function () {
    (window.__tlsErrors || []).forEach(note);
    document.body.setAttribute("data-tls-loaded", "1");
  });
})();
</script>"""

PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px 24px; color: #111827;
       background: #ffffff; }
#tls-errors { display: none; color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; padding: 6px;
              white-space: pre-wrap; }
h1 { font-size: 20px; margin: 4px 0 8px; }
h2 { font-size: 16px; margin: 18px 0 6px; border-bottom: 1px solid #e5e7eb; padding-bottom: 3px; }
.tls-note { color: #4b5563; font-size: 12px; }
"""


def page(title: str, body: str, *, head: str = "") -> str:
    """A complete HTML document: UTF-8, no external resource, the error collector first."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; font-src data:\">\n"
        f"<title>{esc(title)}</title>\n{ERROR_COLLECTOR}\n<style>{PAGE_CSS}</style>\n{head}</head>\n<body>\n"
        "<pre id=\"tls-errors\"></pre>\n"
        f"{body}\n</body>\n</html>\n"
    )
