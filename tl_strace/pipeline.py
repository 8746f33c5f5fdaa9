"""``strace()``: one call from a model and an input to a :class:`~tl_strace.results.StraceResult`.

It wires the modules in their one direction: model → graph → weights → search → masked
evaluation → metrics → result. Every precondition is checked before the first forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from jaxtyping import Float, Int
from typing import Any

import torch
from torch import Tensor

from tl_strace._version import __version__
from tl_strace.ablation import CONDITIONS, MaskRow, TokenMasks, masked_logprobs, verify_attention_masking
from tl_strace.engine import evaluate
from tl_strace import options
from tl_strace.graph import EdgeLayout, Graph, check_decomposition, node_vectors
from tl_strace.memory import rows_for_budget
from tl_strace.progress import Progress, check_progress
from tl_strace.model import (
    CleanRun,
    ModelSpec,
    check_full_graph,
    clean_run,
    describe_model,
    model_dtype,
    model_guard,
    prepare_tokens,
    require_ready,
    serialised,
    target_token,
)
from tl_strace.results import StraceResult, measured_fields
from tl_strace.search import STRATIFICATIONS, Strata, random_strata
from tl_strace.weights import compute_weights

__all__ = ["CONDITIONS", "PreparedGraph", "check_budget", "check_model", "prepare_graph", "strace", "trace_prepared"]


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
    attention: str | None = None,
    ablate_attention: bool | None = None,
    progress: bool | None = None,
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
        attention: ``"faithful"`` (default: every edge outside the subgraph is removed) or
            ``"never-ablated"``: attention edges are never removed (the masks apply to residual and MLP
            edges only). That is what the authors' published pipeline computes (its attention masks
            are never applied; METHOD.md, "Known pitfalls"), so it reproduces their curves; it is not a
            faithful measurement, and its results say so (``config["attention"]``, the views' titles,
            the corpus report). :data:`tl_strace.ablation.ATTENTION_MODES`.
        ablate_attention: the older spelling: ``False`` is ``attention="never-ablated"``.
        progress: show the stage and the masked rows done in a text bar on stderr once the call has
            run 2 s (:mod:`tl_strace.progress`). Default ``None``: only where someone watches (a
            terminal or a Jupyter kernel; not under pytest or in a log; ``TL_STRACE_PROGRESS=0``
            turns it off everywhere). ``False``: never.

    Returns:
        A :class:`StraceResult`; ``result.tv``, ``result.density``, ``result.subgraph(1e-3)``, ...

    >>> res = strace(model, "The capital of France is")      # doctest: +SKIP
    >>> res.density, res.to_dataframe().head()               # doctest: +SKIP
    """
    t0 = time.perf_counter()
    spec = describe_model(model)
    opts = options.TraceOptions(sizes=sizes, method=method, taus=taus, weights=weights, conditions=conditions,
                                seed=seed, top_k=top_k, batch_size=batch_size, memory_budget=memory_budget,
                                prepend_bos=prepend_bos, attention=attention,
                                ablate_attention=ablate_attention)  # every check, before any work
    show = check_progress(progress)
    # From here on every option is read from ``opts`` (checked and canonical), never from the arguments.
    require_ready(model)
    tokens = prepare_tokens(model, spec, input, prepend_bos=opts.prepend_bos)
    tgt = target_token(model, spec, target)
    check_budget(model, spec, opts, int(tokens.numel()))  # before any work
    timings: dict[str, float] = {}
    with model_guard(model), Progress(show, f"s-Trace ({int(tokens.numel())} tokens)") as bar:
        bar.stage("forward")
        run = clean_run(model, spec, tokens)
        timings["forward"] = time.perf_counter() - t0
        bar.stage("graph")
        prepared = prepare_graph(model, spec, opts, run, timings)
        del run  # the clean activations are not needed past here; free them before the search
        res = trace_prepared(model, spec, opts, prepared, tgt, timings, bar=bar)
    timings["total"] = time.perf_counter() - t0
    return res


def check_budget(model: Any, spec: ModelSpec, opts: options.TraceOptions, n_pos: int) -> None:
    """Refuse a ``memory_budget`` a trace over ``n_pos`` tokens cannot fit, before any work
    (:func:`tl_strace.memory.rows_for_budget`); the bound grows with ``n_pos``."""
    rows_for_budget(spec, n_pos, model_dtype(model), memory_budget=opts.memory_budget, batch_size=opts.batch_size,
                    n_rows=1, random="random" in opts.conditions)


@dataclass(frozen=True)
class PreparedGraph:
    """What the trace of one input keeps of its clean run: the weighted graph, the clean
    last-position log-probabilities and ``max |logit|`` (the full-graph check's scale)."""

    tokens: Int[Tensor, "pos"]
    layout: EdgeLayout
    graph: Graph
    full: Float[Tensor, "vocab"]
    logit_scale: float


