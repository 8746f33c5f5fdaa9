"""The hook-name table and :func:`describe_model`: which architecture a model is, checked against the
graph of METHOD.md section 1 (block kind, norm placement), and the legacy HookedTransformer's adapters."""

from __future__ import annotations

from dataclasses import dataclass
from jaxtyping import Float
from typing import Any, Literal

from torch import Tensor

from tl_strace.errors import UnsupportedModelError


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
