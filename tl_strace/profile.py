"""``density_profile()``: the s-Trace of every next-token prediction along one text, sharing one clean forward.

A paper's density is one number per input; along a text, each position ``t`` has its own prediction
(of token ``t + 1``) and its own output node. The model is causal, so the clean run of the prefix
``tokens[:t + 1]`` is the first ``t + 1`` positions of the run of the whole text
(:meth:`tl_strace.model.CleanRun.prefix`): one forward pass gives every position's graph. Everything
after the clean run is :func:`tl_strace.pipeline.trace_prepared`, the very code :func:`strace` runs,
so the profile's value at ``t`` is the trace of that prefix by construction (its full-graph
exactness check included, per position).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from jaxtyping import Float, Int
from typing import Any

import torch
from torch import Tensor

from tl_strace._version import __version__
from tl_strace.ablation import CONDITIONS
from tl_strace.errors import InputError
from tl_strace.model import (ModelSpec, clean_run, describe_model, model_guard, prepare_tokens, require_ready,
                             run_hooked, serialised, str_tokens, target_token)
from tl_strace.options import TraceOptions
from tl_strace.progress import Progress, check_progress
from tl_strace.pipeline import check_budget, prepare_graph, trace_prepared
from tl_strace.results import DensityProfile, StraceResult

__all__ = ["Sampling", "check_positions", "density_profile", "for_each_position", "greedy_generate",
           "trace_generation"]

_TRACE_OPTIONS = frozenset(f.name for f in dataclasses.fields(TraceOptions))  # what for_each_position accepts


def check_positions(positions: Any, n_tokens: int) -> tuple[int, ...]:
    """The positions to trace, checked, in increasing order: ``None`` gives every position from
    the second token on (each next-token prediction with some context); otherwise an int or an
    iterable of ints (NumPy ints too) in ``[0, n_tokens)``, without duplicates. Anything else is one
    :class:`InputError`, before any work."""
    if positions is None:
        if n_tokens < 2:
            raise InputError(f"The text has {n_tokens} token; a profile needs at least two (the default positions "
                             "start at the second token), or pass positions=[0].")
        return tuple(range(1, n_tokens))
    if isinstance(positions, Tensor):
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool \
                or positions.ndim > 1:
            raise InputError(f"positions must be integer positions, got a {positions.dtype} tensor of shape "
                             f"{tuple(positions.shape)}.")
        positions = positions.reshape(-1).tolist()
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise InputError(f"positions must be an int or a list of ints (token positions), got {positions!r:.60}.")
    out = list(positions)
    if not out:
        raise InputError("positions is empty; give at least one token position (or None for every position).")
    # ints, NumPy ints too (numbers.Integral); never bools, floats or strings
    bad = [p for p in out if isinstance(p, bool) or type(p).__name__ == "bool_" or not isinstance(p, numbers.Integral)]
    if bad:
        raise InputError(f"positions must be ints (token positions), got {bad[0]!r:.60} "
                         f"({type(bad[0]).__name__}).")
    out = [int(p) for p in out]
    outside = [p for p in out if not 0 <= p < n_tokens]
    if outside:
        raise InputError(f"Position {outside[0]} is outside the text's {n_tokens} tokens: positions lie in "
                         f"[0, {n_tokens - 1}] (position t traces the prediction after token t).")
    if len(set(out)) != len(out):
        dup = next(p for p in out if out.count(p) > 1)
        raise InputError(f"Position {dup} is given twice; give each position once.")
    return tuple(sorted(out))


@serialised
def density_profile(
    model: Any,
    text: str | Tensor | Sequence[int],
    positions: numbers.Integral | Iterable[numbers.Integral] | Tensor | None = None,
    *,
    target: int | str | Tensor | None = None,
    next_token_targets: bool = True,
    shared_forward: bool = True,
    sizes: Iterable[float] | None = None,
    method: str = "strace",
    taus: Iterable[float] | None = None,
    weights: str = "l1",
    conditions: Iterable[str] = CONDITIONS,
    seed: int = 0,
    top_k: int = 5,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    prepend_bos: bool | None = None,
    attention: str | None = None,
    ablate_attention: bool | None = None,
    progress: bool | None = None,
) -> DensityProfile:
    """Trace the next-token prediction after each chosen position of ``text``: one
    :class:`~tl_strace.results.StraceResult` per position, from one clean forward of the whole text.

    The value at position ``t`` is exactly ``strace(model, tokens[:t + 1], target=tokens[t + 1], ...)``
    (at the last position ``target``, the token after the text when given; no target before it with
    ``next_token_targets=False``), with the
    same options: the clean run of the prefix is sliced from the run of the whole text (the model is
    causal), and everything after it is the code :func:`~tl_strace.strace` runs. The slice can differ
    from a forward on the prefix by float rounding only (a longer sequence may take another
    reduction order): measured on SmolLM2, the strata are identical, edges whose weights tie to ~1e-8
    may swap places in the search order inside a stratum. The curves, top tokens and densities are
    equal bit for bit: they are measured on the prefix itself against the full graph's row of the
    same masked forwards (:func:`tl_strace.engine.evaluate`). ``shared_forward=False`` gives
    bit-identical results, the search order included.

    Args:
        model: as for :func:`~tl_strace.strace`.
        text: text (tokenized with the model's ``to_tokens``) or a token tensor ``[pos]`` / ``[1, pos]``.
        positions: token positions ``t`` (0-based, BOS included when the tokenizer adds one) whose
            following prediction is traced: an int, a list of ints, or ``None`` (default) for every
            position from the second token on. Duplicates and positions outside the text are refused
            before any work.
        target: the token that follows the text (an id, or text whose first token is used), the
            target of the text's last position, as :func:`~tl_strace.strace`'s ``target`` is for the
            whole text (default ``None``: that position has no target).
        next_token_targets: use the text's token ``t + 1`` as position ``t``'s target (cross-entropy
            and rank of the true next token).
        shared_forward: ``True`` (default): one clean forward of the text, each prefix's clean run
            sliced from it. ``False``: one clean forward per prefix, so every position is bit for bit
            what :func:`~tl_strace.strace` returns (its search order among near-tied edges included)
            at the cost of one clean forward per position (SmolLM2, one CPU thread, every position
            of 28 tokens: 0.92x the separate ``strace`` calls this way, 0.78x with the shared
            forward; ``benchmarks/bench_profile.py``).
        sizes, method, taus, weights, conditions, seed, top_k, batch_size, memory_budget, prepend_bos,
        attention, ablate_attention: as for :func:`~tl_strace.strace`, the same for every position;
            a ``memory_budget`` is checked against the longest prefix before any work.
        progress: a text bar of the positions done (and which one runs) once the call has run
            2 s, as for :func:`~tl_strace.strace` (default: only where someone watches).

    Memory: the profile keeps every position's whole result, whose trace fields (labels, rank,
    weights) take about 20 bytes per edge slot of its prefix; ``memory_budget`` bounds one
    position's trace, not this sum. Every position of a T-token text on SmolLM2 (30 layers, 9 heads):
    7 MiB at T = 15, 223 MiB at T = 50, 1.7 GiB at T = 100 (it grows as T³); choose ``positions``
    for long texts.

    Returns:
        A :class:`~tl_strace.results.DensityProfile`: ``profile.density``, ``profile.at(t)``,
        ``profile.to_dataframe()``, ``profile.plot()``, and the text coloured by density in Jupyter.

    >>> prof = density_profile(model, "The capital of France is Paris")   # doctest: +SKIP
    >>> prof.to_dataframe()[["token", "predicted", "density"]]            # doctest: +SKIP
    """
    opts = TraceOptions(sizes=sizes, method=method, taus=taus, weights=weights, conditions=conditions,
                        seed=seed, top_k=top_k, batch_size=batch_size, memory_budget=memory_budget,
                        prepend_bos=prepend_bos, attention=attention, ablate_attention=ablate_attention)
    results: list[Any] = []
    tokens, chosen, timings = _each_position(model, text, positions, opts, lambda t, r: results.append(r), target=target,
                                             next_token_targets=next_token_targets, shared_forward=shared_forward,
                                             progress=progress)
    first = results[0]  # every position's config is the same: the options, checked once
    config = {**first.config, "conditions": list(opts.conditions), "next_token_targets": next_token_targets,
              "shared_forward": shared_forward, "version": __version__}
    return DensityProfile(model=first.model, config=config, tokens=tokens.cpu(), str_tokens=str_tokens(model, tokens.cpu()),
                          positions=chosen, results=tuple(results), timings=timings)


@serialised
def for_each_position(model: Any, text: str | Tensor | Sequence[int], each: Callable[[int, StraceResult], Any],
                      positions: numbers.Integral | Iterable[numbers.Integral] | Tensor | None = None, *,
                      target: int | str | Tensor | None = None, next_token_targets: bool = True,
                      shared_forward: bool = True, progress: bool | None = None,
                      **trace_options: Any) -> dict[str, float]:
    """:func:`density_profile` without keeping the results: ``each(t, result)`` is called with
    every position's :class:`~tl_strace.results.StraceResult` as soon as it is traced, and the
    result is dropped after the call unless ``each`` keeps it, so memory holds one position's trace
    at a time (a profile keeps all of them: it grows as T³). The corpus runner's every-position
    mode records each position this way. ``trace_options`` are :func:`~tl_strace.strace`'s; every
    argument is checked before any work, as :func:`density_profile` does. Returns the timings."""
    if not callable(each):
        raise InputError(f"each must be a function of (position, result), got {each!r:.60}.")
    unknown = sorted(set(trace_options) - _TRACE_OPTIONS)
    if unknown:
        raise InputError(f"for_each_position got an unknown option {unknown[0]!r}; the options are strace's: "
                         f"{', '.join(sorted(_TRACE_OPTIONS))}.")
    opts = TraceOptions(**trace_options)
    return _each_position(model, text, positions, opts, each, target=target, next_token_targets=next_token_targets,
                          shared_forward=shared_forward, progress=progress)[2]


def _each_position(model: Any, text: str | Tensor | Sequence[int], positions: Any, opts: TraceOptions,
                   each: Callable[[int, StraceResult], Any], *, target: Any, next_token_targets: bool,
                   shared_forward: bool, progress: bool | None) -> tuple[Int[Tensor, "pos"], tuple[int, ...],
                                                                        dict[str, float]]:
    """The loop of :func:`density_profile` and :func:`for_each_position` (under their lock): the
    checks, one clean forward, then each position's trace handed to ``each``. Returns the tokens,
    the positions traced and the timings."""
    t0 = time.perf_counter()
    spec = describe_model(model)
    for name, flag in (("next_token_targets", next_token_targets), ("shared_forward", shared_forward)):
        if not isinstance(flag, bool):
            raise InputError(f"{name} must be True or False, got {flag!r:.60}.")
    show = check_progress(progress)
    require_ready(model)
    tokens = prepare_tokens(model, spec, text, prepend_bos=opts.prepend_bos)
    last_target = target_token(model, spec, target)
    T = int(tokens.numel())
    chosen = check_positions(positions, T)
    check_budget(model, spec, opts, chosen[-1] + 1)  # the longest prefix bounds every position's memory
    timings = {"forward": 0.0, "graph": 0.0, "search": 0.0, "evaluate": 0.0}
    with model_guard(model), Progress(show, f"density profile ({len(chosen)} positions)", unit="position") as bar:
        bar.stage("forward")
        bar.rows(len(chosen))
        # Only the positions up to the last chosen one are ever read.
        full = (clean_run(model, spec, tokens[: chosen[-1] + 1], every_position=True) if shared_forward
                else None)
        timings["forward"] = time.perf_counter() - t0
        for t in chosen:
            bar.stage(f"position {t}")
            t1 = time.perf_counter()
            own: dict[str, float] = {}
            # the slice (this position's share of the one forward), or the prefix's own forward
            run = full.prefix(t + 1) if full is not None else clean_run(model, spec, tokens[: t + 1])
            own["forward"] = time.perf_counter() - t1
            if full is None:
                timings["forward"] += own["forward"]
            prepared = prepare_graph(model, spec, opts, run, own)
            del run  # free the prefix copy before the search (the full run stays for the next position)
            if t + 1 < T:
                tgt = int(tokens[t + 1]) if next_token_targets else None
            else:  # the text's last position: its target is the token after the text, when given
                tgt = last_target
            res = trace_prepared(model, spec, opts, prepared, tgt, own)
            del prepared
            own["total"] = time.perf_counter() - t1
            for k in ("graph", "search", "evaluate"):
                timings[k] += own[k]
            each(t, res)
            del res
            bar.advance(1)
        del full
    timings["total"] = time.perf_counter() - t0
    return tokens, chosen, timings


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How :func:`trace_generation` samples each new token instead of taking the argmax: from the
    softmax of the logits divided by ``temperature``, restricted to the ``top_k`` most likely tokens
    and/or to the smallest set whose probability reaches ``top_p`` (nucleus sampling), with a
    generator seeded by ``seed``, so the same settings give the same text. Checked on construction.

    ``Sampling(top_k=1)`` is greedy decoding (the test suite checks that it gives the argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
            raise InputError(f"Sampling temperature must be a positive number, got {t!r:.60}.")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise InputError(f"Sampling top_k must be a positive int or None, got {k!r:.60}.")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1):
            raise InputError(f"Sampling top_p must be a number in (0, 1] or None, got {p!r:.60}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise InputError(f"Sampling seed must be a non-negative int, got {self.seed!r:.60}.")

    def choose(self, logits: Float[Tensor, "vocab"], generator: torch.Generator) -> int:
        """One token drawn from ``logits`` by these settings (in float64 on the CPU, so the draw does
        not depend on the model's device or dtype beyond its logits)."""
        z = logits.detach().to("cpu", torch.float64) / float(self.temperature)
        if self.top_k is not None and self.top_k < z.numel():
            kth = torch.topk(z, int(self.top_k)).values[-1]
            z = torch.where(z >= kth, z, torch.full_like(z, -math.inf))
        probs = torch.softmax(z, dim=-1)
        if self.top_p is not None and self.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_p, 0) - sorted_p  # the mass of the tokens ranked above each one
            keep = torch.zeros_like(probs, dtype=torch.bool)
            keep[order[before < float(self.top_p)]] = True  # the smallest set reaching top_p (the top token always)
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        return int(torch.multinomial(probs, 1, generator=generator))


