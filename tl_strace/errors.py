"""Exceptions raised on purpose by tl_strace.

Every error the library raises deliberately derives from :class:`StraceError`, so callers can catch
all of them with one ``except`` clause while still telling the kinds apart. Where a kind is also a
misuse of arguments (:class:`InputError`) or of types (:class:`UnsupportedModelError`), it also
derives from the matching built-in, so generic ``except ValueError`` / ``except TypeError`` code
keeps working.
"""

from __future__ import annotations


class StraceError(Exception):
    """Base class of every error tl_strace raises on purpose."""


class InputError(StraceError, ValueError):
    """The text, tokens, sizes or options passed in are invalid."""


class ModelLoadError(StraceError):
    """A model could not be loaded (missing weights, offline hub, bad backend)."""


class UnsupportedModelError(StraceError, TypeError):
    """The model cannot be decomposed exactly into the s-Trace graph."""


class DecompositionError(StraceError):
    """The sum-of-edges identity failed on this model/input."""


class ResultsError(StraceError):
    """A results file or directory is missing, corrupt or from another configuration."""
