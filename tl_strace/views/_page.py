"""The standalone page around one or more view fragments.

The page carries a tiny error collector, installed before any other script: every uncaught error
or failed resource load is appended to ``<pre id="tls-errors">`` (hidden while empty), so a saved
report shows its own failures and a headless browser's ``--dump-dom`` can read them.
"""

from __future__ import annotations

from tl_strace.views._html import esc

__all__ = ["page"]

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
