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

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.checks import check_optional_bool, check_target
from tl_strace.errors import DecompositionError, InputError, UnsupportedModelError

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

# ---------------------------------------------------------------------------------------------
# Hook-name table. One entry per role; "{l}" is the block index. Every name here is a legacy
# TransformerLens name that TransformerBridge keeps as an alias and HookedTransformer defines.
# ---------------------------------------------------------------------------------------------
HOOKS: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",  # block input; the skip connection's source
    "pattern": "blocks.{l}.attn.hook_pattern",  # post-softmax attention [batch, head, dest, src]
    "v": "blocks.{l}.attn.hook_v",  # values [batch, pos, kv_head, d_head]
    "z": "blocks.{l}.attn.hook_z",  # pattern @ v per query head [batch, pos, head, d_head]
    "attn_out": "blocks.{l}.hook_attn_out",  # what the attention sublayer adds to the stream
    "mlp_out": "blocks.{l}.hook_mlp_out",  # what the MLP sublayer adds to the stream
    "resid_post": "blocks.{l}.hook_resid_post",  # block output
    "final_scale": "ln_final.hook_scale",  # the final norm's divisor, per position
    # Sandwich / post-norm blocks (Gemma 2/3, OLMo-2; TransformerBridge only): the attention output
    # before the post-attention norm. There hook_attn_out / hook_mlp_out are the norms' outputs,
    # i.e. still what each sublayer adds to the stream.
    "attn_post_in": "blocks.{l}.ln1_post.hook_in",
}

#: Block attribute of each post-sublayer norm on a TransformerBridge (absent in pre-norm blocks).
_POST_NORMS: dict[str, str] = {"attn": "ln1_post", "mlp": "ln2_post"}

# Where the unembedding reads its input, per backend. Slicing this to the last position makes the
# unembedding cost one position instead of T (the method only reads the last position's logits).
_UNEMBED_IN: dict[str, str] = {"bridge": "unembed.hook_in", "hooked": "ln_final.hook_normalized"}


def hook_name(role: str, layer: int | None = None) -> str:
    """The TransformerLens hook name for ``role`` (a key of :data:`HOOKS`) at block ``layer``.

    >>> hook_name("pattern", 3)
    'blocks.3.attn.hook_pattern'
    """
    name = HOOKS[role]
    return name.format(l=layer) if "{l}" in name else name


Backend = Literal["bridge", "hooked"]


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a model as the graph sees it, checked once per call.

    ``n_kv_heads`` is below ``n_heads`` under grouped-query attention; query head ``h`` reads
    key/value head ``h // (n_heads // n_kv_heads)``.
    """

    backend: Backend
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    normalization: str
    #: Where the blocks normalise: ``"pre"`` (``x + f(norm x)``, GPT-2/Llama), ``"sandwich"``
    #: (``x + norm_post(f(norm_pre x))``, Gemma 2/3) or ``"post"`` (``x + norm_post(f(x))``, OLMo-2).
    #: Under a post-attention norm every attention edge passes through that norm linearised at the
    #: clean run (METHOD.md §1; :meth:`CleanRun.attn_post_norm`).
    norm_placement: str = "pre"
    #: How a block composes its sublayers: ``"sequential"`` (``x + attn(ln1 x)``, then ``+ mlp(ln2 ·)``)
    #: or ``"parallel"`` (``x + attn(ln1 x) + mlp(ln2 x)``: GPT-NeoX/Pythia, GPT-J, Phi-1/2), whose
    #: graph has one node per block and position (METHOD.md §1; :class:`tl_strace.graph.EdgeLayout`).
    block_kind: str = "sequential"

    @property
    def parallel(self) -> bool:
        """Whether attention and MLP read the same block input (``block_kind == "parallel"``)."""
        return self.block_kind == "parallel"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"{self.name}: {self.n_heads} query heads do not divide into {self.n_kv_heads} "
                "key/value heads; grouped-query attention needs n_heads % n_kv_heads == 0."
            )

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, stored with every result so a result names the model it came from."""
        return dict(self.__dict__)


_SUPPORTED = "transformer_lens.model_bridge.TransformerBridge (TransformerLens 4.x) or " \
    "transformer_lens.HookedTransformer (TransformerLens <= 3.9)"


def _backend_of(model: object) -> Backend:
    names = {cls.__name__ for cls in type(model).__mro__}
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedTransformer" in names:
        return "hooked"
    raise UnsupportedModelError(
        f"tl_strace cannot trace a {type(model).__module__}.{type(model).__qualname__}. "
        f"Pass a {_SUPPORTED}; for a Hugging Face model `m`, wrap it with "
        "TransformerBridge.boot_transformers(name, hf_model=m, tokenizer=tok), or use tl_strace.load_model."
    )


def describe_model(model: object) -> ModelSpec:
    """Check that ``model`` can be decomposed into the graph of METHOD.md §1 and describe it.

    Refuses, with :class:`UnsupportedModelError`, any model whose blocks are not residual blocks of
    attention and MLP (models without attention or MLP per block, encoder-decoders). These are
    refused rather than approximated; the numerical sum-of-edges check in :func:`clean_run`
    catches what the configuration cannot (unusual blocks).

    Parallel attention/MLP blocks (GPT-NeoX/Pythia, GPT-J, Phi-1/2: ``x + attn(ln1 x) + mlp(ln2 x)``)
    get their own graph, one node per block and position (``spec.block_kind == "parallel"``, METHOD.md
    §1), on both backends (HookedTransformer: ``cfg.parallel_attn_mlp``). Where an attention
    implementation does not read ``hook_pattern`` (TransformerLens 4.3's GPT-J bridge),
    :func:`tl_strace.ablation.verify_attention_masking` refuses the model.

    Sandwich / post-norm blocks (Gemma 2/3: ``x + norm_post(attn(norm_pre x))``; OLMo-2 without the
    pre-norm) are accepted on a TransformerBridge (``spec.norm_placement``): the post-attention norm
    is linearised at the clean run, as the final norm is (METHOD.md §1).
    """
    backend = _backend_of(model)
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .cfg; pass a {_SUPPORTED}.")
    name = str(getattr(cfg, "model_name", None) or type(model).__name__)
    block_kind = _block_kind(model, backend, name)
    if getattr(cfg, "attn_only", False):
        raise UnsupportedModelError(
            f"{name} is attention-only; the s-Trace graph needs an MLP in every block."
        )
    placement = _norm_placement(model, backend)
    if block_kind == "parallel" and placement != "pre":
        raise UnsupportedModelError(
            f"{name} has parallel attention/MLP blocks with post-sublayer norms ({placement}); tl_strace handles "
            "each of the two but not both together. Report this architecture."
        )
    for flag in ("use_normalization_before_and_after", "post_attention_norm", "use_post_attn_norm"):
        if getattr(cfg, flag, False) and placement == "pre":
            where = ("a HookedTransformer exposes no hook on the post-attention norm's input; load it as a "
                     "TransformerBridge (tl_strace.load_model or TransformerBridge.boot_transformers)"
                     if backend == "hooked" else
                     "but its blocks have no ln1_post module with a hook_in to read the attention output "
                     "before that norm; upgrade TransformerLens to a version whose bridge has one")
            raise UnsupportedModelError(
                f"{name} normalises sublayer outputs before adding them ({flag}), and {where}."
            )
    if backend == "hooked":
        _check_hooked(model, name)
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    n_ctx = int(getattr(cfg, "n_ctx", 0) or 0)
    return ModelSpec(
        backend=backend,
        name=name,
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        d_mlp=int(getattr(cfg, "d_mlp", None) or 4 * int(cfg.d_model)),
        d_vocab=int(getattr(cfg, "d_vocab_out", -1) if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab),
        n_ctx=n_ctx if n_ctx > 0 else 2**31 - 1,
        normalization=str(getattr(cfg, "normalization_type", None) or "none"),
        norm_placement=placement,
        block_kind=block_kind,
    )


