"""What one passage contributes: the model's identity, the tracer and its options, the mean cache, one
record from a result, and the memory check that skips a passage which cannot fit."""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_strace import memory as _memory
from tl_strace.components import component_strace
from tl_strace.corpus._base import MEAN_REFERENCE, _METRICS, _jsonable
from tl_strace.corpus._dist import _sync
from tl_strace.corpus._store import _MemorySkip, _RETRY
from tl_strace.errors import InputError, StraceError
from tl_strace.io.datasets import Passage, PassageSet
from tl_strace.mean import compute_means
from tl_strace.model import describe_model, model_dtype, prepare_tokens, weights_fingerprint
from tl_strace.pipeline import strace
from tl_strace.profile import for_each_position
from tl_strace.results import ComponentResult


def _model_identity(model: Any, name: str | None) -> dict[str, Any]:
    """What identifies a model for resuming: shape, dtype, and the fingerprint of every weight
    tensor (:func:`tl_strace.model.weights_fingerprint`), so two checkpoints of one architecture
    never share a run directory."""
    cfg = getattr(model, "cfg", None)
    ident: dict[str, Any] = {"argument": name}
    for k in ("model_name", "n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
        v = getattr(cfg, k, None)
        ident[k] = v if isinstance(v, (int, float, str, type(None))) else str(v)
    params = list(model.parameters())
    ident["dtype"] = str(params[0].dtype) if params else None
    ident["weights_fingerprint"] = weights_fingerprint(model)
    return ident


def _legacy_weights_hash(model: Any) -> str:
    """The identity run directories stored before weight fingerprints (``weights_sha256``: the first
    64k values of the first and last parameter only); computed to compare with such a directory."""
    params = list(model.parameters())
    h = hashlib.sha256()
    for p in (params[:1] + params[-1:]) if params else []:
        h.update(p.detach().flatten()[:65536].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def _model_diff(model: Any, ident: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """How the model now differs from the one a run directory was made with ([] when the same).

    The name it was loaded under may differ (a hub name, then its local copy); the weights may
    not. A directory from before weight fingerprints is compared by its weaker hash."""
    now = dict(ident)
    if "weights_fingerprint" not in stored and "weights_sha256" in stored:
        now.pop("weights_fingerprint")
        now["weights_sha256"] = _legacy_weights_hash(model)
    diff = [d for d in _diff(now, stored) if not d.startswith(("argument:", "model_name:"))]
    if any(d.startswith(("weights_fingerprint:", "weights_sha256:")) for d in diff):
        diff.insert(0, "other weights (another checkpoint of this architecture?)")
    return diff


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)  # a key absent on one side equals None (keys added later)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {vb!r} in the directory, {va!r} now")
    return out


def _make_tracer(granularity: str, ablation: str, ablate_attention: bool,
                 opts: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The function that traces one passage, and its keyword arguments.

    Token granularity with zero ablation is the core pipeline, :func:`tl_strace.strace`. Component
    granularity (zero or mean ablation) is :func:`tl_strace.components.component_strace`, with the
    keyword arguments of ``strace`` it shares, plus ``ablation`` (and ``means``, added by the runner).
    """
    kw = {k: v for k, v in opts.items() if v is not None or k in ("prepend_bos",)}
    if granularity == "token":
        if ablation == "mean":
            raise InputError("ablation='mean' is not available at token granularity: tl_strace.strace zero-ablates "
                             "edges only. Mean ablation of heads and MLPs: --granularity component --ablation mean.")
        if not ablate_attention:
            kw["ablate_attention"] = False
        kw["progress"] = False  # the runner draws its own bar, per passage
        return strace, kw
    if not ablate_attention:
        raise InputError("ablate_attention=False applies to token granularity (attention edges); component "
                         "granularity ablates whole heads.")
    if opts.get("method") != "strace" or opts.get("weights") != "l1":
        raise InputError("Component granularity ranks components with its L1 scorer; method and weights apply to "
                         "token granularity only (leave them at 'strace' and 'l1').")
    params = set(inspect.signature(component_strace).parameters)
    kw = {k: v for k, v in kw.items() if k in params and k not in ("method", "weights", "taus")}
    kw["ablation"] = ablation
    kw["progress"] = False  # the runner draws its own bar, per passage
    return component_strace, kw


def _means(model: Any, passages: PassageSet, path: Path, dist: "_Dist") -> Any:
    """Mean activations over the first :data:`MEAN_REFERENCE` passages that fit the model's
    context, cached in the run directory (rank 0 computes them; the other ranks load that file)."""
    n_ctx = int(getattr(getattr(model, "cfg", None), "n_ctx", 0) or 0)
    texts = []
    for p in passages:
        if len(texts) == MEAN_REFERENCE:
            break
        if not n_ctx or model.to_tokens(p.text, truncate=False).shape[-1] <= n_ctx:
            texts.append(p.text)
    means, exc = None, None
    if dist.rank == 0:
        try:
            means = compute_means(model, texts, path=path)
        except (StraceError, OSError) as e:
            exc = e
    _sync(dist, exc)  # the barrier: rank 0 has written the file (or every rank stops)
    return means if means is not None else compute_means(model, texts, path=path)


def _shares(res: Any) -> dict[str, list[float]]:
    """Per stratum: shares of attention / MLP / residual edges and of four equal layer groups."""
    K = len(res.sizes)
    labels = res.labels
    ids = torch.nonzero(labels < K).flatten()
    lab = labels[ids]
    d = res.layout.decode(ids)
    kind, layer = d["type"], d["layer"]
    L = int(res.model["n_layers"])
    total = torch.bincount(lab, minlength=K).cumsum(0).double()

    def share(mask: torch.Tensor) -> list[float]:
        c = torch.bincount(lab[mask], minlength=K).cumsum(0).double()
        return torch.where(total > 0, c / total.clamp(min=1), torch.full_like(c, float("nan"))).tolist()

    out = {"share_attn": share(kind == 0), "share_mlp": share(kind == 2),
           "share_residual": share((kind == 1) | (kind == 3))}
    group = torch.div(layer * 4, L, rounding_mode="floor")
    for g in range(4):
        out[f"share_layers_{g}"] = share(group == g)
    return out


def _record(res: Any, p: Passage, index: int, record_sizes: Sequence[float], seconds: float) -> dict[str, Any]:
    s = res.summary()
    rec: dict[str, Any] = {
        "status": "ok", "index": index, "id": p.id, "text": p.text, "next_word": p.next_word,
        "context_words": p.context_words if p.context_words is not None else len(p.text.split()),
        "line": p.line, "target_id": res.target, "n_tokens": s["n_tokens"], "n_edges": res.n_total,
        "density": s["density"], "density_linear": s["density_linear"],
        **{k: v for k, v in s.items() if k.startswith("recovery_")},
        "full_entropy": s["full_entropy"], "full_top_token": s["full_top_token"],
        "full_top_id": int(res.full_top_ids[0]), "full_top_prob": float(res.full_top_probs[0]),
        "full_ce": s["full_ce"], "full_target_rank": float(res.full_target_rank),
        "sizes": res.sizes.tolist(), "counts": res.counts.tolist(),
    }
    for c, cond in enumerate(res.conditions):
        suffix = "" if cond == "only" else f"_{cond}"
        for m in _METRICS:
            rec[f"{m}{suffix}"] = getattr(res, f"{m}_all")[c].tolist()
    only = list(res.conditions).index("only")
    rec["top_ids"] = res.top_ids[only, :, 0].tolist()
    rec["top_tokens"] = [t[0] for t in res.top_strs[only]]
    rec["top_probs"] = res.top_probs[only, :, 0].tolist()
    comps: dict[str, dict[str, int]] = {}
    if isinstance(res, ComponentResult):
        from tl_strace.components import component_table

        table = component_table(res)
        for size in record_sizes:  # the components kept at size s (presence: 1)
            comps[f"{size:g}"] = {str(n): 1 for n in table.loc[table["first_size"] <= size + 1e-12, "name"]}
    else:
        rec.update(_shares(res))
        if res.config.get("method") == "strace":
            for size in record_sizes:
                try:
                    df = res.subgraph(size).components()
                except InputError:
                    continue
                comps[f"{size:g}"] = {str(n): int(e) for n, e in zip(df["component"], df["n_edges"])}
    rec["components"] = comps
    rec["seconds"] = seconds
    return _jsonable(rec)


def _trace_every_position(model: Any, p: Passage, kw: dict[str, Any]) -> tuple[Any, dict[str, list[Any]]]:
    """Every position of a passage (``--every-position``): :func:`tl_strace.profile.for_each_position`
    with the run's options, from one clean forward. Returns the last position's result (the
    passage's own prediction, recorded as a plain run records it: the same call as
    ``strace(model, text, target=...)``) and the profile, columnar: one list per field of
    :data:`tl_strace.corpus._base.PROFILE_FIELDS` (``tv``: a list of per-stratum lists) and per
    recovery size, one entry per position. Only these are kept per position, so memory holds one
    position's trace at a time."""
    cols: dict[str, list[Any]] = {}
    last: list[Any] = [None]
    t_prev = [time.perf_counter()]

    def each(t: int, res: Any) -> None:
        now = time.perf_counter()
        s = res.summary()
        row = {"position": t, "n_tokens": s["n_tokens"], "token_id": int(res.tokens[-1]), "target_id": res.target,
               "density": s["density"], "density_linear": s["density_linear"], "full_entropy": s["full_entropy"],
               "full_top_id": int(res.full_top_ids[0]), "full_top_prob": float(res.full_top_probs[0]),
               "full_ce": s["full_ce"], "full_target_rank": float(res.full_target_rank),
               "seconds": now - t_prev[0], **{k: v for k, v in s.items() if k.startswith("recovery_")},
               "tv": res.tv.tolist()}
        t_prev[0] = now
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
        last[0] = res

    for_each_position(model, p.text, each, target=p.target, **kw)
    return last[0], cols


class _MemoryCheck:
    """Before each passage is traced: can one call fit in memory?

    With a ``memory_budget``, the call must fit it (:func:`tl_strace.memory.rows_for_budget`).
    Without one, the smallest call (its fixed part and one masked row,
    :func:`tl_strace.memory.estimate_memory`) must fit the memory available on this machine
    (:func:`tl_strace.memory.available_memory`); when the default batching of the masked forwards
    would not, the call gets the available memory as its budget (fewer rows per forward). A passage
    that cannot fit raises InputError, which the runner records as skipped with that reason, so a
    run (and every resume) goes on instead of running out of memory on it. Host memory is checked
    (where the edge space lives, whatever the model's device).
    """

    def __init__(self, model: Any, *, granularity: str, random: bool, prepend_bos: bool | None,
                 memory_budget: int | None, batch_size: int | None) -> None:
        self.model, self.spec, self.dtype = model, describe_model(model), model_dtype(model)
        self.est_kw = {"edge_space": granularity == "token", "random": random}
        self.prepend_bos, self.memory_budget, self.batch_size = prepend_bos, memory_budget, batch_size

    def limit(self) -> int | None:
        """The memory a call may use now: the ``memory_budget``, else what is available (None: unknown)."""
        return self.memory_budget if self.memory_budget is not None else _memory.available_memory()

    def __call__(self, text: str, kw: dict[str, Any]) -> dict[str, Any]:
        """The tracer's keyword arguments for ``text`` (``kw``, or with a memory budget added).

        Raises :class:`_MemorySkip` (with the bytes the passage needs) when it cannot fit."""
        T = int(prepare_tokens(self.model, self.spec, text, prepend_bos=self.prepend_bos).numel())
        need = _memory.estimate_memory(self.spec, T, 1, dtype=self.dtype, **self.est_kw)
        if self.memory_budget is not None:
            if self.batch_size is not None:  # batch_size rows per forward must fit the budget too
                need = _memory.estimate_memory(self.spec, T, int(self.batch_size), dtype=self.dtype, **self.est_kw)
            if need.total > self.memory_budget:
                raise _MemorySkip(
                    f"This passage ({T} tokens) needs at least {need.total / 2**20:,.0f} MiB for one call on "
                    f"{self.spec.name} ({need.describe()}), over memory_budget={self.memory_budget / 2**20:,.0f} "
                    f"MiB; {_RETRY}.", need.total)
            _memory.rows_for_budget(self.spec, T, self.dtype, memory_budget=self.memory_budget,
                                    batch_size=self.batch_size, n_rows=1, **self.est_kw)
            return kw
        avail = _memory.available_memory()
        if avail is None:
            return kw
        if need.total > avail:
            raise _MemorySkip(
                f"This passage ({T} tokens) needs at least {need.total / 2**20:,.0f} MiB for one call on "
                f"{self.spec.name} ({need.describe()}), but only {avail / 2**20:,.0f} MiB are available on this "
                f"machine; {_RETRY} (or free memory, or shorten the passage).", need.total)
        rows = int(self.batch_size) if self.batch_size else _memory.DEFAULT_ROWS_BUDGET // max(need.per_row, 1)
        if need.fixed + rows * need.per_row > avail:
            return {**kw, "memory_budget": int(avail)}
        return kw
