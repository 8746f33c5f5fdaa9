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

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.errors import InputError, ResultsError
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
from tl_strace.store import SchemaViolation, as_path, read_tensors, schema_checked, write_tensors

__all__ = ["MEAN_POSITIONS", "MeanCache", "compute_means", "reference_tokens"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Version of the on-disk format written by :meth:`MeanCache.save`. Format 2 files always carry a
checksum (:data:`tl_strace.store.CHECKSUMMED_FORMAT`); format 1 (the 0.1.0 release) files may not."""

_READABLE_VERSIONS = (1, FORMAT_VERSION)

MEAN_POSITIONS: tuple[str, ...] = ("agnostic", "per_position")
"""Which mean :meth:`MeanCache.values` returns: one per component, or one per (component, position)."""

DEFAULT_ROLES: tuple[str, ...] = ("z", "mlp_out")
"""Hook roles (keys of :data:`tl_strace.model.HOOKS`) whose means component ablation needs."""

_META_KEY = "tl_strace_means"

Reference = str | Tensor | Sequence[str] | Sequence[Tensor] | Sequence[Sequence[int]]
"""A reference corpus: one text, texts, a ``[n, pos]`` token tensor, or token sequences of any lengths."""


def _per_layer_shape(role: str, spec: ModelSpec | dict[str, Any]) -> tuple[int, ...]:
    """Shape of one position of ``role``'s hook in one block (batch and position axes removed);
    ``spec`` may also be a cache's stored model identity (a dict)."""
    get = spec.get if isinstance(spec, dict) else lambda k: getattr(spec, k)
    shapes = {
        "z": (get("n_heads"), get("d_head")),
        "v": (get("n_kv_heads"), get("d_head")),
        "mlp_out": (get("d_model"),),
        "attn_out": (get("d_model"),),
        "resid_pre": (get("d_model"),),
        "resid_post": (get("d_model"),),
    }
    if role not in shapes:
        raise InputError(f"Means can be computed for the hook roles {sorted(shapes)}; got {role!r}.")
    return shapes[role]


def _model_identity(spec: ModelSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in ("name", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")}


@dataclass(frozen=True)
class MeanCache:
    """Means of hook activations over a reference corpus, per block, for one model.

    ``means[role]`` is the position-agnostic mean ``[layer, *shape]``; ``pos_means[role]`` the
    per-position mean ``[layer, covered_pos, *shape]``, where ``pos_counts[t]`` reference sequences
    reach position ``t`` (all ≥ 1). ``model`` names the model and its shapes, ``hooks`` the
    TransformerLens hook name of each role (``{l}`` = block), ``fingerprint`` the SHA-256 of the
    reference tokens (it decides whether a saved cache can be reused for a corpus), and
    ``model_fingerprint`` the :func:`~tl_strace.model.weights_fingerprint` of the model the means
    were computed on (``None`` only for caches written before it was recorded: those cannot be
    tied to weights).
    """

    model: dict[str, Any]
    hooks: dict[str, str]
    means: dict[str, Tensor]
    pos_means: dict[str, Tensor]
    pos_counts: Int[Tensor, "pos"]
    n_sequences: int
    n_tokens: int
    fingerprint: str
    prepend_bos: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if set(self.means) != set(self.pos_means) or set(self.means) != set(self.hooks):
            raise ResultsError("A mean cache needs the same roles in means, pos_means and hooks; "
                               f"got {sorted(self.means)}, {sorted(self.pos_means)}, {sorted(self.hooks)}.")
        P = int(self.pos_counts.numel())
        for role, m in self.means.items():
            pm = self.pos_means[role]
            if pm.ndim != m.ndim + 1 or pm.shape[0] != m.shape[0] or pm.shape[1] != P or pm.shape[2:] != m.shape[1:]:
                raise ResultsError(f"Mean cache role {role!r}: per-position means {_fmt(pm)} do not match "
                                   f"position-agnostic means {_fmt(m)} and {P} covered positions.")

    # ------------------------------------------------------------------ checks and values
    @property
    def covered_positions(self) -> int:
        """How many leading positions have a per-position mean (the longest reference sequence)."""
        return int(self.pos_counts.numel())

    def check_model(self, spec: ModelSpec, roles: Sequence[str] = DEFAULT_ROLES, *, model: Any = None,
                    fingerprint: str | None = None) -> None:
        """Refuse (:class:`InputError`) a cache computed on another model, or lacking ``roles``,
        or whose hook names or shapes differ from what ``spec`` expects.

        With ``model`` (or its precomputed ``fingerprint``), also refuse a cache computed on other
        weights: another checkpoint or fine-tune of the same architecture has the same name and
        shapes, so only :func:`~tl_strace.model.weights_fingerprint` tells them apart. A cache that
        records no weights (written before they were recorded) is accepted with a logged warning.
        """
        mine = _model_identity(spec)
        theirs = {k: self.model.get(k) for k in mine}
        if theirs != mine:
            diff = ", ".join(f"{k}: cache {theirs[k]!r} vs model {mine[k]!r}" for k in mine if theirs[k] != mine[k])
            raise InputError(
                f"This mean cache was computed on another model ({diff}). Means only make sense for the model "
                "they were computed on: recompute them with tl_strace.compute_means(model, reference)."
            )
        for role in roles:
            if role not in self.means:
                raise InputError(f"This mean cache has no means for {role!r} (it has {sorted(self.means)}); "
                                 f"recompute it with compute_means(model, reference, roles={tuple(roles)!r}).")
            want_hook, got_hook = HOOKS[role], self.hooks[role]
            want_shape = (spec.n_layers, *_per_layer_shape(role, spec))
            if got_hook != want_hook or tuple(self.means[role].shape) != want_shape:
                raise InputError(
                    f"Mean cache role {role!r} was recorded at {got_hook!r} with shape {_fmt(self.means[role])}; "
                    f"this model needs {want_hook!r} with shape [{','.join(map(str, want_shape))}]. "
                    "Recompute it with tl_strace.compute_means(model, reference)."
                )
        if model is not None or fingerprint is not None:  # same architecture: are they the same weights?
            self._check_weights(fingerprint if fingerprint is not None else weights_fingerprint(model))

    def _check_weights(self, fingerprint: str) -> None:
        if self.model_fingerprint is None:
            logger.warning("This mean cache (%s) does not record the weights it was computed on (written by an "
                           "older tl_strace); it cannot be checked against the model. Recompute it with "
                           "tl_strace.compute_means(model, reference).", self.model.get("name"))
        elif self.model_fingerprint != fingerprint:
            raise InputError(
                f"This mean cache was computed on other weights than this model's: it was made by "
                f"{self.model.get('name')!r} with weights fingerprint {self.model_fingerprint[:12]}…, this model's "
                f"is {fingerprint[:12]}… (another checkpoint or fine-tune). Means only make sense for the weights "
                "they were computed on: recompute them with tl_strace.compute_means(model, reference)."
            )

    def values(self, role: str, n_pos: int, positions: str = "agnostic") -> Float[Tensor, "layer p *shape"]:
        """Means of ``role`` for an input of ``n_pos`` tokens: ``[layer, 1, *shape]`` position-agnostic,
        or ``[layer, n_pos, *shape]`` per position (refused beyond the covered positions)."""
        if positions not in MEAN_POSITIONS:
            raise InputError(f"Unknown mean positions {positions!r}; choose one of {list(MEAN_POSITIONS)}.")
        if role not in self.means:
            raise InputError(f"This mean cache has no means for {role!r}; it has {sorted(self.means)}.")
        if positions == "agnostic":
            return self.means[role][:, None]
        if n_pos > self.covered_positions:
            raise InputError(
                f"Per-position means cover positions 0..{self.covered_positions - 1} (the longest reference "
                f"sequence), but the input has {n_pos} tokens. Use mean_positions='agnostic' (one mean per "
                "component, any length), or compute the means on a reference corpus with sequences at least "
                f"{n_pos} tokens long."
            )
        return self.pos_means[role][:, :n_pos]

    def describe(self) -> dict[str, Any]:
        """Plain-JSON provenance, stored in results that used this cache."""
        return {"model": self.model.get("name"), "n_sequences": self.n_sequences, "n_tokens": self.n_tokens,
                "covered_positions": self.covered_positions, "fingerprint": self.fingerprint,
                "model_fingerprint": self.model_fingerprint, "roles": sorted(self.means)}

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike) -> None:
        """Write to one ``.safetensors`` file (tensors) with JSON metadata (model, hooks, corpus).

        Written to a temporary file and renamed, so a crash never leaves half a cache behind, with
        a checksum of the content (verified by :meth:`load`).
        """
        tensors = {f"mean.{r}": t.contiguous().cpu() for r, t in self.means.items()}
        tensors |= {f"pos_mean.{r}": t.contiguous().cpu() for r, t in self.pos_means.items()}
        tensors["pos_counts"] = self.pos_counts.contiguous().cpu()
        meta = {"format_version": FORMAT_VERSION, "model": self.model, "hooks": self.hooks,
                "n_sequences": self.n_sequences, "n_tokens": self.n_tokens, "fingerprint": self.fingerprint,
                "prepend_bos": self.prepend_bos, "extra": self.extra, "model_fingerprint": self.model_fingerprint}
        write_tensors(path, tensors, _META_KEY, meta, what="tl_strace mean cache")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MeanCache":
        """Read a cache written by :meth:`save` (no code is executed: safetensors + JSON), checked.

        The file's checksum is verified, then its schema (:func:`_check_cache_file`): roles and the
        hooks table, tensor dtypes and shapes against the stored model identity, finite means,
        counts. Files written before checksums existed (the 0.1.0 release, format 1) have none and
        are checked by schema only; a format-2 file without its checksum is refused. Every problem is
        a :class:`ResultsError` naming the file and field (a path that is not a ``str``/``os.PathLike``:
        :class:`InputError`). A FIFO, device or directory is refused before it is opened.
        """
        path = as_path(path, "tl_strace mean cache")
        meta, tensors = read_tensors(  # another format, e.g. a StraceResult, lacks the key
            path, _META_KEY, what="tl_strace mean cache",
            missing=f"No mean cache at {path!r}; create one with tl_strace.compute_means(model, reference, path=...).")
        version = meta.pop("format_version", None) if isinstance(meta, dict) else None
        if isinstance(version, bool) or version not in _READABLE_VERSIONS:
            raise ResultsError(f"{path!r} was written by an incompatible tl_strace version; recompute it.")
        with schema_checked(path, "tl_strace mean cache",
                            "recompute it with tl_strace.compute_means(model, reference)"):
            _check_cache_file(meta, tensors)
        roles = sorted(meta["hooks"])
        return cls(model=meta["model"], hooks=meta["hooks"],
                   means={r: tensors[f"mean.{r}"] for r in roles},
                   pos_means={r: tensors[f"pos_mean.{r}"] for r in roles},
                   pos_counts=tensors["pos_counts"].long(), n_sequences=meta["n_sequences"],
                   n_tokens=meta["n_tokens"], fingerprint=meta["fingerprint"],
                   prepend_bos=meta.get("prepend_bos"), extra=meta.get("extra") or {},
                   model_fingerprint=meta.get("model_fingerprint"))


_Bad = SchemaViolation  # one schema violation of a mean cache file: the field and what is wrong


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(ch in "0123456789abcdef" for ch in x)


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _check_cache_file(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Raise :class:`_Bad` at the first field of a mean cache file that is ill-typed or inconsistent."""
    known = {"model", "hooks", "n_sequences", "n_tokens", "fingerprint", "prepend_bos", "extra", "model_fingerprint"}
    for k in ("model", "hooks", "n_sequences", "n_tokens", "fingerprint"):
        if k not in meta:
            raise _Bad(k, "is missing")
    if set(meta) - known:
        raise _Bad(", ".join(sorted(set(meta) - known)), "is not a field of a mean cache")
    model = meta["model"]
    ints = ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise _Bad("model", f"must name the model and its shapes {list(ints)}")
    for k in ints:
        if not _is_pos_int(model.get(k)):
            raise _Bad(f"model.{k}", f"must be a positive integer, got {model.get(k)!r}")
    hooks = meta["hooks"]
    if not isinstance(hooks, dict) or not hooks:
        raise _Bad("hooks", "must map at least one role to its hook name")
    for role, hook in hooks.items():
        if role not in HOOKS or hook != HOOKS[role]:
            raise _Bad("hooks", f"maps {role!r} to {hook!r}; the known roles are {dict(HOOKS)}")
        try:
            _per_layer_shape(role, model)
        except InputError as e:
            raise _Bad("hooks", f"role {role!r} has no means") from e
    for k in ("n_sequences", "n_tokens"):
        if not _is_pos_int(meta[k]):
            raise _Bad(k, f"must be a positive integer, got {meta[k]!r}")
    if not _is_sha256(meta["fingerprint"]):
        raise _Bad("fingerprint", f"must be a SHA-256 hex digest, got {meta['fingerprint']!r}")
    if meta.get("model_fingerprint") is not None and not _is_sha256(meta["model_fingerprint"]):
        raise _Bad("model_fingerprint", f"must be a SHA-256 hex digest or null, got {meta['model_fingerprint']!r}")
    if meta.get("prepend_bos") not in (None, True, False):
        raise _Bad("prepend_bos", f"must be true, false or null, got {meta['prepend_bos']!r}")
    if not isinstance(meta.get("extra") or {}, dict):
        raise _Bad("extra", "must be a dict")
    want = {f"mean.{r}" for r in hooks} | {f"pos_mean.{r}" for r in hooks} | {"pos_counts"}
    if want - set(tensors):
        raise _Bad(", ".join(sorted(want - set(tensors))), "is missing from the tensors")
    if set(tensors) - want:
        raise _Bad(", ".join(sorted(set(tensors) - want)), "is not a tensor of this cache's roles")
    counts = tensors["pos_counts"]
    if counts.dtype not in (torch.int64, torch.int32) or counts.ndim != 1 or counts.numel() < 1:
        raise _Bad("pos_counts", f"must be a 1-D integer tensor, got {_fmt(counts)}")
    c = counts.long()
    # sequences reaching position t: at least one, never more at a later position, all of them at 0
    if (bool((c < 1).any()) or bool((c[1:] > c[:-1]).any()) or int(c[0]) != meta["n_sequences"]
            or int(c.sum()) != meta["n_tokens"]):
        raise _Bad("pos_counts", f"must count the {meta['n_sequences']} sequences reaching each position (≥ 1, "
                                 f"non-increasing, summing to n_tokens = {meta['n_tokens']})")
    P = int(c.numel())
    for role in hooks:
        shape = (model["n_layers"], *_per_layer_shape(role, model))
        for name, want_shape in ((f"mean.{role}", shape), (f"pos_mean.{role}", (shape[0], P, *shape[1:]))):
            t = tensors[name]
            if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                raise _Bad(name, f"must be a float tensor, got {_fmt(t)}")
            if tuple(t.shape) != want_shape:
                raise _Bad(name, f"has shape {_fmt(t)}, but model {model['name']!r} over {P} covered positions "
                                 f"needs [{','.join(map(str, want_shape))}]")
            if not bool(torch.isfinite(t).all()):
                raise _Bad(name, "must hold finite means")


def _fmt(t: Tensor) -> str:
    kind = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
            torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}.get(t.dtype, str(t.dtype))
    return f"{kind}[{','.join(map(str, t.shape))}]"


# ---------------------------------------------------------------------------------------------
# Computing means
# ---------------------------------------------------------------------------------------------
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


def _refuse_other_model(cached: MeanCache, spec: ModelSpec, wfp: str, path: str | os.PathLike) -> None:
    """Refuse to overwrite (or reuse) a cache file holding means of another model."""
    mine = _model_identity(spec)
    other_weights = cached.model_fingerprint is not None and cached.model_fingerprint != wfp
    if other_weights or {k: cached.model.get(k) for k in mine} != mine:
        theirs = f"{cached.model.get('name')!r}" + (f", weights fingerprint {cached.model_fingerprint[:12]}…"
                                                     if cached.model_fingerprint else "")
        raise InputError(
            f"The mean cache {os.fspath(path)!r} holds means of another model ({theirs}; this model is "
            f"{spec.name!r}, weights fingerprint {wfp[:12]}…). Pass another path= for this model's means, or "
            "delete the file to recompute it."
        )


def _check_cache_path(path: Any) -> str:
    """``compute_means``'s ``path`` as a ``str``, refused before any work when it is not a path, is a
    directory or a special file (a FIFO would block the read forever), or sits in a missing
    directory. Writability is not required here: an existing cache in a read-only place is reused."""
    import stat

    got = as_path(path, "tl_strace mean cache")
    try:
        st = os.stat(got)
    except FileNotFoundError:
        parent = os.path.dirname(got) or "."
        if not os.path.isdir(parent):
            raise InputError(f"path={got!r}: the directory {parent!r} does not exist; create it first or pass "
                             "another path for the mean cache.") from None
        return got
    except OSError as e:
        raise InputError(f"path={got!r} cannot be read: {e.strerror or e}.") from e
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"path={got!r} is a directory; give the name of a mean cache file inside it, e.g. "
                         f"{os.path.join(got, 'means.safetensors')!r}.")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"path={got!r} is not a regular file (a FIFO, device or socket); give the path of a mean "
                         "cache file.")
    return got


def _check_roles(roles: Any) -> tuple[str, ...]:
    """``roles`` as distinct hook-role names (keys of :data:`tl_strace.model.HOOKS`), read once."""
    from collections.abc import Iterable

    example = "roles=('z', 'mlp_out')"
    if isinstance(roles, str):
        raise InputError(f"roles must be a list of hook roles, e.g. ({roles!r},); got the string {roles!r}.")
    if not isinstance(roles, Iterable) or isinstance(roles, (bytes, Tensor)):
        raise InputError(f"roles must be a list of hook roles, e.g. {example}; "
                         f"got {type(roles).__name__} {roles!r:.60}.")
    got = tuple(roles)
    bad = [r for r in got if not isinstance(r, str)]
    if bad:
        raise InputError(f"roles must be names of hook roles such as 'z' or 'mlp_out'; got {bad!r:.80} among them.")
    if not got:
        raise InputError(f"roles must name at least one hook role, e.g. {example}.")
    return tuple(dict.fromkeys(got))


class _SumHook:
    """Adds the batch sum of a hook's activations into ``sums[layer, :T]`` (a module-level callable,
    not a closure, so it is defined once)."""

    def __init__(self, sums: Tensor, layer: int, n_pos: int) -> None:
        self.sums, self.layer, self.n_pos = sums, layer, n_pos

    def __call__(self, x: Tensor, hook: Any) -> None:
        self.sums[self.layer, : self.n_pos] += x.detach().to(torch.float64).sum(0)


def _is_mean_cache_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written as a mean cache (damaged or not): only such a
    file may be replaced by a recomputed cache; anything else is the user's data."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return _META_KEY in (f.metadata() or {})
    except Exception:  # not safetensors at all
        return False


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
