"""Everything tl_strace knows about a TransformerLens model, in one place.

This module is the only one that touches a model object. It holds

* the hook-name table (:data:`HOOKS`): the TransformerLens hook points the method reads and edits,
  by their legacy names, which both ``TransformerBridge`` (TL 4.x) and ``HookedTransformer`` (TL 3.x)
  answer to;
* :func:`describe_model`: the architecture checks that refuse a model the graph of METHOD.md §1
  cannot describe exactly (parallel attention, post-norm, encoder-decoders, ...);
* :func:`prepare_tokens`: text or token tensors in, one checked ``Int[Tensor, "pos"]`` out;
* :func:`model_guard`: the saved-settings context that guarantees no hook is left behind and the
  model's state is what it was, on every exit path;
* :func:`clean_run`: one cached forward pass returning exactly the activations the graph needs.

Hooks never read ``hook.name`` (on the bridge it is the canonical name, not the alias used here): each
hook closure is told its layer when it is made.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.errors import InputError, UnsupportedModelError

__all__ = [
    "HOOKS",
    "CleanRun",
    "ModelSpec",
    "clean_run",
    "describe_model",
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
}

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

    Refuses, with :class:`UnsupportedModelError`, any model whose blocks are not sequential pre-norm
    residual blocks (``x + attn(ln1 x)`` then ``+ mlp(ln2 ·)``): parallel attention/MLP blocks
    (GPT-J, Pythia/GPT-NeoX), models without attention or MLP per block, encoder-decoders. These
    are refused rather than approximated; the numerical sum-of-edges check in :func:`clean_run`
    catches what the configuration cannot (sandwich norms, unusual blocks).
    """
    backend = _backend_of(model)
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .cfg; pass a {_SUPPORTED}.")
    name = str(getattr(cfg, "model_name", None) or type(model).__name__)
    if getattr(cfg, "parallel_attn_mlp", False):
        raise UnsupportedModelError(
            f"{name} uses parallel attention and MLP blocks (x + attn(x) + mlp(x), GPT-J/Pythia style). "
            "Its MLP reads the block input, not the stream after attention, so the s-Trace graph "
            "(resid_mid between the sublayers) does not describe it and tl_strace refuses to approximate it. "
            "Use a sequential pre-norm model (GPT-2, Llama, Qwen2, Mistral, SmolLM2, ...)."
        )
    if getattr(cfg, "attn_only", False):
        raise UnsupportedModelError(
            f"{name} is attention-only; the s-Trace graph needs an MLP in every block."
        )
    for flag in ("use_normalization_before_and_after", "post_attention_norm", "use_post_attn_norm"):
        if getattr(cfg, flag, False):
            raise UnsupportedModelError(
                f"{name} normalises sublayer outputs before adding them ({flag}); its edges would not "
                "sum to the residual stream. Sandwich/post-norm blocks are not supported."
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
    )


def _attached_hooks(model: Any) -> list[str]:
    """Names of hook points that carry forward or backward hooks right now."""
    found = []
    for name, hp in getattr(model, "hook_dict", {}).items():
        if getattr(hp, "_forward_hooks", None) or getattr(hp, "_backward_hooks", None):
            found.append(name)
    return found


def require_ready(model: Any) -> None:
    """Preconditions on the model's state, checked before any forward pass.

    * eval mode: dropout would make every masked forward a different random model;
    * no hooks attached: they would silently change what is measured.
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
        if _attached_hooks(model):
            model.reset_hooks(including_permanent=True)


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
    with model.hooks(fwd_hooks=fwd):
        logits = model(tokens, **kwargs)
    return logits[:, -1, :]


def _keep_last(x: Tensor, hook: Any) -> Tensor:
    return x[:, -1:, :]


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------
def prepare_tokens(model: Any, spec: ModelSpec, inp: str | Tensor | Sequence[int], *,
                   prepend_bos: bool | None = None) -> Int[Tensor, "pos"]:
    """Turn text or tokens into one checked 1-D token tensor on the model's device.

    Text is tokenized with the model's own ``to_tokens`` (so BOS handling follows the model's
    TransformerLens defaults unless ``prepend_bos`` says otherwise). Tokens may be ``[pos]`` or
    ``[1, pos]``; they are used as given.
    """
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
        tokens = torch.as_tensor(inp)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise InputError(f"Tokens must be integers, got dtype {tokens.dtype}.")
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


def target_token(model: Any, spec: ModelSpec, target: int | str | None) -> int | None:
    """The true next token as an id: given as an id, or as text whose first token is used
    (tokenized without BOS, so ``" Paris"`` keeps its leading space)."""
    if target is None:
        return None
    if isinstance(target, str):
        if getattr(model, "tokenizer", None) is None:
            raise InputError("The model has no tokenizer; give the target as a token id.")
        ids = model.to_tokens(target, prepend_bos=False)[0]
        if ids.numel() == 0:
            raise InputError(f"The target {target!r} tokenizes to nothing.")
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
    else:
        w, b, centre = _hooked_final_norm(ln, spec)
    return w, b, centre


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

    @property
    def resid_mid(self) -> Float[Tensor, "layer pos d_model"]:
        """The stream between the sublayers, as the sum the method defines it to be."""
        return self.resid_pre + self.attn_out

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

    hooks = [(hook_name(r, l), saver(r, l))
             for l in range(L) for r in ("resid_pre", "pattern", "v", "z", "attn_out", "mlp_out", "resid_post")]
    hooks.append((hook_name("final_scale"), saver("final_scale", -1)))
    with model_guard(model):
        logits = run_hooked(model, tokens[None], hooks, backend=spec.backend, last_only=False)[0].float()
        # The last position's normalised state, recomputed from what the unembedding read.
        final_out = _final_out(model, spec, store[("resid_post", L - 1)][-1], store[("final_scale", -1)][-1])
        W_O, b_O = zip(*(attention_output(model, spec, l) for l in range(L)))
        w, b, centre = final_norm_params(model, spec)
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
        f"{spec.name}: attn.hook_v has {n} heads, but the model has {spec.n_heads} query heads and "
        f"{spec.n_kv_heads} key/value heads; tl_strace cannot tell which head each value belongs to."
    )
