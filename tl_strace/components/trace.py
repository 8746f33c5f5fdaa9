""":func:`component_strace` (component-level s-Trace) and :func:`evaluate_components` (one chosen set)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from jaxtyping import Float
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tl_strace import options
from tl_strace._version import __version__
from tl_strace.components.ablate import Ablation, ComponentMasks, _logprobs, verify_component_ablation
from tl_strace.components.scorers import COMPONENT_SCORERS, ComponentOptions, _Context
from tl_strace.components.space import ABLATIONS, ComponentSpace, MAX_DEFAULT_STRATA
from tl_strace.errors import InputError
from tl_strace.graph import check_decomposition, node_vectors
from tl_strace.mean import MEAN_POSITIONS, MeanCache
from tl_strace.memory import rows_for_budget
from tl_strace.engine import evaluate
from tl_strace.metrics import total_variation
from tl_strace.model import (
    attention_output,
    clean_run,
    describe_model,
    model_dtype,
    model_guard,
    prepare_tokens,
    require_ready,
    serialised,
    target_token,
)
from tl_strace.results import ComponentResult, measured_fields
from tl_strace.progress import Progress, check_progress
from tl_strace.search import check_sizes, labels_from_rank, rank_of, target_counts


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
        counts = target_counts(szs, C)  # the token level's rule: floor(σ·C) for σ as written
    keep = [(s, c) for s, c in zip(szs, counts) if c <= limit or c == C]
    return [s for s, _ in keep], [c for _, c in keep]


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
    attribution_point: float | None = None,
    target: int | str | Tensor | None = None,
    seed: int = 0,
    top_k: int = 5,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    prepend_bos: bool | None = None,
    progress: bool | None = None,
) -> ComponentResult:
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
        attribution_point: the keep value ``m`` in (0, 1) at which attribution gradients are taken
            (scorer ``"attribution"`` only; default 0.5). Given with another scorer it is refused.
        target: the true next token (id or text) for cross-entropy and rank.
        seed: seed of the random condition.
        top_k: top tokens kept per stratum; a value above the vocabulary size keeps every token
            (``config["top_k"]`` records the effective value, ``min(top_k, d_vocab)``).
        batch_size / memory_budget: rows per masked forward / the whole call's memory bound, as in
            :func:`tl_strace.strace` (component calls have no edge space; see :mod:`tl_strace.memory`).
        prepend_bos: passed to ``model.to_tokens`` for text.
        progress: a text bar of the stage and the masked rows done once the call has run 2 s, as
            for :func:`tl_strace.strace` (default: only where someone watches).

    Returns:
        A :class:`~tl_strace.results.ComponentResult` (``config["granularity"] == "component"``).
    """
    t0 = time.perf_counter()
    spec = describe_model(model)
    # Every option, before any work; iterables are read once, scalars made canonical.
    opts = ComponentOptions(sizes=sizes, conditions=conditions, seed=seed, top_k=top_k, batch_size=batch_size,
                            memory_budget=memory_budget, prepend_bos=prepend_bos, scorer=scorer, ablation=ablation,
                            mean_positions=mean_positions, per_position=per_position, greedy_steps=greedy_steps,
                            attribution_point=attribution_point)
    show = check_progress(progress)
    # From here on every option is read from ``opts`` (checked and canonical), never from the arguments.
    conds = opts.conditions
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=opts.prepend_bos)
    T = int(tokens.numel())
    tgt = target_token(model, spec, target)
    abl = Ablation.build(spec, T, opts.ablation, means, opts.mean_positions, model=model)
    space = ComponentSpace(spec.n_layers, spec.n_heads, T, opts.per_position)
    C = space.size
    limit = C if opts.scorer != "greedy" or opts.greedy_steps is None else min(int(opts.greedy_steps), C)
    szs, counts = _strata_counts(opts.sizes, C, limit)
    # The greedy scorer evaluates up to C candidates per step; the others at most 3 conditions × C.
    chunk = rows_for_budget(spec, T, model_dtype(model), memory_budget=opts.memory_budget, batch_size=opts.batch_size,
                            n_rows=3 * C, edge_space=False, backward=opts.scorer == "attribution")
    timings: dict[str, float] = {}

    with model_guard(model), Progress(show, f"component s-Trace ({T} tokens)") as bar:
        bar.stage("forward")
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
                       {"attribution_point": opts.attribution_point, "greedy_steps": opts.greedy_steps, "tv_empty": tv_empty})
        bar.stage(f"search ({opts.scorer})")
        order, score = COMPONENT_SCORERS[opts.scorer](ctx)
        t2 = time.perf_counter()
        timings["search"] = t2 - t1
        rank = rank_of(order, C)
        c = torch.tensor(counts, dtype=torch.long)
        labels = labels_from_rank(rank, c)
        tables = {"only": labels}
        if "random" in conds:  # this granularity's random baseline: a seeded uniform order of the components
            perm = torch.randperm(C, generator=torch.Generator().manual_seed(int(opts.seed)))
            tables["random"] = labels_from_rank(rank_of(perm, C), c)
        K = len(counts)
        shape = (len(conds), K)  # rows: condition-major, one per stratum
        ks = torch.arange(K)
        rows = []
        for c in conds:
            lab = tables["random" if c == "random" else "only"]
            kept = (lab[None, :] <= ks[:, None]).float()  # [K, C]
            rows.append(1.0 - kept if c == "inverse" else kept)
        # The last "only" row keeps every component (the full model): it must give back the clean
        # logits, or something outside the hook points changes the model (tl_strace.engine.evaluate).
        masks = ComponentMasks(spec, space, torch.cat(rows), abl, device=tokens.device, dtype=model_dtype(model))
        bar.stage("evaluate")
        bar.rows(masks.n_rows)
        m, reference = evaluate(model, spec, tokens, masks, clean=full, logit_scale=logit_scale,
                                full_row=conds.index("only") * K + K - 1, chunk=chunk, target=tgt,
                                top_k=opts.top_k, shape=shape, on_rows=bar.advance)
        timings["evaluate"] = time.perf_counter() - t2

    timings["total"] = time.perf_counter() - t0
    config = {
        "granularity": "component", "method": "component", "scorer": opts.scorer, "ablation": opts.ablation,
        "mean_positions": opts.mean_positions if opts.ablation == "mean" else None,
        "means": abl.source,
        "per_position": opts.per_position, "n_components": C, "components": space.names(),
        "greedy_steps": opts.greedy_steps, "attribution_point": opts.attribution_point,
        "sizes": [float(s) for s in szs], "taus": None, "weights": None, "tv_empty": tv_empty,
        # the effective top_k: a top_k above the vocabulary keeps every token and is stored as d_vocab
        "seed": int(opts.seed), "prepend_bos": opts.prepend_bos, "top_k": int(m["ids"].shape[-1]), "version": __version__,
    }
    return ComponentResult(
        model=spec.to_json(),
        config=config,
        n_components=C,
        conditions=conds,
        sizes=torch.tensor(szs, dtype=torch.float64),
        counts=torch.tensor(counts, dtype=torch.long),
        params=torch.tensor(szs, dtype=torch.float64),
        reaches_input_all=torch.ones(shape, dtype=torch.bool),
        labels=labels,
        rank=rank,
        scores=score.float(),
        timings=timings,
        **measured_fields(model, tokens, tgt, m, reference, opts.top_k, clean=full),
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
