"""The circuit view's stylesheet and script, read from package data (``views/assets/circuit.{css,js}``).

The script is plain ES2015 with no dependency, kept in a real ``.js`` file so editors and linters
see it. It initialises every ``.tls-view`` element on the page that is not yet initialised (so a
notebook can show many views, and showing one twice is harmless), reads its data from the
``<script type="application/json" class="tls-data">`` child, and writes every piece of text with
``textContent`` / ``setAttribute``, never ``innerHTML``. Both files are inlined into each view
verbatim (no network), read once per process.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["circuit_css", "circuit_js"]


@functools.lru_cache(maxsize=None)
def _asset(name: str) -> str:
    return resources.files("tl_strace.views").joinpath("assets", name).read_text(encoding="utf-8")


def circuit_css() -> str:
    """The circuit view's stylesheet."""
    return _asset("circuit.css")


def circuit_js() -> str:
    """The circuit view's script."""
    return _asset("circuit.js")
