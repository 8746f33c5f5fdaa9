"""Checks :func:`~tl_strace.mean.compute_means` runs before any work: its ``roles`` and ``path``
arguments, and whether an existing cache file at ``path`` belongs to another model."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from tl_strace.errors import InputError
from tl_strace.mean._shapes import _model_identity
from tl_strace.mean.cache import MeanCache
from tl_strace.model import ModelSpec
from tl_strace.store import as_path


def _refuse_other_model(cached: MeanCache, spec: ModelSpec, wfp: str, path: str | os.PathLike) -> None:
    """Refuse to overwrite (or reuse) a cache file holding means of another model."""
    mine = _model_identity(spec)
    other_weights = cached.model_fingerprint is not None and cached.model_fingerprint != wfp
    if other_weights or {k: cached.model.get(k) for k in mine} != mine:
        theirs = f"{cached.model.get('name')!r}" + (f", weights fingerprint {cached.model_fingerprint[:12]}…"
                                                     if cached.model_fingerprint else "")
        raise InputError(
            f"The mean cache {os.fspath(path)!r} holds means of another model ({theirs}; this model is "
            f"{spec.name!r}, weights fingerprint {wfp[:12]}…). Pass another path= for this model's means, or "
            "delete the file to recompute it."
        )


def _check_cache_path(path: Any) -> str:
    """``compute_means``'s ``path`` as a ``str``, refused before any work when it is not a path, is a
    directory or a special file (a FIFO would block the read forever), or sits in a missing
    directory. Writability is not required here: an existing cache in a read-only place is reused."""
    import stat

    got = as_path(path, "tl_strace mean cache")
    try:
        st = os.stat(got)
    except FileNotFoundError:
        parent = os.path.dirname(got) or "."
        if not os.path.isdir(parent):
            raise InputError(f"path={got!r}: the directory {parent!r} does not exist; create it first or pass "
                             "another path for the mean cache.") from None
        return got
    except OSError as e:
        raise InputError(f"path={got!r} cannot be read: {e.strerror or e}.") from e
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"path={got!r} is a directory; give the name of a mean cache file inside it, e.g. "
                         f"{os.path.join(got, 'means.safetensors')!r}.")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"path={got!r} is not a regular file (a FIFO, device or socket); give the path of a mean "
                         "cache file.")
    return got


def _check_roles(roles: Any) -> tuple[str, ...]:
    """``roles`` as distinct hook-role names (keys of :data:`tl_strace.model.HOOKS`), read once."""
    from collections.abc import Iterable

    example = "roles=('z', 'mlp_out')"
    if isinstance(roles, str):
        raise InputError(f"roles must be a list of hook roles, e.g. ({roles!r},); got the string {roles!r}.")
    if not isinstance(roles, Iterable) or isinstance(roles, (bytes, Tensor)):
        raise InputError(f"roles must be a list of hook roles, e.g. {example}; "
                         f"got {type(roles).__name__} {roles!r:.60}.")
    got = tuple(roles)
    bad = [r for r in got if not isinstance(r, str)]
    if bad:
        raise InputError(f"roles must be names of hook roles such as 'z' or 'mlp_out'; got {bad!r:.80} among them.")
    if not got:
        raise InputError(f"roles must name at least one hook role, e.g. {example}.")
    return tuple(dict.fromkeys(got))