#: Block classes of TransformerBridge whose attention and MLP both read the block input.
_PARALLEL_BLOCKS: frozenset[str] = frozenset({"ParallelBlockBridge"})


def _block_kind(model: Any, backend: Backend, name: str) -> str:
    """``"parallel"`` or ``"sequential"`` (see :attr:`ModelSpec.block_kind`).

    Parallel when the config says so (``parallel_attn_mlp``) or a bridge block is a
    ``ParallelBlockBridge``: the sum-of-edges checks cannot tell the two apart (both satisfy
    ``resid_post = resid_pre + attn_out + mlp_out``), only what the MLP reads differs.
    """
    cfg = model.cfg
    blocks = list(getattr(model, "blocks", []))
    flags = [type(b).__name__ in _PARALLEL_BLOCKS for b in blocks] if backend == "bridge" else []
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False)) or any(flags)
    if not parallel:
        return "sequential"
    if flags and not all(flags):
        raise UnsupportedModelError(
            f"{name}: only blocks {[l for l, f in enumerate(flags) if f]} are parallel attention/MLP blocks; "
            "tl_strace handles models whose blocks are all alike. Report this architecture."
        )
    return "parallel"


def _norm_placement(model: Any, backend: Backend) -> str:
    """``"pre"``, ``"sandwich"`` or ``"post"`` (see :attr:`ModelSpec.norm_placement`), from the blocks.

    Read from the modules, not the config: TransformerBridge leaves
    ``use_normalization_before_and_after`` False on Gemma 2/3, whose blocks still carry
    ``ln1_post``/``ln2_post``. Only the bridge is inspected (a HookedTransformer has no hook on the
    post-norm's input, see :data:`HOOKS`), and a post-attention norm counts only with its
    ``hook_in``, which :func:`clean_run` reads.
    """
    if backend != "bridge":
        return "pre"
    hooks = getattr(model, "hook_dict", {})
    blocks = list(getattr(model, "blocks", []))
    post = [hook_name("attn_post_in", l) in hooks for l in range(len(blocks))]
    if not any(post):
        return "pre"
    if not all(post):
        raise UnsupportedModelError(
            f"{type(model).__name__}: only blocks {[l for l, p in enumerate(post) if p]} have a post-attention "
            "norm (ln1_post); tl_strace handles models whose blocks are all alike. Report this architecture."
        )
    return "post" if getattr(blocks[0], "ln1", None) is None else "sandwich"


def _permanent_hook_ids(hp: Any) -> set[int]:
    """Ids (in ``hp._forward_hooks`` / ``_backward_hooks``) of the hooks a hook point holds as
    *permanent* (``add_hook(..., is_permanent=True)``). TransformerLens's own adapters install such
    hooks as part of the model (OPT's and XGLM's MLP bridges); ``reset_hooks()`` keeps them."""
    ids: set[int] = set()
    for handle in list(getattr(hp, "fwd_hooks", None) or []) + list(getattr(hp, "bwd_hooks", None) or []):
        if getattr(handle, "is_permanent", False):
            hid = getattr(getattr(handle, "hook", None), "id", None)
            if hid is not None:
                ids.add(hid)
    return ids


def _attached_hooks(model: Any) -> list[str]:
    """Names of hook points that carry forward or backward hooks right now, permanent hooks (part
    of the model, see :func:`_permanent_hook_ids`) aside. Their effect, if any, is still checked by
    the sum-of-edges and full-graph identities on every call."""
    found = []
    for name, hp in getattr(model, "hook_dict", {}).items():
        fwd, bwd = getattr(hp, "_forward_hooks", None), getattr(hp, "_backward_hooks", None)
        if not fwd and not bwd:
            continue
        if (set(fwd or {}) | set(bwd or {})) - _permanent_hook_ids(hp):
            found.append(name)
    return found


#: The hook dicts of an ``nn.Module`` that run on a forward or backward pass. (The
#: ``*_with_kwargs`` / ``*_always_called`` dicts only flag entries of these, so these four see all.)
_RAW_HOOK_DICTS: dict[str, str] = {
    "_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook",
}
#: ``torch.nn.modules.module``'s global hook dicts, which run on every module, and what fills them.
_GLOBAL_HOOK_DICTS: dict[str, str] = {
    "_global_forward_pre_hooks": "register_module_forward_pre_hook",
    "_global_forward_hooks": "register_module_forward_hook",
    "_global_backward_pre_hooks": "register_module_full_backward_pre_hook",
    "_global_backward_hooks": "register_module_full_backward_hook",
}
#: Packages whose own raw hooks are part of a clean model. A model carries them after its first
#: forward passes, whatever the user does, and they only record values or run a hook point:
#: TransformerLens 4.3's ``BlockBridge._maybe_wire_capture_hooks.<locals>._capture_pre_ln1`` /
#: ``_capture_mlp_in`` (forward pre-hooks on each block's ln1/ln2 bridge; the latter runs
#: ``hook_mlp_in``), TransformerLens's ``HookPoint`` hooks (reported by :func:`_attached_hooks`
#: instead), and transformers' ``install_output_capuring_hook.<locals>.output_capturing_hook``
#: (forward hooks on decoder layers and attention modules, installed by ``run_with_cache`` /
#: ``output_attentions``; inactive unless a collector is set). A HookedTransformer (TL <= 3.9) has
#: no raw hooks of its own. Anything else is the user's and is refused.
_OWN_HOOK_PACKAGES: tuple[str, ...] = ("transformer_lens", "transformers")


