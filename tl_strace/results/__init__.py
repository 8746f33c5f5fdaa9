"""The result of tracing one input: curves, density, the subgraphs themselves, and safe storage.

One type per granularity over a shared base (:class:`TraceResult`): :class:`StraceResult` for token
edges, :class:`ComponentResult` for heads and MLPs, each with ``to_dataframe()`` like TransformerLens's
``PatchingResult``; :meth:`TraceResult.load` reads either. Tensors are stored with safetensors and everything else as JSON in the same
file's metadata: loading a result someone sent you never runs code.
"""

# The package is split by job (_schema, subgraph, result: the base, token, component); these names are its interface.
from tl_strace.results._schema import FORMAT_VERSION
from tl_strace.results.component import ComponentResult
from tl_strace.results.profile import DensityProfile
from tl_strace.results.result import TraceResult, measured_fields, register_view
from tl_strace.results.token import StraceResult
from tl_strace.results.subgraph import Subgraph

__all__ = ["FORMAT_VERSION", "ComponentResult", "DensityProfile", "StraceResult", "Subgraph", "TraceResult", "measured_fields", "register_view"]
