"""The result schema: every field's type, shape and range, and the identities between labels, rank and
counts, checked on load (:meth:`StraceResult.validate`); the format version."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tl_strace.ablation import ATTENTION_MODES, CONDITIONS
from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout
from tl_strace.search import NOT_IN_ANY, check_sizes, target_counts
from tl_strace.store import SchemaViolation


FORMAT_VERSION = 4  # 4: full_graph_tv (the full graph's row against the clean forward)


_READABLE_VERSIONS = (1, 2, 3, FORMAT_VERSION)


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
    if "attention" in cfg:
        if component or not isinstance(cfg["attention"], str) or cfg["attention"] not in ATTENTION_MODES:
            raise _Bad("config.attention", f"must be one of {list(ATTENTION_MODES)} on a token-level result only, "
                                           f"got {cfg['attention']!r}")
        if cfg.get("ablate_attention", True) != (cfg["attention"] == "faithful"):
            raise _Bad("config.attention", f"is {cfg['attention']!r} but config.ablate_attention is "
                                           f"{cfg.get('ablate_attention')!r}: the two disagree")
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
    n_name, scores_name = ("n_components", "scores") if component else ("n_edges", "weights")
    E = getattr(res, n_name, None)
    if not _is_int(E) or E < 1:
        raise _Bad(n_name, f"must be a positive integer, got {E!r}")
    if component:
        if "n_components" in cfg and cfg["n_components"] != E:
            raise _Bad(n_name, f"is {E} but config.n_components is {cfg['n_components']!r}")
        size = E
    else:
        layout = EdgeLayout(int(m["n_layers"]), int(m["n_heads"]), T, parallel=m.get("block_kind") == "parallel")
        if E != layout.n_edges_formula():
            raise _Bad(n_name, f"is {E} but a {m['n_layers']}-layer, {m['n_heads']}-head graph over {T} "
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
        raise _Bad("counts", f"must be non-decreasing counts ending at {n_name} = {E}, got {c.tolist()}")
    if method == "strace" or component:
        want = target_counts(s.tolist(), E)
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
    ftv = res.full_graph_tv
    if not _is_num(ftv) or not (math.isnan(ftv) or 0.0 <= ftv <= 1.0):
        raise _Bad("full_graph_tv", f"must be a probability mass in [0, 1] (or NaN), got {ftv!r}")
    for name in ("full_ce", "full_target_rank"):
        v = float(getattr(res, name))
        if (res.target is None) != math.isnan(v) or math.isinf(v) or v < (1 if name == "full_target_rank" else -1e-4):
            raise _Bad(name, f"must be NaN without a target and a finite {'rank >= 1' if 'rank' in name else 'CE >= 0'} "
                             f"with one, got {v!r}")
    # ---- the trace over the edge space
    labels = _tensor(res, "labels", _INT_DTYPES, shape=(size,))
    rank = _tensor(res, "rank", _INT_DTYPES, shape=(size,))
    weights = _tensor(res, scores_name, _FLOAT_DTYPES, shape=(size,))
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
        raise _Bad(scores_name, "must be finite")
