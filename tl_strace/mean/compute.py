"""Computing means: one run of the model over a reference corpus (:func:`compute_means`), reusing
a saved cache of the same model and corpus when there is one."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_strace.errors import InputError, ResultsError
from tl_strace.mean._checks import _check_cache_path, _check_roles, _refuse_other_model
from tl_strace.mean._schema import _is_mean_cache_file
from tl_strace.mean._shapes import _model_identity, _per_layer_shape
from tl_strace.mean.cache import DEFAULT_ROLES, MeanCache
from tl_strace.model import (
    HOOKS,
    ModelSpec,
    describe_model,
    hook_name,
    model_dtype,
    model_guard,
    prepare_tokens,
    require_ready,
    run_hooked,
    serialised,
    weights_fingerprint,
)

logger = logging.getLogger("tl_strace.mean")  # the package's logger, as before it was split

Reference = str | Tensor | Sequence[str] | Sequence[Tensor] | Sequence[Sequence[int]]
"""A reference corpus: one text, texts, a ``[n, pos]`` token tensor, or token sequences of any lengths."""


def reference_tokens(model: Any, spec: ModelSpec, reference: Reference, *,
                     prepend_bos: bool | None = None) -> list[Int[Tensor, "pos"]]:
    """The reference corpus as checked 1-D token tensors (texts tokenized one by one).

    Raises :class:`InputError` for an empty corpus, an empty text or sequence, or tokens outside the
    vocabulary / longer than the model's context.
    """
    if isinstance(reference, str):
        items: list[Any] = [reference]
    elif isinstance(reference, Tensor):
        if reference.ndim == 1:
            items = [reference]
        elif reference.ndim == 2:
            items = list(reference)
        else:
            raise InputError(f"A reference token tensor must be [pos] or [n, pos]; got shape {tuple(reference.shape)}.")
    else:
        items = list(reference)
    if not items:
        raise InputError(
            "The reference corpus is empty: mean ablation needs at least one text or token sequence to average "
            "over. Pass e.g. compute_means(model, ['Some representative text.', ...])."
        )
    out = []
    for i, item in enumerate(items):
        try:
            out.append(prepare_tokens(model, spec, item, prepend_bos=prepend_bos))
        except InputError as e:
            raise InputError(f"Reference item {i}: {e}") from e
    return out


def _fingerprint(seqs: Sequence[Tensor], roles: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(roles)).encode())
    for s in seqs:
        h.update(str(int(s.numel())).encode() + b":")
        h.update(s.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


class _SumHook:
    """Adds the batch sum of a hook's activations into ``sums[layer, :T]`` (a module-level callable,
    not a closure, so it is defined once)."""

    def __init__(self, sums: Tensor, layer: int, n_pos: int) -> None:
        self.sums, self.layer, self.n_pos = sums, layer, n_pos

    def __call__(self, x: Tensor, hook: Any) -> None:
        self.sums[self.layer, : self.n_pos] += x.detach().to(torch.float64).sum(0)


@serialised
def compute_means(model: Any, reference: Reference, *, roles: Sequence[str] = DEFAULT_ROLES,
                  path: str | os.PathLike | None = None, prepend_bos: bool | None = None,
                  batch_size: int = 16) -> MeanCache:
    """Mean activations of ``roles`` over a reference corpus, for mean ablation.

    Args:
        model: the TransformerLens model the means are for (eval mode, no hooks attached).
        reference: texts (each tokenized with the model's ``to_tokens``), a ``[n, pos]`` token
            tensor, or token sequences of any lengths. Sequences of equal length are batched.
        roles: hook roles (keys of :data:`tl_strace.model.HOOKS`); default ``("z", "mlp_out")``.
        path: a ``.safetensors`` cache file. If it holds means of this model (same weights, by
            :func:`~tl_strace.model.weights_fingerprint`) over exactly this corpus (same tokens,
            same roles), they are loaded instead of recomputed. If it holds means of *another*
            model (another architecture, checkpoint or fine-tune), :class:`InputError` is raised
            and the file is kept: pass another path or delete it. Otherwise (another corpus or
            roles, a damaged file, or a cache written before weights were recorded) the means
            are computed and written there.
        prepend_bos: passed to ``model.to_tokens`` for texts.
        batch_size: sequences per forward pass (an integer ≥ 1).

    Every argument is checked before any forward pass (one-line :class:`InputError`): roles, a
    ``path`` that is not a ``str``/``os.PathLike`` or names a directory, device or FIFO or sits in a
    missing directory, ``batch_size`` (``0``, ``2.5``, ``"a"`` are refused, not coerced), ``prepend_bos``.

    >>> means = compute_means(model, passages, path="smollm2_means.safetensors")  # doctest: +SKIP
    >>> means.covered_positions, means.n_tokens                                   # doctest: +SKIP
    """
    from tl_strace.options import check_int, check_optional_bool

    spec = describe_model(model)
    roles = _check_roles(roles)
    shapes = {r: _per_layer_shape(r, spec) for r in roles}
    bs = check_int("batch_size", batch_size, minimum=1)
    prepend_bos = check_optional_bool("prepend_bos", prepend_bos)
    if path is not None:
        path = _check_cache_path(path)
    require_ready(model)
    seqs = reference_tokens(model, spec, reference, prepend_bos=prepend_bos)
    fp = _fingerprint(seqs, roles)
    wfp = weights_fingerprint(model)
    if path is not None and os.path.exists(path):
        try:
            cached: MeanCache | None = MeanCache.load(path)
        except ResultsError as e:
            if not _is_mean_cache_file(path):
                raise InputError(
                    f"path={os.fspath(path)!r} holds a file that is not a tl_strace mean cache; compute_means "
                    "would overwrite it. Pass another path, or delete the file if it is not needed."
                ) from e
            logger.warning("Mean cache %s cannot be reused (%s); recomputing.", path, e)
            cached = None
        if cached is not None:
            _refuse_other_model(cached, spec, wfp, path)
            try:
                if cached.model_fingerprint is None:
                    raise InputError("it does not record the weights it was computed on (an older tl_strace)")
                cached.check_model(spec, roles)
                if cached.fingerprint == fp:
                    return cached
                logger.warning("Mean cache %s was computed on another reference corpus; recomputing.", path)
            except InputError as e:
                logger.warning("Mean cache %s cannot be reused (%s); recomputing.", path, e)

    L = spec.n_layers
    P = max(int(s.numel()) for s in seqs)
    device = seqs[0].device
    sums = {r: torch.zeros(L, P, *shapes[r], dtype=torch.float64, device=device) for r in roles}
    counts = torch.zeros(P, dtype=torch.long, device=device)
    by_len: dict[int, list[Tensor]] = {}
    for s in seqs:
        by_len.setdefault(int(s.numel()), []).append(s)

    with model_guard(model):
        for T, group in sorted(by_len.items()):
            hooks = [(hook_name(r, l), _SumHook(sums[r], l, T)) for r in roles for l in range(L)]
            for i in range(0, len(group), bs):
                batch = torch.stack(group[i:i + bs])
                run_hooked(model, batch, hooks, backend=spec.backend)
                counts[:T] += batch.shape[0]
    n_tokens = int(counts.sum())
    dtype = torch.float32 if model_dtype(model) != torch.float64 else torch.float64
    cnt = counts.to(torch.float64)
    means = {}
    pos_means = {}
    for r in roles:
        view = (1, P) + (1,) * len(shapes[r])
        pos_means[r] = (sums[r] / cnt.reshape(view)).to(dtype).cpu()
        means[r] = (sums[r].sum(1) / n_tokens).to(dtype).cpu()
    cache = MeanCache(model=_model_identity(spec), hooks={r: HOOKS[r] for r in roles}, means=means,
                      pos_means=pos_means, pos_counts=counts.cpu(), n_sequences=len(seqs), n_tokens=n_tokens,
                      fingerprint=fp, prepend_bos=prepend_bos, model_fingerprint=wfp)
    if path is not None:
        cache.save(path)
    return cache
