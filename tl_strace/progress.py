"""Progress of one long call, shown where a user is watching (issue 17).

A trace of a long input takes minutes: the user should see which stage it is in and how many
masked rows are done. :class:`Progress` is one text bar (``tqdm``, on stderr) that

* appears only when the call is still running after :data:`DELAY_S` seconds, so short calls print
  nothing;
* is shown by default only where someone watches: a terminal (stderr is a TTY) or a Jupyter kernel;
  never under pytest, in a pipe or a log file, and never when asked (``progress=False``, or the
  environment variable ``TL_STRACE_PROGRESS=0``; ``=1`` forces it on);
* is a plain text bar, not a widget: a notebook without ``ipywidgets`` shows it without warnings,
  and it is cleared when the call ends (``leave=False``), so a saved notebook keeps no bar.

>>> with Progress(False, "s-Trace") as p:   # disabled: every method is a no-op
...     p.stage("search"); p.rows(10); p.advance(3)
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any

from tl_strace.errors import InputError

__all__ = ["DELAY_S", "MIN_INTERVAL_S", "Progress", "check_progress", "watching"]

DELAY_S = 2.0
"""Seconds a call runs before its bar appears."""

MIN_INTERVAL_S = 0.5
"""Least seconds between two redraws of the bar."""


def watching() -> bool:
    """Whether a person is likely watching this process's output (see the module docstring)."""
    env = os.environ.get("TL_STRACE_PROGRESS", "").strip().lower()
    if env in {"0", "false", "no", "off"}:
        return False
    if env in {"1", "true", "yes", "on"}:
        return True
    if "PYTEST_CURRENT_TEST" in os.environ:
        return False
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or replaced stream
        pass
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        try:
            shell = ipython.get_ipython()
        except Exception:  # noqa: BLE001 - any IPython oddity means: not a kernel we know
            return False
        return shell is not None and "ipykernel" in type(shell).__module__ + str(getattr(shell, "kernel", ""))
    return False


def check_progress(progress: Any) -> bool:
    """``progress`` as a bool: ``None`` (default) is :func:`watching`; anything but bool/None is refused."""
    if progress is None:
        return watching()
    if not isinstance(progress, bool):
        raise InputError(f"progress must be True, False or None (show it where someone watches); got {progress!r}.")
    return progress


class Progress:
    """A stage label and a count (masked rows, or a profile's positions), as one delayed,
    self-clearing text bar."""

    def __init__(self, enabled: bool, desc: str, unit: str = "row") -> None:
        self._bar: Any = None
        self._desc = desc
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=None, desc=desc, unit=unit, delay=DELAY_S, leave=False, file=sys.stderr,
                             dynamic_ncols=True, mininterval=MIN_INTERVAL_S)

    def stage(self, name: str) -> None:
        """Name the stage now running (forward, graph, search, evaluate)."""
        if self._bar is not None:
            self._bar.set_description_str(f"{self._desc}: {name}", refresh=False)

    def rows(self, total: int) -> None:
        """How many units (masked rows of the evaluate stage, positions of a profile) are to come."""
        if self._bar is not None:
            self._bar.reset(total=int(total))

    def advance(self, n: int) -> None:
        """``n`` more units are done."""
        if self._bar is not None:
            self._bar.update(int(n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