def _is_own_hook(fn: Any) -> bool:
    """Whether ``fn`` was defined in one of :data:`_OWN_HOOK_PACKAGES` (seen through partials)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    mod = getattr(fn, "__module__", None) or type(fn).__module__ or ""
    return mod.split(".")[0] in _OWN_HOOK_PACKAGES


def _raw_hooks(model: Any) -> list[str]:
    """Raw PyTorch hooks on the model's modules or registered globally, that are not its own.

    Such hooks bypass TransformerLens's hook points, so :func:`model_guard` would not remove them
    and nothing in the method accounts for what they change (METHOD.md §1 assumes the model is the
    function its hook points describe).
    """
    import torch.nn.modules.module as nn_module

    hooked = [(m, attr, kind, fn) for m in model.modules() for attr, kind in _RAW_HOOK_DICTS.items()
              for fn in (getattr(m, attr, None) or {}).values() if not _is_own_hook(fn)]
    found = []
    if hooked:  # name them (rare, so the slower walk over every name is taken only here)
        # A bridge reaches each submodule under two names (``blocks.0.mlp`` and
        # ``blocks.0._original_component.mlp``); report the one a user would write.
        names: dict[int, str] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            best = names.get(id(m))
            if best is None or ("_original_component" in best, len(best)) > ("_original_component" in name, len(name)):
                names[id(m)] = name
        for m, attr, kind, fn in hooked:
            found.append(f"a {kind} {getattr(fn, '__qualname__', type(fn).__name__)!s} on "
                         f"{names.get(id(m)) or '<root>'} ({type(m).__name__})")
    for attr, register in _GLOBAL_HOOK_DICTS.items():
        for fn in (getattr(nn_module, attr, None) or {}).values():
            if not _is_own_hook(fn):
                found.append(f"a global module hook {getattr(fn, '__qualname__', type(fn).__name__)!s} "
                             f"(torch.nn.modules.module.{register})")
    return found


def require_ready(model: Any) -> None:
    """Preconditions on the model's state, checked before any forward pass.

    * eval mode: dropout would make every masked forward a different random model;
    * no hooks attached, at hook points or as raw PyTorch hooks on any submodule (or globally on
      every module): they would silently change what is measured. What no scan can see (a patched
      ``forward``, a stateful module) is caught after the fact by :func:`check_full_graph`.

    Call it inside :func:`exclusive` (the public functions are :func:`serialised`), so that the
    hooks of a concurrent call on the same model are never mistaken for the user's.
    """
    training = sorted({n.split(".")[0] or "<root>" for n, m in model.named_modules() if m.training})
    if training:
        raise InputError(
            f"The model is in training mode (dropout active in: {', '.join(training[:5])}"
            f"{', ...' if len(training) > 5 else ''}); s-Trace needs a deterministic model. Call model.eval() first."
        )
    attached = _attached_hooks(model)
    if attached:
        raise InputError(
            f"The model has hooks attached at {', '.join(attached[:5])}{', ...' if len(attached) > 5 else ''}; "
            "they would change what s-Trace measures. Remove them with model.reset_hooks() "
            "(or run tl_strace outside your own `with model.hooks(...)` block)."
        )
    raw = _raw_hooks(model)
    if raw:
        raise InputError(
            f"The model has raw PyTorch hooks outside TransformerLens's hook points: {'; '.join(raw[:3])}"
            f"{f'; and {len(raw) - 3} more' if len(raw) > 3 else ''}. They would change what s-Trace measures "
            "without it knowing; remove each with the handle its register_*_hook call returned "
            "(handle.remove()), or use TransformerLens hook points (model.hooks(...)) outside tl_strace calls."
        )
    # (named by the bridge's user-facing path: "blocks.0.mlp", not "blocks.0._original_component.mlp")
    # TransformerLens's own adapters may patch a forward as part of the model (Falcon's decoder
    # layers: ``_patch_decoder_inplace_add.<locals>.patched_forward``): allowed like its own hooks.
    patched = list(dict.fromkeys((n.replace("._original_component", "") or "<root>")
                                 for n, m in model.named_modules()
                                 if "forward" in vars(m) and not _is_own_hook(vars(m)["forward"])))
    if patched:
        raise InputError(
            f"The model has its forward replaced on the instance at {', '.join(patched[:5])}"
            f"{', ...' if len(patched) > 5 else ''} (module.forward = ...); s-Trace would trace the patched "
            "function without knowing it. Restore the original (del module.forward) or express the change "
            "as a TransformerLens hook outside tl_strace calls."
        )
    _require_loaded_weights(model)


def _require_loaded_weights(model: Any) -> None:
    """Refuse weights that cannot give a meaningful forward: on the meta device (never loaded), or
    of several floating dtypes (a partly converted model: ``model.blocks[1].half()``), which fails
    inside the first matrix product or, worse, computes in mixed precision."""
    meta: list[str] = []
    dtypes: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            meta.append(name)
        if p.dtype.is_floating_point:
            dtypes.setdefault(p.dtype, name)
    if meta:
        raise InputError(
            f"{len(meta)} parameters of the model are on the meta device (e.g. {meta[0]}): its weights were "
            "never loaded. Load the model with its weights (e.g. tl_strace.load_model or boot_transformers) first."
        )
    if len(dtypes) > 1:
        desc = ", ".join(f"{str(d).replace('torch.', '')} (e.g. {n})" for d, n in dtypes.items())
        raise InputError(
            f"The model's parameters have several floating dtypes: {desc}. Convert the whole model to one "
            "dtype first, e.g. model.to(torch.float32)."
        )


# ---------------------------------------------------------------------------------------------
# One call at a time per model
# ---------------------------------------------------------------------------------------------
#: One re-entrant lock per model object, dropped with the model. Guarded by :data:`_LOCKS_GUARD`
#: (a WeakKeyDictionary is not safe to insert into from several threads at once).
_LOCKS: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Any) -> Any:
    """The model's lock, made on first use; ``None`` for an object that cannot be a model (not
    weak-referenceable or not hashable), which :func:`describe_model` then refuses."""
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = _LOCKS[model] = threading.RLock()
        except TypeError:
            return None
    return lock


@contextlib.contextmanager
def exclusive(model: Any) -> Iterator[None]:
    """Hold ``model``'s lock for the block: one tl_strace call at a time runs on a model.

    Every call adds hooks to the model's hook points and :func:`model_guard` clears them all on
    exit, so two calls overlapping on one model would remove, or run, each other's hooks and
    return wrong numbers without an error. Calls on different models take different locks and
    run in parallel. The lock is re-entrant: a call made while this thread holds it (a public
    function used inside another) does not wait.
    """
    lock = _model_lock(model)
    if lock is None:
        yield
        return
    with lock:
        yield


def serialised(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a public function whose first argument (``model``) is a model: the whole call,
    from its first check of the model to its last forward pass, runs under :func:`exclusive`."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        model = args[0] if args else kwargs.get("model")
        with exclusive(model):
            return fn(*args, **kwargs)

    return call


def check_full_graph(spec: ModelSpec, clean: Float[Tensor, "vocab"], kept: Float[Tensor, "vocab"],
                     logit_scale: float, dtype: torch.dtype) -> float:
    """Check that a masked forward keeping every edge (or component) reproduces the clean run.

    ``clean`` and ``kept`` are last-position log-probabilities of the clean run and of the
    all-kept masked row; ``logit_scale`` is ``max |logit|`` of the clean run. Every mask of that row
    is an exact identity (patterns times 1, the skip minus 0), so the two differ only by the
    rounding of a batched forward against a single one. Anything else means the model is not the
    function its hook points describe: a raw hook :func:`require_ready` could not see, a submodule
    patched outside TransformerLens, a stateful or batch-dependent module, or nondeterminism; then
    every stratum is wrong, and :class:`DecompositionError` is raised. Returns the error.

    The bound is relative to the logits' magnitude, as :func:`tl_strace.graph.check_decomposition`'s
    is to the streams': 1e-4 in float32 (measured: ≲ 2e-6 relative on the tiny test models and
    SmolLM2, whose logits reach ~30; a leak between batch rows measured 1e-2 or more) and 2e-2 in
    reduced precision (bf16 has ~3e-3 relative rounding per operation).
    """
    rel = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    tol = rel * max(1.0, float(logit_scale))
    err = float((kept.float() - clean.float().to(kept.device)).abs().max())
    if not err <= tol:
        raise DecompositionError(
            f"{spec.name}: the model's output is not reproduced by keeping every edge (max |log-prob "
            f"difference| {err:.3g} against a tolerance of {tol:.3g}), so every stratum's numbers would be wrong. "
            "Likely causes: a raw PyTorch hook or a module patched outside TransformerLens's hook points "
            "(e.g. a replaced forward or activation), another thread running this model outside tl_strace "
            "during the call (tl_strace's lock serialises only its own calls), or a stateful / nondeterministic "
            "model; remove the cause (handle.remove(), reload the model, or join the other thread) and retry."
        )
    return err


@contextlib.contextmanager
def model_guard(model: Any) -> Iterator[None]:
    """Run a block with gradients off and the model's state restored afterwards, whatever happens.

    On exit (normal or exception) every hook point is left without hooks: tl_strace only ever adds
    hooks inside this block, and :func:`require_ready` has checked there were none before. The
    grad-enabled flag and the model's ``training`` flags are saved and restored too.
    """
    modes = [(m, m.training) for m in model.modules()]
    grad = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(False)
        yield
    finally:
        torch.set_grad_enabled(grad)
        for m, mode in modes:
            if m.training != mode:
                m.train(mode)
        if _attached_hooks(model):  # only ever tl_strace's own temporary hooks (require_ready)
            model.reset_hooks(including_permanent=False)


def run_hooked(model: Any, tokens: Tensor, hooks: Sequence[tuple[str, Callable[..., Any]]], *,
               backend: Backend, last_only: bool = True) -> Tensor:
    """One forward pass with ``hooks``; returns logits ``[batch, vocab]`` at the last position.

    The hooks live only inside TransformerLens's own ``model.hooks`` context, which removes them on
    every exit path. With ``last_only`` the unembedding input is sliced to the last position first,
    which saves the T·d_model·d_vocab unembedding of positions nobody reads.
    """
    fwd = list(hooks)
    if last_only:
        fwd.append((_UNEMBED_IN[backend], _keep_last))
    # No KV cache: HF models build one by default (config.use_cache), which keeps every block's
    # keys and values of every row alive for the whole forward (11 MiB a row on GPT-2 small at 150
    # tokens); nothing here decodes further tokens.
    kwargs = {"use_cache": False} if backend == "bridge" else {}
    try:
        ctx = model.hooks(fwd_hooks=fwd)
        ctx.__enter__()
    except KeyError as e:  # a hook point this architecture's TransformerLens adapter does not expose
        missing = next((n for n, _ in fwd if n not in getattr(model, "hook_dict", {}) and n not in getattr(model, "mod_dict", {})), None)
        raise UnsupportedModelError(
            f"{getattr(model.cfg, 'model_name', type(model).__name__)}: TransformerLens does not expose the hook point "
            f"{missing or str(e)!r} on this architecture, and s-Trace needs it to read or mask the graph; "
            "this model cannot be traced (see docs/architectures.md for the architectures that can)."
        ) from e
    try:
        logits = model(tokens, **kwargs)
    finally:
        ctx.__exit__(None, None, None)
    return logits[:, -1, :]


def _keep_last(x: Tensor, hook: Any) -> Tensor:
    return x[:, -1:, :]


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------
def prepare_tokens(model: Any, spec: ModelSpec, inp: Any, *,
                   prepend_bos: bool | None = None) -> Int[Tensor, "pos"]:
    """Turn text or tokens into one checked 1-D token tensor on the model's device.

    Text is tokenized with the model's own ``to_tokens`` (so BOS handling follows the model's
    TransformerLens defaults unless ``prepend_bos`` says otherwise). Tokens may be ``[pos]`` or
    ``[1, pos]`` (a tensor, a NumPy array or a list of ints); they are used as given. Everything
    else (bytes, ragged or string lists, complex or float ids, tensors on the meta device) is an
    :class:`InputError` here, before any forward pass.
    """
    prepend_bos = check_optional_bool("prepend_bos", prepend_bos)
    if isinstance(inp, (bytes, bytearray, memoryview)):
        raise InputError(f"The input is {type(inp).__name__}, not text; decode it first, e.g. "
                         "input=data.decode('utf-8'), or pass token ids as a tensor.")
    if isinstance(inp, str):
        if not inp.strip():
            raise InputError("The input text is empty (or only whitespace); give at least one word to predict from.")
        if getattr(model, "tokenizer", None) is None:
            raise InputError(
                "This model has no tokenizer, so text cannot be tokenized; pass a token tensor instead "
                "(e.g. torch.tensor([[1, 2, 3]]))."
            )
        kwargs: dict[str, Any] = {"truncate": False}  # TL truncates to n_ctx silently by default
        if prepend_bos is not None:
            kwargs["prepend_bos"] = prepend_bos
        tokens = model.to_tokens(inp, **kwargs)
    else:
        tokens = _as_token_tensor(inp)
    if tokens.numel() == 0:  # before the dtype: torch.as_tensor([]) is float32
        raise InputError("The token sequence is empty; give at least one token.")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(f"Tokens must be integers, got dtype {tokens.dtype}; pass integer token ids "
                         "(e.g. torch.tensor([1, 2, 3]) or model.to_tokens(text)).")
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise InputError(
            f"Expected one sequence of tokens, shaped [pos] or [1, pos]; got shape {tuple(tokens.shape)}. "
            "Trace one input per call (or use tl_strace's corpus runner for many)."
        )
    if tokens.numel() == 0:
        raise InputError("The token sequence is empty; give at least one token.")
    if tokens.numel() > spec.n_ctx:
        raise InputError(
            f"The input is {tokens.numel()} tokens long but {spec.name} has a context of {spec.n_ctx} tokens; "
            "shorten the text (the method predicts the token after the last one, so keep the end)."
        )
    if int(tokens.min()) < 0 or int(tokens.max()) >= spec.d_vocab:
        raise InputError(f"Token ids must lie in the vocabulary [0, {spec.d_vocab}) of {spec.name}; got {int(tokens.min())}..{int(tokens.max())}.")
    device = _model_device(model)
    return tokens.to(device=device, dtype=torch.long)


def _token_list_error(inp: Any) -> str | None:
    """Why a (nested) Python list of token ids is unusable, or None: ragged rows, strings, bools,
    floats or complex numbers, found before ``torch.as_tensor`` coerces or fails on them."""
    import numbers

    import numpy as np

    def walk(x: Any, depth: int) -> tuple[int, ...] | str:
        if isinstance(x, (str, bytes)):
            return (f"a token list holds {type(x).__name__} {x!r:.40}; pass text as one string, or token ids as "
                    "integers")
        if isinstance(x, (bool, np.bool_)):
            return f"a token list holds the bool {x!r}; token ids are integers"
        if isinstance(x, numbers.Integral) or (isinstance(x, (Tensor, np.ndarray)) and x.ndim == 0):
            return ()
        if isinstance(x, numbers.Number):
            return f"a token list holds {x!r} ({type(x).__name__}); token ids are integers"
        if isinstance(x, (Tensor, np.ndarray)):
            return tuple(x.shape)
        if not isinstance(x, Sequence) or depth > 2:
            return f"a token list holds {type(x).__name__}; token ids are integers"
        shapes = [walk(e, depth + 1) for e in x]
        for s in shapes:
            if isinstance(s, str):
                return s
        if len(set(shapes)) > 1:
            return ("the token lists are ragged (rows of different lengths); trace one sequence per call, shaped "
                    "[pos] or [1, pos]")
        return (len(x), *(shapes[0] if shapes else ()))

    found = walk(inp, 0)
    return found if isinstance(found, str) else None


def _as_token_tensor(inp: Any) -> Tensor:
    """Token ids given as a tensor, a NumPy array or a list, as a tensor (same device); refuses what
    is not readable as integer ids with a one-line :class:`InputError`."""
    if isinstance(inp, Tensor):
        if inp.device.type == "meta":
            raise InputError("The tokens are on the meta device (shapes only, no values); create them on the CPU "
                             "or the model's device, e.g. torch.tensor([1, 2, 3]).")
        return inp
    if isinstance(inp, (list, tuple)):
        why = _token_list_error(inp)
        if why is not None:
            raise InputError(f"Cannot read the tokens: {why}.")
    try:
        return torch.as_tensor(inp)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"The input must be text or token ids ([pos] or [1, pos] integers); got "
                         f"{type(inp).__name__} ({str(e).splitlines()[0][:120]}).") from e


def target_token(model: Any, spec: ModelSpec, target: Any) -> int | None:
    """The true next token as an id: given as an id, or as text whose first token is used
    (tokenized without BOS, so ``" Paris"`` keeps its leading space). A one-element integer tensor
    is an id; floats, bools and longer tensors are refused (:func:`tl_strace.checks.check_target`)."""
    target = check_target(target)
    if target is None:
        return None
    if isinstance(target, str):
        if getattr(model, "tokenizer", None) is None:
            raise InputError("The model has no tokenizer; give the target as a token id.")
        ids = model.to_tokens(target, prepend_bos=False)[0]
        if ids.numel() == 0:
            raise InputError(f"The target {target!r} tokenizes to nothing.")
        unk_id, unk = getattr(model.tokenizer, "unk_token_id", None), getattr(model.tokenizer, "unk_token", None)
        if unk_id is not None and int(ids[0]) == int(unk_id) and target.strip() != str(unk):
            raise InputError(f"The target {target!r} is not in {spec.name}'s vocabulary: its first token is the "
                             f"unknown token {unk!r} (id {unk_id}); give a word the tokenizer knows, or a token id.")
        return int(ids[0])
    t = int(target)
    if not 0 <= t < spec.d_vocab:
        raise InputError(f"Target token id {t} is outside the vocabulary [0, {spec.d_vocab}).")
    return t


def _model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


#: Values sampled per tensor by :func:`weights_fingerprint` (evenly strided, first and last included).
_FINGERPRINT_SAMPLES = 16384


def weights_fingerprint(model: Any) -> str:
    """SHA-256 (hex) identifying a model by its weights, not its name.

    Every parameter and floating buffer enters by name, shape and dtype and an evenly strided
    sample of :data:`_FINGERPRINT_SAMPLES` of its values (all of them for smaller tensors). Two
    checkpoints of one architecture (a fine-tune, another training step, one retrained block) differ
    in nearly every weight, so they get different fingerprints, while the cost stays a gather per
    tensor (tens of milliseconds for a 135M model on a CPU). No reduction enters the hash, so the
    fingerprint does not depend on the thread count. Used to tie mean caches and corpus run
    directories to the model that made them.
    """
    h = hashlib.sha256()
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.dtype.is_floating_point]
    for name, t in sorted(named, key=lambda nt: nt[0]):
        x = t.detach()
        h.update(f"{name}|{tuple(x.shape)}|{x.dtype}|".encode())
        flat = x.reshape(-1)
        if flat.numel():
            n = min(_FINGERPRINT_SAMPLES, flat.numel())
            idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
            h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of the model's parameters (masks are built in it)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def str_tokens(model: Any, tokens: Int[Tensor, "pos"]) -> list[str]:
    """Token strings for display; ``"<id>"`` placeholders when the model has no tokenizer."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{int(t)}>" for t in tokens]
    return [tok.decode([int(t)]) for t in tokens]


