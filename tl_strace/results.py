"""The result of tracing one input: curves, density, the subgraphs themselves, and safe storage.

One type whatever the options (:class:`StraceResult`), with ``to_dataframe()`` like TransformerLens's
``PatchingResult``. Tensors are stored with safetensors and everything else as JSON in the same
file's metadata: loading a result someone sent you never runs code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from fractions import Fraction
from types import SimpleNamespace
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_strace.ablation import CONDITIONS
from tl_strace.density import (
    RECOVERY_LEVELS,
    auc_linear,
    auc_log,
    recovery_sizes,
    size_at_tolerance,
)
from tl_strace.errors import InputError, ResultsError, StraceError
from tl_strace.graph import EDGE_TYPE_NAMES, EdgeLayout
from tl_strace.search import NOT_IN_ANY, check_sizes, target_counts
from tl_strace.store import SchemaViolation, as_path, read_tensors, schema_checked, write_tensors

__all__ = ["FORMAT_VERSION", "StraceResult", "Subgraph"]

FORMAT_VERSION = 2
"""Version of the on-disk format written by :meth:`StraceResult.save`. Format 2 files always carry a
checksum (:data:`tl_strace.store.CHECKSUMMED_FORMAT`); format 1 (the 0.1.0 release) files may not."""

_READABLE_VERSIONS = (1, FORMAT_VERSION)


@dataclass(frozen=True)
class Subgraph:
    """The edges of one stratum, as named, typed columns (one entry per edge, sorted by rank).

    ``type`` indexes ``("attn", "res_attn", "mlp", "res_mlp")`` (in parallel blocks ``res_attn`` is the
    block's one skip edge and no edge is ``res_mlp``); ``head`` is -1 except for attention edges;
    ``target``/``source`` are token positions (equal for residual and MLP edges). ``weight`` is the
    edge's local weight and ``rank`` the order in which the search added it.
    """

    size: float
    n_edges_total: int
    n_layers: int
    n_heads: int
    str_tokens: list[str]
    edge_id: Int[Tensor, "edge"]
    type: Int[Tensor, "edge"]
    layer: Int[Tensor, "edge"]
    head: Int[Tensor, "edge"]
    target: Int[Tensor, "edge"]
    source: Int[Tensor, "edge"]
    weight: Float[Tensor, "edge"]
    rank: Int[Tensor, "edge"]

    def __len__(self) -> int:
        return int(self.edge_id.numel())

    def names(self) -> list[str]:
        """Readable edge names: ``L3H7 5←2`` (head 7 of block 3 moves token 2 into 5), ``MLP3 5``,
        ``L3 skip→attn 5``, ``L3 skip→mlp 5``."""
        out = []
        for k, l, h, t, s in zip(self.type.tolist(), self.layer.tolist(), self.head.tolist(),
                                 self.target.tolist(), self.source.tolist()):
            out.append(
                f"L{l}H{h} {t}←{s}" if k == 0 else f"L{l} skip→attn {t}" if k == 1 else f"MLP{l} {t}" if k == 2
                else f"L{l} skip→mlp {t}"
            )
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per edge: name, type, layer, head, target/source positions and tokens, weight, rank."""
        toks = self.str_tokens
        tgt, src = self.target.tolist(), self.source.tolist()
        return pd.DataFrame({
            "name": self.names(),
            "type": [EDGE_TYPE_NAMES[k] for k in self.type.tolist()],
            "layer": self.layer.numpy(),
            "head": self.head.numpy(),
            "target": tgt,
            "source": src,
            "target_token": [toks[t] for t in tgt],
            "source_token": [toks[s] for s in src],
            "weight": self.weight.numpy(),
            "rank": self.rank.numpy(),
        })

    def components(self) -> pd.DataFrame:
        """Which heads and MLPs this subgraph uses: edges and summed weight per component
        (``L3H7`` / ``MLP3``), sorted by layer. Residual edges are not components.

        Grouped over tensors (no per-edge Python objects: a subgraph can hold millions of edges)."""
        keep = (self.type == 0) | (self.type == 2)
        layer, head, kind, weight = self.layer[keep], self.head[keep], self.type[keep], self.weight[keep]
        mlp = 1 << 20  # head slot of an MLP: after every head of its layer
        key = layer.long() * (mlp + 1) + torch.where(kind == 0, head.long(), torch.full_like(head.long(), mlp))
        uniq, inv, n = torch.unique(key, return_inverse=True, return_counts=True)
        wsum = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, weight.double())
        # ties (same layer and edge count) in the order the subgraph's edges first reach each component
        first = torch.full((uniq.numel(),), len(self), dtype=torch.long).scatter_reduce_(
            0, inv, torch.nonzero(keep).flatten(), reduce="amin")
        lay, slot = (uniq // (mlp + 1)).tolist(), (uniq % (mlp + 1)).tolist()
        df = pd.DataFrame({
            "component": [f"MLP{l}" if h == mlp else f"L{l}H{h}" for l, h in zip(lay, slot)],
            "layer": np.asarray(lay, dtype=np.int64),
            "n_edges": n.numpy().astype(np.int64),
            "weight": wsum.numpy(),
            "_first": first.numpy(),
        })
        df = df.sort_values(["layer", "n_edges", "_first"], ascending=[True, False, True])
        return df.drop(columns="_first").reset_index(drop=True)

    def component_shares(self) -> pd.DataFrame:
        """:meth:`components` plus each component's edge count in the full graph (``n_edges_total``)
        and the share of them this subgraph keeps (``share``).

        A head of block l < L-1 has T(T+1)/2 attention edges and an MLP T edges; in the last block
        only position T-1 reaches the output (T and 1 edges). See also
        :func:`tl_strace.components.project_trace` for every stratum at once.
        """
        df = self.components()
        T, L = len(self.str_tokens), self.n_layers
        last = (df["layer"] == L - 1).to_numpy(dtype=bool)
        is_mlp = df["component"].astype(str).str.startswith("MLP").to_numpy(dtype=bool)
        total = np.where(is_mlp, np.where(last, 1, T), np.where(last, T, T * (T + 1) // 2)).astype(np.int64)
        return df.assign(n_edges_total=total, share=df["n_edges"].to_numpy(dtype=np.float64) / np.maximum(total, 1))


# ---------------------------------------------------------------------------------------------
# Schema validation (shared by StraceResult.load and StraceResult.validate)
# ---------------------------------------------------------------------------------------------
_TOKEN_METHODS = ("strace", "threshold", "nucleus")
_KNOWN_METHODS = (*_TOKEN_METHODS, "component")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CURVES = ("tv_all", "kl_all", "nucleus_all", "entropy_all", "ce_all", "target_rank_all")


_Bad = SchemaViolation  # one schema violation: the field and what is wrong (turned into a ResultsError)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _tensor(res: Any, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None = None,
            ndim: int | None = None) -> Tensor:
    t = getattr(res, name)
    if not isinstance(t, Tensor):
        raise _Bad(name, f"must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise _Bad(name, f"has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if ndim is not None and t.ndim != ndim:
        raise _Bad(name, f"has shape {list(t.shape)}, expected {ndim} dimensions")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise _Bad(name, f"has shape {list(t.shape)}, expected {list(shape)}")
    return t


def _ids_in_vocab(name: str, t: Tensor, vocab: Any) -> None:
    if t.numel() and (int(t.min()) < 0 or (vocab is not None and int(t.max()) >= vocab)):
        raise _Bad(name, f"holds ids outside the vocabulary [0, {vocab})")


def _probs(t: Tensor, name: str) -> None:
    """Probabilities: exp of log-probabilities <= 0, so in [0, 1] (1e-6: float32 rounding)."""
    v = t.double()
    if bool(torch.isnan(v).any()) or bool((v < 0).any()) or bool((v > 1 + 1e-6).any()):
        raise _Bad(name, "must be probabilities in [0, 1]")


def _str_list(x: Any, name: str, n: int | None = None) -> list[str]:
    if not isinstance(x, list) or not all(isinstance(s, str) for s in x):
        raise _Bad(name, "must be a list of strings")
    if n is not None and len(x) != n:
        raise _Bad(name, f"has {len(x)} entries, expected {n}")
    return x


def _check_result(res: Any) -> None:
    """Raise :class:`_Bad` at the first field of ``res`` that is ill-typed or inconsistent."""
    # ---- model and config
    m = res.model
    if not isinstance(m, dict):
        raise _Bad("model", f"must be a dict, got {type(m).__name__}")
    for k in ("n_layers", "n_heads"):
        if not _is_int(m.get(k)) or m[k] < 1:
            raise _Bad(f"model.{k}", f"must be a positive integer, got {m.get(k)!r}")
    for k in ("n_kv_heads", "d_head", "d_model", "d_mlp", "d_vocab", "n_ctx"):
        if k in m and not (_is_int(m[k]) and m[k] >= 1):
            raise _Bad(f"model.{k}", f"must be a positive integer, got {m[k]!r}")
    if not isinstance(m.get("name", ""), str):
        raise _Bad("model.name", f"must be a string, got {m['name']!r}")
    cfg = res.config
    if not isinstance(cfg, dict):
        raise _Bad("config", f"must be a dict, got {type(cfg).__name__}")
    method = cfg.get("method")
    if method not in _KNOWN_METHODS:
        raise _Bad("config.method", f"is {method!r}, not one of the known methods {list(_KNOWN_METHODS)}")
    gran = cfg.get("granularity", "token")
    if gran not in ("token", "component") or (gran == "component") != (method == "component"):
        raise _Bad("config.granularity", f"is {gran!r}, which does not match method {method!r}")
    component = gran == "component"
    # what each granularity writes (tl_strace.pipeline.strace, tl_strace.components.component_strace)
    ablations = ("zero", "mean") if component else ("zero",)
    if "ablation" in cfg and cfg["ablation"] not in ablations:
        raise _Bad("config.ablation", f"is {cfg['ablation']!r}; a {gran}-level result has one of {list(ablations)}")
    if "seed" in cfg and not (_is_int(cfg["seed"]) and -(1 << 63) <= cfg["seed"] < (1 << 64)):
        raise _Bad("config.seed", f"must be an integer seed, got {cfg['seed']!r}")
    if "ablate_attention" in cfg and (component or not isinstance(cfg["ablate_attention"], bool)):
        raise _Bad("config.ablate_attention", f"must be true or false on a token-level result only, got "
                                              f"{cfg['ablate_attention']!r}")
    if "top_k" in cfg and not (_is_int(cfg["top_k"]) and cfg["top_k"] >= 1):
        raise _Bad("config.top_k", f"must be a positive integer, got {cfg['top_k']!r}")
    if not isinstance(res.timings, dict) or not all(isinstance(k, str) and _is_num(v) for k, v in res.timings.items()):
        raise _Bad("timings", "must map names to numbers of seconds")
    # ---- input
    toks = _str_list(res.str_tokens, "str_tokens")
    T = len(toks)
    if T < 1:
        raise _Bad("str_tokens", "is empty")
    tokens = _tensor(res, "tokens", _INT_DTYPES, ndim=1)
    if tokens.numel() != T:
        raise _Bad("str_tokens", f"has {T} entries but tokens has {tokens.numel()}")
    vocab = m.get("d_vocab")
    if tokens.numel() and (int(tokens.min()) < 0 or (vocab is not None and int(tokens.max()) >= vocab)):
        raise _Bad("tokens", f"holds ids outside the vocabulary [0, {vocab})")
    if res.target is not None and not (_is_int(res.target) and res.target >= 0
                                       and (vocab is None or res.target < vocab)):
        raise _Bad("target", f"must be None or a token id in [0, {vocab}), got {res.target!r}")
    conds = res.conditions
    if (not isinstance(conds, tuple) or not conds or len(set(conds)) != len(conds)
            or any(c not in CONDITIONS for c in conds) or "only" not in conds):
        raise _Bad("conditions", f"must be distinct names from {list(CONDITIONS)} including 'only', got {conds!r}")
    C = len(conds)
    # ---- strata
    if not _is_int(res.n_edges) or res.n_edges < 1:
        raise _Bad("n_edges", f"must be a positive integer, got {res.n_edges!r}")
    E = res.n_edges
    if component:
        if "n_components" in cfg and cfg["n_components"] != E:
            raise _Bad("n_edges", f"is {E} but config.n_components is {cfg['n_components']!r}")
        size = E
    else:
        layout = EdgeLayout(int(m["n_layers"]), int(m["n_heads"]), T, parallel=m.get("block_kind") == "parallel")
        if E != layout.n_edges_formula():
            raise _Bad("n_edges", f"is {E} but a {m['n_layers']}-layer, {m['n_heads']}-head graph over {T} "
                                  f"tokens has {layout.n_edges_formula()} edges")
        size = layout.size
    sizes = _tensor(res, "sizes", _FLOAT_DTYPES, ndim=1)
    K = int(sizes.numel())
    if K < 1:
        raise _Bad("sizes", "is empty")
    s = sizes.double()
    strict = method in ("strace", "component")
    steps = s[1:] - s[:-1]
    # s-Trace / component sizes are targets σ in (0, 1], strictly increasing; threshold / nucleus sizes
    # are realised sizes counts/|E|, which may be 0 (an empty stratum) and repeat.
    if (not bool(torch.isfinite(s).all()) or bool((s <= 0).any() if strict else (s < 0).any())
            or bool((s > 1).any()) or float(s[-1]) != 1.0 or bool((steps <= 0).any() if strict else (steps < 0).any())):
        raise _Bad("sizes", f"must lie in {'(' if strict else '['}0, 1], {'strictly ' if strict else ''}increase and "
                            f"end at 1.0 (the full graph), got {[round(float(x), 6) for x in s]}")
    counts = _tensor(res, "counts", _INT_DTYPES, shape=(K,))
    c = counts.long()
    if bool((c < 0).any()) or bool((c[1:] < c[:-1]).any()) or int(c[-1]) != E:
        raise _Bad("counts", f"must be non-decreasing edge counts ending at n_edges = {E}, got {c.tolist()}")
    if method == "strace" or component:
        want = (target_counts(s.tolist(), E) if method == "strace" else
                [min(E, math.floor(Fraction(repr(float(x))) * E + Fraction(1, 10**9))) for x in s.tolist()])
        slack = 0 if sizes.dtype == torch.float64 else 1  # float32 sizes: floor(σ·|E|) may move by one
        if any(abs(a - b) > slack for a, b in zip(c.tolist(), want)):
            raise _Bad("counts", f"are {c.tolist()} but sizes {s.tolist()} of {E} edges give {want}")
    elif not torch.allclose(s, c.double() / E, rtol=1e-6, atol=0.0):
        raise _Bad("sizes", f"must be counts / n_edges for method {method!r}")
    params = _tensor(res, "params", _FLOAT_DTYPES, shape=(K,))
    if strict and not torch.allclose(params.double(), s, rtol=1e-6, atol=0.0):
        raise _Bad("params", f"must equal sizes for method {method!r}")
    key = "sizes" if strict else "taus"
    if cfg.get(key) is not None:
        try:
            given = torch.tensor(check_sizes(cfg[key]) if strict else [float(x) for x in cfg[key]], dtype=torch.float64)
        except (InputError, TypeError, ValueError) as e:
            raise _Bad(f"config.{key}", f"is not a list of numbers: {cfg[key]!r}") from e
        if given.shape != params.shape or not torch.allclose(given, params.double(), rtol=1e-6, atol=0.0):
            raise _Bad(f"config.{key}", f"{cfg[key]!r} does not match params {params.tolist()}")
    # ---- curves
    for name in _CURVES:
        t = _tensor(res, name, _FLOAT_DTYPES, ndim=2)
        if t.shape[0] != C:
            raise _Bad("conditions", f"names {C} conditions {list(conds)} but {name} has {t.shape[0]} rows")
        if t.shape[1] != K:
            raise _Bad(name, f"has {t.shape[1]} strata, but sizes has {K}")
    tv = res.tv_all.double()
    if bool(torch.isnan(tv).any()) or bool((tv < -1e-4).any()) or bool((tv > 1 + 1e-4).any()):
        raise _Bad("tv_all", "must lie in [0, 1] (a total variation)")  # 1e-4: float32 rounding of a sum of |p - q|
    nuc = res.nucleus_all.double()
    if bool(torch.isnan(nuc).any()) or bool((nuc < -1e-3).any()) or bool((nuc > 100 + 1e-3).any()):
        raise _Bad("nucleus_all", "must lie in [0, 100] (a percentage)")
    # KL and entropy are clamped / sums of non-negative terms of finite log-probabilities: finite and
    # >= 0 (1e-4 absorbs float32 rounding, as for TV). CE and rank are NaN exactly when there is no target.
    for name in ("kl_all", "entropy_all"):
        v = getattr(res, name).double()
        if not bool(torch.isfinite(v).all()) or bool((v < -1e-4).any()):
            raise _Bad(name, "must be finite and non-negative (nats)")
    ce, trk = res.ce_all.double(), res.target_rank_all.double()
    if res.target is None:
        if not bool(torch.isnan(ce).all()) or not bool(torch.isnan(trk).all()):
            raise _Bad("ce_all" if not bool(torch.isnan(ce).all()) else "target_rank_all",
                       "must be NaN: the result has no target")
    else:
        if not bool(torch.isfinite(ce).all()) or bool((ce < -1e-4).any()):
            raise _Bad("ce_all", "must be finite and non-negative (nats) with a target")
        if (not bool(torch.isfinite(trk).all()) or bool((trk < 1).any()) or bool((trk != trk.round()).any())
                or (vocab is not None and bool((trk > vocab).any()))):
            raise _Bad("target_rank_all", f"must be whole ranks in [1, {vocab}] with a target")
    _tensor(res, "reaches_input_all", (torch.bool,), shape=(C, K))
    top_ids = _tensor(res, "top_ids", _INT_DTYPES, ndim=3)
    k = int(top_ids.shape[-1])
    if tuple(top_ids.shape[:2]) != (C, K) or k < 1:
        raise _Bad("top_ids", f"has shape {list(top_ids.shape)}, expected [{C}, {K}, top_k]")
    # config.top_k is the effective value; files written before it was stored so may hold a larger
    # request when every token of the vocabulary was kept (k == d_vocab).
    if "top_k" in cfg and cfg["top_k"] != k and not (vocab is not None and k == vocab and cfg["top_k"] > k):
        raise _Bad("config.top_k", f"is {cfg['top_k']!r} but top_ids keeps {k} tokens")
    _ids_in_vocab("top_ids", top_ids, vocab)
    _probs(_tensor(res, "top_probs", _FLOAT_DTYPES, shape=(C, K, k)), "top_probs")
    ts = res.top_strs
    if not isinstance(ts, list) or len(ts) != C or any(not isinstance(r, list) or len(r) != K for r in ts):
        raise _Bad("top_strs", f"must be {C} × {K} lists of {k} strings")
    for row in ts:
        for cell in row:
            _str_list(cell, "top_strs", k)
    _ids_in_vocab("full_top_ids", _tensor(res, "full_top_ids", _INT_DTYPES, shape=(k,)), vocab)
    _probs(_tensor(res, "full_top_probs", _FLOAT_DTYPES, shape=(k,)), "full_top_probs")
    _str_list(res.full_top_strs, "full_top_strs", k)
    for name in ("full_entropy", "full_ce", "full_target_rank"):
        if not _is_num(getattr(res, name)):
            raise _Bad(name, f"must be a number, got {getattr(res, name)!r}")
    if not math.isfinite(res.full_entropy) or res.full_entropy < -1e-4:
        raise _Bad("full_entropy", f"must be finite and non-negative (nats), got {res.full_entropy!r}")
    for name in ("full_ce", "full_target_rank"):
        v = float(getattr(res, name))
        if (res.target is None) != math.isnan(v) or math.isinf(v) or v < (1 if name == "full_target_rank" else -1e-4):
            raise _Bad(name, f"must be NaN without a target and a finite {'rank >= 1' if 'rank' in name else 'CE >= 0'} "
                             f"with one, got {v!r}")
    # ---- the trace over the edge space
    labels = _tensor(res, "labels", _INT_DTYPES, shape=(size,))
    rank = _tensor(res, "rank", _INT_DTYPES, shape=(size,))
    weights = _tensor(res, "weights", _FLOAT_DTYPES, shape=(size,))
    lab, rk = labels.long(), rank.long()
    if component:
        inside = torch.ones(size, dtype=torch.bool)
    else:
        inside = layout.ancestors()
        if bool((lab[~inside] != NOT_IN_ANY).any()):
            raise _Bad("labels", "gives a stratum to a slot that is not an edge of the graph")
    li = lab[inside]
    if bool((li < 0).any()) or bool((li >= K).any()):
        raise _Bad("labels", f"must name strata 0..{K - 1} for every edge")
    if torch.bincount(li, minlength=K).cumsum(0).tolist() != c.tolist():
        raise _Bad("labels", f"do not give the stratum edge counts {c.tolist()}")
    ranked = rk >= 0
    if bool((rk < -1).any()) or bool((ranked & ~inside).any()):
        raise _Bad("rank", "must be -1 or a search order, on edges of the graph only")
    order = rk[ranked]
    n = int(order.numel())
    if n and (int(order.max()) >= n or not bool((torch.bincount(order, minlength=n) == 1).all())):
        raise _Bad("rank", f"must number the {n} ranked edges 0..{n - 1}, each once")
    first = torch.searchsorted(c, order, right=True).clamp(max=K - 1)
    if not torch.equal(first, lab[ranked]) or bool((lab[inside & ~ranked] != K - 1).any()):
        raise _Bad("rank", "disagrees with labels (stratum k must be the first counts[k] edges of the search)")
    if bool(torch.isinf(weights).any()) or (not component and bool(torch.isnan(weights).any())):
        # component scores are NaN for components a stopped greedy search never scored
        raise _Bad("weights", "must be finite")


@dataclass(frozen=True)
class StraceResult:
    """Everything one s-Trace (or threshold/nucleus) run measured on one input.

    Curves are ``[condition, stratum]`` tensors; ``conditions`` names the rows (``"only"``, then any
    of ``"random"``, ``"inverse"``). ``sizes`` is the x-axis (target σ for s-Trace, realised
    size for threshold/nucleus); ``counts`` the edges in each stratum; the last stratum is the full
    graph. ``labels``/``rank``/``weights`` describe the trace over the flat edge space (see
    :class:`tl_strace.graph.EdgeLayout`) and back :meth:`subgraph`.

    The convenience properties (``tv``, ``nucleus``, ``density``, ...) read the ``"only"`` row.
    """

    model: dict[str, Any]
    config: dict[str, Any]
    str_tokens: list[str]
    tokens: Int[Tensor, "pos"]
    target: int | None
    n_edges: int
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
    labels: Int[Tensor, "edge"]
    rank: Int[Tensor, "edge"]
    weights: Float[Tensor, "edge"]
    timings: dict[str, float] = field(default_factory=dict)

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
    def layout(self) -> EdgeLayout:
        return EdgeLayout(int(self.model["n_layers"]), int(self.model["n_heads"]), len(self.str_tokens),
                          parallel=self.model.get("block_kind") == "parallel")

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
                    "n_edges": int(self.counts[k]),
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
            "n_edges": self.n_edges,
        }

    # ---------------------------------------------------------------- subgraphs
    def _stratum(self, s: float) -> int | None:
        for k, v in enumerate(self.sizes.tolist()):
            if math.isclose(v, s, rel_tol=1e-9, abs_tol=0.0):
                return k
        return None

    def subgraph(self, s: float) -> Subgraph:
        """The edges kept at size ``s``: a computed stratum, or (s-Trace only) any s up to the
        largest partial stratum, as the first ``floor(s·|E|)`` edges the search took."""
        if self.config.get("granularity", "token") == "component":
            raise InputError(
                "subgraph() returns token-level edges; this result is component-level (its strata are sets of "
                "heads and MLPs). Use tl_strace.components.component_table(result) and keep the rows with "
                "first_size <= s."
            )
        if not (0.0 < float(s) <= 1.0):
            raise InputError(f"Size must lie in (0, 1]; got {s}.")
        k = self._stratum(float(s))
        if k is not None:
            mask = self.labels <= k
            size = float(self.sizes[k])
        elif self.config.get("method") == "strace" and float(s) <= float(self.sizes[-2] if len(self.sizes) > 1 else 0):
            n = target_counts([float(s)], self.n_edges)[0]
            mask = (self.rank >= 0) & (self.rank < n)
            size = float(s)
        else:
            raise InputError(f"No stratum at s = {s}; this result has sizes {[float(x) for x in self.sizes]}.")
        ids = torch.nonzero(mask).flatten()
        ids = ids[torch.argsort(self.rank[ids], stable=True)]
        d = self.layout.decode(ids)
        return Subgraph(
            size=size, n_edges_total=self.n_edges, n_layers=int(self.model["n_layers"]),
            n_heads=int(self.model["n_heads"]), str_tokens=list(self.str_tokens), edge_id=ids,
            type=d["type"], layer=d["layer"], head=d["head"], target=d["target"], source=d["source"],
            weight=self.weights[ids], rank=self.rank[ids],
        )

    # ---------------------------------------------------------------- storage
    _TENSORS = ("tokens", "sizes", "counts", "params", "tv_all", "kl_all", "nucleus_all", "entropy_all", "ce_all",
                "target_rank_all", "reaches_input_all", "top_ids", "top_probs", "full_top_ids", "full_top_probs",
                "labels", "rank", "weights")

    def save(self, path: str | os.PathLike) -> None:
        """Write to one ``.safetensors`` file: tensors as tensors, the rest as JSON metadata.

        Written to a temporary file and renamed, so a crash never leaves a half-written result; a
        directory, device node or unwritable path is refused with
        :class:`~tl_strace.fsutil.OutputPathError`. The file carries a SHA-256 checksum of its
        content, verified by :meth:`load`.
        """
        tensors = {n: getattr(self, n).contiguous().cpu() for n in self._TENSORS}
        tensors["labels"] = tensors["labels"].clamp(max=torch.iinfo(torch.int32).max).to(torch.int32)
        tensors["rank"] = tensors["rank"].to(torch.int32)
        tensors["reaches_input_all"] = tensors["reaches_input_all"].to(torch.uint8)
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._TENSORS}
        meta["conditions"] = list(self.conditions)
        meta["format_version"] = FORMAT_VERSION
        write_tensors(path, tensors, "tl_strace", meta, what="tl_strace result file")

    def validate(self) -> None:
        """Check every field's type, every tensor's dtype and shape, and the consistency between
        fields (conditions and curve rows, strata across sizes/counts/params/curves, labels and rank
        against the edge layout of the model and input, ``n_edges``, tokens, top tokens, method).

        Raises :class:`ResultsError` naming the first field that is wrong. :meth:`load` runs it on
        every file, so an edited file cannot load as a plausible result even if its checksum was
        recomputed. Linear in the number of edge slots (tens of milliseconds for SmolLM2 at 100 tokens).
        """
        try:
            _check_result(self)
        except _Bad as e:
            raise ResultsError(f"This StraceResult is inconsistent: {e}.") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StraceResult":
        """Read a result written by :meth:`save` (no code is executed: safetensors + JSON), checked.

        The file's SHA-256 checksum is verified (a file modified or damaged after it was written is
        refused), then its schema with :meth:`validate`. Files written before checksums existed
        (the 0.1.0 release, format 1) have none: they load when their schema is valid; a format-2
        file without its checksum is refused. Every problem is a :class:`ResultsError` naming the
        file and the field; a ``path`` that is not a ``str``/``os.PathLike`` is an :class:`InputError`.
        """
        path = as_path(path, "tl_strace result file")
        meta, tensors = read_tensors(path, "tl_strace", what="tl_strace result file",
                                     missing=f"No result file at {path!r}.")
        version = meta.pop("format_version", None) if isinstance(meta, dict) else None
        if isinstance(version, bool) or version not in _READABLE_VERSIONS:
            raise ResultsError(f"{path!r} was written by an incompatible tl_strace version.")
        with schema_checked(path, "tl_strace result", "recompute it or restore an intact copy"):
            names = {f.name for f in fields(cls)} - set(cls._TENSORS)
            for what, have, want, optional in (("metadata", set(meta), names, {"timings"}),
                                               ("tensors", set(tensors), set(cls._TENSORS), set())):
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
            _check_result(SimpleNamespace(**meta, **tensors))  # before construction (its type hints)
        return cls(**meta, **tensors)

    def __repr__(self) -> str:
        return (f"StraceResult(model={self.model.get('name')!r}, tokens={len(self.str_tokens)}, "
                f"edges={self.n_edges}, method={self.config.get('method')!r}, strata={len(self.sizes)}, "
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
