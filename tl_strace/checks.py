"""Checks of option values, in one place: pure functions, no model, no registry, no forward pass.

Every entry point checks its options before any work, so one bad value gets the same one-line
:class:`~tl_strace.errors.InputError` everywhere: it names the argument, shows the value and its
type, and says what is accepted. Each checker returns the value in its canonical form (a Python
``int``/``bool``/``float``, a tuple for a sequence), so an iterable is read exactly once and a
NumPy or 0-d torch integer becomes an ``int`` that JSON and safetensors metadata accept.

This module sits at the bottom of the layers (it imports only :mod:`tl_strace.errors`), so every
layer may use it; checks against the registries of names (methods, weights, conditions) are in
:mod:`tl_strace.options`, above the modules that define them.

>>> check_int("top_k", 5, minimum=1)
5
>>> parse_bytes("1.5GiB"), parse_bytes("512MB"), parse_bytes(4096)
(1610612736, 512000000, 4096)
>>> check_int("seed", 1.5)
Traceback (most recent call last):
...
tl_strace.errors.InputError: seed must be an integer; got 1.5 (float). Pass a whole number such as 0.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from tl_strace.errors import InputError

__all__ = [
    "BYTE_UNITS",
    "check_batch_size",
    "check_bool",
    "check_choice",
    "check_float",
    "check_fractions",
    "check_int",
    "check_memory_budget",
    "check_optional_bool",
    "check_seed",
    "check_sizes",
    "check_target",
    "check_taus",
    "check_top_k",
    "describe",
    "parse_bytes",
]

BYTE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30, "gib": 1 << 30,
    "ti": 1 << 40, "tib": 1 << 40,
}
"""Units of a byte size written as text (case-insensitive): ``K``/``KB``, ``M``/``MB``, ``G``/``GB``,
``T``/``TB`` are powers of 1000; ``Ki``/``KiB`` ... ``Ti``/``TiB`` powers of 1024."""

_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts


def describe(value: Any) -> str:
    """``value`` as an error message shows it: a short repr and its type, e.g. ``'no' (str)``."""
    if isinstance(value, torch.Tensor):
        dt = str(value.dtype).replace("torch.", "")
        text = f"tensor {dt}[{','.join(str(d) for d in value.shape)}] on {value.device}"
        return text if value.device.type == "meta" or value.numel() > 8 else f"{text} {value.tolist()}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _as_int(value: Any) -> int | None:
    """``value`` as an ``int`` when it is an integer (Python, NumPy, or a one-element integer tensor), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type == "meta" or value.dtype.is_floating_point \
                or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    return None


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """An integer option as a Python ``int``; ``None`` only when ``optional``.

    Accepts ``int``, NumPy integer scalars and one-element integer tensors; refuses ``bool``, every
    float (``2.0`` too: a float here is a mistake, not a count), NaN and strings.
    """
    if value is None and optional:
        return None
    got = _as_int(value)
    if got is None:
        extra = " (or None)" if optional else ""
        example = minimum if minimum is not None and minimum > 0 else 0
        raise InputError(f"{name} must be an integer{extra}; got {describe(value)}. Pass a whole number such as "
                         f"{example}.")
    if minimum is not None and got < minimum:
        raise InputError(f"{name} must be at least {minimum}; got {got}.")
    if maximum is not None and got > maximum:
        raise InputError(f"{name} must be at most {maximum}; got {got}.")
    return got


