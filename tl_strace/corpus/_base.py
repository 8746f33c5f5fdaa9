"""Constants, file names and small helpers of corpus runs (digests, sealing, versions, JSON)."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_strace._version import __version__
from tl_strace.fsutil import atomic_write


logger = logging.getLogger("tl_strace.corpus")


GRANULARITIES = ("token", "component")


ABLATIONS = ("zero", "mean")


CONFIG_FILE = "run.json"


ISSUES_FILE = "data_issues.jsonl"


UNIGRAM_FILE = "unigram.json"


SHARD_GLOB = "shard-*.jsonl"


RECORD_VERSION = 1


MEAN_REFERENCE = 256


DEFAULT_RECORD_SIZES = (1e-3, 1e-2, 0.1, 0.4)


# The fields of an every-position run's "profile" (one list per field, one entry per position traced),
# besides the recovery sizes: scalars, then each position's per-stratum TV curve.
PROFILE_FIELDS = ("position", "n_tokens", "token_id", "target_id", "density", "density_linear", "full_entropy",
                  "full_top_id", "full_top_prob", "full_ce", "full_target_rank", "seconds", "tv")


_METRICS = ("tv", "kl", "nucleus", "entropy", "ce", "target_rank", "reaches_input")


# Keys that may differ between invocations of the same run.
_FREE_KEYS = ("limit",)


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.jsonl"


def _atomic_write(path: Path, text: str) -> None:
    """Write a run file with :func:`tl_strace.fsutil.atomic_write` (no temporary left on failure)."""
    atomic_write(path, text, what="run file")


def _digest(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj`` (sorted keys, no spaces, NaN as ``NaN``).

    Python's JSON writes floats with ``repr``, which reads back to the same float, so a record
    read back from its line hashes to the same digest as when it was written."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sealed(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with its checksum added under ``"sha256"`` (see :func:`_digest`)."""
    return {**obj, "sha256": _digest({k: v for k, v in obj.items() if k != "sha256"})}


def _versions() -> dict[str, str]:
    out = {"tl_strace": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    for mod in ("transformer_lens", "transformers", "numpy", "pandas"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def _jsonable(x: Any) -> Any:
    """Floats as JSON numbers (NaN kept as NaN: Python's json reads it back)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x
