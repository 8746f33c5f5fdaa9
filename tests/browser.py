"""Headless Chromium for the browser tests (tests/integration/test_report_browser.py, test_jupyter.py).

The Debian package, never a downloaded browser. :data:`OFFLINE_FLAGS` are the flags both tests
start it with: headless, no sandbox or GPU, and none of Chromium's own background connections (on a
closed network they are refused, many at a time). Each test adds its profile, host-resolution rule,
window size and what it drives.
"""

from __future__ import annotations

import shutil


def find_chromium() -> str | None:
    """The first Chromium (or Chrome) on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


OFFLINE_FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--no-first-run",
    "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
)
