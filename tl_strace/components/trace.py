""":func:`component_strace` (component-level s-Trace) and :func:`evaluate_components` (one chosen set)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from fractions import Fraction
from jaxtyping import Float
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tl_strace import options
from tl_strace._version import __version__
from tl_strace.components.ablate import (
    Ablation,
    _check_finite,
    _logprobs,
    component_logprobs,
    verify_component_ablation,
)
from tl_strace.components.scorers import COMPONENT_SCORERS, ComponentOptions, _Context
from tl_strace.components.space import ABLATIONS, ComponentSpace, MAX_DEFAULT_STRATA
from tl_strace.errors import InputError
from tl_strace.graph import check_decomposition, node_vectors
from tl_strace.mean import MEAN_POSITIONS, MeanCache
from tl_strace.memory import rows_for_budget
from tl_strace.metrics import ROW_METRICS, entropy, row_metrics, target_stats, top_tokens, total_variation
from tl_strace.model import (
    attention_output,
    check_full_graph,
    clean_run,
    describe_model,
    model_dtype,
    model_guard,
    prepare_tokens,
    require_ready,
    serialised,
    str_tokens,
    target_token,
)
from tl_strace.results import StraceResult
from tl_strace.search import check_sizes


# ---------------------------------------------------------------------------------------------
# Strata
# ---------------------------------------------------------------------------------------------
def _strata_counts(sizes: Sequence[float] | None, C: int, limit: int) -> tuple[list[float], list[int]]:
    """Target sizes and component counts; strata above ``limit`` components (greedy stopped
    early) are dropped, except the full model."""
    if sizes is None:
        if C <= MAX_DEFAULT_STRATA:
            counts = list(range(1, C + 1))
        else:
            counts = sorted({int(round(x)) for x in np.geomspace(1, C, 64)} | {C})
        szs = [k / C for k in counts]
    else:
        szs = list(check_sizes(sizes))
        # floor(σ·C), except that σ·C within 1e-9 of an integer counts as that integer, so the
        # float k/C (e.g. 5/300 = 0.01666…) keeps k components, not k-1.
        counts = [min(C, math.floor(Fraction(repr(s)) * C + Fraction(1, 10**9))) for s in szs]
    keep = [(s, c) for s, c in zip(szs, counts) if c <= limit or c == C]
    return [s for s, _ in keep], [c for _, c in keep]


def _labels(rank: Tensor, counts: Sequence[int]) -> Tensor:
    c = torch.tensor(list(counts), dtype=torch.long)
    labels = torch.full_like(rank, len(counts) - 1)
    ranked = rank >= 0
    labels[ranked] = torch.searchsorted(c, rank[ranked], right=True).clamp(max=len(counts) - 1)
    return labels


@serialised
def component_strace(
    model: Any,
    input: str | Tensor | Sequence[int],
    *,
    scorer: str = "l1",
    ablation: str = "zero",
    means: MeanCache | str | os.PathLike | None = None,
    mean_positions: str = "agnostic",
    per_position: bool = False,
    sizes: Iterable[float] | None = None,
    conditions: Iterable[str] = ("only",),
    greedy_steps: int | None = None,
    attribution_point: float = 0.5,
    target: int | str | Tensor | None = None,
    seed: int = 0,
    top_k: int = 5,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    prepend_bos: bool | None = None,
) -> StraceResult:
    """s-Trace at component granularity: nested sets of heads/MLPs, ranked by ``scorer`` and
    evaluated by batched masked forwards; density as for the token-level trace.

    Args:
        model: a ``TransformerBridge`` / ``HookedTransformer`` in eval mode with no hooks attached.
        input: text or tokens ``[pos]`` / ``[1, pos]``; the prediction after the last token is studied.
        scorer: ``"l1"`` (default), ``"attribution"`` or ``"greedy"`` (see the module docstring).
        ablation: ``"zero"`` (paper default) or ``"mean"`` (needs ``means``).
        means: a :class:`~tl_strace.mean.MeanCache` from :func:`~tl_strace.mean.compute_means`, or
            the path of a saved one.
        mean_positions: ``"agnostic"`` (one mean per component; any input length) or
            ``"per_position"`` (the mean at each position; the reference must cover the input).
        per_position: split every component per token position (``L3H7@5``).
        sizes: fractions of components in (0, 1], increasing; stratum ``k`` keeps
            ``floor(σ_k·C)`` components (``k/C`` keeps exactly ``k``). Default: every count 1..C
            (s = k/C), or a 64-count geometric grid when C > 512.
        conditions: any of ``"only"`` (always), ``"random"``, ``"inverse"``.
        greedy_steps: stop the greedy search after this many components (its cost is
            ``Σ_k (C − k)`` masked rows); larger strata are then not evaluated, except the full model.
        attribution_point: the keep value ``m`` in (0, 1) at which attribution gradients are taken.
        target: the true next token (id or text) for cross-entropy and rank.
        seed: seed of the random condition.
        top_k: top tokens kept per stratum; a value above the vocabulary size keeps every token
            (``config["top_k"]`` records the effective value, ``min(top_k, d_vocab)``).
        batch_size / memory_budget: rows per masked forward / the whole call's memory bound, as in
            :func:`tl_strace.strace` (component calls have no edge space; see :mod:`tl_strace.memory`).
        prepend_bos: passed to ``model.to_tokens`` for text.

    Returns:
        A :class:`~tl_strace.results.StraceResult` with ``config["granularity"] == "component"``.
    """
    t0 = time.perf_counter()
    spec = describe_model(model)
    # Every option, before any work; iterables are read once, scalars made canonical.
    opts = ComponentOptions(sizes=sizes, conditions=conditions, seed=seed, top_k=top_k, batch_size=batch_size,
                            memory_budget=memory_budget, prepend_bos=prepend_bos, scorer=scorer, ablation=ablation,
                            mean_positions=mean_positions, per_position=per_position, greedy_steps=greedy_steps,
                            attribution_point=attribution_point)
    scorer, ablation, mean_positions, per_position = opts.scorer, opts.ablation, opts.mean_positions, opts.per_position
    conds, sizes, attribution_point, greedy_steps = opts.conditions, opts.sizes, opts.attribution_point, opts.greedy_steps
    top_k, seed, batch_size, memory_budget = opts.top_k, opts.seed, opts.batch_size, opts.memory_budget
    prepend_bos = opts.prepend_bos
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=prepend_bos)
    T = int(tokens.numel())
    tgt = target_token(model, spec, target)
    abl = Ablation.build(spec, T, ablation, means, mean_positions, model=model)
    space = ComponentSpace(spec.n_layers, spec.n_heads, T, per_position)
    C = space.size
    limit = C if scorer != "greedy" or greedy_steps is None else min(int(greedy_steps), C)
    szs, counts = _strata_counts(sizes, C, limit)
    # The greedy scorer evaluates up to C candidates per step; the others at most 3 conditions × C.
    chunk = rows_for_budget(spec, T, model_dtype(model), memory_budget=memory_budget, batch_size=batch_size,
                            n_rows=3 * C, edge_space=False, backward=scorer == "attribution")
    timings: dict[str, float] = {}

    with model_guard(model):
        run = clean_run(model, spec, tokens)
        # The identities component ablation relies on (attention output = Σ_h z_h W_O[h] + b_O,
        # block output = stream + attention + MLP, the linearised final norm), and that the hooks
        # really are on the computation path.
        check_decomposition(run, node_vectors(run), rel_tol=1e-4 if model_dtype(model) == torch.float32 else 2e-2)
        verify_component_ablation(model, spec, tokens, run.b_O)
        full = torch.log_softmax(run.logits, dim=-1)
        logit_scale = float(run.logits.abs().max())
        empty = _logprobs(model, spec, tokens, space, torch.zeros(1, C), abl, chunk)
        tv_empty = float(total_variation(full, empty)[0])
        t1 = time.perf_counter()
        timings["forward"] = t1 - t0
        ctx = _Context(model, spec, tokens, space, abl, run, full, chunk,
                       {"attribution_point": attribution_point, "greedy_steps": greedy_steps, "tv_empty": tv_empty})
        order, score = COMPONENT_SCORERS[scorer](ctx)
        t2 = time.perf_counter()
        timings["search"] = t2 - t1
        rank = torch.full((C,), -1, dtype=torch.long)
        rank[order] = torch.arange(order.numel())
        labels = _labels(rank, counts)
        tables = {"only": labels}
        if "random" in conds:
            perm = torch.randperm(C, generator=torch.Generator().manual_seed(int(seed)))
            rrank = torch.empty(C, dtype=torch.long)
            rrank[perm] = torch.arange(C)
            tables["random"] = _labels(rrank, counts)
        K = len(counts)
        ks = torch.arange(K)
        rows = []
        for c in conds:
            lab = tables["random" if c == "random" else "only"]
            kept = (lab[None, :] <= ks[:, None]).float()  # [K, C]
            rows.append(1.0 - kept if c == "inverse" else kept)
        # Metrics chunk by chunk: only per-row numbers are kept, never [rows, vocab].
        out: dict[str, list[Tensor]] = {n: [] for n in ROW_METRICS}
        # The last "only" row keeps every component (the full model): it must give back the clean
        # logits, or something outside the hook points changes the model (tl_strace.model.check_full_graph).
        full_row, start = conds.index("only") * K + K - 1, 0
        for logp in component_logprobs(model, spec, tokens, space, torch.cat(rows), abl, chunk=chunk):
            _check_finite(spec, logp)
            if start <= full_row < start + logp.shape[0]:
                check_full_graph(spec, full, logp[full_row - start], logit_scale, model_dtype(model))
            start += logp.shape[0]
            for n, v in row_metrics(full, logp, tgt, top_k).items():
                out[n].append(v.cpu())
        timings["evaluate"] = time.perf_counter() - t2

    full = full.cpu()
    shape = (len(conds), K)
    rs = lambda x: x.reshape(*shape, *x.shape[1:])  # noqa: E731
    m = {n: rs(torch.cat(v)) for n, v in out.items()}
    if tgt is not None:
        fce, frk = target_stats(full[None], tgt)
        full_ce, full_rank = float(fce[0]), float(frk[0])
    else:
        full_ce, full_rank = float("nan"), float("nan")
    full_ids, full_probs = top_tokens(full[None], top_k)
    top_ids = m["ids"]
    timings["total"] = time.perf_counter() - t0
    config = {
        "granularity": "component", "method": "component", "scorer": scorer, "ablation": ablation,
        "mean_positions": mean_positions if ablation == "mean" else None,
        "means": abl.source,
        "per_position": per_position, "n_components": C, "components": space.names(),
        "greedy_steps": greedy_steps, "attribution_point": attribution_point if scorer == "attribution" else None,
        "sizes": [float(s) for s in szs], "taus": None, "weights": None, "tv_empty": tv_empty,
        # the effective top_k: a top_k above the vocabulary keeps every token and is stored as d_vocab
        "seed": int(seed), "prepend_bos": prepend_bos, "top_k": int(top_ids.shape[-1]), "version": __version__,
    }
    return StraceResult(
        model=spec.to_json(),
        config=config,
        str_tokens=str_tokens(model, tokens.cpu()),
        tokens=tokens.cpu(),
        target=tgt,
        n_edges=C,
        conditions=conds,
        sizes=torch.tensor(szs, dtype=torch.float64),
        counts=torch.tensor(counts, dtype=torch.long),
        params=torch.tensor(szs, dtype=torch.float64),
        tv_all=m["tv"],
        kl_all=m["kl"],
        nucleus_all=m["nucleus"],
        entropy_all=m["entropy"],
        ce_all=m["ce"],
        target_rank_all=m["rank"],
        reaches_input_all=torch.ones(shape, dtype=torch.bool),
        top_ids=top_ids,
        top_probs=m["probs"],
        top_strs=[[str_tokens(model, top_ids[c, k]) for k in range(K)] for c in range(len(conds))],
        full_top_ids=full_ids[0],
        full_top_probs=full_probs[0],
        full_top_strs=str_tokens(model, full_ids[0]),
        full_entropy=float(entropy(full[None])[0]),
        full_ce=full_ce,
        full_target_rank=full_rank,
        labels=labels,
        rank=rank,
        weights=score.float(),
        timings=timings,
    )


# ---------------------------------------------------------------------------------------------
# Evaluating named component sets
# ---------------------------------------------------------------------------------------------
@serialised
def evaluate_components(
    model: Any,
    input: str | Tensor | Sequence[int],
    keep: Sequence[Sequence[str]],
    *,
    ablation: str = "zero",
    means: MeanCache | str | os.PathLike | None = None,
    mean_positions: str = "agnostic",
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    prepend_bos: bool | None = None,
) -> Float[Tensor, "row vocab"]:
    """Last-position log-probabilities with only the named components kept, one row per set.

    Every head and MLP not named is ablated (zero or mean). A name with ``@t`` keeps that
    component at position ``t`` only; the residual stream is always kept.

    >>> evaluate_components(model, "The capital of France is", [["L0H1", "MLP0"], []])  # doctest: +SKIP
    """
    spec = describe_model(model)
    ablation = options.check_choice("ablation", ablation, ABLATIONS)
    mean_positions = options.check_choice("mean_positions", mean_positions, MEAN_POSITIONS)
    batch_size, memory_budget = options.check_batch_size(batch_size), options.check_memory_budget(memory_budget)
    prepend_bos = options.check_optional_bool("prepend_bos", prepend_bos)
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=prepend_bos)
    T = int(tokens.numel())
    if isinstance(keep, str) or any(isinstance(k, str) for k in keep):
        raise InputError("keep is a list of component-name lists, one per row: e.g. [['L0H1', 'MLP2']].")
    per_pos = any("@" in n for row in keep for n in row)
    space = ComponentSpace(spec.n_layers, spec.n_heads, T, per_pos)
    L, S, P = spec.n_layers, space.n_slots, space.grid_pos
    grid = torch.zeros(len(keep), L * S * P)
    for i, row in enumerate(keep):
        for n in row:
            grid[i, space.cells_of(n)] = 1.0
    if per_pos:  # cells that cannot reach the output are irrelevant; keep them like ComponentSpace.grid
        g = grid.reshape(len(keep), L, S, P)
        g[:, L - 1, :, : P - 1] = 1.0
    keep_rows = grid[:, space.cells]
    abl = Ablation.build(spec, T, ablation, means, mean_positions, model=model)
    chunk = rows_for_budget(spec, T, model_dtype(model), memory_budget=memory_budget, batch_size=batch_size,
                            n_rows=len(keep), edge_space=False, outputs=len(keep))
    if not keep:
        return torch.empty(0, spec.d_vocab)
    with model_guard(model):
        b_O = torch.stack([attention_output(model, spec, l)[1].detach().float() for l in range(spec.n_layers)])
        verify_component_ablation(model, spec, tokens, b_O)
        return _logprobs(model, spec, tokens, space, keep_rows, abl, chunk).cpu()