# ---------------------------------------------------------------------------------------------
# Weights the graph needs
# ---------------------------------------------------------------------------------------------
def attention_output(model: Any, spec: ModelSpec, layer: int) -> tuple[Float[Tensor, "head d_head d_model"], Float[Tensor, "d_model"]]:
    """``W_O`` split per query head and the output bias ``b_O`` (zeros when the model has none)."""
    attn = model.blocks[layer].attn
    W_O = attn.W_O
    if W_O.ndim == 2:  # [head*d_head, d_model]
        W_O = W_O.reshape(spec.n_heads, spec.d_head, spec.d_model)
    try:
        b_O = attn.b_O
    except Exception:  # the bridge raises when a bias-free projection is asked for its bias
        b_O = None
    if b_O is None:
        b_O = torch.zeros(spec.d_model, dtype=W_O.dtype, device=W_O.device)
    return W_O, b_O


def final_norm_params(model: Any, spec: ModelSpec) -> tuple[Tensor | None, Tensor | None, bool]:
    """The final norm's elementwise weight, bias and whether it centres (LayerNorm) or not (RMSNorm).

    The linearised final norm (METHOD.md §1) is ``u ↦ centre(u) / scale · w``, with ``scale`` frozen at
    the clean run; the bias is a constant of the output node. :func:`clean_run` checks the result
    against the model's own ``ln_final`` output and refuses the model if they differ.
    """
    ln = model.ln_final
    if spec.backend == "bridge":
        inner = getattr(ln, "original_component", ln)
        w = getattr(inner, "weight", None)
        b = getattr(inner, "bias", None)
        centre = spec.normalization.upper().startswith("LN")
        if not centre:  # RMSNorm: read what the module multiplies by (Gemma's is 1 + weight)
            w, b = rms_affine(inner, spec.d_model, model_dtype(model), _model_device(model))
    else:
        w, b, centre = _hooked_final_norm(ln, spec)
    return w, b, centre


