"""The result of tracing one input: curves, density, the subgraphs themselves, and safe storage.

One type whatever the options (:class:`StraceResult`), with ``to_dataframe()`` like TransformerLens's
``PatchingResult``. Tensors are stored with safetensors and everything else as JSON in the same
file's metadata: loading a result someone sent you never runs code.
"""

# The package is split by job (_schema, subgraph, result); these names are its interface.
from tl_strace.results._schema import FORMAT_VERSION
from tl_strace.results.result import StraceResult, register_view
from tl_strace.results.subgraph import Subgraph

__all__ = ["FORMAT_VERSION", "StraceResult", "Subgraph", "register_view"]
