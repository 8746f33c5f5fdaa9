"""tl_strace: how much of a language model is used to predict each next token.

s-Trace (Kervadec et al., 2026) and the computation-density estimator on TransformerLens models.

>>> import tl_strace as ts                                   # doctest: +SKIP
>>> model = ts.load_model("smollm2-135m")                    # doctest: +SKIP
>>> res = ts.strace(model, "The capital of France is")       # doctest: +SKIP
>>> res.density, res.tv, res.subgraph(1e-3)                  # doctest: +SKIP
"""

from tl_strace._version import __version__
from tl_strace.components import component_strace, project_trace
from tl_strace.errors import (
    DecompositionError,
    InputError,
    ModelLoadError,
    ResultsError,
    StraceError,
    UnsupportedModelError,
)
from tl_strace.io.models import load_model
from tl_strace.mean import MeanCache, compute_means
from tl_strace.pipeline import check_model, strace
from tl_strace.results import StraceResult, Subgraph
from tl_strace.search import DEFAULT_SIZES
from tl_strace import views as _views  # noqa: F401  registers the result display methods' renderers

__all__ = [
    "DEFAULT_SIZES",
    "DecompositionError",
    "InputError",
    "MeanCache",
    "ModelLoadError",
    "ResultsError",
    "StraceError",
    "StraceResult",
    "Subgraph",
    "UnsupportedModelError",
    "__version__",
    "check_model",
    "component_strace",
    "compute_means",
    "load_model",
    "project_trace",
    "strace",
]