#: Magnitude of the probe vectors :func:`rms_affine` feeds a norm: the RMS of ``±c·1`` is
#: ``sqrt(c² + eps)``, which is ``c`` to a relative ``eps / 2c²`` (≈ 1e-10 for eps = 1e-6); 64² also
#: stays far inside the float16 range.
_PROBE = 64.0


def rms_affine(module: Any, d_model: int, dtype: torch.dtype, device: torch.device
               ) -> tuple[Float[Tensor, "d_model"], Float[Tensor, "d_model"]]:
    """The effective elementwise weight and bias of an RMSNorm module, whatever its convention.

    RMSNorm is ``u ↦ u / rms(u) · w + b``, with ``w`` stored as ``weight`` (Llama, OLMo-2) or as
    ``weight - 1`` (Gemma's ``1 + weight``). Rather than trusting a convention, the module is fed
    ``+c·1`` and ``−c·1`` (both of RMS ``c``): ``w = (out₊ − out₋) / 2`` and ``b = (out₊ + out₋) / 2``.
    The identities of :func:`tl_strace.graph.check_decomposition` then verify the result at every
    position of the clean run.
    """
    x = torch.full((2, 1, d_model), _PROBE, dtype=dtype, device=device)
    x[1] = -_PROBE
    with torch.no_grad():
        out = module(x).reshape(2, d_model).float()
    return (out[0] - out[1]) / 2, (out[0] + out[1]) / 2


