"""``strace()``: one call from a model and an input to a :class:`~tl_strace.results.StraceResult`.

It wires the modules in their one direction: model → graph → weights → search → masked
evaluation → metrics → result. Every precondition is checked before the first forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from tl_strace._version import __version__
from tl_strace.ablation import CONDITIONS, MaskRow, masked_logprobs, verify_attention_masking
from tl_strace import options
from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout, Graph, check_decomposition, node_vectors
from tl_strace.memory import rows_for_budget
from tl_strace.metrics import ROW_METRICS, entropy, row_metrics, target_stats, top_tokens
from tl_strace.model import (
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
from tl_strace.search import STRATIFICATIONS, Strata, random_strata
from tl_strace.weights import compute_weights

__all__ = ["CONDITIONS", "check_model", "strace"]


def _reaches_input(strata: Strata, layout: EdgeLayout) -> Tensor:
    """Per stratum: does the (connected) subgraph contain an edge out of an embedding node?

    Edges leaving embedding nodes are block 0's attention and attention-skip edges (and, in parallel
    blocks, its MLP edges, whose MLP reads the block input).
    """
    attn, res_attn, mlp, _ = layout.split(strata.labels)
    first = int(torch.minimum(attn[0].min(), res_attn[0].min()))
    if layout.parallel:
        first = min(first, int(mlp[0].min()))
    return torch.arange(strata.n_strata) >= first


@serialised
def check_model(model: Any, input: str | Tensor | Sequence[int], *,
                prepend_bos: bool | None = None) -> dict[str, float]:
    """Run every exactness check tl_strace relies on, on ``input``, and return the worst errors.

    * the edges into every node sum to the node's vector (attention and MLP nodes, block
      boundaries, the linearised final norm, head outputs) — as :func:`strace` checks on every call;
    * zeroing the attention pattern of block 0 leaves exactly the output bias (attention masking
      really reaches the model);
    * keeping every edge in a masked forward reproduces the model's logits (``"full graph logits"``).

    Raises :class:`~tl_strace.errors.UnsupportedModelError` / :class:`~tl_strace.errors.DecompositionError`
    with the failing identity when the model cannot be traced exactly.

    >>> check_model(model, "The capital of France is")   # doctest: +SKIP
    {'attention node (edges into resid_mid)': 3.1e-05, ..., 'full graph logits': 1.9e-06}
    """
    spec = describe_model(model)
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=prepend_bos)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, int(tokens.numel()), parallel=spec.parallel)
    with model_guard(model):
        run = clean_run(model, spec, tokens)
        errs = check_decomposition(run, node_vectors(run),
                                   rel_tol=1e-4 if model_dtype(model) == torch.float32 else 2e-2)
        verify_attention_masking(model, spec, tokens, run.b_O)
        everything = torch.zeros(layout.size, dtype=torch.long)
        (logp,) = list(masked_logprobs(model, spec, tokens, layout, [everything], [MaskRow(0, 0)], chunk=1))
    errs["full graph logits"] = check_full_graph(spec, torch.log_softmax(run.logits, -1), logp[0],
                                                 float(run.logits.abs().max()), model_dtype(model))
    return errs


@serialised
def strace(
    model: Any,
    input: str | Tensor | Sequence[int],
    *,
    sizes: Iterable[float] | None = None,
    method: str = "strace",
    taus: Iterable[float] | None = None,
    weights: str = "l1",
    conditions: Iterable[str] = CONDITIONS,
    target: int | str | Tensor | None = None,
    seed: int = 0,
    top_k: int = 5,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    prepend_bos: bool | None = None,
    ablate_attention: bool = True,
) -> StraceResult:
    """Trace one input: find nested subgraphs that best reproduce the model's next-token
    distribution, evaluate them by masked forward passes, and measure how dense the computation is.

    Thread-safe: calls on one model are serialised; calls on different models run in parallel.
    The lock covers tl_strace's own calls only: do not run the model yourself from another thread
    during a call (its forward passes would fire this call's hooks).
    Every call checks that keeping every edge reproduces the model's logits, and raises
    :class:`~tl_strace.errors.DecompositionError` if not (a raw hook or patch it could not see).

    Args:
        model: a ``TransformerBridge`` (TransformerLens 4) or ``HookedTransformer``, in eval mode,
            with no hooks attached (neither at hook points nor as raw PyTorch hooks).
        input: text (tokenized with the model's ``to_tokens``) or a token tensor ``[pos]`` / ``[1, pos]``.
            The prediction studied is the token after the last one.
        sizes: s-Trace target sizes in (0, 1], strictly increasing; default paper B's 26 (+ full).
        method: ``"strace"`` (default), or paper A's ``"threshold"`` / ``"nucleus"`` (which take ``taus``).
        weights: ``"l1"`` (paper B default) or ``"ifr"`` (paper A).
        conditions: any of ``"only"`` (always included), ``"random"``, ``"inverse"``.
        target: the true next token (id, or text whose first token is used), for cross-entropy and rank.
        seed: seed of the random baseline.
        top_k: how many top tokens to keep per stratum; a value above the vocabulary size keeps every
            token (``config["top_k"]`` records the effective value, ``min(top_k, d_vocab)``).
        batch_size: masks per forward pass; default: as many as ``memory_budget`` allows.
        memory_budget: the most extra memory the whole call may use (bytes, or text such as ``"1GiB"``,
            ``"512MB"``: :func:`tl_strace.options.parse_bytes`), by the upper bound of
            :func:`tl_strace.memory.estimate_memory`; a budget the input cannot fit is refused before
            any work, saying how much it needs. Default ``None``: each masked forward gets up to 1 GiB
            of rows and the rest is whatever the input needs.
        prepend_bos: passed to ``model.to_tokens`` for text input.
        ablate_attention: ``False`` never removes attention edges (the masks apply to residual and MLP
            edges only). This reproduces a pipeline whose attention mask silently fails to apply, to
            measure how much apparent sparsity depends on it; never use it for real measurements.

    Returns:
        A :class:`StraceResult`; ``result.tv``, ``result.density``, ``result.subgraph(1e-3)``, ...

    >>> res = strace(model, "The capital of France is")      # doctest: +SKIP
    >>> res.density, res.to_dataframe().head()               # doctest: +SKIP
    """
    t0 = time.perf_counter()
    spec = describe_model(model)
    opts = options.TraceOptions(sizes=sizes, method=method, taus=taus, weights=weights, conditions=conditions,
                                seed=seed, top_k=top_k, batch_size=batch_size, memory_budget=memory_budget,
                                prepend_bos=prepend_bos, ablate_attention=ablate_attention)  # every check, before any work
    conds, top_k, seed = opts.conditions, opts.top_k, opts.seed
    batch_size, memory_budget, prepend_bos, ablate_attention = (opts.batch_size, opts.memory_budget, opts.prepend_bos,
                                                                opts.ablate_attention)
    method, weights = opts.method, opts.weights
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=prepend_bos)
    tgt = target_token(model, spec, target)
    layout = EdgeLayout(spec.n_layers, spec.n_heads, int(tokens.numel()), parallel=spec.parallel)
    # Before any work: refuse a memory_budget the call cannot fit (tl_strace.memory).
    rows_for_budget(spec, layout.n_pos, model_dtype(model), memory_budget=memory_budget, batch_size=batch_size,
                    n_rows=1, random="random" in conds)
    timings: dict[str, float] = {}

    with model_guard(model):
        run = clean_run(model, spec, tokens)
        t1 = time.perf_counter()
        timings["forward"] = t1 - t0
        vec = node_vectors(run)
        check_decomposition(run, vec, rel_tol=1e-4 if model_dtype(model) == torch.float32 else 2e-2)
        verify_attention_masking(model, spec, tokens, run.b_O)
        graph: Graph = compute_weights(vec, layout, weights)
        full = torch.log_softmax(run.logits, dim=-1)
        logit_scale = float(run.logits.abs().max())
        del run, vec  # the clean activations are not needed past here; free them before the search
        t2 = time.perf_counter()
        timings["graph"] = t2 - t1
        strata = STRATIFICATIONS[method](graph, opts.parameters)
        tables = [strata.labels]
        rnd = None
        if "random" in conds:
            rnd = random_strata(graph, strata.counts.tolist(), strata.sizes.tolist(), seed=seed)
            tables.append(rnd.labels)
        t3 = time.perf_counter()
        timings["search"] = t3 - t2

        K = strata.n_strata
        rows = [MaskRow(table=(1 if c == "random" else 0), k=k, inverse=(c == "inverse")) for c in conds for k in range(K)]
        chunk = rows_for_budget(spec, layout.n_pos, model_dtype(model), memory_budget=memory_budget,
                                batch_size=batch_size, n_rows=len(rows), random="random" in conds)
        out: dict[str, list[Tensor]] = {n: [] for n in ROW_METRICS}
        # The last stratum of every method is the full graph (every valid edge; the others cannot
        # reach the last position), so its row must give back the clean logits: checked on every
        # call, it catches what require_ready cannot see (a patched module, a stateful model).
        full_row, start = conds.index("only") * K + K - 1, 0
        for logp in masked_logprobs(model, spec, tokens, layout, tables, rows, chunk=chunk,
                                    ablate_attention=ablate_attention):
            if not torch.isfinite(logp).all():
                raise InputError(f"{spec.name} produced non-finite logits under a masked forward; "
                                 "run the model in float32.")
            if start <= full_row < start + logp.shape[0]:
                check_full_graph(spec, full, logp[full_row - start], logit_scale, model_dtype(model))
            start += logp.shape[0]
            for n, v in row_metrics(full, logp, tgt, top_k).items():
                out[n].append(v)
        timings["evaluate"] = time.perf_counter() - t3

    C = len(conds)
    shape = (C, K)
    cat = lambda n: torch.cat(out[n]).cpu().reshape(*shape, *torch.cat(out[n]).shape[1:])  # noqa: E731
    reach = []
    for c in conds:
        if c == "inverse":  # every residual edge is kept: the skip chain reaches the input
            reach.append(torch.ones(K, dtype=torch.bool))
        else:
            reach.append(_reaches_input(rnd if c == "random" else strata, layout))
    top_ids = cat("ids")
    full_ids, full_probs = top_tokens(full[None], top_k)
    if tgt is not None:
        fce, frk = target_stats(full[None], tgt)
        full_ce, full_rank = float(fce[0]), float(frk[0])
    else:
        full_ce = full_rank = float("nan")
    timings["total"] = time.perf_counter() - t0
    return StraceResult(
        model=spec.to_json(),
        config={"method": method, "weights": weights, "ablation": "zero", "seed": int(seed),
                "granularity": "token", "ablate_attention": bool(ablate_attention),
                "sizes": [float(s) for s in strata.params] if method == "strace" else None,
                "taus": [float(s) for s in strata.params] if method != "strace" else None,
                "prepend_bos": prepend_bos, "top_k": int(top_ids.shape[-1]), "version": __version__},
        str_tokens=str_tokens(model, tokens.cpu()),
        tokens=tokens.cpu(),
        target=tgt,
        n_edges=graph.n_edges,
        conditions=conds,
        sizes=strata.sizes,
        counts=strata.counts,
        params=strata.params,
        tv_all=cat("tv"),
        kl_all=cat("kl"),
        nucleus_all=cat("nucleus"),
        entropy_all=cat("entropy"),
        ce_all=cat("ce"),
        target_rank_all=cat("rank"),
        reaches_input_all=torch.stack(reach),
        top_ids=top_ids,
        top_probs=cat("probs"),
        top_strs=[[str_tokens(model, top_ids[c, k]) for k in range(K)] for c in range(C)],
        full_top_ids=full_ids[0].cpu(),
        full_top_probs=full_probs[0].cpu(),
        full_top_strs=str_tokens(model, full_ids[0].cpu()),
        full_entropy=float(entropy(full[None])[0]),
        full_ce=full_ce,
        full_target_rank=full_rank,
        labels=strata.labels,
        rank=strata.rank,
        weights=graph.weights.float(),
        timings=timings,
    )