def greedy_generate(model: Any, spec: ModelSpec, tokens: Int[Tensor, "pos"], max_new_tokens: int, *,
                    stop_at_eos: bool = True, sampling: Sampling | None = None) -> Int[Tensor, "pos_out"]:
    """``tokens`` followed by up to ``max_new_tokens`` new tokens, each the argmax of its next-token
    distribution (or drawn by ``sampling``), stopping after the tokenizer's end-of-sequence token
    when ``stop_at_eos``.

    One forward of the whole sequence per new token, without a KV cache (what tl_strace's forwards
    are everywhere: the same logits a trace compares against). Call inside
    :func:`~tl_strace.model.model_guard`.
    """
    eos = getattr(getattr(model, "tokenizer", None), "eos_token_id", None) if stop_at_eos else None
    gen = None
    if sampling is not None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(sampling.seed))
    out = tokens
    for _ in range(max_new_tokens):
        logits = run_hooked(model, out[None], [], backend=spec.backend)[0]
        nxt = int(torch.argmax(logits.float())) if sampling is None else sampling.choose(logits, gen)
        out = torch.cat([out, torch.tensor([nxt], dtype=out.dtype, device=out.device)])
        if eos is not None and nxt == int(eos):
            break
    return out


@serialised
def trace_generation(model: Any, prompt: str | Tensor | Sequence[int], max_new_tokens: int = 20, *,
                     stop_at_eos: bool = True, sampling: Sampling | None = None,
                     prepend_bos: bool | None = None, **options: Any) -> DensityProfile:
    """Generate from ``prompt`` (greedily, or with a user's ``sampling``), then trace the prediction
    of every generated token.

    The model continues ``prompt`` with up to ``max_new_tokens`` tokens, each the argmax of its
    next-token distribution, or drawn by ``sampling`` (a :class:`Sampling`: temperature, top-k,
    top-p, seed) (:func:`greedy_generate`; stopping after the end-of-sequence token with
    ``stop_at_eos``). The result is :func:`density_profile` of the whole sequence at the positions
    that predicted the generated tokens (position ``t`` predicts token ``t + 1``: from the prompt's
    last token to the one before the last generated token), each with the generated token as its
    target; ``config["generation"]`` records the prompt's length and the settings.

    ``options`` are :func:`density_profile`'s (every option of :func:`~tl_strace.strace`,
    ``shared_forward``); all are checked, and a ``memory_budget`` against the longest sequence,
    before generation starts.

    >>> prof = trace_generation(model, "The capital of France is", 8)     # doctest: +SKIP
    >>> "".join(prof.str_tokens[prof.config["generation"]["prompt_tokens"]:])   # doctest: +SKIP
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r:.60}.")
    if not isinstance(stop_at_eos, bool):
        raise InputError(f"stop_at_eos must be True or False, got {stop_at_eos!r:.60}.")
    if sampling is not None and not isinstance(sampling, Sampling):
        raise InputError(f"sampling must be a tl_strace.profile.Sampling (e.g. Sampling(temperature=0.8, top_p=0.9, "
                         f"seed=0)) or None for greedy decoding, got {sampling!r:.60}.")
    for name in ("positions", "next_token_targets", "target"):
        if name in options:
            raise InputError(f"trace_generation chooses {name} itself (the generated tokens); leave {name} out.")
    spec = describe_model(model)
    pass_on = {k: v for k, v in options.items() if k != "shared_forward"}
    opts = TraceOptions(prepend_bos=prepend_bos, **pass_on)  # every option checked before generation
    require_ready(model)
    tokens = prepare_tokens(model, spec, prompt, prepend_bos=opts.prepend_bos)
    P = int(tokens.numel())
    if P + max_new_tokens > spec.n_ctx:
        raise InputError(f"The prompt is {P} tokens and {spec.name}'s context {spec.n_ctx}: at most "
                         f"{spec.n_ctx - P} new tokens fit; got max_new_tokens={max_new_tokens}.")
    check_budget(model, spec, opts, P + max_new_tokens - 1)
    t0 = time.perf_counter()
    with model_guard(model):
        seq = greedy_generate(model, spec, tokens, max_new_tokens, stop_at_eos=stop_at_eos, sampling=sampling)
    elapsed = time.perf_counter() - t0
    prof = density_profile(model, seq, list(range(P - 1, int(seq.numel()) - 1)), next_token_targets=True,
                           prepend_bos=prepend_bos, **options)
    gen = {"prompt_tokens": P, "new_tokens": int(seq.numel()) - P, "max_new_tokens": max_new_tokens,
           "decoding": "greedy" if sampling is None else "sampling", "stop_at_eos": stop_at_eos}
    if sampling is not None:
        gen["sampling"] = dataclasses.asdict(sampling)
    return dataclasses.replace(prof, config={**prof.config, "generation": gen},
                               timings={**prof.timings, "generate": elapsed})
