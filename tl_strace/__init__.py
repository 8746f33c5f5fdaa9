"""tl_strace: how much of a language model is used to predict each next token.

s-Trace (Kervadec et al., 2026) and the computation-density estimator on TransformerLens models.

>>> import tl_strace as ts                                   # doctest: +SKIP
>>> model = ts.load_model("smollm2-135m")                    # doctest: +SKIP
>>> res = ts.strace(model, "The capital of France is")       # doctest: +SKIP
>>> res.density, res.tv, res.subgraph(1e-3)                  # doctest: +SKIP

``import tl_strace`` imports everything below (torch, TransformerLens) and registers the result
display methods' renderers (:mod:`tl_strace.views`), except in the ``tl-strace`` command itself,
which imports what a subcommand needs when it runs, so ``tl-strace --help`` answers at once;
there the names below are imported on first use.
"""

import importlib
import os
import sys

from tl_strace._version import __version__
from tl_strace.errors import (
    DecompositionError,
    InputError,
    ModelLoadError,
    ResultsError,
    StraceError,
    UnsupportedModelError,
)

#: Public name -> the module it lives in (imported eagerly, or on first use in the command).
_LAZY = {
    "component_strace": "tl_strace.components",
    "project_trace": "tl_strace.components",
    "load_model": "tl_strace.io.models",
    "MeanCache": "tl_strace.mean",
    "compute_means": "tl_strace.mean",
    "check_model": "tl_strace.pipeline",
    "density_profile": "tl_strace.profile",
    "trace_generation": "tl_strace.profile",
    "Sampling": "tl_strace.profile",
    "DensityProfile": "tl_strace.results",
    "strace": "tl_strace.pipeline",
    "ComponentResult": "tl_strace.results",
    "StraceResult": "tl_strace.results",
    "Subgraph": "tl_strace.results",
    "TraceResult": "tl_strace.results",
    "DEFAULT_SIZES": "tl_strace.search",
}


def __getattr__(name: str):
    """The public names, imported on first use (only the ``tl-strace`` command gets here)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        importlib.import_module("tl_strace.views")  # registers the result display methods' renderers
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _is_command() -> bool:
    """Whether this process is the ``tl-strace`` console script (``sys.argv[0]`` names it)."""
    base = os.path.basename(sys.argv[0] if sys.argv else "").lower()
    return base in ("tl-strace", "tl-strace.exe", "tl-strace-script.py")


if not _is_command():
    from tl_strace.components import component_strace, project_trace
    from tl_strace.io.models import load_model
    from tl_strace.mean import MeanCache, compute_means
    from tl_strace.pipeline import check_model, strace
    from tl_strace.profile import Sampling, density_profile, trace_generation
    from tl_strace.results import ComponentResult, DensityProfile, StraceResult, Subgraph, TraceResult
    from tl_strace.search import DEFAULT_SIZES
    from tl_strace import views as _views  # noqa: F401  registers the result display methods' renderers

__all__ = [
    "ComponentResult",
    "DEFAULT_SIZES",
    "DecompositionError",
    "DensityProfile",
    "InputError",
    "MeanCache",
    "ModelLoadError",
    "ResultsError",
    "Sampling",
    "StraceError",
    "StraceResult",
    "Subgraph",
    "TraceResult",
    "UnsupportedModelError",
    "__version__",
    "check_model",
    "component_strace",
    "compute_means",
    "density_profile",
    "load_model",
    "project_trace",
    "strace",
    "trace_generation",
]
