"""Checks of the public options against the registries of names, above the modules that define them.

Valid names come from the registries (:data:`tl_strace.search.STRATIFICATIONS`,
:data:`tl_strace.weights.WEIGHTS`, :data:`tl_strace.ablation.CONDITIONS`); registries that live in
modules above this one (component scorers, ablations, mean positions) are passed in by the caller.
Every value check that needs no registry is in :mod:`tl_strace.checks` and re-exported here, so an
entry point imports its checks from one module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tl_strace.ablation import ATTENTION_MODES, CONDITIONS
from tl_strace.checks import *  # noqa: F403 - the value checks, re-exported
from tl_strace.checks import __all__ as _CHECKS
from tl_strace.checks import (
    _materialise,
    check_batch_size,
    check_bool,
    check_choice,
    check_memory_budget,
    check_optional_bool,
    check_seed,
    check_sizes,
    check_taus,
    check_top_k,
    describe,
)
from tl_strace.errors import InputError
from tl_strace.search import STRATIFICATIONS
from tl_strace.weights import WEIGHTS

__all__ = [*_CHECKS, "CommonOptions", "TraceOptions", "check_attention", "check_conditions", "check_method", "check_weights"]


def check_method(method: Any) -> str:
    """A stratification of :data:`tl_strace.search.STRATIFICATIONS`."""
    return check_choice("method", method, STRATIFICATIONS)


def check_weights(weights: Any) -> str:
    """A weight scheme of :data:`tl_strace.weights.WEIGHTS`."""
    return check_choice("weights", weights, WEIGHTS)


def check_attention(attention: Any, ablate_attention: Any = None) -> str:
    """The attention mode (:data:`tl_strace.ablation.ATTENTION_MODES`) from ``attention`` and/or the
    older boolean ``ablate_attention`` (``False`` is ``"never-ablated"``); both ``None`` is
    ``"faithful"``, and two that disagree are refused."""
    mode = None if attention is None else check_choice("attention", attention, ATTENTION_MODES)
    if ablate_attention is None:
        return mode or "faithful"
    old = "faithful" if check_bool("ablate_attention", ablate_attention) else "never-ablated"
    if mode is not None and mode != old:
        raise InputError(f"attention={mode!r} and ablate_attention={bool(ablate_attention)} disagree; pass only "
                         f"attention= ('faithful' or 'never-ablated').")
    return old


def check_conditions(conditions: Any) -> tuple[str, ...]:
    """Distinct names of :data:`tl_strace.ablation.CONDITIONS`, as given (``"only"`` is added by the pipeline)."""
    if conditions is None:
        raise InputError(f"conditions must be a list of names from {list(CONDITIONS)}, e.g. ['only']; got None.")
    if isinstance(conditions, str):
        raise InputError(f"conditions must be a list of names, e.g. [{conditions!r}]; got the string {conditions!r}.")
    conds = _materialise("conditions", conditions, "['only', 'random']")
    bad = [c for c in conds if not isinstance(c, str) or c not in CONDITIONS]
    if bad or not conds or len(set(conds)) != len(conds):
        shown = f" ({', '.join(describe(c) for c in bad)} unknown)" if bad else ""
        raise InputError(f"Conditions must be distinct names from {list(CONDITIONS)}; got {list(conds)}{shown}.")
    return conds


@dataclass(frozen=True)
class CommonOptions:
    """The options every s-Trace entry point shares, checked once in ``__post_init__``.

    Constructing one is the check: a bad value raises the one-line :class:`InputError` of
    :mod:`tl_strace.checks` before any work, and every field holds its canonical form afterwards
    (tuples for sequences, read once; Python ints; ``memory_budget`` in bytes). ``conditions``
    always starts with ``"only"`` (added when missing; the others keep their order).

    Fields are annotated ``Any`` because they accept what a user passes (a generator of sizes,
    ``"1GiB"``, a NumPy integer); after construction they hold: ``sizes: tuple[float, ...] | None``,
    ``conditions: tuple[str, ...]``, ``seed: int``, ``top_k: int``, ``batch_size: int | None``,
    ``memory_budget: int | None`` (bytes), ``prepend_bos: bool | None``.
    """

    sizes: Any = None
    conditions: Any = ("only",)
    seed: Any = 0
    top_k: Any = 5
    batch_size: Any = None
    memory_budget: Any = None
    prepend_bos: Any = None

    def __post_init__(self) -> None:
        conds = check_conditions(self.conditions)
        self._canonical(sizes=check_sizes(self.sizes), conditions=tuple(dict.fromkeys(("only", *conds))),
             seed=check_seed(self.seed), top_k=check_top_k(self.top_k), batch_size=check_batch_size(self.batch_size),
             memory_budget=check_memory_budget(self.memory_budget),
             prepend_bos=check_optional_bool("prepend_bos", self.prepend_bos))

    def _canonical(self, **values: Any) -> None:
        """Store checked values on the frozen instance (for ``__post_init__`` of this class and subclasses)."""
        for k, v in values.items():
            object.__setattr__(self, k, v)


@dataclass(frozen=True)
class TraceOptions(CommonOptions):
    """Every option of a token-level trace (:func:`tl_strace.strace`, the corpus runner, ``tl-strace
    trace``): the shared ones plus the stratification (``method`` with ``sizes`` or ``taus``), the
    edge ``weights`` and the ``attention`` mode (``ablate_attention``, the older boolean spelling, is
    accepted and kept consistent: after construction ``ablate_attention == (attention == "faithful")``). Names are checked against the registries
    (:data:`~tl_strace.search.STRATIFICATIONS`, :data:`~tl_strace.weights.WEIGHTS`,
    :data:`~tl_strace.ablation.CONDITIONS`).

    >>> TraceOptions(sizes=[1e-3, 0.1], conditions=["random"]).conditions
    ('only', 'random')
    """

    conditions: Any = CONDITIONS
    method: Any = "strace"
    taus: Any = None
    weights: Any = "l1"
    attention: Any = None
    ablate_attention: Any = None

    def __post_init__(self) -> None:
        method = check_method(self.method)
        if method == "strace" and self.taus is not None:
            raise InputError("taus apply to method='threshold' or 'nucleus'; s-Trace takes sizes.")
        if method != "strace" and self.sizes is not None:
            raise InputError(f"method={method!r} builds strata from taus (weight thresholds); pass taus=..., not sizes.")
        super().__post_init__()
        mode = check_attention(self.attention, self.ablate_attention)
        self._canonical(method=method, weights=check_weights(self.weights), taus=check_taus(self.taus),
             attention=mode, ablate_attention=mode == "faithful")

    @property
    def parameters(self) -> tuple[float, ...] | None:
        """What the stratification takes: the sizes for s-Trace, the taus otherwise."""
        return self.sizes if self.method == "strace" else self.taus
