"""Is the HuggingFace hub usable? Offline flags, a reachability probe, and the local snapshot cache.

Offline, ``transformers`` retries the hub for ~23 s and then raises a generic ``OSError``; these
checks let :func:`tl_strace.io.models.load_model` decide *before* any network call, and
:func:`_offline_hint` is the one 'how to fix it' text every hub failure ends with.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path
from typing import Final

from tl_strace.io.registry import list_bundled_models

#: TCP connect timeout for the hub reachability probe.
_HUB_PROBE_TIMEOUT_S: Final[float] = 2.0

_TRUTHY: Final[frozenset[str]] = frozenset({"1", "true", "yes", "on"})


def _env_flag(var: str) -> bool:
    """Return whether environment variable ``var`` is set to a truthy value (1/true/yes/on)."""
    return os.environ.get(var, "").strip().lower() in _TRUTHY


def _hub_offline_by_env() -> bool:
    """Whether the user asked for offline mode (read at call time, unlike huggingface_hub)."""
    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Probe the hub endpoint with one TCP connection so an offline machine fails in seconds.

    With a proxy configured a direct connection says nothing, so the hub is then assumed
    reachable and the real request decides.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return True
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_hint(name: str) -> str:
    """The common 'how to fix it' text for a hub model that cannot be fetched."""
    return (
        f"To fix: go online (and unset HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE), or pass a local "
        f"directory containing save_pretrained output of {name!r} and its tokenizer, or use a "
        f"bundled offline model: {', '.join(repr(m) for m in list_bundled_models())}."
    )


def _cached_hub_snapshot(name: str) -> Path | None:
    """Return the local HuggingFace cache snapshot of hub model ``name``, if usable offline."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # not cached, malformed repo id, hub library quirk: all mean "no snapshot"
        return None
    return snapshot if (snapshot / "config.json").is_file() else None
