"""The clean forward pass (:func:`clean_run`): exactly the activations the graph needs, in one cached run;
and the clean attention patterns views draw (:func:`clean_patterns`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from jaxtyping import Float, Int
from typing import Any

import torch
from torch import Tensor

from tl_strace.errors import InputError, UnsupportedModelError
from tl_strace.model.params import PostNorm, _post_norm, attention_output, final_norm_params
from tl_strace.model.ready import exclusive, model_guard, require_ready, run_hooked
from tl_strace.model.spec import ModelSpec, _per_kv_head, describe_model, hook_name
from tl_strace.model.tokens import _model_device, model_dtype


# ---------------------------------------------------------------------------------------------
# The clean run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CleanRun:
    """Activations of one clean forward pass, exactly what the graph of METHOD.md §1 is built from.

    All float tensors are float32 copies (weights and metrics are computed in float32 whatever
    the model's dtype). ``norm_w``/``norm_b``/``norm_centre`` plus ``final_scale`` define the
    linearised final norm applied to the last block's edge vectors.

    A run recorded with ``clean_run(..., every_position=True)`` also keeps, for every position, the
    final norm's scale, the model's own normalised state and the logits (``scales``, ``final_outs``,
    ``all_logits``): what the run of each prefix reads at its own last position, so
    :meth:`prefix` can give the clean run of any prefix without another forward pass (the model
    is causal: nothing at position ``t`` reads a later position).
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
    scales: Float[Tensor, "pos"] | None = None
    """The final norm's scale at every position (``every_position`` runs only)."""
    final_outs: Float[Tensor, "pos d_model"] | None = None
    """The model's own final-norm output at every position (``every_position`` runs only)."""
    all_logits: Float[Tensor, "pos vocab"] | None = None
    """The logits at every position (``every_position`` runs only); ``logits`` is the last row."""

    @property
    def n_pos(self) -> int:
        return int(self.tokens.numel())

    def prefix(self, n: int) -> "CleanRun":
        """The clean run of the first ``n`` tokens, sliced from this run of the whole sequence.

        Every per-position field keeps its first ``n`` positions (attention patterns their first
        ``n`` query and source positions, the post-attention norm's frozen gains their first ``n``);
        the fields read at the last position (``final_scale``, ``final_out``, ``logits``) are those of
        position ``n - 1``; the weights (``W_O``, ``b_O``, the norms' weights) are shared. Slices are
        made contiguous (copies where a slice is strided), as a forward on the prefix lays them out. Needs a run
        recorded with ``every_position=True``.
        """
        if self.scales is None or self.final_outs is None or self.all_logits is None:
            raise ValueError("CleanRun.prefix needs a run recorded with clean_run(..., every_position=True)")
        if not 1 <= n <= self.n_pos:
            raise ValueError(f"a prefix of {n} tokens of a {self.n_pos}-token run")
        pos = lambda x: x[:, :n].contiguous()  # noqa: E731  [layer, pos, ...] fields
        post = self.attn_post
        return CleanRun(
            spec=self.spec,
            tokens=self.tokens[:n].contiguous(),
            resid_pre=pos(self.resid_pre),
            attn_out=pos(self.attn_out),
            mlp_out=pos(self.mlp_out),
            resid_post=pos(self.resid_post),
            pattern=self.pattern[:, :, :n, :n].contiguous(),
            v=pos(self.v),
            z=pos(self.z),
            W_O=self.W_O,
            b_O=self.b_O,
            final_scale=self.scales[n - 1].clone(),
            final_out=self.final_outs[n - 1].clone(),
            norm_w=self.norm_w,
            norm_b=self.norm_b,
            norm_centre=self.norm_centre,
            logits=self.all_logits[n - 1].clone(),
            attn_post=None if post is None else PostNorm(inp=pos(post.inp), w=post.w, b=post.b,
                                                         gain=pos(post.gain)),
            scales=self.scales[:n].contiguous(),
            final_outs=self.final_outs[:n].contiguous(),
            all_logits=self.all_logits[:n].contiguous(),
        )

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

    def normalise_last_block(self, x: Float[Tensor, "layer *rest d_model"]) -> Float[Tensor, "layer *rest d_model"]:
        """A copy of ``x`` with its last block's vectors through :meth:`final_norm`: what the output
        node reads from the last block is the normalised stream (METHOD.md §1), so every vector there
        (edge sources, node vectors, component contributions) is measured after the linearised norm.
        Only the last position of the last block reaches the output; the others are normalised too,
        harmlessly (nothing reads them)."""
        x = x.clone()
        x[-1] = self.final_norm(x[-1])
        return x


def clean_run(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], *, every_position: bool = False) -> CleanRun:
    """One forward pass on ``tokens`` that records what the graph needs (no gradients).

    With ``every_position`` it also keeps what each position's own prediction reads (the final
    norm's scale and output, the logits: ``T × d_vocab`` floats more), for :meth:`CleanRun.prefix`.

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
        all_logits = run_hooked(model, tokens[None], hooks, backend=spec.backend, last_only=False,
                                every_position=True)[0].float()
        logits = all_logits[-1].clone()
        if not every_position:
            all_logits = None  # type: ignore[assignment]  # only the last row is kept
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
        final_outs = (_final_out(model, spec, store[("resid_post", L - 1)], store[("final_scale", -1)])
                      if every_position else None)
        final_out = (final_outs[-1] if final_outs is not None
                     else _final_out(model, spec, store[("resid_post", L - 1)][-1], store[("final_scale", -1)][-1]))
        W_O, b_O = zip(*(attention_output(model, spec, l) for l in range(L)))
        w, b, centre = final_norm_params(model, spec)
        attn_post = None
        if post:
            attn_out = torch.stack([store[("attn_out", l)] for l in range(L)])
            raw = torch.stack([store.pop(("attn_post_in", l)) for l in range(L)])
            attn_post = _post_norm(model, spec, "attn", raw, attn_out)
    if not torch.isfinite(all_logits if all_logits is not None else logits).all():
        raise InputError(
            f"{spec.name} produced non-finite logits (NaN or inf) on this input; s-Trace compares distributions "
            "and cannot proceed. Check the model weights, or run it in float32 (fp16 overflows easily)."
        )
    d = spec.d_model
    # pop while stacking: at most one role is held twice (the per-layer copies and the stack)
    stack = lambda role: torch.stack([store.pop((role, l)) for l in range(L)])  # noqa: E731
    scales = store[("final_scale", -1)].reshape(tokens.numel(), -1)
    if scales.shape[1] != 1:
        raise UnsupportedModelError(f"{spec.name}: ln_final.hook_scale is not one number per position.")
    scales = scales[:, 0]
    scale = scales[-1:]
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
        scales=scales.clone() if every_position else None,
        final_outs=final_outs,
        all_logits=all_logits,
    )


def _final_out(model: Any, spec: ModelSpec, x_last: Tensor, scale: Tensor) -> Tensor:
    """What the model's own final norm gives for the last position (``x_last`` ``[d_model]``; the
    reference to check against), or for every position (``x_last`` ``[pos, d_model]`` → ``[pos, d_model]``)."""
    ln = model.ln_final
    inner = getattr(ln, "original_component", None) if spec.backend == "bridge" else None
    fn = inner if inner is not None else ln
    with torch.no_grad():
        out = fn(x_last.reshape(1, -1, x_last.shape[-1]).to(model_dtype(model)))
    return out.reshape(x_last.shape).float()


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