def prepare_graph(model: Any, spec: ModelSpec, opts: options.TraceOptions, run: CleanRun,
                  timings: dict[str, float]) -> PreparedGraph:
    """The weighted graph of ``run`` (METHOD.md §1–2), after the exactness checks every trace runs:
    the edges into every node sum to it, and zeroing attention patterns reaches the model.

    ``run`` is the clean run of exactly the input traced (for a profile, a :meth:`CleanRun.prefix`);
    its time is added to ``timings["graph"]``. Call inside :func:`tl_strace.model.model_guard`.
    """
    t1 = time.perf_counter()
    layout = EdgeLayout(spec.n_layers, spec.n_heads, run.n_pos, parallel=spec.parallel)
    vec = node_vectors(run)
    check_decomposition(run, vec, rel_tol=1e-4 if model_dtype(model) == torch.float32 else 2e-2)
    verify_attention_masking(model, spec, run.tokens, run.b_O)
    graph: Graph = compute_weights(vec, layout, opts.weights)
    full = torch.log_softmax(run.logits, dim=-1)
    prepared = PreparedGraph(tokens=run.tokens, layout=layout, graph=graph, full=full,
                             logit_scale=float(run.logits.abs().max()))
    timings["graph"] = timings.get("graph", 0.0) + time.perf_counter() - t1
    return prepared


def trace_prepared(model: Any, spec: ModelSpec, opts: options.TraceOptions, prepared: PreparedGraph,
                   tgt: int | None, timings: dict[str, float], *, bar: Progress | None = None) -> StraceResult:
    """Everything :func:`strace` does after the graph: the search, the masked evaluation (with the
    full-graph exactness check) and the result. Shared by :func:`strace` and
    :func:`tl_strace.profile.density_profile`, so a profile's value at a position is the trace of
    that prefix by construction. Adds ``"search"`` and ``"evaluate"`` to ``timings`` (which the
    result keeps); call inside :func:`tl_strace.model.model_guard`. ``bar`` shows the stages
    (:class:`tl_strace.progress.Progress`; none by default).
    """
    bar = bar if bar is not None else Progress(False, "")
    conds = opts.conditions
    tokens, layout, graph, full = prepared.tokens, prepared.layout, prepared.graph, prepared.full
    t2 = time.perf_counter()
    bar.stage("search")
    strata = STRATIFICATIONS[opts.method](graph, opts.parameters)
    tables = [strata.labels]
    rnd_counts, rnd_reach = None, None
    if "random" in conds:
        rnd = random_strata(graph, strata.counts.tolist(), strata.sizes.tolist(), seed=opts.seed)
        # Only its labels go on (the masks); its rank is dropped here, before the masked forwards.
        tables.append(rnd.labels)
        rnd_counts, rnd_reach = rnd.counts, _reaches_input(rnd, layout)
        del rnd
    t3 = time.perf_counter()
    timings["search"] = timings.get("search", 0.0) + t3 - t2

    K = strata.n_strata
    # Stratum k is labels <= k and holds counts[k] edges (Strata), so a stratum whose count equals
    # the previous one's (short inputs, tiny sizes) is the previous subgraph again: when that holds
    # in every table, one masked row serves both and its metrics are copied (the same masks, so the
    # same numbers). Measured on SmolLM2: 5 of 27 rows saved at 5 tokens, 2 at 14, none at 53.
    present = torch.zeros(K, dtype=torch.bool)
    present[0] = True
    for c in [strata.counts] + ([rnd_counts] if rnd_counts is not None else []):
        c = c.cpu()
        present[1:] |= c[1:] != c[:-1]
    keep = [k for k in range(K) if bool(present[k])]
    slot = (torch.cumsum(present.long(), 0) - 1)  # each stratum's row among the kept ones
    U = len(keep)
    rows = [MaskRow(table=(1 if c == "random" else 0), k=k, inverse=(c == "inverse")) for c in conds for k in keep]
    chunk = rows_for_budget(spec, layout.n_pos, model_dtype(model), memory_budget=opts.memory_budget,
                            batch_size=opts.batch_size, n_rows=len(rows), random="random" in conds)
    # The last stratum of every method is the full graph (every valid edge; the others cannot
    # reach the last position): its row must give back the clean logits (tl_strace.engine.evaluate).
    masks = TokenMasks(spec, layout, tables, rows, device=tokens.device, ablate_attention=opts.ablate_attention)
    del tables  # the masks hold their int16 copy; the random labels are not needed past here
    bar.stage("evaluate")
    bar.rows(len(rows))
    m, reference = evaluate(model, spec, tokens, masks, clean=full, logit_scale=prepared.logit_scale,
                            full_row=conds.index("only") * U + int(slot[K - 1]), chunk=chunk, target=tgt,
                            top_k=opts.top_k, shape=(len(conds), U), on_rows=bar.advance)
    if U < K:
        m = {name: v.index_select(1, slot) for name, v in m.items()}
    timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t3

    reach = []
    for c in conds:
        if c == "inverse":  # every residual edge is kept: the skip chain reaches the input
            reach.append(torch.ones(K, dtype=torch.bool))
        else:
            reach.append(rnd_reach if c == "random" else _reaches_input(strata, layout))
    return StraceResult(
        model=spec.to_json(),
        config={"method": opts.method, "weights": opts.weights, "ablation": "zero", "seed": int(opts.seed),
                "granularity": "token", "attention": opts.attention,
                "ablate_attention": bool(opts.ablate_attention),
                "sizes": [float(s) for s in strata.params] if opts.method == "strace" else None,
                "taus": [float(s) for s in strata.params] if opts.method != "strace" else None,
                "prepend_bos": opts.prepend_bos, "top_k": int(m["ids"].shape[-1]), "version": __version__},
        n_edges=graph.n_edges,
        conditions=conds,
        sizes=strata.sizes,
        counts=strata.counts,
        params=strata.params,
        reaches_input_all=torch.stack(reach),
        labels=strata.labels,
        rank=strata.rank,
        weights=graph.weights.float(),
        timings=timings,
        **measured_fields(model, tokens, tgt, m, reference, opts.top_k, clean=full),
    )
