""":class:`TraceResult`, the base of the result type of each granularity (:mod:`.token`,
:mod:`.component`): everything one trace measured, its curves and tables, safetensors storage, and
the display methods the views plug into (:func:`register_view`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from jaxtyping import Bool, Float, Int
from types import SimpleNamespace
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import Tensor

from tl_strace.ablation import attention_mode
from tl_strace.density import RECOVERY_LEVELS, auc_linear, auc_log, recovery_sizes, size_at_tolerance
from tl_strace.errors import InputError, ResultsError, StraceError
from tl_strace.metrics import clean_summary, total_variation
from tl_strace.model import str_tokens
from tl_strace.results._schema import FORMAT_VERSION, _Bad, _READABLE_VERSIONS, _check_result
from tl_strace.store import as_path, read_tensors, schema_checked, write_tensors


#: The result type of each granularity (``config["granularity"]``), for :meth:`TraceResult.load`;
#: each subclass registers itself by its ``GRANULARITY``.
_BY_GRANULARITY: dict[str, type["TraceResult"]] = {}


@dataclass(frozen=True, kw_only=True)
class TraceResult:
    """What every trace of one input measured, whatever its nodes: the shared base of
    :class:`StraceResult` (token edges) and :class:`ComponentResult` (heads and MLPs).

    Curves are ``[condition, stratum]`` tensors; ``conditions`` names the rows (``"only"``, then any
    of ``"random"``, ``"inverse"``). ``sizes`` is the x-axis (target σ for s-Trace and components,
    realised size for threshold/nucleus); ``counts`` the edges (components) in each stratum; the
    last stratum is the whole model. Each subclass adds the trace itself over its own units
    (``labels``, ``rank`` and the ranking scores), so no field changes meaning with a flag.

    The convenience properties (``tv``, ``nucleus``, ``density``, ...) read the ``"only"`` row.
    :meth:`TraceResult.load` reads a file of either granularity.
    """

    #: ``config["granularity"]`` of this type, the unit its counts count, and the names of its
    #: trace fields (labels, rank, scores) — set by each subclass.
    GRANULARITY: ClassVar[str] = ""
    UNIT: ClassVar[str] = ""
    _TRACE: ClassVar[tuple[str, str, str, str]] = ("", "", "", "")  # n_total, labels, rank, scores

    model: dict[str, Any]
    config: dict[str, Any]
    str_tokens: list[str]
    tokens: Int[Tensor, "pos"]
    target: int | None
    conditions: tuple[str, ...]
    sizes: Float[Tensor, "stratum"]
    counts: Int[Tensor, "stratum"]
    params: Float[Tensor, "stratum"]
    tv_all: Float[Tensor, "condition stratum"]
    kl_all: Float[Tensor, "condition stratum"]
    nucleus_all: Float[Tensor, "condition stratum"]
    entropy_all: Float[Tensor, "condition stratum"]
    ce_all: Float[Tensor, "condition stratum"]
    target_rank_all: Float[Tensor, "condition stratum"]
    reaches_input_all: Bool[Tensor, "condition stratum"]
    top_ids: Int[Tensor, "condition stratum k"]
    top_probs: Float[Tensor, "condition stratum k"]
    top_strs: list[list[list[str]]]
    full_top_ids: Int[Tensor, "k"]
    full_top_probs: Float[Tensor, "k"]
    full_top_strs: list[str]
    full_entropy: float
    full_ce: float
    full_target_rank: float
    timings: dict[str, float] = field(default_factory=dict)
    #: TV between the curves' reference (the full graph's masked row) and the clean forward computed
    #: on its own: the call's exactness check as a probability mass (float rounding of two
    #: differently shaped forwards, ~1e-7 in float32; NaN in files of formats before 4).
    full_graph_tv: float = float("nan")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.GRANULARITY:
            _BY_GRANULARITY[cls.GRANULARITY] = cls

    @classmethod
    def _migrate(cls, meta: dict[str, Any], tensors: dict[str, Tensor], version: int) -> None:
        """Rename, in place, the fields an older format (``version``) stored under other names."""

    @property
    def n_total(self) -> int:
        """How many units (edges, components) the whole model has: the last stratum's count."""
        return int(getattr(self, self._TRACE[0]))

    # ---------------------------------------------------------------- curves of the trace itself
    def _row(self, name: str) -> int:
        if name not in self.conditions:
            raise InputError(f"This result has no {name!r} condition; it has {list(self.conditions)}. "
                             f"Trace again with conditions including {name!r}.")
        return self.conditions.index(name)

    def curve(self, metric: str = "tv", condition: str = "only") -> Tensor:
        """One metric's curve over the strata for one condition.

        ``metric`` is one of tv, kl, nucleus, entropy, ce, target_rank, reaches_input.
        """
        attr = f"{metric}_all"
        if not hasattr(self, attr):
            raise InputError(f"Unknown metric {metric!r}; choose one of tv, kl, nucleus, entropy, ce, "
                             "target_rank, reaches_input.")
        return getattr(self, attr)[self._row(condition)]

    @property
    def tv(self) -> Float[Tensor, "stratum"]:
        """Total variation to the full model's distribution per stratum (the trace itself)."""
        return self.curve("tv")

    @property
    def nucleus(self) -> Float[Tensor, "stratum"]:
        """Shared nucleus (percent) per stratum."""
        return self.curve("nucleus")

    @property
    def kl(self) -> Float[Tensor, "stratum"]:
        return self.curve("kl")

    @property
    def attention(self) -> str:
        """How attention edges were treated (:data:`tl_strace.ablation.ATTENTION_MODES`): ``"faithful"``,
        or ``"never-ablated"`` (the reference pipeline's mode; not a faithful measurement)."""
        return attention_mode(self.config)

    # ---------------------------------------------------------------- density
    @property
    def density(self) -> float:
        """Paper B's density: area under TV over log10 s (higher = denser)."""
        return auc_log(self.sizes.numpy(), self.tv.numpy())

    @property
    def density_linear(self) -> float:
        """Paper A's density: area under TV over linear s."""
        return auc_linear(self.sizes.numpy(), self.tv.numpy())

    def recovery_sizes(self, levels: tuple[int, ...] = RECOVERY_LEVELS) -> dict[int, float]:
        """Smallest s whose shared nucleus reaches each level (percent)."""
        return recovery_sizes(self.sizes.numpy(), self.nucleus.numpy(), levels)

    def size_at_tv(self, eps: float) -> float:
        """Smallest s with TV ≤ ``eps``."""
        return size_at_tolerance(self.sizes.numpy(), self.tv.numpy(), eps)

    # ---------------------------------------------------------------- tables
    def to_dataframe(self) -> pd.DataFrame:
        """One row per (condition, stratum) with every metric and the subgraph's top token."""
        rows = []
        for c, cond in enumerate(self.conditions):
            for k in range(len(self.sizes)):
                rows.append({
                    "condition": cond,
                    "size": float(self.sizes[k]),
                    "param": float(self.params[k]),
                    f"n_{self.UNIT}": int(self.counts[k]),
                    "tv": float(self.tv_all[c, k]),
                    "kl": float(self.kl_all[c, k]),
                    "nucleus": float(self.nucleus_all[c, k]),
                    "entropy": float(self.entropy_all[c, k]),
                    "ce": float(self.ce_all[c, k]),
                    "target_rank": float(self.target_rank_all[c, k]),
                    "reaches_input": bool(self.reaches_input_all[c, k]),
                    "top_token": self.top_strs[c][k][0],
                    "top_prob": float(self.top_probs[c, k, 0]),
                })
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        """The input's scalar results: density, recovery sizes, full-model entropy and top token."""
        rec = self.recovery_sizes()
        return {
            "density": self.density,
            "density_linear": self.density_linear,
            **{f"recovery_{k}": v for k, v in rec.items()},
            "full_entropy": self.full_entropy,
            "full_top_token": self.full_top_strs[0],
            "full_ce": self.full_ce,
            "n_tokens": len(self.str_tokens),
            f"n_{self.UNIT}": self.n_total,
            "attention": self.attention,
        }

    # ---------------------------------------------------------------- storage
    _TENSORS: ClassVar[tuple[str, ...]] = (
        "tokens", "sizes", "counts", "params", "tv_all", "kl_all", "nucleus_all", "entropy_all", "ce_all",
        "target_rank_all", "reaches_input_all", "top_ids", "top_probs", "full_top_ids", "full_top_probs")

    @classmethod
    def _tensor_fields(cls) -> tuple[str, ...]:
        return cls._TENSORS + cls._TRACE[1:]

    def save(self, path: str | os.PathLike) -> None:
        """Write to one ``.safetensors`` file: tensors as tensors, the rest as JSON metadata.

        Written to a temporary file and renamed, so a crash never leaves a half-written result; a
        directory, device node or unwritable path is refused with
        :class:`~tl_strace.fsutil.OutputPathError`. The file carries a SHA-256 checksum of its
        content, verified by :meth:`load`.
        """
        tensors, meta = self._stored()
        write_tensors(path, tensors, "tl_strace", meta, what="tl_strace result file")

    def _stored(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What :meth:`save` writes: the tensors (as stored: labels/rank int32, flags uint8) and the
        JSON metadata (with ``format_version``); :meth:`_from_stored` reads them back. Files that hold
        several results (:class:`tl_strace.results.DensityProfile`) store each through these two."""
        tensors = {n: getattr(self, n).contiguous().cpu() for n in self._tensor_fields()}
        tensors["labels"] = tensors["labels"].clamp(max=torch.iinfo(torch.int32).max).to(torch.int32)
        tensors["rank"] = tensors["rank"].to(torch.int32)
        tensors["reaches_input_all"] = tensors["reaches_input_all"].to(torch.uint8)
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._tensor_fields()}
        meta["conditions"] = list(self.conditions)
        meta["format_version"] = FORMAT_VERSION
        return tensors, meta

    def validate(self) -> None:
        """Check every field's type, every tensor's dtype and shape, and the consistency between
        fields (conditions and curve rows, strata across sizes/counts/params/curves, labels and rank
        against the edge layout of the model and input, ``n_edges``, tokens, top tokens, method).

        Raises :class:`ResultsError` naming the first field that is wrong. :meth:`load` runs it on
        every file, so an edited file cannot load as a plausible result even if its checksum was
        recomputed. Linear in the number of edge slots (tens of milliseconds for SmolLM2 at 100 tokens).
        """
        gran = self.config.get("granularity", "token") if isinstance(self.config, dict) else None
        if gran != self.GRANULARITY:
            raise ResultsError(f"This {type(self).__name__} is inconsistent: config.granularity is {gran!r}, but a "
                               f"{type(self).__name__} is {self.GRANULARITY!r}-level.")
        try:
            _check_result(self)
        except _Bad as e:
            raise ResultsError(f"This {type(self).__name__} is inconsistent: {e}.") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TraceResult":
        """Read a result written by :meth:`save` (no code is executed: safetensors + JSON), checked.

        ``TraceResult.load`` returns the file's own type (:class:`StraceResult` or
        :class:`ComponentResult`, by its ``config["granularity"]``); ``StraceResult.load`` /
        ``ComponentResult.load`` refuse a file of the other granularity. The file's SHA-256
        checksum is verified (a file modified or damaged after it was written is refused), then its
        schema with :meth:`validate`. Files written before checksums existed (the 0.1.0 release,
        format 1) have none: they load when their schema is valid; a later file without its checksum
        is refused. Component files of formats 1–2 (one result type for both granularities, whose
        ``n_edges``/``weights`` held the component count and scores) load as
        :class:`ComponentResult`. Every problem is a :class:`ResultsError` naming the file and the
        field; a ``path`` that is not a ``str``/``os.PathLike`` is an :class:`InputError`.
        """
        path = as_path(path, "tl_strace result file")
        meta, tensors = read_tensors(path, "tl_strace", what="tl_strace result file",
                                     missing=f"No result file at {path!r}.")
        return cls._from_stored(path, meta, tensors)

    @classmethod
    def _from_stored(cls, path: str, meta: Any, tensors: dict[str, Tensor]) -> "TraceResult":
        """The result of what :meth:`_stored` gave (read back from ``path``, named in errors),
        migrated and checked as :meth:`load` describes; ``meta`` is modified."""
        version = meta.pop("format_version", None) if isinstance(meta, dict) else None
        if isinstance(version, bool) or version not in _READABLE_VERSIONS:
            raise ResultsError(f"{path!r} was written by an incompatible tl_strace version.")
        with schema_checked(path, "tl_strace result", "recompute it or restore an intact copy"):
            cfg = meta.get("config")
            gran = cfg.get("granularity", "token") if isinstance(cfg, dict) else None
            kind = _BY_GRANULARITY.get(gran) if isinstance(gran, str) else None
            if kind is None:
                raise _Bad("config.granularity", f"is {gran!r}, not one of {list(_BY_GRANULARITY)}")
            if cls is not TraceResult and kind is not cls:
                raise ResultsError(f"{path!r} holds a {gran}-level result ({kind.__name__}), not a "
                                   f"{cls.__name__}; load it with {kind.__name__}.load or TraceResult.load.")
            kind._migrate(meta, tensors, version)
            names = {f.name for f in fields(kind)} - set(kind._tensor_fields())
            # formats before 4 did not keep the full graph's TV against the clean forward (NaN)
            optional_meta = {"timings"} | ({"full_graph_tv"} if version < 4 else set())
            for what, have, want, optional in (("metadata", set(meta), names, optional_meta),
                                               ("tensors", set(tensors), set(kind._tensor_fields()), set())):
                if want - optional - have:
                    raise _Bad(", ".join(sorted(want - optional - have)), f"is missing from the {what}")
                if have - want:
                    raise _Bad(", ".join(sorted(have - want)), f"is not a field of a result ({what})")
            for n in ("labels", "rank"):  # stored as int32; a float would be truncated silently
                if tensors[n].dtype not in (torch.int32, torch.int64):
                    raise _Bad(n, f"has dtype {tensors[n].dtype}, expected int32")
                tensors[n] = tensors[n].long()
            reach = tensors["reaches_input_all"]
            if reach.dtype not in (torch.uint8, torch.bool) or bool((reach.to(torch.uint8) > 1).any()):
                raise _Bad("reaches_input_all", "must hold 0/1 flags (uint8)")
            tensors["reaches_input_all"] = reach.bool()
            if not isinstance(meta["conditions"], list):
                raise _Bad("conditions", f"must be a list of names, got {meta['conditions']!r}")
            meta["conditions"] = tuple(meta["conditions"])
            meta.setdefault("timings", {})
            meta.setdefault("full_graph_tv", float("nan"))
            _check_result(SimpleNamespace(**meta, **tensors))  # before construction (its type hints)
        return kind(**meta, **tensors)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model.get('name')!r}, tokens={len(self.str_tokens)}, "
                f"{self.UNIT}={self.n_total}, method={self.config.get('method')!r}, strata={len(self.sizes)}, "
                f"density={self.density:.4f}, full_top={self.full_top_strs[0]!r})")

    # ---------------------------------------------------------------- views
    # tl_strace.views registers its renderers on import (register_view), so results never imports
    # views: the data flows one way. The package's __init__ imports views, so they are always there.
    def clean_patterns(self, model: Any) -> Float[Tensor, "layer head pos pos_src"]:
        """The clean attention patterns of this result's input on ``model`` (one forward pass), for
        the views that draw attention; ``model`` must be the one the result was traced with."""
        from tl_strace.model import clean_patterns

        return clean_patterns(model, self.tokens, n_layers=int(self.model["n_layers"]),
                              n_heads=int(self.model["n_heads"]), name=self.model.get("name"))

    def _repr_html_(self) -> str:
        """Jupyter display: summary, TV and shared-nucleus curves (with baselines) and the
        interactive circuit view; self-contained, no network (see :func:`tl_strace.views.circuit_view`)."""
        return _view("html")(self)

    def save_html(self, path: str | os.PathLike, *, model: Any = None, **kwargs: Any) -> str:
        """Write a standalone HTML report (curves, circuit, table, composition, circuitsvis details);
        with ``model``, also the attention patterns restricted to the trace. Keywords as
        :func:`tl_strace.views.report_html`. Returns the path."""
        patterns = None if model is None else self.clean_patterns(model)
        return _view("report")(self, path, patterns=patterns, **kwargs)

    def detail_views(self, s: float | None = None, *, model: Any = None, **kwargs: Any) -> Any:
        """The circuitsvis detail views (:func:`tl_strace.views.detail_views`); with ``model``, also
        the attention patterns of the heads the subgraph at ``s`` uses."""
        patterns = None if model is None else self.clean_patterns(model)
        return _view("details")(self, s, patterns=patterns, **kwargs)

    def plot(self, metric: str = "tv", *, ax: Any = None) -> Any:
        """A matplotlib figure of ``metric`` against log s with the baselines and paper B's phases shaded."""
        return _view("plot")(self, metric, ax=ax)

    def plot_shares(self) -> Any:
        """A matplotlib figure of the shares of attention/MLP/residual edges and of 4 layer groups vs s."""
        return _view("plot_shares")(self)


