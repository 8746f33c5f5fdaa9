"""Safe on-disk storage shared by results and mean caches: tensors in a ``.safetensors`` file, the
rest as JSON in its metadata. Reading never runs code.

Every file carries a SHA-256 checksum of its content (:func:`content_checksum`: each tensor's name,
dtype, shape and bytes, in sorted order, then the canonical JSON of the metadata), stored in the
safetensors metadata under :data:`CHECKSUM_KEY` and verified by :func:`read_tensors`, so a file
damaged or edited after it was written is refused instead of loading as a plausible result.
Every file written now also carries the format marker :data:`FORMAT_KEY` = ``"2"`` (and its
JSON metadata ``format_version`` 2): a file that says it is format 2 but has no checksum was
edited or damaged and is refused. Only files written before checksums existed (the 0.1.0 release:
no marker, ``format_version`` 1) have no checksum: they are read, and the caller's schema
validation is then their only check (logged as a warning).
Only regular files are read: a FIFO, device or socket is refused before it is opened (opening a
FIFO would block forever).
Writes go through :func:`tl_strace.fsutil.write_with`: atomic, never onto a directory or device
node, no temporary file left behind on failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import contextlib
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tl_strace.errors import InputError, ResultsError
from tl_strace.fsutil import write_with

__all__ = ["CHECKSUMMED_FORMAT", "CHECKSUM_KEY", "FORMAT_KEY", "SchemaViolation", "as_path", "content_checksum",
           "read_tensors", "schema_checked", "write_tensors"]

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "tl_strace_sha256"
"""Safetensors metadata key holding the SHA-256 of a file's content (see :func:`content_checksum`)."""

FORMAT_KEY = "tl_strace_format"
"""Safetensors metadata key marking a file written with a checksum (value ``"2"``)."""

CHECKSUMMED_FORMAT = 2
"""The first on-disk format (``format_version`` in the JSON metadata, :data:`FORMAT_KEY`) that always
carries a checksum; a file of this format without one was edited or damaged."""


class SchemaViolation(Exception):
    """One schema violation of a stored file: the field and what is wrong with it. Raised by the
    schema checks of results and mean caches, turned into a :class:`ResultsError` by
    :func:`schema_checked`."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")


@contextlib.contextmanager
def schema_checked(path: str, what: str, fix: str) -> Iterator[None]:
    """Run a file's schema checks: a :class:`SchemaViolation`, or a value of an unexpected kind
    (``TypeError`` ... ``AttributeError`` from a check reading it), becomes one :class:`ResultsError`
    naming ``path``, the ``what`` it should be, the problem and the ``fix``."""
    try:
        yield
    except SchemaViolation as e:
        raise ResultsError(f"{path!r} is not a valid {what} ({e}); it was edited or damaged after it was "
                           f"written: {fix}.") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ResultsError(f"{path!r} is not a valid {what} ({type(e).__name__}: {e}); it was edited or damaged "
                           f"after it was written: {fix}.") from e


def as_path(path: Any, what: str) -> str:
    """``path`` as a ``str``, or a one-line :class:`InputError` when it is not a path (``str`` or
    ``os.PathLike``): ``load(42)`` must not end in a raw ``TypeError`` from ``os.fspath``."""
    if isinstance(path, (bytes, bytearray)) or not isinstance(path, (str, os.PathLike)):
        raise InputError(f"The {what} path must be a str or os.PathLike (e.g. 'result.safetensors'); got "
                         f"{type(path).__name__} {path!r:.60}.")
    got = os.fspath(path)
    if not isinstance(got, str):  # a PathLike returning bytes
        raise InputError(f"The {what} path must be text (a str or os.PathLike of str); got {got!r:.60}.")
    return got


def _canonical_json(meta: Any) -> str:
    """The JSON text a checksum covers: keys sorted, tuples as lists (what a JSON round trip gives)."""
    return json.dumps(json.loads(json.dumps(meta)), sort_keys=True)


def content_checksum(tensors: Mapping[str, Tensor], meta: Any) -> str:
    """SHA-256 (hex) of a file's content: every tensor's name, dtype, shape and raw bytes, in sorted
    name order, then the canonical JSON of ``meta`` (``json.dumps(..., sort_keys=True)``).

    It depends only on the content, not on the file layout, so it is the same when computed on
    the tensors before writing and on the tensors read back."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{len(name)}:{name}|{t.dtype}|{tuple(t.shape)}|{t.numel() * t.element_size()}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(b"meta|" + _canonical_json(meta).encode())
    return h.hexdigest()


