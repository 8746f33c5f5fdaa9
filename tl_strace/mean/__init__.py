"""Mean-ablation values from a reference corpus, computed once, saved and reused.

Zero ablation removes a component's contribution; *mean ablation* (METHOD.md §4, an extension)
replaces it by its average over a reference corpus the user chooses. :func:`compute_means` runs the
model once over that corpus and records, for every block, the mean of each hook in ``roles``
(by default the head outputs ``attn.hook_z`` and ``hook_mlp_out``: what component-level ablation
replaces). Two kinds of mean are kept:

* **position-agnostic** (the default everywhere): the average over every token position of every
  reference sequence, BOS position included. One vector per head / MLP, so it serves inputs of
  any length;
* **per-position**: the average at position ``t`` over the reference sequences that reach ``t``.
  It can only serve inputs no longer than the longest reference sequence (the *covered*
  positions); :meth:`MeanCache.values` refuses longer inputs with a message saying so.

A :class:`MeanCache` names the model, the hook shapes and the weights it was computed on (the
:func:`~tl_strace.model.weights_fingerprint` of the model), and is checked against the model before
use: a cache from another model, or from another checkpoint of the same architecture, is refused,
not silently broadcast. It is stored as one ``.safetensors`` file with JSON metadata and a checksum
of its content, so loading one never runs code and a damaged or edited file is refused.

>>> means = compute_means(model, ["The cat sat on the mat.", "It rained all day."])  # doctest: +SKIP
>>> means.save("means.safetensors"); MeanCache.load("means.safetensors")             # doctest: +SKIP
>>> means.values("z", n_pos=7).shape   # [layer, 1, head, d_head]: position-agnostic # doctest: +SKIP
torch.Size([30, 1, 9, 64])
"""

# The package is split by job: _shapes (hook shapes, model identity), _schema (the file format and
# its check), cache (the MeanCache type), _checks (argument checks), compute (compute_means). These
# names are its interface; the private ones are re-exported for the modules and tests that use them.
from tl_strace.mean._checks import _check_cache_path, _check_roles, _refuse_other_model
from tl_strace.mean._schema import (
    _META_KEY,
    _READABLE_VERSIONS,
    FORMAT_VERSION,
    _Bad,
    _check_cache_file,
    _is_mean_cache_file,
    _is_pos_int,
    _is_sha256,
)
from tl_strace.mean._shapes import _fmt, _model_identity, _per_layer_shape
from tl_strace.mean.cache import DEFAULT_ROLES, MEAN_POSITIONS, MeanCache
from tl_strace.mean.compute import Reference, _fingerprint, _SumHook, compute_means, reference_tokens

__all__ = ["MEAN_POSITIONS", "MeanCache", "compute_means", "reference_tokens"]
