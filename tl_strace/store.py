"""Safe on-disk storage shared by results and mean caches: tensors in a ``.safetensors`` file, the
rest as JSON in its metadata. Writes are atomic (temporary file, then rename); reading never runs
code."""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tl_strace.errors import ResultsError

__all__ = ["read_tensors", "write_tensors"]


def write_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], key: str, meta: dict[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` (as JSON under metadata ``key``) to ``path``, atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={key: json.dumps(meta)})
    os.replace(tmp, path)


def read_tensors(path: str | os.PathLike, key: str, *, what: str,
                 missing: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read what :func:`write_tensors` wrote: ``(meta, tensors)``.

    Raises :class:`ResultsError` with ``missing`` when there is no file, and saying the file is
    not a ``what`` when it cannot be read or lacks the metadata ``key``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ResultsError(missing)
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # corrupt file, another format
        raise ResultsError(f"{path!r} is not a {what} ({type(e).__name__}: {e}).") from e
    return meta, tensors
