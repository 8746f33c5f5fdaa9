"""Everything tl_strace knows about a TransformerLens model, in one place.

This module is the only one that touches a model object. It holds

* the hook-name table (:data:`HOOKS`): the TransformerLens hook points the method reads and edits,
  by their legacy names, which both ``TransformerBridge`` (TL 4.x) and ``HookedTransformer`` (TL 3.x)
  answer to;
* :func:`describe_model`: the architecture checks that refuse a model the graph of METHOD.md §1
  cannot describe exactly (encoder-decoders, attention-only models, ...), tells pre-norm from
  sandwich / post-norm blocks (:attr:`ModelSpec.norm_placement`) and sequential from parallel
  attention/MLP blocks (:attr:`ModelSpec.block_kind`);
* :func:`prepare_tokens`: text or token tensors in, one checked ``Int[Tensor, "pos"]`` out;
* :func:`model_guard`: the saved-settings context that guarantees no hook is left behind and the
  model's state is what it was, on every exit path;
* :func:`require_ready`: no dropout, no hooks (at hook points or raw PyTorch ones) before a call;
  :func:`check_full_graph`: the all-kept masked row reproduces the clean logits, on every call;
* :func:`exclusive` / :func:`serialised`: one call at a time per model (a per-model re-entrant
  lock held for the whole of every public call that runs the model);
* :func:`clean_run`: one cached forward pass returning exactly the activations the graph needs.

Hooks never read ``hook.name`` (on the bridge it is the canonical name, not the alias used here): each
hook closure is told its layer when it is made.
"""

# The package is split by job (spec, ready, tokens, params, run); these names are its interface.
from tl_strace.model.spec import (
    HOOKS,
    ModelSpec,
    describe_model,
    hook_name,
)
from tl_strace.model.ready import (
    _attached_hooks,
    check_full_graph,
    exclusive,
    model_guard,
    require_ready,
    run_hooked,
    serialised,
)
from tl_strace.model.tokens import (
    model_dtype,
    prepare_tokens,
    str_tokens,
    target_token,
    weights_fingerprint,
)
from tl_strace.model.params import (
    PostNorm,
    attention_output,
    attention_without_heads,
    final_norm_params,
    rms_affine,
)
from tl_strace.model.run import (
    CleanRun,
    clean_patterns,
    clean_run,
)

__all__ = [
    "HOOKS",
    "CleanRun",
    "ModelSpec",
    "PostNorm",
    "attention_without_heads",
    "clean_patterns",
    "clean_run",
    "check_full_graph",
    "describe_model",
    "exclusive",
    "serialised",
    "weights_fingerprint",
    "hook_name",
    "model_guard",
    "prepare_tokens",
]