@dataclass(frozen=True)
class PostNorm:
    """A post-sublayer norm of every block, linearised at the clean run (METHOD.md §1).

    The block adds ``norm_post(a)`` to the stream, where ``a`` is the sublayer's own output; with
    the norm's scale frozen per position it is ``a[l, t] · w[l] · gain[l, t] + b[l]``, exactly, at the
    clean run. Every edge vector of that sublayer is multiplied by ``w · gain`` (:meth:`linear`);
    ``b`` is a constant of the node, like ``b_O``.
    """

    inp: Float[Tensor, "layer pos d_model"]
    """What the norm read at the clean run: the sublayer's output before the norm."""
    w: Float[Tensor, "layer d_model"]
    """The effective elementwise weight (Gemma's ``1 + weight``), see :func:`rms_affine`."""
    b: Float[Tensor, "layer d_model"]
    gain: Float[Tensor, "layer pos"]
    """``1 / scale`` per position, read from the norm's own input and output at the clean run."""

    def linear(self, u: Float[Tensor, "layer pos *rest d_model"]) -> Float[Tensor, "layer pos *rest d_model"]:
        """The norm's linear part at the clean run: ``u[l, t, ...] · w[l] · gain[l, t]``."""
        extra = (1,) * (u.ndim - 3)
        L, T = self.gain.shape
        return u * self.gain.reshape(L, T, *extra, 1) * self.w.reshape(L, 1, *extra, -1)


def _hf_module(mod: Any) -> Any:
    """The Hugging Face module a bridge component wraps (called without the bridge's hook points)."""
    inner = getattr(mod, "original_component", None)
    return mod if inner is None else inner


def _post_norm(model: Any, spec: ModelSpec, kind: str, inp: Float[Tensor, "layer pos d_model"],
               out: Float[Tensor, "layer pos d_model"]) -> PostNorm:
    """Linearise the post-``kind`` norm of every block from what it read (``inp``) and wrote (``out``).

    ``w``/``b`` come from the module (:func:`rms_affine`); the frozen ``gain`` at position ``t`` is
    the least-squares ratio ``<out − b, inp·w> / <inp·w, inp·w>``, which is exactly ``1 / rms`` for
    an RMSNorm, whatever its eps or the hook conventions (0 where the norm read a zero vector).
    """
    dtype, device = model_dtype(model), _model_device(model)
    ws, bs = [], []
    for l in range(spec.n_layers):
        mod = getattr(model.blocks[l], _POST_NORMS[kind])
        w, b = rms_affine(_hf_module(mod), spec.d_model, dtype, device)
        ws.append(w.to(inp.device))
        bs.append(b.to(inp.device))
    w, b = torch.stack(ws), torch.stack(bs)
    u = inp * w[:, None, :]
    num = ((out - b[:, None, :]) * u).sum(-1)
    den = (u * u).sum(-1)
    gain = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return PostNorm(inp=inp, w=w, b=b, gain=gain)