def check_bool(name: str, value: Any) -> bool:
    """A flag as a Python ``bool``: ``True``/``False`` (or a NumPy bool) only, never a truthy ``"no"`` or ``1``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InputError(f"{name} must be True or False; got {describe(value)}.")


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``None`` (the model's default) or a flag, as :func:`check_bool`."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InputError(f"{name} must be True, False or None; got {describe(value)}.")


def _as_real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool, a string or a multi-element tensor)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type == "meta" or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        return float(value.item())
    if isinstance(value, numbers.Real):  # int, float, numpy numbers, Fraction, Decimal is not Real
        return float(value)
    return None


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                open_low: bool = False, open_high: bool = False, why: str = "") -> float:
    """A finite real number, optionally within ``[low, high]`` (``open_*`` excludes the bound)."""
    got = _as_real(value)
    if got is None or not math.isfinite(got):
        raise InputError(f"{name} must be a finite number; got {describe(value)}.")
    below = low is not None and (got <= low if open_low else got < low)
    above = high is not None and (got >= high if open_high else got > high)
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if open_low else '['}{lo}, {hi}{')' if open_high else ']'}"
        raise InputError(f"{name} must lie in {interval}{why}; got {got:g}.")
    return got


def check_choice(name: str, value: Any, choices: Iterable[str] | Mapping[str, Any]) -> str:
    """One name of a registry (a dict's keys or a tuple of names); the message lists them sorted."""
    valid = sorted(choices)
    if isinstance(value, str) and value in valid:
        return value
    shown = repr(value) if isinstance(value, str) else describe(value)
    raise InputError(f"Unknown {name} {shown}; choose one of {valid}.")


def _materialise(name: str, values: Any, example: str) -> tuple[Any, ...]:
    """Read an iterable option once (a generator cannot be read twice); refuse a bare string or scalar."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) \
            or (isinstance(values, torch.Tensor) and values.ndim == 0) \
            or (isinstance(values, np.ndarray) and values.ndim == 0):
        raise InputError(f"{name} must be a list such as {example}; got {describe(values)}.")
    return tuple(values)


def check_fractions(name: str, values: Any, *, example: str = "[1e-3, 0.01, 0.1]") -> tuple[float, ...]:
    """A non-empty, strictly increasing sequence of numbers in (0, 1] (fractions of a graph), read once."""
    items = _materialise(name, values, example)
    if not items:
        raise InputError(f"{name} must not be empty; pass None for the defaults.")
    vals = []
    for v in items:
        f = _as_real(v)
        if f is None:
            raise InputError(f"{name} must be numbers in (0, 1]; got {describe(v)} among them.")
        vals.append(f)
    bad = [s for s in vals if not 0.0 < s <= 1.0]  # NaN fails the comparison too
    if bad:
        raise InputError(f"{name} must lie in (0, 1] (a fraction of the graph's edges); got {bad}.")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise InputError(f"{name} must be strictly increasing without duplicates; got {vals}. "
                         f"Did you mean {sorted(set(vals))}?")
    return tuple(vals)


def check_sizes(sizes: Any) -> tuple[float, ...] | None:
    """s-Trace target sizes as :func:`tl_strace.search.check_sizes` takes them, read once; ``None`` stays ``None``.

    >>> check_sizes(s for s in (1e-3, 0.1))
    (0.001, 0.1)
    """
    if sizes is None:
        return None
    return check_fractions("sizes", sizes)


def check_taus(taus: Any) -> tuple[float, ...] | None:
    """Thresholds of ``method="threshold"``/``"nucleus"``: ``None`` (the defaults) or distinct numbers in [0, 1].

    An empty list is refused (it used to mean the defaults silently).
    """
    if taus is None:
        return None
    items = _materialise("taus", taus, "[0.5, 0.1, 0.01]")
    if not items:
        raise InputError("taus must not be empty; pass None for the method's default thresholds.")
    vals = []
    for t in items:
        f = _as_real(t)
        if f is None or not 0.0 <= f <= 1.0:
            raise InputError(f"taus values must be distinct numbers in [0, 1]; got {describe(t)}.")
        vals.append(f)
    if len(set(vals)) != len(vals):
        raise InputError(f"taus values must be distinct numbers in [0, 1]; got {vals}.")
    return tuple(vals)


def check_top_k(top_k: Any) -> int:
    """How many top tokens to keep: an integer ≥ 1."""
    return check_int("top_k", top_k, minimum=1)  # type: ignore[return-value]


def check_seed(seed: Any) -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in [-2**63, 2**64)."""
    return check_int("seed", seed, minimum=_SEED_MIN, maximum=_SEED_MAX)  # type: ignore[return-value]


def check_batch_size(batch_size: Any) -> int | None:
    """Masks per forward: ``None`` (from the memory budget) or an integer ≥ 1."""
    return check_int("batch_size", batch_size, minimum=1, optional=True)


_SIZE_TEXT = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_bytes(value: Any, name: str = "memory_budget") -> int:
    """A positive number of bytes: an integer, or text with a unit of :data:`BYTE_UNITS`.

    ``"2GiB"``, ``"512MB"``, ``"2.5G"`` (= 2.5e9), ``"1e9"`` and ``4096`` are accepted; a whole-number
    float (``2e9``) too. NaN, infinities, zero, negative sizes, fractional bytes and garbage are refused.
    """
    if isinstance(value, str):
        m = _SIZE_TEXT.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in BYTE_UNITS:
            raise InputError(f"{name} {value!r} is not a size; write e.g. '2GiB', '512MiB', '1.5GB' or a number of "
                             "bytes (K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti powers of 1024).")
        got = int(float(m.group(1)) * BYTE_UNITS[unit])
    else:
        as_int = _as_int(value)
        real = _as_real(value) if as_int is None else None
        if as_int is not None:
            got = as_int
        elif real is not None and math.isfinite(real) and real == int(real):
            got = int(real)
        else:
            raise InputError(f"{name} must be a number of bytes or a size such as '2GiB'; got {describe(value)}.")
    if got <= 0:
        raise InputError(f"{name} is in bytes and must be positive; got {value!r}.")
    return got


def check_memory_budget(memory_budget: Any) -> int | None:
    """``None`` (no bound on the whole call) or :func:`parse_bytes`."""
    return None if memory_budget is None else parse_bytes(memory_budget)


def check_target(target: Any) -> int | str | None:
    """The true next token before the tokenizer sees it: ``None``, text, or one integer id.

    A one-element integer tensor is one id; a longer tensor, a float (``1.5``, and ``2.0`` too), a bool
    or bytes is refused. The vocabulary range is checked against the model by
    :func:`tl_strace.model.target_token`.
    """
    if target is None or isinstance(target, str):
        return target
    if isinstance(target, torch.Tensor) and target.numel() != 1:
        raise InputError(f"target must be one token id (or text); got {describe(target)}. For a multi-token "
                         "target, give its first token, e.g. target=int(ids[0]).")
    got = _as_int(target)
    if got is None:
        raise InputError(f"target must be a token id (an integer) or text; got {describe(target)}.")
    return got
