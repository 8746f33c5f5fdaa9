"""Before and around every call: no foreign hooks, dropout or meta weights (:func:`require_ready`), one
call at a time per model (:func:`exclusive`), the saved-settings guard and hooked runs, the full-graph check."""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from jaxtyping import Float
from typing import Any

import torch
from torch import Tensor

from tl_strace.errors import DecompositionError, InputError, UnsupportedModelError
from tl_strace.model.spec import Backend, ModelSpec, _UNEMBED_IN


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
               backend: Backend, last_only: bool = True, every_position: bool = False) -> Tensor:
    """One forward pass with ``hooks``; returns logits ``[batch, vocab]`` at the last position, or
    with ``every_position`` (which needs ``last_only=False``) ``[batch, pos, vocab]`` at every position.

    The hooks live only inside TransformerLens's own ``model.hooks`` context, which removes them on
    every exit path. With ``last_only`` the unembedding input is sliced to the last position first,
    which saves the T·d_model·d_vocab unembedding of positions nobody reads.
    """
    if every_position and last_only:
        raise ValueError("every_position needs last_only=False (the unembedding of every position)")
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
    return logits if every_position else logits[:, -1, :]


def _keep_last(x: Tensor, hook: Any) -> Tensor:
    return x[:, -1:, :]