def attention_without_heads(model: Any, spec: ModelSpec, layer: int,
                            b_O: Float[Tensor, "d_model"]) -> Float[Tensor, "d_model"]:
    """What ``blocks.{layer}.hook_attn_out`` holds when every head is removed (pattern or ``z``
    zeroed): ``b_O``, passed through the block's post-attention norm where it has one (0 for a
    bias-free attention under an RMSNorm). The reference of the masking self-checks."""
    if spec.norm_placement == "pre":
        return b_O
    mod = getattr(model.blocks[layer], _POST_NORMS["attn"])
    fn = _hf_module(mod)
    with torch.no_grad():
        out = fn(b_O[None, None].to(device=_model_device(model), dtype=model_dtype(model)))
    return out.reshape(-1).float().to(b_O.device)


# ---------------------------------------------------------------------------------------------
# The clean run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CleanRun:
    """Activations of one clean forward pass, exactly what the graph of METHOD.md §1 is built from.

    All float tensors are float32 copies (weights and metrics are computed in float32 whatever
    the model's dtype). ``norm_w``/``norm_b``/``norm_centre`` plus ``final_scale`` define the
    linearised final norm applied to the last block's edge vectors.
    """

    spec: ModelSpec
    tokens: Int[Tensor, "pos"]
    resid_pre: Float[Tensor, "layer pos d_model"]
    attn_out: Float[Tensor, "layer pos d_model"]
    mlp_out: Float[Tensor, "layer pos d_model"]
    resid_post: Float[Tensor, "layer pos d_model"]
    pattern: Float[Tensor, "layer head pos pos_src"]
    v: Float[Tensor, "layer pos kv_head d_head"]
    z: Float[Tensor, "layer pos head d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    final_scale: Float[Tensor, ""]
    final_out: Float[Tensor, "d_model"]
    norm_w: Float[Tensor, "d_model"]
    norm_b: Float[Tensor, "d_model"]
    norm_centre: bool
    logits: Float[Tensor, "vocab"]
    attn_post: PostNorm | None = None
    """The post-attention norm linearised at the clean run (sandwich / post-norm blocks), else None.
    ``attn_out`` is then that norm's output (what the block adds to the stream) and
    ``attn_post.inp`` the attention's own output ``Σ_h z_h @ W_O[h] + b_O``."""

    @property
    def resid_mid(self) -> Float[Tensor, "layer pos d_model"]:
        """The stream between the sublayers, as the sum the method defines it to be."""
        return self.resid_pre + self.attn_out

    def attn_post_norm(self, u: Float[Tensor, "layer pos *rest d_model"]) -> Float[Tensor, "layer pos *rest d_model"]:
        """What the block adds to the stream for an attention contribution ``u[l, t]`` (a head's
        ``z_h @ W_O[h]``, one source's, ...): ``u`` through the post-attention norm linearised at
        the clean run, its bias left out (a node constant, :attr:`attn_const`); ``u`` itself in
        pre-norm blocks."""
        return u if self.attn_post is None else self.attn_post.linear(u)

    @property
    def attn_const(self) -> Float[Tensor, "layer pos d_model"]:
        """The constant term of each attention node (in no edge): ``b_O``, through the linearised
        post-attention norm plus that norm's bias where there is one."""
        L, T, d = self.attn_out.shape
        const = self.attn_post_norm(self.b_O[:, None, :].expand(L, T, d))
        return const if self.attn_post is None else const + self.attn_post.b[:, None, :]

    def final_norm(self, u: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        """The linear part of the final norm with its scale frozen at the clean run's last position."""
        if self.norm_centre:
            u = u - u.mean(dim=-1, keepdim=True)
        return u / self.final_scale * self.norm_w


def clean_run(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"]) -> CleanRun:
    """One forward pass on ``tokens`` that records what the graph needs (no gradients).

    Raises :class:`InputError` when the model's logits are not finite (NaN/inf: a broken or
    overflowing model, often fp16 without enough range).
    """
    L = spec.n_layers
    store: dict[tuple[str, int], Tensor] = {}

    def saver(role: str, layer: int) -> Callable[[Tensor, Any], None]:
        def hook(x: Tensor, hook: Any) -> None:
            store[(role, layer)] = x.detach()[0].float().clone()
        return hook

    keys = [(r, l) for l in range(L) for r in ("resid_pre", "pattern", "v", "z", "attn_out", "mlp_out", "resid_post")]
    keys.append(("final_scale", -1))
    post = spec.norm_placement != "pre"
    if post:
        keys += [("attn_post_in", l) for l in range(L)]
    hooks = [(hook_name(r, l if l >= 0 else None), saver(r, l)) for r, l in keys]
    with model_guard(model):
        logits = run_hooked(model, tokens[None], hooks, backend=spec.backend, last_only=False)[0].float()
        # A hook point that exists but never fires (some TransformerLens adapters delegate a whole
        # sublayer to the HF module: GPT-J's attention under TransformerLens 3.9's bridge) would
        # otherwise surface as a KeyError; name it instead.
        silent = [name for (name, _), key in zip(hooks, keys) if key not in store]
        if silent:
            raise UnsupportedModelError(
                f"{spec.name}: the hook point {silent[0]} never fired during a forward pass "
                f"({len(silent)} hook points silent), so this TransformerLens adapter does not expose what the "
                "s-Trace graph reads and edits; tl_strace refuses the model. Try another TransformerLens version "
                "or backend (HookedTransformer / TransformerBridge)."
            )
        # The last position's normalised state, recomputed from what the unembedding read.
        final_out = _final_out(model, spec, store[("resid_post", L - 1)][-1], store[("final_scale", -1)][-1])
        W_O, b_O = zip(*(attention_output(model, spec, l) for l in range(L)))
        w, b, centre = final_norm_params(model, spec)
        attn_post = None
        if post:
            attn_out = torch.stack([store[("attn_out", l)] for l in range(L)])
            raw = torch.stack([store.pop(("attn_post_in", l)) for l in range(L)])
            attn_post = _post_norm(model, spec, "attn", raw, attn_out)
    if not torch.isfinite(logits).all():
        raise InputError(
            f"{spec.name} produced non-finite logits (NaN or inf) on this input; s-Trace compares distributions "
            "and cannot proceed. Check the model weights, or run it in float32 (fp16 overflows easily)."
        )
    d = spec.d_model
    # pop while stacking: at most one role is held twice (the per-layer copies and the stack)
    stack = lambda role: torch.stack([store.pop((role, l)) for l in range(L)])  # noqa: E731
    scale = store[("final_scale", -1)][-1].reshape(-1)
    if scale.numel() != 1:
        raise UnsupportedModelError(f"{spec.name}: ln_final.hook_scale is not one number per position.")
    return CleanRun(
        spec=spec,
        tokens=tokens,
        resid_pre=stack("resid_pre"),
        attn_out=stack("attn_out"),
        mlp_out=stack("mlp_out"),
        resid_post=stack("resid_post"),
        pattern=stack("pattern"),
        v=_per_kv_head(stack("v"), spec),
        z=stack("z"),
        W_O=torch.stack([x.detach().float() for x in W_O]),
        b_O=torch.stack([x.detach().float() for x in b_O]),
        final_scale=scale[0],
        final_out=final_out,
        norm_w=(w.detach().float() if w is not None else torch.ones(d, device=logits.device)),
        norm_b=(b.detach().float() if b is not None else torch.zeros(d, device=logits.device)),
        norm_centre=centre,
        logits=logits,
        attn_post=attn_post,
    )


def _final_out(model: Any, spec: ModelSpec, x_last: Tensor, scale: Tensor) -> Tensor:
    """What the model's own final norm gives for the last position (the reference to check against)."""
    ln = model.ln_final
    inner = getattr(ln, "original_component", None) if spec.backend == "bridge" else None
    fn = inner if inner is not None else ln
    with torch.no_grad():
        out = fn(x_last[None, None].to(model_dtype(model)))
    return out.reshape(-1).float()


# ---------------------------------------------------------------------------------------------
# Adapters for the legacy HookedTransformer backend (TransformerLens <= 3.9)
#
# Everything above is one code path over the hook names both backends share (:data:`HOOKS`).
# HookedTransformer differs from the bridge in only these places, each handled here:
#
# * where the unembedding reads (``ln_final.hook_normalized``, not ``unembed.hook_in``): the
#   ``_UNEMBED_IN`` table above;
# * its final norm's parameters are ``ln_final.w`` / ``ln_final.b`` and its kind is its class
#   (``final_rms=True`` gives an RMSNorm under ``normalization_type="LN"``); with processed weights
#   (``fold_ln``) it is ``LayerNormPre`` / ``RMSNormPre`` with no parameters at all, the weight
#   having been folded into ``W_U``: the linearised final norm is then ``centre(u)/scale`` (LN) or
#   ``u/scale`` (RMS) and the output node is that, exactly (:func:`_hooked_final_norm`);
# * ``W_O`` is already ``[head, d_head, d_model]`` and ``b_O`` always exists (it carries the
#   value biases after ``fold_value_biases``): :func:`attention_output` reads both as they are;
# * under grouped-query attention ``hook_v`` has one head per key/value head, except with
#   ``cfg.ungroup_grouped_query_attention`` where TransformerLens repeats each key/value head for
#   its query heads first (:func:`_per_kv_head` undoes that);
# * a model built with ``normalization_type=None`` has no ``ln_final`` (:func:`_check_hooked`).
# ---------------------------------------------------------------------------------------------
#: HookedTransformer final-norm classes and whether they subtract the mean.
_HOOKED_NORM_CENTRES: dict[str, bool] = {
    "LayerNorm": True, "LayerNormPre": True, "RMSNorm": False, "RMSNormPre": False,
}


def _check_hooked(model: Any, name: str) -> None:
    """Refuse a HookedTransformer whose final norm tl_strace cannot linearise."""
    ln = getattr(model, "ln_final", None)
    kind = type(ln).__name__
    if kind not in _HOOKED_NORM_CENTRES:
        raise UnsupportedModelError(
            f"{name}: its final norm is {'missing' if ln is None else kind} "
            f"(normalization_type={getattr(model.cfg, 'normalization_type', None)!r}); tl_strace needs one of "
            f"{', '.join(_HOOKED_NORM_CENTRES)} as ln_final to define the output node."
        )


def _hooked_final_norm(ln: Any, spec: ModelSpec) -> tuple[Tensor | None, Tensor | None, bool]:
    """``(w, b, centre)`` of a HookedTransformer's ``ln_final``; ``w``/``b`` are None once folded."""
    centre = _HOOKED_NORM_CENTRES.get(type(ln).__name__, spec.normalization.upper().startswith("LN"))
    return getattr(ln, "w", None), getattr(ln, "b", None), centre


def _per_kv_head(v: Float[Tensor, "layer pos v_head d_head"], spec: ModelSpec) -> Float[Tensor, "layer pos kv_head d_head"]:
    """Values with one head per key/value head, as the graph indexes them (query head h reads kv(h)).

    A HookedTransformer with ``ungroup_grouped_query_attention`` hooks ``v`` after repeating each
    key/value head ``n_heads // n_kv_heads`` times (``repeat_interleave``); the copies are equal,
    so the first of each group is the key/value head.
    """
    n = v.shape[2]
    if n == spec.n_kv_heads:
        return v
    if n == spec.n_heads:
        return v[:, :, :: spec.n_heads // spec.n_kv_heads]
    raise UnsupportedModelError(
        f"{spec.name}: attn.hook_v has shape [{', '.join(map(str, v.shape[1:]))}] per layer, not "
        f"[pos, {spec.n_kv_heads} key/value heads (or {spec.n_heads} query heads), {spec.d_head}]; the values "
        "are laid out differently (e.g. multi-head latent attention), so tl_strace cannot tell which head "
        "each value belongs to and refuses the model."
    )


def clean_patterns(model: Any, tokens: Int[Tensor, "pos"], *, n_layers: int, n_heads: int,
                   name: str | None = None) -> Float[Tensor, "layer head pos pos_src"]:
    """The clean attention patterns of ``tokens``, by one forward pass, on CPU.

    For views of a result traced earlier: the model must have the result's architecture
    (``n_layers`` × ``n_heads`` and, when given, its name) and be ready (no foreign hooks), checked
    before the forward pass; the call holds the model's lock like every tl_strace call
    (:func:`exclusive`). Views never run the model themselves: a caller computes the patterns here
    (``StraceResult.clean_patterns(model)``) and passes them.
    """
    with exclusive(model):
        spec = describe_model(model)
        if (spec.n_layers, spec.n_heads) != (int(n_layers), int(n_heads)) or (name is not None and spec.name != name):
            raise InputError(f"This result was traced on {name!r} ({n_layers} layers × {n_heads} heads) "
                             f"but the model given is {spec.name!r} ({spec.n_layers} × {spec.n_heads}); "
                             "pass the model the result was traced with.")
        require_ready(model)
        run = clean_run(model, spec, tokens.to(_model_device(model)))
    return run.pattern.cpu()
