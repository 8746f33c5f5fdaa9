"""Building the model object: booting a ``TransformerBridge`` from a directory or hub name, and the
final eval-mode / device / dtype guarantee every loader applies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tl_strace.errors import ModelLoadError
from tl_strace.io._hub import _offline_hint

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time (transformer_lens takes ~2 s)
    from transformer_lens.model_bridge import TransformerBridge


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