def write_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], key: str, meta: dict[str, Any], *,
                  what: str = "tl_strace file") -> None:
    """Write ``tensors`` and ``meta`` (as JSON under metadata ``key``) to ``path``, atomically, with
    the checksum of both under :data:`CHECKSUM_KEY`.

    Raises :class:`~tl_strace.fsutil.OutputPathError` (one line, naming ``what`` and the path) when
    the path is a directory or special file, its directory is missing or read-only, or the write
    fails (full disk); no temporary file is left behind.
    """
    metadata = {key: json.dumps(meta), CHECKSUM_KEY: content_checksum(tensors, meta),
                FORMAT_KEY: str(CHECKSUMMED_FORMAT)}

    def writer(tmp: Path) -> None:
        try:
            save_file(tensors, os.fspath(tmp), metadata=metadata)
        except Exception as e:  # safetensors reports I/O failures (full disk) as SafetensorError
            if type(e).__name__ == "SafetensorError":
                raise OSError(str(e)) from e
            raise

    write_with(path, writer, what=what)


def read_tensors(path: str | os.PathLike, key: str, *, what: str,
                 missing: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read what :func:`write_tensors` wrote: ``(meta, tensors)``, after verifying its checksum.

    Raises :class:`ResultsError` with ``missing`` when there is no file, saying the file is not a
    ``what`` when it cannot be read or lacks the metadata ``key``, and saying it was modified or
    damaged when its content no longer matches the checksum stored in it, or when it is of a format
    that always has a checksum (:data:`FORMAT_KEY`, ``format_version`` ≥ :data:`CHECKSUMMED_FORMAT`)
    but has none. A file without a checksum written before checksums existed (no marker) is returned
    with a logged warning; the caller's schema validation is then its only check. A path that is
    not a regular file (a directory, FIFO, device, socket) is refused before it is opened;
    a path that is not a ``str``/``os.PathLike`` is an :class:`InputError`.
    """
    path = as_path(path, what)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ResultsError(missing) from None
    except OSError as e:
        raise ResultsError(f"Cannot read the {what} {path!r}: {e.strerror or e}.") from e
    if stat.S_ISDIR(st.st_mode):
        raise ResultsError(f"{path!r} is a directory, not a {what} file; give the path of the file.")
    if not stat.S_ISREG(st.st_mode):
        raise ResultsError(f"{path!r} is not a regular file (a FIFO, device or socket), so it is not a {what}; "
                           "give the path of a saved file.")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            meta = json.loads(raw[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # corrupt file, another format
        raise ResultsError(f"{path!r} is not a {what} ({type(e).__name__}: {e}).") from e
    stored = raw.get(CHECKSUM_KEY)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if stored is None and (FORMAT_KEY in raw or (isinstance(version, (int, float)) and not isinstance(version, bool)
                                                 and version >= CHECKSUMMED_FORMAT)):
        raise ResultsError(
            f"{path!r} was modified or damaged after it was written: it is a format-{CHECKSUMMED_FORMAT} {what}, "
            f"which always carries a SHA-256 checksum, but its checksum was removed. Do not use it; restore an "
            f"intact copy or recompute it."
        )
    if stored is None:
        logger.warning("%s has no checksum (written by an older tl_strace); checked by its schema only.", path)
    elif stored != content_checksum(tensors, meta):
        raise ResultsError(
            f"{path!r} was modified or damaged after it was written: its content no longer matches the SHA-256 "
            f"checksum stored in it. Do not use it; restore an intact copy or recompute it."
        )
    return meta, tensors