def measured_fields(model: Any, tokens: Int[Tensor, "pos"], target: int | None, metrics: dict[str, Tensor],
                    reference: Float[Tensor, "vocab"], top_k: int, *,
                    clean: Float[Tensor, "vocab"]) -> dict[str, Any]:
    """The fields every granularity fills the same way: the input, the curves and top tokens from
    :func:`tl_strace.engine.evaluate`'s ``metrics`` (``[condition, stratum]``), the full model's own
    numbers (:func:`tl_strace.metrics.clean_summary`) from ``reference`` (the full graph's row the
    curves are measured against), ``full_graph_tv`` (that row against the ``clean`` forward);
    token strings from ``model``."""
    clean_fields = clean_summary(reference, target, top_k)
    top_ids = metrics["ids"]
    C, K = int(top_ids.shape[0]), int(top_ids.shape[1])
    return {
        "str_tokens": str_tokens(model, tokens.cpu()), "tokens": tokens.cpu(), "target": target,
        "tv_all": metrics["tv"], "kl_all": metrics["kl"], "nucleus_all": metrics["nucleus"],
        "entropy_all": metrics["entropy"], "ce_all": metrics["ce"], "target_rank_all": metrics["rank"],
        "top_ids": top_ids, "top_probs": metrics["probs"],
        "top_strs": [[str_tokens(model, top_ids[c, k]) for k in range(K)] for c in range(C)],
        **clean_fields, "full_top_strs": str_tokens(model, clean_fields["full_top_ids"]),
        "full_graph_tv": float(total_variation(clean, reference[None].to(clean.device))[0]),
    }


#: Renderers by name, registered by :mod:`tl_strace.views` on import (see :func:`register_view`).
_VIEWS: dict[str, Callable[..., Any]] = {}


def register_view(name: str, render: Callable[..., Any]) -> None:
    """Make ``render`` the renderer behind a result's display method ``name`` (``"html"``,
    ``"report"``, ``"details"``, ``"plot"``, ``"plot_shares"``); a views package plugs in here."""
    _VIEWS[name] = render


def _view(name: str) -> Callable[..., Any]:
    try:
        return _VIEWS[name]
    except KeyError:
        raise StraceError(f"No view {name!r} is registered; import tl_strace.views (import tl_strace does).") from None
