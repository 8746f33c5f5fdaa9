"""The :class:`MeanCache` type: means of hook activations for one model, checked before use, saved
to and loaded from one ``.safetensors`` file (see :mod:`tl_strace.mean`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor

from tl_strace.errors import InputError, ResultsError
from tl_strace.mean._schema import _META_KEY, _READABLE_VERSIONS, FORMAT_VERSION, _check_cache_file
from tl_strace.mean._shapes import _fmt, _model_identity, _per_layer_shape
from tl_strace.model import HOOKS, ModelSpec, weights_fingerprint
from tl_strace.store import as_path, read_tensors, schema_checked, write_tensors

logger = logging.getLogger("tl_strace.mean")  # the package's logger, as before it was split

MEAN_POSITIONS: tuple[str, ...] = ("agnostic", "per_position")
"""Which mean :meth:`MeanCache.values` returns: one per component, or one per (component, position)."""

DEFAULT_ROLES: tuple[str, ...] = ("z", "mlp_out")
"""Hook roles (keys of :data:`tl_strace.model.HOOKS`) whose means component ablation needs."""


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
